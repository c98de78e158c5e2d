"""The fused CPU attention kernel (``diffusekit.cpu_attention``): numbers against SDPA, routing, compile, fallback.

The kernel needs Linux x86-64 with AVX-512 BF16 and a C++ compiler; where it cannot run, the tests that need it
skip with the reason, and the fallback test still checks that attention stays SDPA with one warning.
"""

from __future__ import annotations

import math
import textwrap

import pytest
import torch
import torch.nn.functional as F

from conftest import run_json_child
from diffusekit import cpu_attention
from diffusekit.models.attention import Attention


@pytest.fixture
def needs_kernel():
    """Skips where the kernel cannot run (built on first use, once per machine: not at collection); fails where the
    machine can build it and the build fails (a broken source must not pass as skipped tests)."""
    reason = cpu_attention.unavailable_reason()
    if reason is not None and reason.startswith("building or loading it failed"):
        pytest.fail(f"the CPU kernels did not build on a machine that can build them: {reason}")
    if reason is not None:
        pytest.skip(f"fused CPU attention unavailable: {reason}")


def _heads(batch, tokens, heads, dim, offset=0.0):
    # (B, N, heads * d) split into heads, as the attention layers do: (B, heads, N, d), non-contiguous
    return (torch.randn(batch, tokens, heads, dim) + offset).transpose(1, 2)


def _errors(out, ref):
    return float((out - ref).norm() / ref.norm()), float((out - ref).abs().max())


def _assert_same_uint8(out, ref):
    """A kernel's uint8 output against the reference's: equal except one step on rounding borders (under 1e-3)."""
    diff = (out.int() - ref.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


@pytest.mark.usefixtures("needs_kernel")
@pytest.mark.parametrize("batch,heads,nq,nk,dim", [
    (2, 2, 70, 70, 40),     # the UNet's first-stage head size; tokens not a multiple of the blocks
    (1, 3, 33, 77, 40),     # cross-attention over 77 text tokens
    (1, 1, 5, 3, 7),        # odd head size, fewer keys than a tile
    (2, 1, 40, 300, 80),    # more than one block of keys, second-stage head size
    (1, 2, 9, 20, 160),     # the widest SD head size (10 channel vectors)
    (1, 1, 37, 45, 24),     # head sizes of 16 n + 8: a last half vector after 1, 3, 4 and 5 full ones
    (1, 2, 19, 70, 56),
    (1, 1, 21, 33, 72),
    (1, 1, 17, 40, 88),
])
def test_kernel_matches_sdpa_within_bf16_error(batch, heads, nq, nk, dim):
    q = _heads(batch, nq, heads, dim)
    k, v = _heads(batch, nk, heads, dim, offset=0.5), _heads(batch, nk, heads, dim)
    ref = F.scaled_dot_product_attention(q, k, v)
    out = cpu_attention.attention(q, k, v)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert out.transpose(1, 2).is_contiguous()  # laid out (B, N, heads, d) for the output projection
    rel, worst = _errors(out, ref)
    assert rel < 1e-2 and worst < 3e-2, (rel, worst)
    # contiguous inputs, and a contiguous copy of the last dimension, give the same result
    assert torch.equal(cpu_attention.attention(q.contiguous(), k.contiguous(), v.contiguous()), out)


def _int8_products_reference(q, k, v, block=256):
    """The int8 products' arithmetic in float64 (what ``products="int8"`` computes, up to the float32 rounding of
    the scores and the exponential): k and v less their means over the keys, one step per channel (largest magnitude
    / 127); q times k's steps, one step per query row; p = round(255 * 2^(s - the row's maximum in its block of 256
    keys)), each block weighted by 2^(its maximum - the row's maximum); v's mean added back."""
    q, k, v = q.double(), k.double(), v.double()

    def steps(x, dim):
        step = x.abs().amax(dim, keepdim=True) / 127
        return torch.where(step > 0, step, torch.ones_like(step))

    k = k - k.mean(2, keepdim=True)
    k_step = steps(k, 2)
    k_int = torch.round(k / k_step).clamp(-127, 127)
    q = q * k_step
    q_step = steps(q, -1)
    q_int = torch.round(q / q_step).clamp(-127, 127)
    v_mean = v.mean(2, keepdim=True)
    v_step = steps(v - v_mean, 2)
    v_int = torch.round((v - v_mean) / v_step).clamp(-127, 127)
    s = (q_int @ k_int.transpose(-1, -2)) * q_step * (q.shape[-1] ** -0.5 / math.log(2))  # base 2
    top = s.amax(-1, keepdim=True)
    num, den = 0, 0
    for n in range(0, s.shape[-1], block):
        part = s[..., n:n + block]
        local = part.amax(-1, keepdim=True)
        p = torch.round(255 * torch.exp2(part - local))
        weight = torch.exp2(local - top)
        num = num + weight * (p @ v_int[:, :, n:n + block])
        den = den + weight * p.sum(-1, keepdim=True)
    return num / den * v_step + v_mean


@pytest.mark.usefixtures("needs_kernel")
@pytest.mark.parametrize("batch,heads,nq,nk,dim", [
    (2, 2, 70, 600, 40),    # three blocks of keys, the last one partly padding; padded query rows
    (1, 3, 33, 77, 40),     # cross-attention over 77 text tokens
    (1, 1, 5, 3, 7),        # odd head size (padded channel quads), fewer keys than a tile
    (2, 1, 40, 300, 80),
    (1, 2, 9, 20, 160),
    (1, 1, 37, 45, 24),
    (1, 2, 19, 70, 56),
])
def test_int8_products_compute_their_emulation_and_stay_near_sdpa(batch, heads, nq, nk, dim):
    """``products="int8"``: the kernel's numbers are the float64 emulation of its int8 arithmetic (a layout or
    offset mistake moves them by far more), within a few percent of SDPA, and the uint8 route agrees with it."""
    from diffusekit.quantization.modules import _ops

    q = _heads(batch, nq, heads, dim) * 2  # scores of std ~2
    k, v = _heads(batch, nk, heads, dim, offset=0.5), _heads(batch, nk, heads, dim, offset=0.3)
    out = cpu_attention.attention(q, k, v, products="int8")
    emulated = _int8_products_reference(q, k, v)
    assert float((out - emulated).norm() / emulated.norm()) < 2e-3
    rel, _ = _errors(out, F.scaled_dot_product_attention(q, k, v))
    assert rel < 5e-2, rel
    assert torch.equal(cpu_attention.attention(q.contiguous(), k.contiguous(), v.contiguous(), products="int8"), out)
    ref = _ops().quantize_per_tensor(out.transpose(1, 2).contiguous(), 0.01, 100, 0, 255, torch.uint8)
    _assert_same_uint8(cpu_attention.attention_quantize(q, k, v, 0.01, 100, products="int8"), ref)


@pytest.mark.usefixtures("needs_kernel")
@pytest.mark.parametrize("batch,heads,nq,nk,dim,sharp", [
    (2, 2, 70, 300, 40, 1.0),   # the first-stage head size; more than one block of keys, padded keys and queries
    (1, 3, 33, 77, 40, 1.0),    # cross-attention over 77 text tokens
    (1, 1, 5, 3, 7, 1.0),       # odd head size, fewer keys than a tile
    (2, 1, 40, 520, 80, 4.0),   # peaked rows (scores of std ~16) across three blocks: the online softmax's rescaling
    (1, 2, 9, 20, 160, 1.0),
    (1, 1, 37, 45, 24, 1.0),
])
def test_float32_products_give_sdpa_numbers(batch, heads, nq, nk, dim, sharp):
    """``products="float32"`` (the exact path's attention): float32 FMAs and an exponential accurate to float32, so
    the result is SDPA's to float32 rounding: nearer float64 than torch's own float32 SDPA is, within 1e-5 of it."""
    q = _heads(batch, nq, heads, dim) * sharp
    k, v = _heads(batch, nk, heads, dim, offset=0.5), _heads(batch, nk, heads, dim)
    ref64 = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    sdpa = F.scaled_dot_product_attention(q, k, v)
    out = cpu_attention.attention(q, k, v, products="float32")
    assert out.shape == sdpa.shape and out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(out, sdpa, rtol=1e-5, atol=1e-5)
    rel, _ = _errors(out.double(), ref64)
    rel_sdpa, _ = _errors(sdpa.double(), ref64)
    assert rel < max(2 * rel_sdpa, 1e-6), (rel, rel_sdpa)
    assert torch.equal(cpu_attention.attention(q.contiguous(), k.contiguous(), v.contiguous(), products="float32"),
                       out)
    with pytest.raises(ValueError, match="products must be one of"):
        cpu_attention.attention(q, k, v, products="fp32")


@pytest.mark.usefixtures("needs_kernel")
def test_exact_attention_routes_long_self_attention_and_optimize_chooses_it(monkeypatch):
    from diffusekit import UNet2DConditionModel
    from diffusekit.models.attention import EXACT_KERNEL_MAX_HEAD_DIM, EXACT_KERNEL_MIN_SCORES

    layer = Attention(32, heads=2, dim_head=16).eval()
    side = math.isqrt(EXACT_KERNEL_MIN_SCORES)  # self-attention over side tokens: side² scores per head
    assert side * side == EXACT_KERNEL_MIN_SCORES
    short, long = torch.randn(2, side - 1, 32), torch.randn(2, side, 32)
    with torch.no_grad():
        sdpa_short, sdpa_long = layer(short), layer(long)
        layer.cpu_exact_attention = True
        calls = []
        real = cpu_attention.attention
        monkeypatch.setattr(cpu_attention, "attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
        assert torch.equal(layer(short), sdpa_short)  # fewer scores: SDPA, where it is as fast
        assert calls == []
        torch.testing.assert_close(layer(long), sdpa_long, rtol=1e-5, atol=1e-6)
        assert calls == [{"products": "float32"}]
        wide = Attention(EXACT_KERNEL_MAX_HEAD_DIM + 8, heads=1, dim_head=EXACT_KERNEL_MAX_HEAD_DIM + 8).eval()
        wide.cpu_exact_attention = True  # a head wider than the kernel's limit (the VAE's 512): SDPA
        wide(torch.randn(1, side, EXACT_KERNEL_MAX_HEAD_DIM + 8))
        assert len(calls) == 1
    unet = UNet2DConditionModel(sample_size=8, layers_per_block=1, block_out_channels=(32, 64),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=8).eval()
    layers = [m for m in unet.modules() if isinstance(m, Attention)]
    layers[0].cpu_exact_attention = False  # an explicit choice stays
    unet.optimize(use_cache=False)  # chooses the layers' attention now; compiles at the first call (not made here)
    assert layers[0].cpu_exact_attention is False and all(m.cpu_exact_attention is True for m in layers[1:])
    assert all(m.cpu_fused_attention is None for m in layers)  # the bf16 kernel stays opt-in
    unet.disable_cpu_fused_attention()
    assert all(m.cpu_exact_attention is False for m in layers)


@pytest.mark.usefixtures("needs_kernel")
def test_kernel_follows_peaked_attention_and_refuses_bad_input():
    q, k, v = _heads(1, 64, 2, 16), _heads(1, 64, 2, 16), _heads(1, 64, 2, 16)
    ref = F.scaled_dot_product_attention(q * 6, k * 6, v)  # scores of std ~9: nearly one-hot rows
    rel, _ = _errors(cpu_attention.attention(q * 6, k * 6, v), ref)
    assert rel < 2e-2, rel
    with pytest.raises(RuntimeError, match="do not match"):
        cpu_attention.attention(q, k[:, :, :, :8], v)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.diffusekit.cpu_attention(q.double(), k.double(), v.double(), 0.25)


@pytest.mark.usefixtures("needs_kernel")
def test_attention_layer_routes_float32_cpu_calls_without_mask():
    layer = Attention(32, heads=2, dim_head=16).eval()
    x = torch.randn(2, 50, 32)
    mask = torch.ones(2, 50, dtype=torch.bool)
    mask[:, -5:] = False
    with torch.no_grad():
        sdpa, sdpa_masked = layer(x), layer(x, attention_mask=mask)
        layer.cpu_fused_attention = True
        fused, fused_masked = layer(x), layer(x, attention_mask=mask)
    assert 0 < _errors(fused, sdpa)[0] < 1e-2  # the kernel ran (bf16 products), within its error
    assert torch.equal(fused_masked, sdpa_masked)  # a mask goes to SDPA
    x.requires_grad_(True)
    out = layer(x)  # autograd: SDPA, gradients flow
    out.sum().backward()
    assert x.grad is not None and torch.allclose(out.detach(), sdpa, atol=1e-6)


@pytest.mark.usefixtures("needs_kernel")
def test_model_switch_and_torch_compile_trace_the_op():
    from diffusekit import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=8).eval()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor(10), torch.randn(2, 7, 32)
    layers = [m for m in unet.modules() if isinstance(m, Attention)]
    assert layers and all(m.cpu_fused_attention is None for m in layers)
    with torch.no_grad():
        sdpa = unet(x, t, ctx).sample
        assert unet.enable_cpu_fused_attention() is True
        assert all(m.cpu_fused_attention is True for m in layers)
        eager = unet(x, t, ctx).sample
        compiled = torch.compile(unet, backend="aot_eager", fullgraph=True)(x, t, ctx).sample
    assert 0 < _errors(eager, sdpa)[0] < 1e-2
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    unet.disable_cpu_fused_attention()
    assert all(m.cpu_fused_attention is False for m in layers)


@pytest.mark.usefixtures("needs_kernel")
@pytest.mark.parametrize("shape,groups,offset", [
    ((2, 320, 9, 11), 32, 0.0),    # SD UNet widths: 10 channels per group
    ((1, 128, 37, 21), 32, 100.0),  # the VAE's last stage (4 channels per group); a mean far from 0
    ((3, 24, 5, 7), 8, -3.0),      # channels not a multiple of 16
    ((2, 40, 1, 1), 4, 0.5),       # one pixel
    ((2, 6, 9), 3, 1.0),           # 3-d input
])
def test_group_norm_kernel_matches_torch_in_both_layouts(shape, groups, offset):
    """``diffusekit::group_norm`` against float64 ``F.group_norm``: within float32 rounding in the contiguous and the
    channels-last layout (where inductor's own GroupNorm is slow), output in the input's layout, with and without
    the affine parameters."""
    from diffusekit import cpu_group_norm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g) * 2 + offset
    weight, bias = torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)
    layouts = [x] + ([x.contiguous(memory_format=torch.channels_last)] if x.dim() == 4 else [])
    for affine in ((weight, bias), (None, None)):
        ref = F.group_norm(x.double(), groups, *(None if a is None else a.double() for a in affine), 1e-5)
        for xi in layouts:
            out = cpu_group_norm.group_norm(xi, groups, *affine, 1e-5)
            assert out.dtype == torch.float32 and out.is_contiguous(memory_format=cpu_group_norm.output_format(xi))
            assert (out.double() - ref).abs().max() <= 2e-6 * ref.abs().max()
    with pytest.raises(RuntimeError, match="do not split into 7 groups"):
        cpu_group_norm.group_norm(x, 7, None, None, 1e-5)


@pytest.mark.usefixtures("needs_kernel")
def test_group_norm_layers_route_to_the_kernel_and_compile(monkeypatch):
    """Every GroupNorm of the models is ``models.normalization.GroupNorm``: ``cpu_kernel`` (set by optimize() for int8
    models, as the attention switch) routes float32 calls outside autograd to the kernel, torch.compile traces the op
    on a channels-last input, and grad mode keeps torch's (the kernel has no backward)."""
    from diffusekit import cpu_group_norm
    from diffusekit.models.normalization import GroupNorm
    from diffusekit.optimize import _default_cpu_kernels

    calls = []
    kernel = cpu_group_norm.group_norm
    monkeypatch.setattr(cpu_group_norm, "group_norm", lambda *args: calls.append(1) or kernel(*args))

    model = torch.nn.Sequential(torch.nn.Conv2d(8, 32, 3, padding=1), GroupNorm(8, 32), torch.nn.SiLU()).eval()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 12, 12).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model(x)
        assert model[1].cpu_kernel is None
        _default_cpu_kernels(model)
        assert model[1].cpu_kernel is True
        assert not calls
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
        assert len(calls) == 1
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
        torch.testing.assert_close(compiled, ref, rtol=1e-5, atol=1e-5)
        assert len(calls) == 2
    y = model(x.requires_grad_())  # grad mode: torch's GroupNorm, differentiable
    y.sum().backward()
    assert x.grad is not None and len(calls) == 2


@pytest.mark.usefixtures("needs_kernel")
@pytest.mark.parametrize("shape,groups,shift,silu", [
    ((2, 320, 9, 11), 32, True, True),    # a UNet ResNet's norm2: time embedding added, SiLU
    ((1, 128, 37, 21), 32, False, True),  # the VAE's last stage: no time embedding
    ((3, 24, 5, 7), 8, True, False),      # channels not a multiple of 16; no activation
])
def test_group_norm_quantize_matches_norm_silu_and_quantize(shape, groups, shift, silu):
    """``diffusekit::group_norm_quantize``: the uint8 of ``quantize(silu(group_norm(x + shift)))`` computed in float64,
    in both layouts (output in the input's layout), off by one step only on rounding borders."""
    from diffusekit import cpu_group_norm
    from diffusekit.quantization.modules import _ops

    g = torch.Generator().manual_seed(2)
    x = torch.randn(*shape, generator=g) * 3 + 1
    weight, bias = torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)
    add = torch.randn(shape[0], shape[1], 1, 1, generator=g) * 2 if shift else None
    ref = F.group_norm(x.double() + (0 if add is None else add.double()), groups, weight.double(), bias.double(), 1e-5)
    ref = (F.silu(ref) if silu else ref).float()
    ref = _ops().quantize_per_tensor(ref, 0.01, 40, 0, 255, torch.uint8)
    for xi in (x, x.contiguous(memory_format=torch.channels_last)):
        out = cpu_group_norm.group_norm_quantize(xi, groups, weight, bias, 1e-5, add, silu, 0.01, 40)
        assert out.dtype == torch.uint8 and out.is_contiguous(memory_format=cpu_group_norm.output_format(xi))
        _assert_same_uint8(out, ref)
    assert (ref > 40).any() and (ref < 40).any() and (ref == 255).float().mean() < 0.05
    with pytest.raises(RuntimeError, match="one value per"):
        cpu_group_norm.group_norm_quantize(x, groups, weight, bias, 1e-5, torch.ones(5), silu, 0.01, 40)


def _int8_resnet(channels=32):
    from diffusekit.models.resnet import ResnetBlock2D
    from diffusekit.quantization.modules import Int8Conv2d

    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=channels, out_channels=channels, temb_channels=16, groups=8).eval()
    for name in ("conv1", "conv2"):
        conv = Int8Conv2d.from_float(getattr(block, name))
        conv.set_input_qparams(0.02, 14)
        setattr(block, name, conv)
    return block


@pytest.mark.usefixtures("needs_kernel")
def test_int8_resnet_norms_quantize_for_their_convolutions_in_one_pass(monkeypatch):
    """With the GroupNorm kernel on, a ResNet block's ``norm -> SiLU -> int8 conv`` (norm2 with the time embedding
    added) runs the norm, SiLU and the conv's input quantization as one kernel pass with the numbers of the separate
    layers (also without an activation: a spatial transformer's input projection); float convs, dropout while training and grad mode keep the separate layers; inductor lowers the uint8
    hand-over to oneDNN int8 convolutions."""
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    from diffusekit import cpu_group_norm
    from diffusekit.models.normalization import norm_act_conv
    from diffusekit.models.resnet import ResnetBlock2D

    calls = []
    kernel = cpu_group_norm.group_norm_quantize
    monkeypatch.setattr(cpu_group_norm, "group_norm_quantize", lambda *args: calls.append(1) or kernel(*args))
    block = _int8_resnet()
    x, temb = torch.randn(2, 32, 12, 12), torch.randn(2, 16)
    step = 0.02 * block.conv2._dq_weight().abs().sum((1, 2, 3)).max()  # the most one uint8 step moves an output
    with torch.no_grad():
        ref = block(x, temb)
        block.norm1.cpu_kernel = block.norm2.cpu_kernel = True
        out = block(x, temb)
        assert len(calls) == 2
        assert (out - ref).abs().max() <= 2 * step and (out - ref).norm() / ref.norm() < 1e-3
        torch._dynamo.reset()
        with inductor_config.patch(freezing=True):
            compiled, (code, *_) = run_and_get_code(torch.compile(block), x, temb)
        assert "diffusekit.group_norm_quantize" in code and code.count("qconv") >= 2
        assert "_convolution_pointwise" not in code  # no float convolution left
        torch.testing.assert_close(compiled, out, rtol=1e-5, atol=1e-5)
        assert len(calls) == 4  # traced once per norm

        # no activation (a spatial transformer's norm -> int8 proj_in)
        fused = norm_act_conv(block.norm1, None, block.conv1, x)
        assert len(calls) == 5
        block.norm1.cpu_kernel = False
        torch.testing.assert_close(fused, norm_act_conv(block.norm1, None, block.conv1, x), rtol=0, atol=float(step))
        block.norm1.cpu_kernel = True

        plain = ResnetBlock2D(in_channels=32, out_channels=32, temb_channels=16, groups=8).eval()
        plain.norm1.cpu_kernel = plain.norm2.cpu_kernel = True
        plain(x, temb)  # float convs: the float GroupNorm kernel, then SiLU and the conv
        block.train()
        block.dropout.p = 0.5
        block(x, temb)  # dropout between SiLU and conv2: norm2 stays separate, norm1 still fused
        assert len(calls) == 6
    block.eval()
    block(x.requires_grad_(), temb)  # grad mode: the separate layers
    assert len(calls) == 6


@pytest.mark.usefixtures("needs_kernel")
def test_attention_before_an_int8_output_projection_is_written_as_its_uint8_input():
    """With an int8 ``to_out.0``, the kernel writes the attention quantized as that layer's uint8 input
    (``diffusekit::cpu_attention_quantize``): the uint8 of the float kernel's output, off by one step only on rounding
    borders; the layer's output matches the float route; inductor hands the uint8 tensor to a oneDNN int8 matmul."""
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    from diffusekit.quantization.modules import Int8Linear, _ops

    g = torch.Generator().manual_seed(3)
    q, k, v = (_heads(2, 77, 4, 24) * 2 for _ in range(3))
    ref = _ops().quantize_per_tensor(cpu_attention.attention(q, k, v).transpose(1, 2).contiguous(), 0.01, 100, 0,
                                     255, torch.uint8)
    out = cpu_attention.attention_quantize(q, k, v, 0.01, 100)
    assert out.shape == (2, 77, 4, 24) and out.dtype == torch.uint8
    _assert_same_uint8(out, ref)
    assert (ref != 100).float().mean() > 0.5

    torch.manual_seed(0)
    layer = Attention(query_dim=96, heads=4, dim_head=24).eval()
    layer.to_out[0] = Int8Linear.from_float(layer.to_out[0])
    layer.to_out[0].set_input_qparams(0.004, 128)
    layer.cpu_fused_attention = True
    x = torch.randn(2, 50, 96, generator=g)
    step = 0.004 * layer.to_out[0]._dq_weight().abs().sum(1).max()
    with torch.no_grad():
        with_int8_products = layer(x)  # the default on this route
        layer.cpu_int8_products = False
        fused = layer(x)
        int8_out = layer.to_out[0]
        layer.to_out[0] = torch.nn.Sequential(int8_out)  # no forward_uint8: the float (bf16) kernel, then the layer
        separate = layer(x)
        layer.to_out[0] = int8_out
        assert (fused - separate).abs().max() <= step and (fused - separate).norm() / separate.norm() < 1e-3
        # int8 products: a different result, as near the float route as their error allows
        change = float((with_int8_products - separate).norm() / separate.norm())
        assert 1e-4 < change < 3e-2, change
        torch._dynamo.reset()
        with inductor_config.patch(freezing=True):
            compiled, (code, *_) = run_and_get_code(torch.compile(layer), x)
    assert "diffusekit.cpu_attention_quantize" in code and "qlinear_pointwise" in code
    torch.testing.assert_close(compiled, fused, rtol=1e-5, atol=1e-5)


def _geglu_reference(x, w, w_scale, bias, x_qparams, out_qparams):
    """The int8 GEGLU projection in float64: dequantize, both halves, a * gelu(g), quantize (round half to even)."""
    (xs, xzp), (os_, ozp) = x_qparams, out_qparams
    y = (x.double() - xzp) @ w.double().T * (xs * w_scale.double()) + (0 if bias is None else bias.double())
    a, g = y.chunk(2, dim=-1)
    h = (a * F.gelu(g)).float()
    return torch.clamp(torch.round(h * (1.0 / os_)) + ozp, 0, 255).to(torch.uint8)


@pytest.mark.usefixtures("needs_kernel")
@pytest.mark.parametrize("lead,k,n,with_bias", [
    ((8192 // 64,), 320, 1280, True),  # SD 1.5's first-stage shape (fewer tokens)
    ((2, 37), 64, 48, True),           # rows not a multiple of the 6-row tile; 48 outputs: a 16-wide last block
    ((7,), 8, 16, False),              # tiny, no bias
    ((3, 101), 128, 528, True),        # several column tasks (256 wide) and a ragged last one
])
def test_int8_geglu_kernel_matches_the_float64_reference(lead, k, n, with_bias):
    """``diffusekit::int8_geglu`` (u8 x s8 products, GEGLU, uint8 output) against the same computation in float64:
    the same uint8 almost everywhere, off by one step only where a value lies on a rounding border; gates spread
    far into the negative side, where gelu's small values need the erfc form."""
    from diffusekit import cpu_int8_geglu

    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (*lead, k), dtype=torch.uint8, generator=g)
    w = torch.randint(-127, 128, (2 * n, k), dtype=torch.int8, generator=g)
    w_scale = torch.rand(2 * n, generator=g) * 4e-3 + 1e-4
    bias = torch.randn(2 * n, generator=g) * 0.5 if with_bias else None
    x_qparams, out_qparams = (0.02, 121), (0.01, 30)
    packed, colsum = cpu_int8_geglu.pack(w)
    out = torch.ops.diffusekit.int8_geglu(x, packed, colsum, w_scale, bias, *x_qparams, *out_qparams)
    ref = _geglu_reference(x, w, w_scale, bias, x_qparams, out_qparams)
    assert out.shape == (*lead, n) and out.dtype == torch.uint8
    _assert_same_uint8(out, ref)
    assert 0.05 < (ref == out_qparams[1]).logical_not().float().mean() and (ref < out_qparams[1]).any()  # not all 0
    with pytest.raises(RuntimeError, match="multiple of 4"):
        torch.ops.diffusekit.int8_geglu(x[..., :-2], packed, colsum, w_scale, bias, *x_qparams, *out_qparams)
    with pytest.raises(RuntimeError, match="packed int8"):
        torch.ops.diffusekit.int8_geglu(x, w, colsum, w_scale, bias, *x_qparams, *out_qparams)


def _int8_feed_forward(dim=64, seed=0):
    from diffusekit.models.transformer_2d import FeedForward
    from diffusekit.quantization.modules import Int8Linear

    torch.manual_seed(seed)
    ff = FeedForward(dim).eval()
    with torch.no_grad():
        ff.net[0].proj.bias.normal_(0, 0.3)
    ff.net[0].proj = Int8Linear.from_float(ff.net[0].proj)
    ff.net[0].proj.set_input_qparams(0.03, 128)
    ff.net[2] = Int8Linear.from_float(ff.net[2])
    ff.net[2].set_input_qparams(0.004, 60)
    return ff


@pytest.mark.usefixtures("needs_kernel")
def test_int8_feed_forward_routes_to_the_geglu_kernel_and_keeps_its_copy_current(monkeypatch):
    """``FeedForward.cpu_kernel`` (set by optimize() for int8 models) runs an int8 feed-forward's first layer and GEGLU
    through the kernel, with the numbers of the QDQ layers; the packed copy follows ``set_weight`` and loads, stays
    out of the state dict, and goes with the switch; float feed-forwards and grad mode keep the layers."""
    from diffusekit import cpu_int8_geglu
    from diffusekit.models.transformer_2d import FeedForward
    from diffusekit.optimize import _default_cpu_kernels

    calls = []
    kernel = cpu_int8_geglu.feed_forward
    monkeypatch.setattr(cpu_int8_geglu, "feed_forward", lambda *args: calls.append(1) or kernel(*args))
    ff = _int8_feed_forward()
    x = torch.randn(2, 50, 64)
    step = 0.004 * ff.net[2]._dq_weight().abs().sum(1).max()  # the most one uint8 step of the hidden moves an output
    with torch.no_grad():
        ref = ff(x)
        assert ff.cpu_kernel is None and ff.net[0].proj.geglu_weight is None
        _default_cpu_kernels(ff)
        assert ff.cpu_kernel is True and ff.net[0].proj.geglu_weight is not None
        assert not any("geglu" in key for key in ff.state_dict())
        out = ff(x)
        assert len(calls) == 1
        assert (out - ref).abs().max() <= step and (out - ref).norm() / ref.norm() < 1e-3
        compiled = torch.compile(ff, backend="aot_eager", fullgraph=True)(x)
        torch.testing.assert_close(compiled, out, rtol=0, atol=0)
        assert len(calls) == 2

        other = _int8_feed_forward(seed=1)
        ff.net[0].proj.set_weight(other.net[0].proj._dq_weight())  # a new weight: packed again
        torch.testing.assert_close(ff(x), ff.net[2](ff.net[0](x)), rtol=0, atol=float(step))
        ff.load_state_dict(other.state_dict())  # a load: packed again
        torch.testing.assert_close(ff(x), other(x), rtol=0, atol=float(step))
        assert len(calls) == 4
        ff.cpu_kernel = False
        assert ff.net[0].proj.geglu_weight is None
        ff(x)
        assert len(calls) == 4

        plain = FeedForward(64).eval()
        plain.cpu_kernel = True  # float layers: nothing to pack, the layers run
        plain(x)
        assert len(calls) == 4
    ff.cpu_kernel = True
    ff(x.requires_grad_())  # grad mode: the QDQ layers (the kernel has no backward)
    assert len(calls) == 4


@pytest.mark.usefixtures("needs_kernel")
def test_int8_feed_forward_compiles_to_the_kernel_and_a_oneDNN_int8_matmul_on_its_output():
    """Under inductor with freezing (what optimize() runs for int8 models), the kernel's uint8 output goes straight
    into the second layer's oneDNN int8 matmul: no float linear and no dequantized [tokens, 4 dim] tensor."""
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    ff = _int8_feed_forward()
    ff.cpu_kernel = True
    x = torch.randn(2, 50, 64)
    torch._dynamo.reset()
    with torch.no_grad(), inductor_config.patch(freezing=True):
        out, (code, *_) = run_and_get_code(torch.compile(ff), x)
        eager = ff(x)
    assert "diffusekit.int8_geglu" in code and "qlinear_pointwise" in code
    assert "addmm" not in code and "mkl_linear" not in code
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


_FALLBACK = textwrap.dedent("""
    import json, os, warnings
    import torch
    from diffusekit import cpu_attention
    from diffusekit.models.attention import Attention
    from diffusekit.modeling import ModelMixin
    from diffusekit.optimize import _default_cpu_kernels

    class Model(ModelMixin):
        def __init__(self):
            super().__init__()
            self.attn = Attention(16, heads=2, dim_head=8)

        def forward(self, x):
            return self.attn(x)

    model = Model().eval()
    x = torch.randn(1, 12, 16)
    with torch.no_grad():
        ref = model(x)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            enabled = model.enable_cpu_fused_attention()
            _default_cpu_kernels(model)  # what optimize() does for an int8 model: no second warning
            out = model(x)
            choice = model.attn.cpu_fused_attention
            model.attn.cpu_fused_attention = True  # set by hand without a kernel: still SDPA, no error
            forced = model(x)
    print(json.dumps({"enabled": enabled, "reason": cpu_attention.unavailable_reason(), "choice": choice,
                      "same": torch.equal(out, ref) and torch.equal(forced, ref),
                      "warnings": [str(w.message) for w in caught],
                      "built": [str(p) for p in __import__("pathlib").Path(os.environ["DIFFUSEKIT_CACHE_DIR"]).rglob("*.so")]}))
""")


def test_a_failed_build_falls_back_to_sdpa_with_one_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSEKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails every build
    got = run_json_child(_FALLBACK)
    assert got["enabled"] is False and got["choice"] is None and got["same"] is True, got
    assert len(got["warnings"]) == 1 and "stays torch's scaled_dot_product_attention" in got["warnings"][0], got
    assert got["reason"] in got["warnings"][0] and got["built"] == []
    if cpu_attention.available():  # this machine can build it: the failure was the compiler's
        assert "failed" in got["reason"], got


_AOTI = textwrap.dedent("""
    import json, sys, warnings
    import torch
    from torch import nn
    from diffusekit.models.attention import Attention
    from diffusekit.optimize import compiled_call, optimize_module
    from diffusekit.quantization import quantize_model

    torch.manual_seed(0)
    model = nn.Sequential(Attention(32, heads=2, dim_head=16), nn.Linear(32, 8)).eval()
    x = torch.randn(2, 70, 32)
    quantize_model(model, [x * 1.2, x])
    with torch.no_grad():
        sdpa = model(x)
        optimize_module(model, cache_dir=sys.argv[1])  # int8: turns the fused kernel on
        fast = model(x)
        stats = dict(compiled_call(model).stats)
        model._compiled_call_impl = None
        fused_eager = model(x)
    print(json.dumps({"choice": model[0].cpu_fused_attention, "rel_sdpa": float((fast - sdpa).norm() / sdpa.norm()),
                      "rel_eager": float((fast - fused_eager).norm() / sdpa.norm()), "out": fast.flatten().tolist(),
                      "builds": stats["aoti_builds"], "loads": stats["aoti_loads"]}))
""")


@pytest.mark.slow
@pytest.mark.usefixtures("needs_kernel")
def test_aoti_package_calls_the_op_and_a_fresh_process_loads_it(tmp_path):
    cold = run_json_child(_AOTI, str(tmp_path / "cache"))
    assert cold["choice"] is True and cold["builds"] == 1 and cold["rel_eager"] < 1e-5, cold
    assert 0 < cold["rel_sdpa"] < 2e-2, cold  # int8 layers + the kernel vs int8 layers + SDPA
    entries = list((tmp_path / "cache").rglob("model.json"))  # the custom op's calls, for the proxy executor
    assert len(entries) == 1
    warm = run_json_child(_AOTI, str(tmp_path / "cache"))
    assert warm["builds"] == 0 and warm["loads"] == 1 and warm["out"] == cold["out"], warm
