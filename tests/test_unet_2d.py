"""Parity of the shared building blocks and UNet2DModel with diffusers (the oracle), fp32 within ~1e-5."""

from __future__ import annotations

import pytest
import torch

from diffusekit.models.attention import Attention
from diffusekit.models.embeddings import GaussianFourierProjection, TimestepEmbedding, timestep_embedding
from diffusekit.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

diffusers = pytest.importorskip("diffusers")

TOL = dict(rtol=1e-5, atol=1e-5)


def _copy_into(ours: torch.nn.Module, ref: torch.nn.Module) -> None:
    """Load ``ref``'s weights into ``ours`` strictly: key names must agree exactly."""
    ours.load_state_dict(ref.state_dict(), strict=True)


# ---------------------------------------------------------------------------------------------------- blocks


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(heads=4, dim_head=4, norm_num_groups=4, residual_connection=True, bias=True, rescale_output_factor=2.0),
        dict(heads=1, dim_head=16, norm_num_groups=8, residual_connection=True, bias=True),
    ],
)
def test_attention_spatial_matches_diffusers(kwargs):
    from diffusers.models.attention_processor import Attention as RefAttention

    torch.manual_seed(0)
    ref, ours = RefAttention(16, **kwargs), Attention(16, **kwargs)
    _copy_into(ours, ref)
    x = torch.randn(2, 16, 6, 5)  # non-square: catches H/W mix-ups
    torch.testing.assert_close(ours(x), ref(x), **TOL)


def test_attention_cross_and_masks_match_diffusers():
    from diffusers.models.attention_processor import Attention as RefAttention

    torch.manual_seed(0)
    ref = RefAttention(16, cross_attention_dim=12, heads=2, dim_head=8)
    ours = Attention(16, cross_attention_dim=12, heads=2, dim_head=8)
    _copy_into(ours, ref)
    tokens, context = torch.randn(2, 5, 16), torch.randn(2, 7, 12)
    torch.testing.assert_close(ours(tokens, context), ref(tokens, context), **TOL)
    bias = torch.zeros(2, 1, 7)
    bias[0, 0, 3:] = -10000.0  # diffusers' additive mask convention
    expected = ref(tokens, context, attention_mask=bias)
    torch.testing.assert_close(ours(tokens, context, bias), expected, **TOL)
    torch.testing.assert_close(ours(tokens, context, bias[:, 0] == 0), expected, **TOL)  # boolean keep-mask
    assert not torch.allclose(expected, ref(tokens, context))  # the mask did change something


def test_attention_upcast_runs_in_half():
    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8, upcast_attention=True).to(torch.bfloat16)
    x = torch.randn(1, 4, 16, dtype=torch.bfloat16)
    out = attn(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), attn.float()(x.float()), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(in_channels=16, out_channels=8, time_embedding_norm="default"),
        dict(in_channels=16, out_channels=8, time_embedding_norm="scale_shift"),
        dict(in_channels=16, down=True),
        dict(in_channels=16, up=True, output_scale_factor=2.0),
        dict(in_channels=16, out_channels=8, temb_channels=None),
    ],
)
def test_resnet_block_matches_diffusers(kwargs):
    from diffusers.models.resnet import ResnetBlock2D as RefResnet

    kwargs = {"temb_channels": 32, "groups": 4, **kwargs}
    torch.manual_seed(0)
    ref, ours = RefResnet(**kwargs), ResnetBlock2D(**kwargs)
    _copy_into(ours, ref)
    x, temb = torch.randn(2, 16, 8, 6), torch.randn(2, 32)
    if kwargs["temb_channels"] is None:
        temb = None
    torch.testing.assert_close(ours(x, temb), ref(x, temb), **TOL)


@pytest.mark.parametrize("padding", [0, 1])
def test_resampling_matches_diffusers(padding):
    from diffusers.models.downsampling import Downsample2D as RefDown
    from diffusers.models.upsampling import Upsample2D as RefUp

    torch.manual_seed(0)
    x = torch.randn(2, 8, 8, 6)
    ref, ours = RefDown(8, use_conv=True, padding=padding, name="op"), Downsample2D(8, padding=padding)
    _copy_into(ours, ref)
    torch.testing.assert_close(ours(x), ref(x), **TOL)
    ref, ours = RefUp(8, use_conv=True, out_channels=4), Upsample2D(8, out_channels=4)
    _copy_into(ours, ref)
    torch.testing.assert_close(ours(x), ref(x), **TOL)
    torch.testing.assert_close(ours(x, output_size=(15, 13)), ref(x, output_size=(15, 13)), **TOL)
    assert Downsample2D(8, use_conv=False)(x).shape == (2, 8, 4, 3)


@pytest.mark.parametrize("flip", [True, False])
@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("dim", [32, 33])
def test_timestep_embedding_matches_diffusers(flip, shift, dim):
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 3.0, 999.5, 250.0])
    torch.testing.assert_close(
        timestep_embedding(t, dim, flip, shift), get_timestep_embedding(t, dim, flip, shift), rtol=0, atol=0
    )
    torch.testing.assert_close(
        timestep_embedding(t, dim, flip, shift, scale=2.5, max_period=500),
        get_timestep_embedding(t, dim, flip, shift, scale=2.5, max_period=500),
        **TOL,
    )


@pytest.mark.parametrize("log", [True, False])
@pytest.mark.parametrize("flip", [True, False])
def test_fourier_projection_matches_diffusers(log, flip):
    from diffusers.models.embeddings import GaussianFourierProjection as RefFourier

    torch.manual_seed(0)
    ref = RefFourier(8, scale=16, log=log, flip_sin_to_cos=flip)
    ours = GaussianFourierProjection(8, scale=16, log=log, flip_sin_to_cos=flip)
    _copy_into(ours, ref)
    sigmas = torch.tensor([0.01, 0.5, 7.0])
    torch.testing.assert_close(ours(sigmas), ref(sigmas), **TOL)


def test_timestep_mlp_matches_diffusers():
    from diffusers.models.embeddings import TimestepEmbedding as RefMLP

    torch.manual_seed(0)
    ref = RefMLP(8, 32, cond_proj_dim=4, out_dim=16, post_act_fn="silu")
    ours = TimestepEmbedding(8, 32, cond_proj_dim=4, out_dim=16, post_act_fn="silu")
    _copy_into(ours, ref)
    x, cond = torch.randn(3, 8), torch.randn(3, 4)
    torch.testing.assert_close(ours(x, cond), ref(x, cond), **TOL)
