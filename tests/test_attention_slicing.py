"""Sliced attention: ``Attention.set_attention_slice``, ``UNet2DConditionModel.set_attention_slice`` and the
pipelines' ``enable_attention_slicing`` / ``disable_attention_slicing`` give the unsliced results (and diffusers')."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffusekit
from diffusekit.models.attention import Attention
from sd_assets import build_tiny_sd, tiny_unet_kwargs

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("slice_size", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", ["self", "cross-masked", "spatial"])
def test_sliced_attention_equals_unsliced(slice_size, kind):
    torch.manual_seed(0)
    if kind == "spatial":
        attn = Attention(16, heads=4, dim_head=4, norm_num_groups=4, residual_connection=True, bias=True)
        args = (torch.randn(3, 16, 5, 6),)
    else:
        attn = Attention(16, cross_attention_dim=8 if kind != "self" else None, heads=4, dim_head=6)
        x, ctx = torch.randn(3, 7, 16), torch.randn(3, 5, 8)
        keep = torch.ones(3, 5)
        keep[1, 3:] = 0
        bias = (1 - keep)[:, None, :] * -10000.0  # (B, 1, M)
        args = (x,) if kind == "self" else (x, ctx, bias)
    expected = attn(*args)
    attn.set_attention_slice(slice_size)
    assert attn.slice_size == slice_size
    torch.testing.assert_close(attn(*args), expected, rtol=1e-6, atol=1e-6)
    attn.set_attention_slice(None)
    assert torch.equal(attn(*args), expected)


def _unets():
    torch.manual_seed(0)
    ours = diffusekit.UNet2DConditionModel(**tiny_unet_kwargs(layers_per_block=2)).eval()
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**tiny_unet_kwargs(layers_per_block=2)).eval()  # same seeded weights
    return ours, ref


INPUTS = (torch.randn(2, 4, 8, 8), 10, torch.randn(2, 6, 32))


@pytest.mark.parametrize("slice_size", ["auto", "max", 2, [1, 2, 3, 4] * 3])
def test_unet_set_attention_slice_equals_unsliced_and_diffusers(slice_size):
    ours, ref = _unets()
    with torch.no_grad():
        expected = ours(*INPUTS).sample
        ours.set_attention_slice(slice_size)
        ref.set_attention_slice(slice_size)
        layers = [m for m in ours.modules() if isinstance(m, Attention)]
        assert len(layers) == 12 and all(m.slice_size is not None for m in layers)
        got = ours(*INPUTS).sample
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got, ref(*INPUTS).sample, rtol=1e-5, atol=1e-5)
        ours.set_attention_slice(None)
        assert all(m.slice_size is None for m in layers)


def test_unet_set_attention_slice_errors_as_diffusers():
    ours, ref = _unets()
    for model in (ours, ref):
        with pytest.raises(ValueError, match="smaller or equal to 4"):
            model.set_attention_slice(5)
        with pytest.raises(ValueError, match="12"):
            model.set_attention_slice([1, 2])


def test_pipeline_enable_and_disable_attention_slicing(tmp_path):
    folder = build_tiny_sd(tmp_path / "sd")
    kwargs = dict(prompt="a cat", num_inference_steps=2, output_type="np")
    ours = diffusekit.StableDiffusionPipeline.from_pretrained(folder)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    for pipe in (ours, ref):
        pipe.set_progress_bar_config(disable=True)
    plain = ours(generator=torch.manual_seed(0), **kwargs).images
    for slice_size in ("auto", "max", 1):
        ours.enable_attention_slicing(slice_size)
        ref.enable_attention_slicing(slice_size)
        sliced = ours(generator=torch.manual_seed(0), **kwargs).images
        np.testing.assert_allclose(sliced, plain, atol=1e-6)
        assert np.abs(sliced - ref(generator=torch.manual_seed(0), **kwargs).images).max() < 1 / 255
    ours.disable_attention_slicing()
    assert all(m.slice_size is None for m in ours.unet.modules() if isinstance(m, Attention))
    np.testing.assert_array_equal(ours(generator=torch.manual_seed(0), **kwargs).images, plain)


def test_out_of_scope_attention_features_are_refused_or_no_ops():
    """Deliberate differences (UNet2DConditionModel docstring): no processor classes."""
    ours, ref = _unets()
    assert callable(ref.set_default_attn_processor)
    assert ours.set_default_attn_processor() is None  # a no-op: SDPA is the only processor
    with pytest.raises(NotImplementedError, match="set_attention_slice"):
        ours.set_attn_processor(object())
