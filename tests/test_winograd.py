"""Winograd F(2x2, 3x3) convolutions, one matrix product over the unfolded input on the smallest images, and the
upsamplers' convolution computed before the upsampling (``diffusekit.models.winograd``): the direct convolution's
numbers, on the layers and calls their rules pick, switched on by ``optimize()`` for float CPU UNets only."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import diffusekit
from diffusekit.models import resnet, winograd
from sd_assets import tiny_unet_kwargs, tiny_vae_kwargs


def _upsampled_conv2d(x, weight, b):
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, b, padding=1)


#: each algorithm and the torch computation it stands for
ALGORITHMS = {"conv2d": lambda x, weight, b: F.conv2d(x, weight, b, padding=1),
              "gemm_conv2d": lambda x, weight, b: F.conv2d(x, weight, b, padding=1),
              "upsample_conv2d": _upsampled_conv2d}


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
@pytest.mark.parametrize("shape", [(2, 8, 5, 8, 8), (1, 3, 4, 7, 5), (2, 6, 6, 1, 1), (1, 4, 4, 2, 3),
                                   (3, 5, 7, 13, 6)])  # (N, C_in, C_out, H, W): odd sizes, one pixel
@pytest.mark.parametrize("bias", [True, False])
def test_each_algorithm_is_its_convolution(algorithm, shape, bias):
    n, c, o, h, w = shape
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(n, c, h, w, generator=g, dtype=torch.float64), torch.randn(o, c, 3, 3, generator=g,
                                                                                       dtype=torch.float64)
    b = torch.randn(o, generator=g, dtype=torch.float64) if bias else None
    fast, expected = getattr(winograd, algorithm), ALGORITHMS[algorithm](x, weight, b)
    torch.testing.assert_close(fast(x, weight, b), expected, rtol=1e-12, atol=1e-12)
    channels_last = fast(x.to(memory_format=torch.channels_last), weight, b)
    torch.testing.assert_close(channels_last, expected, rtol=1e-12, atol=1e-12)


def test_float32_rounding_is_the_direct_convolutions():
    """Against float64, each algorithm's float32 error stays at the direct convolution's level (Winograd's transform
    coefficients are 0, ±1, ±1/2; the upsampler's form adds pairs of weights)."""
    g = torch.Generator().manual_seed(1)
    x, weight = torch.randn(2, 256, 16, 16, generator=g), torch.randn(256, 256, 3, 3, generator=g) / 48
    exact = F.conv2d(x.double(), weight.double(), padding=1)

    def error(y):
        return float((y.double() - exact).abs().max() / exact.abs().max())

    direct, fast = error(F.conv2d(x, weight, padding=1)), error(winograd.conv2d(x, weight))
    assert fast < 2e-6 and fast < 3 * direct, (fast, direct)
    product = error(winograd.gemm_conv2d(x, weight))  # the direct convolution's products and sums
    assert product < 2e-6 and product < 3 * direct, (product, direct)
    # the upsampler's form sums pairs of weights before its products: rounding at the direct convolution's level too
    low = x[:, :, ::2, ::2]
    exact = F.conv2d(F.interpolate(low.double(), scale_factor=2.0, mode="nearest"), weight.double(), padding=1)
    direct = error(F.conv2d(F.interpolate(low, scale_factor=2.0, mode="nearest"), weight, padding=1))
    fused = error(winograd.upsample_conv2d(low, weight))
    assert fused < 2e-6 and fused < 3 * direct, (fused, direct)


def test_large_calls_are_computed_in_chunks_of_tile_rows(monkeypatch):
    g = torch.Generator().manual_seed(2)
    x, weight, b = torch.randn(2, 4, 11, 6, generator=g), torch.randn(3, 4, 3, 3, generator=g), torch.randn(3)
    whole = winograd.conv2d(x, weight, b)
    calls = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a: calls.append(a[0].shape) or real_bmm(*a))
    monkeypatch.setattr(winograd, "CHUNK_BYTES", 16 * 4 * 2 * 3 * 4 * 2)  # two tile rows of this call per chunk
    chunked = winograd.conv2d(x, weight, b)
    assert [shape[1] for shape in calls] == [2 * 2 * 3] * 3  # 6 tile rows: 3 chunks of (2 images x 2 rows x 3)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("height, width, chunk, grad", [  # odd sizes in chunks; even, whole, with autograd
    (7, 5, 16 * 16 * 2 * 3 * 4, False), pytest.param(6, 10, None, True, marks=pytest.mark.slow)])  # 55 s cold
def test_compiled_transforms_work_on_channels_last_rows(monkeypatch, height, width, chunk, grad):
    """Compiled for inference, the padded inputs and the weights' tap planes reach inductor with their layout told
    (``_dense``), so the transforms read and write whole rows of channels (laid out like its channels-first
    producer, one SD 1.5 layer's input transform took 784 ms); the outputs are channels-last views with the eager
    numbers. Compiled with autograd (the layout op has no derivative) it falls back to copies, gradients intact."""
    from torch._inductor.utils import run_and_get_code

    if chunk is not None:
        monkeypatch.setattr(winograd, "CHUNK_BYTES", chunk)  # two tile rows per chunk
    g = torch.Generator().manual_seed(3)
    x, weight = torch.randn(2, 16, height, width, generator=g), torch.randn(8, 16, 3, 3, generator=g)
    b = torch.randn(8, generator=g)

    def layers(x, weight):
        return winograd.conv2d(x, weight, b), winograd.upsample_conv2d(x, weight, b)

    told = []

    def recording(gm, example_inputs):  # the traced graph, run eagerly: which tensors get their layout told
        told.extend(tuple(node.args[0].meta["example_value"].shape) for node in gm.graph.nodes
                    if node.op == "call_function" and "force_stride_order" in str(node.target))
        return gm.forward

    with torch.no_grad():
        eager = layers(x, weight)
        torch.compile(layers, backend=recording, fullgraph=True)(x, weight)
        compiled, code = run_and_get_code(torch.compile(layers, fullgraph=True), x, weight)
    padded = [(2, 2 * ((height + 1) // 2) + 2, 2 * ((width + 1) // 2) + 2, 16), (2, height + 2, width + 2, 16)]
    assert sorted(told) == sorted(padded + [(3, 3, 8, 16)] * 2), told  # both inputs, both weights' tap planes
    assert "inductor_force_stride_order" in "".join(code)
    for fast, expected in zip(compiled, eager):
        torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-5)
        assert fast.stride(1) == 1  # channels innermost
    if not grad:  # (odd sizes, chunks: the layouts and numbers above are what they change)
        return

    x, weight = x.requires_grad_(True), weight.requires_grad_(True)
    sum(y.square().sum() for y in torch.compile(layers, fullgraph=True)(x, weight)).backward()
    x2, weight2 = x.detach().requires_grad_(True), weight.detach().requires_grad_(True)
    conv, up = ALGORITHMS["conv2d"](x2, weight2, b), ALGORITHMS["upsample_conv2d"](x2, weight2, b)
    (conv.square().sum() + up.square().sum()).backward()
    for got, expected in ((x.grad, x2.grad), (weight.grad, weight2.grad)):  # float32 sums of large squares
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def _counting(monkeypatch, name: str = "conv2d") -> list:
    calls = []
    real = getattr(winograd, name)
    monkeypatch.setattr(winograd, name, lambda *a: calls.append(a[0].shape) or real(*a))
    return calls


def _switch_on(layer: nn.Module, switch: str, x: torch.Tensor, calls: list) -> None:
    """``layer`` runs the plain way while ``switch`` is None, then through its algorithm, with the same numbers."""
    assert getattr(layer, switch) is None
    direct = layer(x)
    assert calls == []
    setattr(layer, switch, True)
    torch.testing.assert_close(layer(x), direct, rtol=1e-5, atol=1e-5)
    assert calls == [x.shape]


def test_layer_uses_winograd_only_where_switched_on_served_and_paying(monkeypatch):
    calls = _counting(monkeypatch)
    conv = winograd.Conv2d(256, 256, 3, padding=1)
    assert list(conv.state_dict()) == ["weight", "bias"]  # nn.Conv2d's keys
    big, small = torch.randn(2, 256, 16, 16), torch.randn(1, 256, 16, 16)  # 512 and 256 output pixels
    with torch.no_grad():
        _switch_on(conv, "winograd", big, calls)
        conv(small)  # under MIN_PIXELS: direct
        conv(torch.randn(1, 256, 96, 96))  # over MAX_PIXELS: direct
        copy.deepcopy(conv).double()(big.double())  # float32 only: direct
        narrow = winograd.Conv2d(128, 256, 3, padding=1)
        narrow.winograd = True
        narrow(torch.randn(2, 128, 16, 16))  # under MIN_CHANNELS: direct
        for kwargs in (dict(stride=2, padding=1), dict(padding=2, dilation=2), dict(padding=1, groups=2),
                       dict(padding=1, padding_mode="reflect")):
            other = winograd.Conv2d(256, 256, 3, **kwargs)
            other.winograd = True
            other(big)  # not served
        assert calls == [big.shape]


def test_layer_uses_the_product_only_below_winograds_range_where_switched_on(monkeypatch):
    products, tiles = _counting(monkeypatch, "gemm_conv2d"), _counting(monkeypatch)
    conv = winograd.Conv2d(256, 256, 3, padding=1)
    small, big = torch.randn(2, 256, 8, 8), torch.randn(2, 256, 16, 16)  # 128 and 512 output pixels
    with torch.no_grad():
        _switch_on(conv, "gemm", small, products)
        conv(big)  # Winograd's range, Winograd off: direct, not the product
        conv.winograd = True
        conv(big)
        assert products == [small.shape] and tiles == [big.shape]
        copy.deepcopy(conv).double()(small.double())  # float32 only: direct
        narrow = winograd.Conv2d(128, 256, 3, padding=1)
        narrow.gemm = True
        narrow(torch.randn(2, 128, 8, 8))  # under MIN_CHANNELS: direct
        strided = winograd.Conv2d(256, 256, 3, stride=2, padding=1)
        strided.gemm = True
        strided(small)  # not served
        assert products == [small.shape]


def test_upsampler_fuses_only_where_switched_on_and_paying(monkeypatch):
    fused = _counting(monkeypatch, "upsample_conv2d")
    up = resnet.Upsample2D(256, use_conv=True)
    assert list(up.state_dict()) == ["conv.weight", "conv.bias"]
    x = torch.randn(2, 256, 8, 8)  # 512 output pixels
    with torch.no_grad():
        _switch_on(up, "fused_upsample", x, fused)
        up(x, output_size=(17, 16))  # an explicit size: interpolation, then the convolution
        up(torch.randn(2, 256, 40, 40))  # over MAX_PIXELS out: direct
        narrow = resnet.Upsample2D(128, use_conv=True)
        narrow.fused_upsample = True
        narrow(torch.randn(2, 128, 8, 8))  # under MIN_CHANNELS: direct
        assert fused == [x.shape]


def test_winograd_reads_the_live_weights():
    """No transformed copy is kept: a weight edited (or a LoRA fused) after a call is used by the next one."""
    conv = winograd.Conv2d(256, 256, 3, padding=1)
    conv.winograd = True
    x = torch.randn(2, 256, 16, 16)
    with torch.no_grad():
        conv(x)
        conv.weight.mul_(-2)
        torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1), rtol=1e-5, atol=1e-4)


def test_optimize_switches_it_on_for_float_cpu_models_and_keeps_explicit_choices():
    unet = diffusekit.UNet2DConditionModel(**tiny_unet_kwargs()).eval()
    vae = diffusekit.AutoencoderKL(**tiny_vae_kwargs()).eval()
    convs = [m for m in unet.modules() if isinstance(m, winograd.Conv2d)]
    # every resnet's two convolutions and the upsamplers'; the stride-2 and the 4-channel in/out convs stay torch's
    assert len(convs) == 2 * len([m for m in unet.modules() if type(m).__name__ == "ResnetBlock2D"]) + 1
    convs[0].winograd = False
    convs[1].gemm = False
    ups = [m for m in unet.modules() if isinstance(m, resnet.Upsample2D)]
    ups[0].fused_upsample = False
    unet.optimize()
    vae.optimize()
    assert ups[0].fused_upsample is False and all(u.fused_upsample for u in ups[1:])
    assert all(m.fused_upsample is None for m in vae.modules() if isinstance(m, resnet.Upsample2D))
    assert convs[0].winograd is False and all(c.winograd for c in convs[1:])
    assert convs[1].gemm is False and all(c.gemm for c in convs[:1] + convs[2:])
    # the VAE decoder keeps the direct convolution (measured slower through Winograd as a whole)
    assert all(m.winograd is None and m.gemm is None for m in vae.modules() if isinstance(m, winograd.Conv2d))


def test_int8_models_keep_their_convolutions(monkeypatch):
    from diffusekit import optimize

    monkeypatch.setattr(optimize, "_is_quantized", lambda module: True)  # optimize()'s int8 branch
    monkeypatch.setattr(optimize, "_default_cpu_kernels", lambda module: None)
    unet = diffusekit.UNet2DConditionModel(**tiny_unet_kwargs()).eval()
    unet.optimize()
    assert all(m.winograd is None and m.gemm is None for m in unet.modules() if isinstance(m, winograd.Conv2d))
    assert all(m.fused_upsample is None for m in unet.modules() if isinstance(m, resnet.Upsample2D))


@pytest.mark.parametrize("algorithm", ["conv2d", "gemm_conv2d", "upsample_conv2d"])
def test_unet_with_each_algorithm_matches_diffusers(monkeypatch, algorithm):
    """Every 3x3 layer of a tiny UNet through Winograd, or through the product (thresholds moved), or its upsampler
    fused, gives diffusers' numbers."""
    diffusers = pytest.importorskip("diffusers")
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 1)
    monkeypatch.setattr(winograd, "MIN_PIXELS", 1 if algorithm == "conv2d" else 10**9)
    calls = _counting(monkeypatch, algorithm)
    config = tiny_unet_kwargs(layers_per_block=2)
    torch.manual_seed(0)
    ours = diffusekit.UNet2DConditionModel(**config).eval()
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**config).eval()
    for m in ours.modules():
        if isinstance(m, winograd.Conv2d):
            m.winograd = m.gemm = True
        if isinstance(m, resnet.Upsample2D):
            m.fused_upsample = algorithm == "upsample_conv2d"
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(2, 4, 10, 6, generator=g), 10, torch.randn(2, 6, 32, generator=g))
    with torch.no_grad():
        torch.testing.assert_close(ours(*inputs).sample, ref(*inputs).sample, rtol=1e-5, atol=1e-5)
    layers = resnet.Upsample2D if algorithm == "upsample_conv2d" else winograd.Conv2d
    assert len(calls) == len([m for m in ours.modules() if isinstance(m, layers)]) > 0
