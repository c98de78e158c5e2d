"""FreeU (``enable_freeu`` / ``disable_freeu`` on the UNet and the SD pipelines) gives diffusers' numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffusekit
from diffusekit.models.freeu import low_frequency_scale
from sd_assets import build_tiny_sd, load_both, tiny_unet_kwargs

diffusers = pytest.importorskip("diffusers")

SD15_FREEU = dict(s1=0.9, s2=0.2, b1=1.5, b2=1.6)  # diffusers' example values for SD 1.5


@pytest.mark.parametrize("size", [(8, 8), (4, 16), (5, 3), (1, 6)])
def test_low_frequency_scale_is_diffusers_fourier_filter(size):
    from diffusers.utils.torch_utils import fourier_filter

    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    for scale in (0.2, 0.0, 1.7):
        torch.testing.assert_close(low_frequency_scale(x, scale), fourier_filter(x, threshold=1, scale=scale),
                                   rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(low_frequency_scale(x, 1.0), x, rtol=1e-6, atol=1e-6)  # the transform round trip
    mean_free = low_frequency_scale(x, 0.0).mean(dim=(-2, -1))  # frequency (0, 0) is the mean: gone at scale 0
    torch.testing.assert_close(mean_free, torch.zeros_like(mean_free), rtol=0, atol=1e-6)
    half = low_frequency_scale(x.bfloat16(), 0.5)
    assert half.dtype == torch.bfloat16


def _unets(**config):
    config = tiny_unet_kwargs(layers_per_block=2, **config)
    torch.manual_seed(0)
    ours = diffusekit.UNet2DConditionModel(**config).eval()
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**config).eval()  # same seeded weights
    return ours, ref


@pytest.mark.parametrize("size", [(8, 8), (10, 6)])  # (10, 6): odd sizes (5 x 3) at the deepest up stage
@pytest.mark.parametrize("up_blocks", [("UpBlock2D", "CrossAttnUpBlock2D"), ("CrossAttnUpBlock2D", "UpBlock2D")])
def test_unet_freeu_matches_diffusers_and_switches_off(size, up_blocks):
    down = ("CrossAttnDownBlock2D", "DownBlock2D")[:: 1 if up_blocks[1] == "CrossAttnUpBlock2D" else -1]
    ours, ref = _unets(up_block_types=up_blocks, down_block_types=down)
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(2, 4, *size, generator=g), 10, torch.randn(2, 6, 32, generator=g))
    with torch.no_grad():
        plain = ours(*inputs).sample
        torch.testing.assert_close(plain, ref(*inputs).sample, rtol=1e-5, atol=1e-5)
        ours.enable_freeu(**SD15_FREEU)
        ref.enable_freeu(**SD15_FREEU)
        assert [block.b1 for block in ours.up_blocks] == [1.5, 1.5]  # diffusers' attributes, on every up block
        freeu = ours(*inputs).sample
        torch.testing.assert_close(freeu, ref(*inputs).sample, rtol=1e-5, atol=1e-5)
        assert (freeu - plain).abs().max() > 1e-2  # FreeU changed the output
        ours.disable_freeu()
        ref.disable_freeu()
        assert ours.up_blocks[0].s1 is None
        assert torch.equal(ours(*inputs).sample, plain)


def test_freeu_acts_on_up_stages_0_and_1_only():
    """Three stages: stage 2 (the shallowest up block) keeps its skips; each factor acts on its own stage."""
    ours, _ = _unets(block_out_channels=(16, 16, 32), down_block_types=("DownBlock2D",) * 3,
                     up_block_types=("UpBlock2D",) * 3)
    inputs = (torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)), 3, torch.zeros(1, 6, 32))
    with torch.no_grad():
        plain = ours(*inputs).sample
        ours.enable_freeu(s1=1.0, s2=1.0, b1=1.0, b2=1.0)  # every factor 1: the same numbers (up to the fft)
        torch.testing.assert_close(ours(*inputs).sample, plain, rtol=1e-5, atol=1e-5)
        changed = []
        for name in ("s1", "s2", "b1", "b2"):
            ours.enable_freeu(**{**dict(s1=1.0, s2=1.0, b1=1.0, b2=1.0), name: 0.0})  # 0 is applied, not "off"
            changed.append(float((ours(*inputs).sample - plain).abs().max()))
        assert min(changed) > 1e-3, changed
        ours.up_blocks[2].resolution_idx = 5  # what stage 2 would do had it the index of a FreeU stage
        assert ours.up_blocks[2]._freeu_factors() is None


def test_enable_freeu_refuses_non_numbers():
    ours, _ = _unets()
    with pytest.raises(ValueError, match="b2 must be a number.*disable_freeu"):
        ours.enable_freeu(0.9, 0.2, 1.5, None)
    with pytest.raises(ValueError, match="s1 must be a number"):
        ours.enable_freeu(True, 0.2, 1.5, 1.6)
    ours.enable_freeu(np.float32(0.9), 0.2, 1, 1.6)  # numpy scalars and ints are numbers
    assert ours.up_blocks[1].s1 == pytest.approx(0.9) and type(ours.up_blocks[1].b1) is float


def test_pipeline_enable_freeu_matches_diffusers(tmp_path):
    folder = build_tiny_sd(tmp_path / "sd", layers_per_block=2)
    ours, ref = load_both(folder)
    kwargs = dict(prompt="a cat", num_inference_steps=3, output_type="np")
    plain = ours(generator=torch.manual_seed(0), **kwargs).images
    ours.enable_freeu(**SD15_FREEU)
    ref.enable_freeu(**SD15_FREEU)
    freeu = ours(generator=torch.manual_seed(0), **kwargs).images
    np.testing.assert_allclose(freeu, ref(generator=torch.manual_seed(0), **kwargs).images, atol=1e-5)
    assert np.abs(freeu - plain).max() > 1e-3
    ours.disable_freeu()
    np.testing.assert_array_equal(ours(generator=torch.manual_seed(0), **kwargs).images, plain)


@pytest.mark.slow
def test_freeu_switched_after_optimize_recompiles(tmp_path):
    """optimize() packages key on the up blocks' FreeU factors: switching FreeU gives the eager FreeU numbers."""
    ours, _ = _unets()
    inputs = (torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)), 10, torch.randn(2, 6, 32))
    with torch.no_grad():
        plain = ours(*inputs).sample
        ours.enable_freeu(**SD15_FREEU)
        eager_freeu = ours(*inputs).sample
        ours.disable_freeu()
        ours.optimize(cache_dir=tmp_path / "cache")
        torch.testing.assert_close(ours(*inputs).sample, plain, rtol=1e-5, atol=1e-5)
        ours.enable_freeu(**SD15_FREEU)
        torch.testing.assert_close(ours(*inputs).sample, eager_freeu, rtol=1e-5, atol=1e-5)
        ours.disable_freeu()
        torch.testing.assert_close(ours(*inputs).sample, plain, rtol=1e-5, atol=1e-5)


def test_off_is_one_package_key_however_it_was_reached():
    """Compiled packages are keyed on module attributes: a UNet whose FreeU was switched on and off again (by
    ``disable_freeu`` or by a per-call setting's restore, also after a failing call) keys like one that never had it,
    so switching back to plain requests reuses the plain package."""
    from diffusekit.aot_packages import structure
    from diffusekit.models.freeu import freeu_for_call

    ours, _ = _unets()
    never = structure(ours)
    ours.enable_freeu(**SD15_FREEU)
    assert structure(ours) != never
    ours.disable_freeu()
    assert structure(ours) == never
    with pytest.raises(RuntimeError, match="mid-call"):
        with freeu_for_call(ours, [0.9, 0.2, 1.5, 1.6]):
            assert ours.up_blocks[0].b1 == 1.5
            raise RuntimeError("mid-call")
    assert structure(ours) == never and ours.up_blocks[0].b1 is None
    ours.enable_freeu(s1=1, s2=1, b1=1, b2=2)  # a pipeline's own setting comes back after a call's factors
    with freeu_for_call(ours, (0.9, 0.2, 1.5, 1.6)):
        assert ours.up_blocks[1].b2 == 1.6
    assert (ours.up_blocks[1].b2, ours.up_blocks[0].s1) == (2.0, 1.0)
    with pytest.raises(ValueError, match="freeu b1 must be a finite number"):
        with freeu_for_call(ours, (0.9, 0.2, float("inf"), 1.6)):
            pass
