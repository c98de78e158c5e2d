"""The exact CPU path's faster 3x3 convolutions, each with the direct convolution's float32 rounding:

- :func:`conv2d`: Winograd F(2x2, 3x3), a 3x3 convolution as 16 matrix products over 4x4 input tiles, 2.25x fewer
  multiply-adds than the direct sum (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2015);
- :func:`gemm_conv2d`: on images too small for Winograd, one matrix product over the unfolded input (the direct
  convolution's own products, in one GEMM that keeps its efficiency on a few pixels);
- :func:`upsample_conv2d`: an upsampler's convolution of the 2x nearest-upsampled image, computed on the input
  itself (2.25x fewer multiply-adds, no upsampled tensor).

Each 4x4 tile ``d`` of the padded input (stride 2) gives a 2x2 output tile ``A^T [(G w G^T) * (B^T d B)] A``. The
elementwise product over the 16 tile positions, summed over the input channels, is 16 matrix products
``(tiles x C_in) @ (C_in x C_out)``. The transforms' coefficients are 0, ±1 and ±1/2, so float32 rounding stays at
the direct convolution's level (against float64, 3.9-4.3e-7 of the output's largest value where oneDNN's direct
convolution gives 2.6-3.6e-7, on SD 1.5's layer shapes after SiLU). Larger Winograd tiles were measured and left
out: F(4x4, 3x3) and F(3x3, 3x3) round to 6-8e-6 and 2-4e-6, too coarse for the exact path's 1e-5 bound.

They are diffusekit's exact CPU path's choice (``optimize()``) for the UNet's wide layers on small images, and left
alone elsewhere: :func:`pays`, :func:`gemm_pays` and :func:`upsample_gemm_pays` hold the rules measured on SD 1.5's
UNet. The VAE decoder keeps the direct convolution: each of its large layers alone ran faster through Winograd
(0.72-0.93x), but the whole 512² decode did not (1.09x with all of them, 1.01x with its 64x64 ones). The weight
transforms run on every call from the live weights: no second copy of them is kept (a cached one would be 16/9 of
SD 1.5's 1280-channel weights, 1.4 GB), an edited weight is never stale, and the transient copies are at most one
layer's (compiled: the weights with their nine taps as planes, then their transform; eagerly its steps hold a few
layers' worth for a moment).

Winograd and the fused upsampler work with the channels innermost: the padded input is laid out
``(N, H + 2, W + 2, C)`` (told to inductor when compiled, :func:`_dense`), the transforms and products read and
write whole rows of channels, and the output is ``(N, H, W, C_out)`` returned as a channels-last view of
``(N, C_out, H, W)``. :func:`gemm_conv2d` unfolds a channels-first input and returns a plain ``(N, C_out, H, W)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Winograd serves layers with at least this many input and output channels ...
MIN_CHANNELS = 256
#: ... on at least this many output pixels per call (batch x height x width) ...
MIN_PIXELS = 512
#: ... and at most this many: SD 1.5's UNet at 512² with CFG (batch 2 x 64 x 64), the largest call measured in the
#: whole model. Layers alone, against oneDNN's direct convolution (both compiled, 2-core AVX-512 CPU, weight
#: transform included): SD 1.5's UNet layers at 512² 0.60-0.92x its time from 64x64 down to 16x16 latents, 0.97-1.0x
#: for 640 channels at 16x16 and 320 at 32x32, but 1.3-1.4x at 8x8 (the weight transform outweighs the saved
#: products on 128 pixels). The whole UNet step: 0.94x (BENCHMARKS.md)
MAX_PIXELS = 8192
#: the transformed input and product tiles of one chunk of tile rows stay under this many bytes each (4x the input
#: chunk's size): the VAE decoder's 512-channel layer at 256² would otherwise hold 2 x 512 MiB at once
CHUNK_BYTES = 128 * 2**20


def serves(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether :func:`conv2d` computes ``conv(x)``: a float32 3x3 convolution with stride 1, padding 1, no dilation
    or groups, zero padding, and a 4-D input."""
    return (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and x.dim() == 4 and x.dtype == torch.float32 and conv.weight.dtype == torch.float32)


def _wide(conv: nn.Conv2d) -> bool:
    """At least :data:`MIN_CHANNELS` input and output channels: every rule below asks for them."""
    return min(conv.in_channels, conv.out_channels) >= MIN_CHANNELS


def _pixels(x: torch.Tensor) -> int:
    """Pixels of a call's input: batch x height x width (a 3x3 convolution's output has as many)."""
    return x.shape[0] * x.shape[-2] * x.shape[-1]


def pays(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """The measured rule (:data:`MIN_CHANNELS`, :data:`MIN_PIXELS`, :data:`MAX_PIXELS`): Winograd is faster than the
    direct convolution for ``conv(x)``."""
    return _wide(conv) and MIN_PIXELS <= _pixels(x) <= MAX_PIXELS


def gemm_pays(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """The measured rule below Winograd's range: on fewer than :data:`MIN_PIXELS` output pixels (SD 1.5's 8x8 and
    4x4 latents with CFG) a 3x3 convolution with :data:`MIN_CHANNELS` runs faster as one matrix product over the
    unfolded input (:func:`gemm_conv2d`): 52-89 GMAC/s there on a 2-core AVX-512 CPU, where oneDNN's direct
    convolution reached 14-45 GMAC/s eagerly and 7-56 inside the compiled UNet (its channels-last input made it
    slowest: 143 ms for SD 1.5's 2560-channel layer at 4x4, against 16 ms for the product)."""
    return _wide(conv) and _pixels(x) < MIN_PIXELS


def gemm_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for a 3x3 ``weight`` as one matrix product: the weight as it is
    stored ``(C_out, C * 9)`` times the input's nine shifted copies ``(C * 9, N * H * W)``. The same products and
    sums as the direct convolution, in one GEMM that keeps its efficiency on a few pixels."""
    n, c, h, w = x.shape  # (N, C, H, W)
    out_c = weight.shape[0]
    padded = F.pad(x, (1, 1, 1, 1))  # (N, C, H + 2, W + 2)
    taps = torch.stack([padded[:, :, i:i + h, j:j + w] for i in range(3) for j in range(3)], -1)  # (N, C, H, W, 9)
    cols = taps.permute(0, 2, 3, 1, 4).reshape(n * h * w, c * 9)  # (N * H * W, C * 9): the weight's column order
    y = torch.mm(weight.reshape(out_c, c * 9), cols.t()).view(out_c, n, h, w).transpose(0, 1)  # (N, C_out, H, W)
    return y if bias is None else y + bias[:, None, None]


def upsample_gemm_pays(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether :func:`upsample_conv2d` serves ``conv(upsample_nearest_2x(x))`` faster than the upsampling and a
    convolution: a 3x3 layer :func:`serves`, with :data:`MIN_CHANNELS`, on at most :data:`MAX_PIXELS` output pixels
    (SD 1.5's three UNet upsamplers at 256² and 512²)."""
    return serves(conv, x) and _wide(conv) and 4 * _pixels(x) <= MAX_PIXELS


def upsample_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)`` for a 3x3 ``weight``,
    computed on ``x`` itself: each of the four output phases ``(2i + a, 2j + b)`` sees the low-resolution input through
    a 2x2 window, whose weights are sums of the 3x3 ones (upsampled rows ``2i - 1, 2i, 2i + 1`` are input rows
    ``i - 1, i, i``; rows ``2i, 2i + 1, 2i + 2`` are ``i, i, i + 1``). That is 16 multiply-adds per input pixel and
    channel pair where the upsampled convolution takes 36, as four matrix products ``(N h w, 4 C) @ (4 C, C_out)``,
    with no upsampled tensor and no tile transforms. Channels innermost throughout, like :func:`conv2d`; the output
    is a channels-last view."""
    n, c, h, w = x.shape  # (N, C, h, w): the input before upsampling
    out_c = weight.shape[0]

    def taps(k0, k1, k2):  # per phase, its two taps' summed weights: phase 0 offsets (-1, 0), phase 1 (0, +1)
        return (k0, k1 + k2), (k0 + k1, k2)

    rows = taps(*_taps_first(weight).unbind(0))  # rows[a][s]: (3, C_out, C)
    planes = [taps(*rows[a][s].unbind(0))[b][t] for a in (0, 1) for b in (0, 1) for s in (0, 1) for t in (0, 1)]
    kernels = torch.stack(planes).view(4, 4, out_c, c)  # (a b, s t, C_out, C): one pass over the weights
    kernels = kernels.transpose(1, 2).reshape(4, out_c, 4 * c)  # columns (s, t, C): the input's order
    p = _dense(F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1)))  # (N, h + 2, w + 2, C)
    cols = torch.stack([torch.cat([p[:, a + s:a + s + h, b + t:b + t + w] for s in (0, 1) for t in (0, 1)], -1)
                        for a in (0, 1) for b in (0, 1)])  # (4 phases, N, h, w, 4 C)
    y = torch.bmm(cols.view(4, n * h * w, 4 * c), kernels.transpose(1, 2))  # (4 phases, N h w, C_out)
    y = y.view(2, 2, n, h, w, out_c).permute(2, 3, 0, 4, 1, 5)  # (N, h, a, w, b, C_out): row 2i + a, column 2j + b
    y = y.reshape(n, 2 * h, 2 * w, out_c).permute(0, 3, 1, 2)  # (N, C_out, 2h, 2w), channels last
    return y if bias is None else y + bias[:, None, None]


#: ``torch.compiler.is_compiling`` (torch >= 2.3; before it, the eager form everywhere)
_is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)


def _taps_first(weight: torch.Tensor) -> torch.Tensor:
    """``weight (C_out, C, 3, 3)`` laid out as ``(3, 3, C_out, C)``: each of the nine taps a dense plane, so that the
    weight transforms read whole rows of channels. As stored, a tap's values lie 9 apart and inductor's transform
    ran one value at a time (116 ms for the 2560 -> 1280 layer's weights alone, compiled; 33 ms after this one
    transposing copy)."""
    return _dense(weight.permute(2, 3, 0, 1))


def _weight_tiles(weight: torch.Tensor) -> list[torch.Tensor]:
    """``G w G^T`` for the 3x3 kernels of ``weight (C_out, C, 3, 3)``: the 16 transformed values (row-major), each
    ``(C_out, C)``; elementwise arithmetic over the nine tap planes of :func:`_taps_first` (a matrix product with
    K = 9 would run far below peak)."""

    def g(k0, k1, k2):  # G applied to three rows (or columns)
        return k0, (k0 + k1 + k2) * 0.5, (k0 - k1 + k2) * 0.5, k2

    rows = g(*_taps_first(weight).unbind(0))  # 4 x (3, C_out, C): kernel rows, then columns
    return [v for row in rows for v in g(*row.unbind(0))]


def _input_tiles(d: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """``B^T d B`` for tiles given by their 16 values ``d[i][j]`` (row ``i``, column ``j``), each ``(...)``: the 16
    transformed values (row-major), each ``(...)``."""

    def bt(d0, d1, d2, d3):  # B^T applied to four rows (or columns)
        return d0 - d2, d1 + d2, d2 - d1, d1 - d3

    columns = [bt(*(d[i][j] for i in range(4))) for j in range(4)]  # B^T over rows: columns[j][r]
    return [v for r in range(4) for v in bt(*(columns[j][r] for j in range(4)))]


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` stored densely in its own dimension order. Compiled for inference, this tells inductor the layout
    (``inductor_force_stride_order``). Left to itself, inductor lays a padded channels-last view out like its
    producer, channels first, and its transform then gathers each tile's channels a whole image apart: 784 ms for
    SD 1.5's 960-channel layer at 64x64 in a profile of the 512² step. Eagerly, or where autograd tracks ``t`` (that
    op has no derivative), ``t.contiguous()``."""
    if not _is_compiling() or t.requires_grad:
        return t.contiguous()
    from torch._inductor import inductor_prims  # registers the op

    strides, step = [], 1
    for size in reversed(t.shape):  # row-major strides of t's shape
        strides.insert(0, step)
        step *= max(size, 1)
    return inductor_prims.force_stride_order(t, strides)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for a 3x3 ``weight`` by Winograd F(2x2, 3x3). Any height and width
    (odd sizes are padded to even and cropped back). Channels innermost throughout (module docstring); the output
    is a channels-last view (of the cropped tiles where H or W is odd)."""
    n, c, h, w = x.shape  # (N, C, H, W)
    th, tw = (h + 1) // 2, (w + 1) // 2  # 2x2 output tiles
    u = torch.stack(_weight_tiles(weight), 0)  # G w G^T: (16, C_out, C)
    padded = _dense(F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1 + 2 * tw - w, 1, 1 + 2 * th - h)))  # (N, 2th+2, 2tw+2, C)
    row_bytes = 16 * max(c, weight.shape[0]) * n * tw * x.element_size()  # one tile row's transformed input or products
    step = max(1, min(th, CHUNK_BYTES // row_bytes))
    chunks = [_tile_rows(padded[:, 2 * t0:2 * min(th, t0 + step) + 2], u) for t0 in range(0, th, step)]
    y = chunks[0] if len(chunks) == 1 else torch.cat(chunks, 1)  # (N, 2*th, 2*tw, C_out)
    y = y[:, :h, :w].permute(0, 3, 1, 2)  # (N, C_out, H, W), channels last
    return y if bias is None else y + bias[:, None, None]


def _tile_rows(padded: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The output rows of ``padded (N, 2*rows + 2, 2*tw + 2, C)`` against the transformed weights ``u``:
    ``(N, 2*rows, 2*tw, C_out)``."""
    n, c = padded.shape[0], padded.shape[3]
    rows, tw = (padded.shape[1] - 2) // 2, (padded.shape[2] - 2) // 2
    out_c = u.shape[1]
    d = [[padded[:, i:i + 2 * rows:2, j:j + 2 * tw:2] for j in range(4)] for i in range(4)]  # (N, rows, tw, C) each
    v = torch.stack(_input_tiles(d)).view(16, n * rows * tw, c)  # B^T d B: (16, N*rows*tw, C)
    m = torch.bmm(v, u.transpose(1, 2)).view(4, 4, n, rows, tw, out_c)  # (4, 4, N, rows, tw, C_out)
    r0, r1 = m[0] + m[1] + m[2], m[1] - m[2] - m[3]  # A^T over tile rows: (4, N, rows, tw, C_out) each
    y = torch.stack([torch.stack([r[0] + r[1] + r[2], r[1] - r[2] - r[3]], 3) for r in (r0, r1)], 2)  # ... m A
    return y.view(n, 2 * rows, 2 * tw, out_c)  # from (N, rows, 2, tw, 2, C_out)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and checkpoint keys) with two faster algorithms for the calls :func:`serves`:
    :func:`conv2d` (Winograd) where its ``winograd`` is True and Winograd :func:`pays`, and :func:`gemm_conv2d` (one
    matrix product) where its ``gemm`` is True and the product :func:`gemm_pays` (fewer pixels than Winograd needs).
    Both switches are ``None`` (direct) until ``optimize()`` of a float ``UNet2DConditionModel`` on the CPU sets them;
    set one to ``False`` to keep a layer off that algorithm there."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.winograd: bool | None = None
        self.gemm: bool | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.winograd or self.gemm) and serves(self, x):  # switches first: eager calls pay nothing more
            if self.winograd and pays(self, x):
                return conv2d(x, self.weight, self.bias)
            if self.gemm and gemm_pays(self, x):
                return gemm_conv2d(x, self.weight, self.bias)
        return super().forward(x)
