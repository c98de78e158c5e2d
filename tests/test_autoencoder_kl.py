"""AutoencoderKL parity with diffusers (the oracle): encode, posterior, seeded sampling, decode, slicing, tiling."""

from __future__ import annotations

import pytest
import torch

from diffusekit import AutoencoderKL
from diffusekit.models.autoencoder_kl import AutoencoderKLOutput, DecoderOutput, DiagonalGaussianDistribution

diffusers = pytest.importorskip("diffusers")

TOL = dict(rtol=1e-5, atol=1e-5)

TINY = dict(
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    norm_num_groups=4,
    latent_channels=4,
    layers_per_block=1,
    sample_size=16,
)


def _ref_vae(**config):
    from diffusers import AutoencoderKL as RefVAE

    torch.manual_seed(0)
    return RefVAE(**config).eval()


def _ours_from_ref(ref) -> AutoencoderKL:
    with torch.device("meta"):
        ours = AutoencoderKL.from_config(ref.config)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return ours.eval()


def _images(batch=2, height=16, width=16, seed=1):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)


def _latents(batch=2, height=8, width=8, seed=2):
    return torch.randn(batch, 4, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(ours, ref): the reference saved by diffusers and loaded from disk by us."""
    ref = _ref_vae(**TINY)
    folder = tmp_path_factory.mktemp("vae")
    ref.save_pretrained(folder)
    return AutoencoderKL.from_pretrained(folder), ref


@torch.no_grad()
def test_posterior_matches_diffusers(pair):
    ours, ref = pair
    x = _images(height=16, width=12)
    got, expected = ours.encode(x), ref.encode(x)
    assert isinstance(got, AutoencoderKLOutput)
    post, ref_post = got.latent_dist, expected.latent_dist
    assert isinstance(post, DiagonalGaussianDistribution) and post.mean.shape == (2, 4, 8, 6)
    for name in ("mean", "logvar", "std", "var"):
        torch.testing.assert_close(getattr(post, name), getattr(ref_post, name), **TOL)
    torch.testing.assert_close(post.mode(), ref_post.mode(), **TOL)
    torch.testing.assert_close(post.kl(), ref_post.kl(), rtol=1e-5, atol=1e-4)
    other = ours.encode(x.flip(0)).latent_dist
    torch.testing.assert_close(post.kl(other), ref_post.kl(ref.encode(x.flip(0)).latent_dist), rtol=1e-5, atol=1e-4)
    z = torch.randn_like(post.mean)
    torch.testing.assert_close(post.nll(z), ref_post.nll(z), rtol=1e-5, atol=1e-4)
    assert ours.encode(x, return_dict=False)[0].mean.shape == post.mean.shape


@torch.no_grad()
def test_seeded_sample_matches_diffusers(pair):
    ours, ref = pair
    x = _images()
    post, ref_post = ours.encode(x).latent_dist, ref.encode(x).latent_dist
    sample = post.sample(generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(sample, ref_post.sample(generator=torch.Generator().manual_seed(7)), **TOL)
    assert not torch.allclose(sample, post.mean)  # the noise is really there
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    ref_gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    torch.testing.assert_close(post.sample(generator=gens), ref_post.sample(generator=ref_gens), **TOL)


@torch.no_grad()
def test_decode_and_forward_match_diffusers(pair):
    ours, ref = pair
    z = _latents(height=8, width=6)
    out = ours.decode(z)
    assert isinstance(out, DecoderOutput) and out.sample.shape == (2, 3, 16, 12)
    torch.testing.assert_close(out.sample, ref.decode(z).sample, **TOL)
    torch.testing.assert_close(ours.decode(z, return_dict=False)[0], out.sample, **TOL)
    x = _images()
    torch.testing.assert_close(ours(x).sample, ref(x).sample, **TOL)
    got = ours(x, sample_posterior=True, generator=torch.Generator().manual_seed(5)).sample
    expected = ref(x, sample_posterior=True, generator=torch.Generator().manual_seed(5)).sample
    torch.testing.assert_close(got, expected, **TOL)
    assert ours(x, return_dict=False)[0].shape == x.shape


def test_ours_saved_loads_in_diffusers(pair, tmp_path):
    from diffusers import AutoencoderKL as RefVAE

    ours, _ = pair
    ours.save_pretrained(tmp_path)
    back = RefVAE.from_pretrained(tmp_path).eval()
    assert back.config.scaling_factor == ours.config.scaling_factor
    with torch.no_grad():
        torch.testing.assert_close(back.decode(_latents()).sample, ours.decode(_latents()).sample, **TOL)


@torch.no_grad()
def test_slicing_runs_items_alone_with_same_result(pair):
    ours, ref = pair
    x, z = _images(batch=3), _latents(batch=3)
    plain_enc, plain_dec = ours.encode(x).latent_dist.mean, ours.decode(z).sample
    ours.enable_slicing()
    ref.enable_slicing()
    seen = []
    hook = ours.decoder.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    try:
        torch.testing.assert_close(ours.encode(x).latent_dist.mean, plain_enc, **TOL)
        torch.testing.assert_close(ours.decode(z).sample, plain_dec, **TOL)
        torch.testing.assert_close(ours.decode(z).sample, ref.decode(z).sample, **TOL)
    finally:
        hook.remove()
        ours.disable_slicing()
        ref.disable_slicing()
    assert seen == [1, 1, 1, 1, 1, 1]  # the decoder saw one item at a time


@pytest.mark.parametrize("size", [(40, 36), (20, 44)])
@torch.no_grad()
def test_tiling_matches_diffusers(pair, size):
    """Small tiles (16 px / 8 latents) so that tiling triggers on small inputs; seams are blended as diffusers."""
    ours, ref = pair
    height, width = size
    x, z = _images(height=height, width=width), _latents(height=height // 2, width=width // 2)
    plain_enc, plain_dec = ours.encode(x).latent_dist.mean, ours.decode(z).sample
    for model in (ours, ref):
        model.enable_tiling()
        model.tile_sample_min_size, model.tile_latent_min_size = 16, 8
    try:
        enc, ref_enc = ours.encode(x).latent_dist, ref.encode(x).latent_dist
        torch.testing.assert_close(enc.mean, ref_enc.mean, **TOL)
        torch.testing.assert_close(enc.logvar, ref_enc.logvar, **TOL)
        dec = ours.decode(z).sample
        torch.testing.assert_close(dec, ref.decode(z).sample, **TOL)
        assert enc.mean.shape == plain_enc.shape and dec.shape == plain_dec.shape
        assert not torch.allclose(enc.mean, plain_enc, atol=1e-3)  # tiling really happened
        assert not torch.allclose(dec, plain_dec, atol=1e-3)
        torch.testing.assert_close(ours.tiled_decode(z).sample, dec, **TOL)
        ours.enable_slicing()
        ref.enable_slicing()
        torch.testing.assert_close(ours.decode(z).sample, ref.decode(z).sample, **TOL)  # sliced and tiled
    finally:
        for model in (ours, ref):
            model.disable_tiling()
            model.disable_slicing()
            model.tile_sample_min_size, model.tile_latent_min_size = 16, 8


@torch.no_grad()
def test_tiling_not_triggered_within_one_tile(pair):
    ours, _ = pair
    z = _latents(height=8, width=8)
    plain = ours.decode(z).sample
    ours.enable_tiling()
    try:
        torch.testing.assert_close(ours.decode(z).sample, plain, rtol=0, atol=0)
    finally:
        ours.disable_tiling()


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(dict(use_quant_conv=False, use_post_quant_conv=False), id="no_quant_convs"),
        pytest.param(dict(mid_block_add_attention=False), id="no_mid_attention"),
        pytest.param(dict(layers_per_block=2, act_fn="mish"), id="two_layers_mish"),
        pytest.param(
            dict(
                block_out_channels=(8, 8, 16, 16),
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                latent_channels=2,
                sample_size=[32, 32],
                scaling_factor=0.13025,
                shift_factor=0.1,
                force_upcast=False,
            ),
            id="sd_layout",
        ),
    ],
)
@torch.no_grad()
def test_config_options_match_diffusers(options):
    config = {**TINY, **options}
    ref = _ref_vae(**config)
    ours = _ours_from_ref(ref)
    x = _images(height=32, width=32)
    torch.testing.assert_close(ours.encode(x).latent_dist.mean, ref.encode(x).latent_dist.mean, **TOL)
    z = ours.encode(x).latent_dist.mode()
    torch.testing.assert_close(ours.decode(z).sample, ref.decode(z).sample, **TOL)
    for key, value in options.items():
        assert ours.config[key] == value


def test_legacy_attention_keys_load(tmp_path):
    from safetensors.torch import save_file

    ref = _ref_vae(**TINY)
    ref.save_config(tmp_path)
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in ref.state_dict().items():
        for new, old in names.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        legacy[key] = value.clone()
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in legacy
    save_file(legacy, tmp_path / "diffusion_pytorch_model.safetensors")
    ours = AutoencoderKL.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours.decode(_latents()).sample, ref.decode(_latents()).sample, **TOL)


def test_half_precision_load(pair, tmp_path):
    ours, _ = pair
    ours.save_pretrained(tmp_path)
    half = AutoencoderKL.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    with torch.no_grad():
        out = half.decode(_latents().to(torch.bfloat16)).sample
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), ours.decode(_latents()).sample, rtol=0.1, atol=0.1)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match=r"'UpBlock9D' in up_block_types\[0\]"):
        AutoencoderKL(**{**TINY, "up_block_types": ("UpBlock9D", "UpDecoderBlock2D")})
    with pytest.raises(ValueError, match="same length"):
        AutoencoderKL(**{**TINY, "block_out_channels": (8,)})
