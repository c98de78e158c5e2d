"""The int8 feed-forward's first layer and GEGLU in one pass: ``torch.ops.diffusekit.int8_geglu``
(``cpu_int8_geglu.cpp``, built and loaded with the fused attention kernel by :mod:`diffusekit.cpu_attention`, on the
same CPUs).

An int8 transformer block's feed-forward is ``Int8Linear(dim -> 8 dim)``, GEGLU (``a * gelu(g)`` of the two halves)
and ``Int8Linear(4 dim -> dim)``. Compiled, the first layer is a oneDNN int8 matmul that writes its float32 output
(``[tokens, 8 dim]``: 84 MB a call in SD 1.5's first stage at 512²) and an elementwise pass reads it back for GEGLU
and the second layer's uint8 input. The kernel keeps the products in registers and writes only that uint8 input,
which the second layer's oneDNN matmul reads as it is. ``optimize()`` of a quantized model turns it on
(``FeedForward.cpu_kernel``) with the other CPU kernels; docs/QUANTIZATION.md ("GEGLU kernel") has the measurements.
"""

from __future__ import annotations

import torch

from . import cpu_attention


def packable(proj) -> bool:
    """Whether an int8 GEGLU projection has the shape the kernel takes (input channels a multiple of 4, each half of
    the outputs a multiple of 16)."""
    return proj.in_features % 4 == 0 and proj.out_features % 32 == 0


def pack(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's copy of a GEGLU projection's int8 weight ``[2N, K]`` (rows: the N a-outputs, then the N
    g-outputs): ``(packed, colsum)``, packed ``[N / 16, K / 4, 2, 16, 4]`` (per block of 16 outputs and 4 input
    channels, the a-rows then the g-rows: the operands of one ``vpdpbusd`` each) and the int32 sum of each row."""
    two_n, k = weight.shape
    n = two_n // 2
    packed = weight.reshape(2, n // 16, 16, k // 4, 4).permute(1, 3, 0, 2, 4).contiguous()
    return packed, weight.sum(dim=1, dtype=torch.int32)


def serves(proj, out, x: torch.Tensor) -> bool:
    """Whether :func:`feed_forward` can run ``out(GEGLU(proj(x)))`` here: both layers are int8 (``Int8Linear``),
    ``proj`` holds its packed copy (``Int8Linear.pack_geglu``), and the library takes ``x``
    (:func:`diffusekit.cpu_attention.serves_tensors`)."""
    return (getattr(proj, "geglu_weight", None) is not None and hasattr(out, "forward_uint8")
            and cpu_attention.serves_tensors(x))


def feed_forward(proj, out, x: torch.Tensor) -> torch.Tensor:
    """``out(a * gelu(g))`` with ``[a, g] = proj(x)``, for the int8 layers :func:`serves` accepts: x is quantized
    with ``proj``'s input parameters, the kernel writes ``out``'s uint8 input, ``out`` runs on it. Traced by
    ``torch.compile``; does no loading itself."""
    x_scale, x_zero_point = proj._input_qparams
    out_scale, out_zero_point = out._input_qparams
    q = proj._quantize_input(x.contiguous())
    hidden = torch.ops.diffusekit.int8_geglu(q, proj.geglu_weight, proj.geglu_colsum, proj.weight_scale, proj.bias,
                                             x_scale, x_zero_point, out_scale, out_zero_point)
    return out.forward_uint8(hidden)
