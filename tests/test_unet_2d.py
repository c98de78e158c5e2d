"""Parity of the shared building blocks and UNet2DModel with diffusers (the oracle), fp32 within ~1e-5."""

from __future__ import annotations

import pytest
import torch

from diffusekit import UNet2DModel, UNet2DOutput
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


# ---------------------------------------------------------------------------------------------------- UNet2DModel


# config.json of google/ddpm-cat-256 (also ddpm-celebahq-256, -church-256, -bedroom-256: same architecture)
DDPM_256_CONFIG = {
    "_class_name": "UNet2DModel",
    "_diffusers_version": "0.0.4",
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 128, 256, 256, 512, 512],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"],
}

# config.json of google/ddpm-cifar10-32
DDPM_CIFAR10_CONFIG = {
    **DDPM_256_CONFIG,
    "block_out_channels": [128, 256, 256, 256],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "sample_size": 32,
}

TINY = dict(
    sample_size=16,
    block_out_channels=(8, 16),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=4,
    layers_per_block=1,
    attention_head_dim=4,
)


def _ref_unet(**config):
    from diffusers import UNet2DModel as RefUNet

    torch.manual_seed(0)
    return RefUNet(**config).eval()


def _ours_from_ref(ref) -> UNet2DModel:
    """Build ours from the reference's config on the meta device and take its weights (strict: same keys)."""
    with torch.device("meta"):
        ours = UNet2DModel.from_config(ref.config)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return ours.eval()


def _inputs(batch=2, channels=3, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, size, size, generator=g)


@torch.no_grad()
def _assert_same(ours, ref, sample, timestep, **kwargs):
    expected = ref(sample, timestep, **kwargs).sample
    got = ours(sample, timestep, **kwargs).sample
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, **TOL)
    return got


def test_ddpm_cat_256_config_matches_diffusers():
    """The exact hub architecture (113M parameters), at 32 px to keep the one forward cheap."""
    from diffusers import UNet2DModel as RefUNet

    torch.manual_seed(0)
    ref = RefUNet.from_config({**DDPM_256_CONFIG, "sample_size": 32}).eval()
    ours = _ours_from_ref(ref)
    assert ours.num_parameters() == sum(p.numel() for p in ref.parameters()) > 100_000_000
    _assert_same(ours, ref, _inputs(batch=1, size=32), 999)


def test_ddpm_cifar10_config_matches_diffusers():
    from diffusers import UNet2DModel as RefUNet

    torch.manual_seed(0)
    ref = RefUNet.from_config(DDPM_CIFAR10_CONFIG).eval()
    ours = _ours_from_ref(ref)
    _assert_same(ours, ref, _inputs(batch=2, size=32), torch.tensor([3, 800]))


def test_tiny_roundtrip_through_files_both_ways(tmp_path):
    ref = _ref_unet(**TINY)
    ref.save_pretrained(tmp_path / "ref")
    ours = UNet2DModel.from_pretrained(tmp_path / "ref")
    assert list(ours.config.block_out_channels) == [8, 16]
    x = _inputs()
    _assert_same(ours, ref, x, torch.tensor([1, 500]))

    from diffusers import UNet2DModel as RefUNet

    ours.save_pretrained(tmp_path / "ours")
    back = RefUNet.from_pretrained(tmp_path / "ours").eval()
    _assert_same(ours, back, x, 7)


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(dict(time_embedding_type="fourier"), id="fourier"),
        pytest.param(dict(time_embedding_type="learned", num_train_timesteps=1000), id="learned"),
        pytest.param(dict(flip_sin_to_cos=False, freq_shift=1, downsample_padding=0), id="ddpm-sinusoid"),
        pytest.param(dict(time_embedding_dim=24), id="time_embedding_dim"),
        pytest.param(dict(center_input_sample=True), id="center_input_sample"),
        pytest.param(dict(resnet_time_scale_shift="scale_shift"), id="scale_shift"),
        pytest.param(dict(attention_head_dim=None), id="head_dim_none"),
        pytest.param(dict(attention_head_dim=8, block_out_channels=(16, 32), norm_num_groups=8), id="head_dim_8"),
        pytest.param(dict(attention_head_dim=2, attn_norm_num_groups=2), id="attn_norm_groups"),
        pytest.param(dict(add_attention=False), id="no_mid_attention"),
        pytest.param(dict(mid_block_type=None), id="no_mid_block"),
        pytest.param(dict(downsample_type="resnet", upsample_type="resnet"), id="resnet_resampling"),
        pytest.param(dict(act_fn="mish", norm_eps=1e-6, mid_block_scale_factor=1.414), id="mish_scaled"),
        pytest.param(
            dict(
                block_out_channels=(8, 8, 16),
                down_block_types=("AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"),
                layers_per_block=2,
            ),
            id="three_stages",
        ),
    ],
)
def test_tiny_options_match_diffusers(options):
    config = {**TINY, **options}
    ref = _ref_unet(**config)
    ours = _ours_from_ref(ref)
    fourier = config.get("time_embedding_type") == "fourier"
    timestep = torch.tensor([0.02, 3.5]) if fourier else torch.tensor([4, 900])
    _assert_same(ours, ref, _inputs(), timestep)


@pytest.mark.parametrize(
    "options,labels",
    [
        (dict(num_class_embeds=5), torch.tensor([1, 4])),
        (dict(class_embed_type="timestep"), torch.tensor([2, 700])),
        (dict(class_embed_type="identity"), torch.randn(2, 32)),
    ],
    ids=["table", "timestep", "identity"],
)
def test_class_conditioning_matches_diffusers(options, labels):
    ref = _ref_unet(**TINY, **options)
    ours = _ours_from_ref(ref)
    out = _assert_same(ours, ref, _inputs(), 10, class_labels=labels)
    other = ours(_inputs(), 10, class_labels=labels.flip(0)).sample
    assert not torch.allclose(out, other)  # the labels reach the output
    with pytest.raises(ValueError, match="class_labels"):
        ours(_inputs(), 10)


def test_class_labels_without_class_embedding_are_refused():
    ours = _ours_from_ref(_ref_unet(**TINY))
    with pytest.raises(ValueError, match="no class embedding"):
        ours(_inputs(), 10, class_labels=torch.tensor([0, 1]))


@torch.no_grad()
def test_timestep_forms_and_return_dict():
    ref = _ref_unet(**TINY)
    ours = _ours_from_ref(ref)
    x = _inputs()
    full = _assert_same(ours, ref, x, torch.tensor([25, 25]))
    for form in (25, torch.tensor(25), torch.tensor([25]), torch.tensor(25.0), 25.0):
        torch.testing.assert_close(ours(x, form).sample, full, **TOL)
    out = ours(x, 25, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1
    torch.testing.assert_close(out[0], full, **TOL)
    result = ours(x, 25)
    assert isinstance(result, UNet2DOutput) and result[0] is result.sample
    different = ours(x, torch.tensor([25, 600])).sample  # per-sample timesteps are used per sample
    torch.testing.assert_close(different[0], full[0], **TOL)
    assert not torch.allclose(different[1], full[1])
    with pytest.raises(ValueError, match="timesteps for a batch"):
        ours(x, torch.tensor([1, 2, 3]))


def test_fractional_python_timestep_is_not_truncated():
    """Deliberate difference: diffusers turns a python float into a long tensor (0.5 -> 0); we keep it."""
    ours = _ours_from_ref(_ref_unet(**TINY))
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(x, 10.5).sample, ours(x, torch.tensor([10.5, 10.5])).sample, **TOL)
        assert not torch.allclose(ours(x, 10.5).sample, ours(x, 10).sample)


def _legacy_names(state_dict):
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    out = {}
    for key, value in state_dict.items():
        for new, old in names.items():
            if f".{new}." in key and ".attentions." in key:
                key = key.replace(f".{new}.", f".{old}.")
        out[key] = value
    return out


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_legacy_attention_keys_load(tmp_path, fmt):
    """Old google/ddpm-* checkpoints name attention weights query/key/value/proj_attn."""
    from diffusers import UNet2DModel as RefUNet
    from safetensors.torch import save_file

    ref = _ref_unet(**TINY)
    ref.save_config(tmp_path)
    legacy = _legacy_names({k: v.clone() for k, v in ref.state_dict().items()})
    assert "mid_block.attentions.0.query.weight" in legacy and "up_blocks.0.attentions.1.proj_attn.bias" in legacy
    if fmt == "bin":
        torch.save(legacy, tmp_path / "diffusion_pytorch_model.bin")
    else:
        save_file(legacy, tmp_path / "diffusion_pytorch_model.safetensors")
    ours = UNet2DModel.from_pretrained(tmp_path)
    x = _inputs()
    _assert_same(ours, ref, x, 42)
    # and diffusers itself reads the same legacy file the same way
    _assert_same(ours, RefUNet.from_pretrained(tmp_path).eval(), x, 42)


def test_unknown_block_type_names_the_config_key():
    with pytest.raises(ValueError, match=r"'UpBlock3D' in up_block_types\[1\]"):
        UNet2DModel(**{**TINY, "up_block_types": ("AttnUpBlock2D", "UpBlock3D")})
    with pytest.raises(ValueError, match=r"down_block_types\[0\]"):
        UNet2DModel(**{**TINY, "down_block_types": ("Nope", "AttnDownBlock2D")})
    with pytest.raises(ValueError, match="mid_block_type"):
        UNet2DModel(**{**TINY, "mid_block_type": "UNetMidBlockXL"})
    with pytest.raises(ValueError, match="time_embedding_type"):
        UNet2DModel(**{**TINY, "time_embedding_type": "rotary"})
    with pytest.raises(ValueError, match="same length"):
        UNet2DModel(**{**TINY, "block_out_channels": (8, 16, 32)})
