"""Parity of UNet2DConditionModel (SD 1.x / 2.x UNet) and its transformer with diffusers (the oracle).

Tiny random-weight models are built with diffusers, their weights perturbed (so norms and biases are not at their
trivial init values and a swapped or mis-wired parameter shows), saved with ``save_pretrained`` and loaded with
ours through the strict loader (and the other way round); forwards are compared in fp32 within 1e-5.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from diffusekit import UNet2DConditionModel, UNet2DConditionOutput
from diffusekit.models.transformer_2d import Transformer2DModel

diffusers = pytest.importorskip("diffusers")

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on shared cores: one intra-op thread is 10x faster than two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# SD 1.x-like: conv projections, one head count everywhere, two stages (one cross-attention, one plain)
SD1_TINY = dict(
    sample_size=16,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)
# SD 2.x-like: linear projections, per-stage head counts (64-wide heads in the real model), upcast attention
SD2_TINY = dict(
    SD1_TINY,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=24,
    attention_head_dim=[2, 4],
    use_linear_projection=True,
    upcast_attention=True,
    norm_num_groups=8,
)


def _perturb(model: torch.nn.Module, seed: int = 123) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def _ref(**config):
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**config).eval()
    _perturb(ref)
    return ref


def _pair(tmp_path, **config):
    """(ours, ref): ref built by diffusers, saved by diffusers, loaded by ours from disk."""
    ref = _ref(**config)
    ref.save_pretrained(tmp_path / "ref")
    ours = UNet2DConditionModel.from_pretrained(tmp_path / "ref")
    return ours, ref


def _inputs(config, batch=2, size=8, tokens=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    ctx_dim = config.get("cross_attention_dim", 1280)
    ctx_dim = ctx_dim[0] if isinstance(ctx_dim, (list, tuple)) else ctx_dim
    sample = torch.randn(batch, config.get("in_channels", 4), size, size, generator=g)
    return sample, torch.randn(batch, tokens, ctx_dim, generator=g)


@torch.no_grad()
def _assert_same(ours, ref, *args, **kwargs):
    expected = ref(*args, **kwargs).sample
    got = ours(*args, **kwargs).sample
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, **TOL)
    return got


# ---------------------------------------------------------------------------------------------------- transformer


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(use_linear_projection=False),
        dict(use_linear_projection=True, num_layers=2),
        dict(only_cross_attention=True),
        dict(cross_attention_dim=None),  # no attn2 / norm2
    ],
)
def test_transformer_2d_matches_diffusers(kwargs):
    from diffusers.models.transformers.transformer_2d import Transformer2DModel as RefTransformer

    kwargs = {"cross_attention_dim": 12, "norm_num_groups": 4, **kwargs}
    torch.manual_seed(0)
    ref = RefTransformer(2, 8, in_channels=16, **kwargs).eval()
    _perturb(ref)
    ours = Transformer2DModel(2, 8, in_channels=16, **kwargs).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 16, 5, 3)  # non-square: catches H/W mix-ups
    ctx = torch.randn(2, 6, 12) if kwargs["cross_attention_dim"] else None
    with torch.no_grad():
        expected = ref(x, encoder_hidden_states=ctx).sample
        torch.testing.assert_close(ours(x, ctx), expected, **TOL)
        quiet = 1e-3 * x  # variance ~1e-6: the GroupNorm epsilon (1e-6 here, not 1e-5) shows
        torch.testing.assert_close(ours(quiet, ctx), ref(quiet, encoder_hidden_states=ctx).sample, **TOL)
        for model in (ours, ref):  # quiet tokens: the LayerNorm epsilon shows
            model.proj_in.weight.mul_(1e-3)
            model.proj_in.bias.mul_(1e-3)
        torch.testing.assert_close(ours(x, ctx), ref(x, encoder_hidden_states=ctx).sample, **TOL)
        if ctx is not None:  # a keep-mask over the text tokens reaches the cross-attention
            keep = torch.ones(2, 6)
            keep[0, 2:] = 0
            masked = ref(x, encoder_hidden_states=ctx, encoder_attention_mask=keep).sample
            torch.testing.assert_close(ours(x, ctx, encoder_attention_mask=keep), masked, **TOL)
            assert not torch.allclose(masked, expected)


# ---------------------------------------------------------------------------------------------------- UNet parity


def test_sd1_like_loads_from_diffusers_and_matches(tmp_path):
    ours, ref = _pair(tmp_path, **SD1_TINY)
    assert set(ours.state_dict()) == set(ref.state_dict())
    sample, ctx = _inputs(SD1_TINY)
    out = _assert_same(ours, ref, sample, 10, ctx)
    assert out.shape == (2, 4, 8, 8)
    # outputs: the dataclass, and the tuple with return_dict=False
    with torch.no_grad():
        result = ours(sample, 10, ctx)
        assert isinstance(result, UNet2DConditionOutput)
        (as_tuple,) = ours(sample, 10, ctx, return_dict=False)
    torch.testing.assert_close(as_tuple, result.sample, rtol=0, atol=0)
    torch.testing.assert_close(result[0], result.sample, rtol=0, atol=0)


def test_ours_saved_loads_in_diffusers(tmp_path):
    ours, ref = _pair(tmp_path, **SD2_TINY)
    ours.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["_class_name"] == "UNet2DConditionModel"
    assert saved["attention_head_dim"] == [2, 4] and saved["use_linear_projection"] is True
    back = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "ours").eval()
    for key in ("attention_head_dim", "use_linear_projection", "upcast_attention", "cross_attention_dim"):
        assert back.config[key] == ref.config[key], key
    sample, ctx = _inputs(SD2_TINY)
    _assert_same(ours, back, sample, 500, ctx)


def test_config_keys_and_defaults_match_diffusers():
    import inspect

    theirs = inspect.signature(diffusers.UNet2DConditionModel.__init__).parameters
    mine = inspect.signature(UNet2DConditionModel.__init__).parameters
    assert list(mine) == list(theirs)
    for name, param in theirs.items():
        if name != "self":
            assert mine[name].default == param.default, name


CONFIGS = {
    "deep_transformers_cross_only": dict(
        SD2_TINY, transformer_layers_per_block=[1, 2], only_cross_attention=[True, False]
    ),
    "asymmetric_transformer_layers": dict(
        SD2_TINY, transformer_layers_per_block=[[1], [2]], reverse_transformer_layers_per_block=[[2, 1], [1, 1]]
    ),
    "three_stages_mixed": dict(
        SD1_TINY,
        block_out_channels=(32, 32, 64),
        layers_per_block=[1, 2, 1],
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=[4, 8, 8],
        transformer_layers_per_block=2,
    ),
    "resnet_and_embedding_options": dict(
        SD1_TINY,
        resnet_time_scale_shift="scale_shift",
        time_embedding_act_fn="silu",
        timestep_post_act="mish",
        time_embedding_dim=48,
        act_fn="gelu",
        norm_eps=1e-4,
        flip_sin_to_cos=False,
        freq_shift=1,
        center_input_sample=True,
        downsample_padding=0,
        mid_block_scale_factor=0.7,
        conv_in_kernel=1,
        conv_out_kernel=5,
        in_channels=3,
        out_channels=6,
    ),
    "fourier_time_plain_mid": dict(SD1_TINY, time_embedding_type="fourier", mid_block_type="UNetMidBlock2D"),
    "no_cross_attention_no_mid": dict(
        SD1_TINY, down_block_types=("UNetResDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type=None,
    ),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_configs_match_diffusers(tmp_path, name):
    config = CONFIGS[name]
    ours, ref = _pair(tmp_path, **config)
    sample, ctx = _inputs(config)
    _assert_same(ours, ref, sample, 321, ctx)


CLASS_EMBEDDINGS = {
    "table": (dict(num_class_embeds=5), lambda: torch.tensor([1, 4])),
    "timestep": (dict(class_embed_type="timestep"), lambda: torch.tensor([3.0, 700.0])),
    "identity": (dict(class_embed_type="identity"), lambda: torch.randn(2, 128)),
    "projection": (
        dict(class_embed_type="projection", projection_class_embeddings_input_dim=6),
        lambda: torch.randn(2, 6),
    ),
    "simple_projection_concat": (
        dict(
            class_embed_type="simple_projection", projection_class_embeddings_input_dim=6, class_embeddings_concat=True
        ),
        lambda: torch.randn(2, 6),
    ),
}


@pytest.mark.parametrize("name", sorted(CLASS_EMBEDDINGS))
def test_class_embeddings_match_diffusers(tmp_path, name):
    extra, labels = CLASS_EMBEDDINGS[name]
    ours, ref = _pair(tmp_path, **SD1_TINY, **extra)
    sample, ctx = _inputs(SD1_TINY)
    torch.manual_seed(5)
    class_labels = labels()
    with_labels = _assert_same(ours, ref, sample, 10, ctx, class_labels=class_labels)
    with torch.no_grad():  # the labels matter
        other = ours(sample, 10, ctx, class_labels=class_labels.flip(0)).sample
    assert not torch.allclose(with_labels, other.flip(0) if name == "identity" else other)
    with pytest.raises(ValueError, match="class_labels"):
        ours(sample, 10, ctx)


def test_lcm_time_cond_proj_matches_diffusers(tmp_path):
    config = dict(SD1_TINY, time_cond_proj_dim=16)
    ours, ref = _pair(tmp_path, **config)
    sample, ctx = _inputs(config)
    w_embedding = torch.randn(2, 16)
    guided = _assert_same(ours, ref, sample, 999, ctx, timestep_cond=w_embedding)
    with torch.no_grad():
        assert not torch.allclose(guided, ours(sample, 999, ctx).sample)


def test_timestep_forms_match_diffusers(tmp_path):
    ours, ref = _pair(tmp_path, **SD1_TINY)
    sample, ctx = _inputs(SD1_TINY)
    expected = _assert_same(ours, ref, sample, 250, ctx)
    with torch.no_grad():  # every spelling of one timestep gives diffusers' answer for it
        for t in (250.0, torch.tensor(250), torch.tensor([250.0]), torch.tensor([250, 250])):
            torch.testing.assert_close(ours(sample, t, ctx).sample, expected, **TOL)
    per_sample = _assert_same(ours, ref, sample, torch.tensor([1.5, 900.0]), ctx)
    assert not torch.allclose(per_sample, expected)
    with pytest.raises(ValueError, match="timestep"):
        ours(sample, torch.tensor([1, 2, 3]), ctx)


def test_odd_sizes_and_text_mask_match_diffusers(tmp_path):
    ours, ref = _pair(tmp_path, **SD2_TINY)
    g = torch.Generator().manual_seed(3)
    sample, ctx = torch.randn(2, 4, 7, 5, generator=g), torch.randn(2, 9, 24, generator=g)
    unmasked = _assert_same(ours, ref, sample, 40, ctx)
    assert unmasked.shape == (2, 4, 7, 5)  # odd: the upsampler follows the skip tensors' sizes
    keep = torch.ones(2, 9, dtype=torch.long)
    keep[1, 4:] = 0
    masked = _assert_same(ours, ref, sample, 40, ctx, encoder_attention_mask=keep)
    torch.testing.assert_close(masked[0], unmasked[0], **TOL)  # nothing masked in sample 0
    assert not torch.allclose(masked[1], unmasked[1])


def test_controlnet_and_adapter_residuals_match_diffusers(tmp_path):
    config = dict(SD1_TINY, layers_per_block=2)
    ours, ref = _pair(tmp_path, **config)
    sample, ctx = _inputs(config)
    g = torch.Generator().manual_seed(9)
    # skips: conv_in, 2 layers + downsampler of stage 0, 2 layers of stage 1
    shapes = [(32, 8, 8)] * 3 + [(32, 4, 4)] + [(64, 4, 4)] * 2
    down = [torch.randn(2, *s, generator=g) for s in shapes]
    mid = torch.randn(2, 64, 4, 4, generator=g)
    controlled = _assert_same(
        ours, ref, sample, 10, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid
    )
    with torch.no_grad():
        plain = ours(sample, 10, ctx).sample
    assert not torch.allclose(plain, controlled)
    with pytest.raises(ValueError, match="skip connections"):
        ours(sample, 10, ctx, down_block_additional_residuals=down[:-1], mid_block_additional_residual=mid)

    # T2I-Adapter: one feature per down block (after its last layer), then the mid block if shapes fit
    adapter = [torch.randn(2, 32, 8, 8, generator=g), torch.randn(2, 64, 4, 4, generator=g)]
    with torch.no_grad():
        expected = ref(sample, 10, ctx, down_intrablock_additional_residuals=list(adapter)).sample
        got = ours(sample, 10, ctx, down_intrablock_additional_residuals=adapter).sample
    torch.testing.assert_close(got, expected, **TOL)
    assert len(adapter) == 2  # ours does not consume the caller's list
    assert not torch.allclose(got, plain)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_loading(tmp_path, dtype):
    ref = _ref(**SD2_TINY)
    ref.save_pretrained(tmp_path / "ref")
    ours = UNet2DConditionModel.from_pretrained(tmp_path / "ref", torch_dtype=dtype)
    assert {p.dtype for p in ours.parameters()} == {dtype}
    assert ours.dtype == dtype
    ref_half = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "ref", torch_dtype=dtype).eval()
    torch.testing.assert_close(ours.state_dict(), ref_half.state_dict(), rtol=0, atol=0)
    if dtype is torch.bfloat16:  # CPU has bf16 kernels for everything here; compare against fp32 loosely
        sample, ctx = _inputs(SD2_TINY)
        with torch.no_grad():
            out = ours(sample.to(dtype), 10, ctx.to(dtype)).sample
            full = ref(sample, 10, ctx).sample
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), full, rtol=0.1, atol=0.1)


# ---------------------------------------------------------------------------------------------------- errors


def test_wrong_text_width_is_a_clear_error(tmp_path):
    ours, _ = _pair(tmp_path, **SD1_TINY)
    sample, _ = _inputs(SD1_TINY)
    with pytest.raises(ValueError, match=r"cross_attention_dim=32") as err:
        ours(sample, 10, torch.randn(2, 7, 768))
    assert "(2, 7, 768)" in str(err.value)
    with pytest.raises(ValueError, match="encoder_hidden_states is required"):
        ours(sample, 10, None)


@pytest.mark.parametrize(
    "key, value, error",
    [
        ("addition_embed_type", "text_image", NotImplementedError),
        ("encoder_hid_dim", 16, NotImplementedError),
        ("encoder_hid_dim_type", "text_proj", NotImplementedError),
        ("dual_cross_attention", True, NotImplementedError),
        ("attention_type", "gated", NotImplementedError),
        ("num_attention_heads", 8, ValueError),
        ("class_embed_type", "bogus", ValueError),
        ("time_embedding_type", "learned", ValueError),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn", ValueError),
    ],
)
def test_unsupported_options_are_refused_by_name(key, value, error):
    with pytest.raises(error, match=key):
        UNet2DConditionModel(**{**SD1_TINY, key: value})


def test_bad_shapes_in_config_are_refused():
    with pytest.raises(ValueError, match="attention_head_dim"):
        UNet2DConditionModel(**{**SD1_TINY, "attention_head_dim": [8, 8, 8]})
    with pytest.raises(ValueError, match="reverse_transformer_layers_per_block"):
        UNet2DConditionModel(**{**SD1_TINY, "transformer_layers_per_block": [[1], [2]]})
    with pytest.raises(ValueError, match="attention heads"):  # more heads than channels (6 heads: fine, as diffusers)
        UNet2DConditionModel(**{**SD1_TINY, "attention_head_dim": 1000})
    with pytest.raises(ValueError, match="down_block_types\\[1\\]"):
        UNet2DConditionModel(**{**SD1_TINY, "down_block_types": ("CrossAttnDownBlock2D", "NoSuchBlock2D")})


# ---------------------------------------------------------------------------------------------------- full size

# config.json of stable-diffusion-v1-5/stable-diffusion-v1-5 (unet/); SD 1.x UNets all share it
SD15_CONFIG = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}


# SD 2.1 (768-v): 64-wide heads given as per-stage head counts, linear projections, upcast attention, 1024-wide text
SD21_CONFIG = dict(
    SD15_CONFIG, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True,
    upcast_attention=True, sample_size=96,
)
# SD x4-upscaler-like: class-embedded noise level, cross-attention-only transformers in three stages, 7 inputs
UPSCALER_CONFIG = dict(
    SD21_CONFIG, attention_head_dim=8, block_out_channels=[256, 512, 512, 1024], in_channels=7, num_class_embeds=1000,
    only_cross_attention=[True, True, True, False], upcast_attention=False,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
)
FULL_SIZE = {
    "sd15": SD15_CONFIG,
    "sd21": SD21_CONFIG,
    "x4_upscaler": UPSCALER_CONFIG,
    "lcm_sd15": dict(SD15_CONFIG, time_cond_proj_dim=256),
}


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_full_size_configs_have_diffusers_keys_and_shapes(name):
    """Real architectures built on the meta device (no memory, no time): every checkpoint key and shape agrees."""
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**FULL_SIZE[name])
        ours = UNet2DConditionModel(**FULL_SIZE[name])
    shapes = lambda model: {k: tuple(v.shape) for k, v in model.state_dict().items()}  # noqa: E731
    assert shapes(ours) == shapes(ref)


@pytest.mark.slow
def test_sd15_full_config_matches_diffusers(tmp_path):
    """The real SD 1.5 architecture (860M parameters, random weights): strict load and one 32x32-latent forward."""
    start = time.perf_counter()
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**SD15_CONFIG).eval()
    ref.save_pretrained(tmp_path / "sd15")
    ours = UNet2DConditionModel.from_pretrained(tmp_path / "sd15")
    assert 855e6 < ours.num_parameters() < 865e6
    g = torch.Generator().manual_seed(0)
    sample, ctx = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 77, 768, generator=g)
    with torch.no_grad():
        expected = ref(sample, 500, ctx).sample
        got = ours(sample, 500, ctx).sample
    torch.testing.assert_close(got, expected, **TOL)
    diff = (got - expected).abs().max().item()
    print(f"SD 1.5 UNet parity: max |diff| {diff:.2e}, {time.perf_counter() - start:.1f}s")
