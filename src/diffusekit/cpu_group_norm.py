"""GroupNorm on the CPU in either memory layout: ``torch.ops.diffusekit.group_norm`` (``cpu_group_norm.cpp``, built
and loaded with the fused attention kernel by :mod:`diffusekit.cpu_attention`, on the same CPUs).

An int8 model's convolutions hand their outputs over channels-last, and inductor's GroupNorm reads each group there as
strided runs of a few channels: on the SD VAE decoder's 128 x 512 x 512 activations it took 4.4x the time of the same
norm on a ``[N, C, H, W]`` tensor. This kernel takes per-channel sums across the pixels (vectorised over the
channels) and combines them into the groups, so both layouts run at memory speed; its statistics are as exact as
torch's (double sums of pivot-shifted values). ``optimize()`` turns it on with the attention kernel for quantized
models (``GroupNorm.cpu_kernel``); docs/QUANTIZATION.md ("GroupNorm kernel") has the measurements.
"""

from __future__ import annotations

import torch

from . import cpu_attention


def output_format(x: torch.Tensor) -> torch.memory_format:
    """The output's layout: channels-last for a 4-d channels-last input (that is not also contiguous), else
    contiguous (what the kernel returns; the shape function uses the same rule)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    """``F.group_norm`` for a float32 CPU tensor ``[N, C, ...]``. Call :func:`serves` first (this function is traced
    by ``torch.compile`` and does no loading itself)."""
    return torch.ops.diffusekit.group_norm(x, groups, weight, bias, eps)


def group_norm_quantize(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                        eps: float, shift: torch.Tensor | None, silu: bool, out_scale: float,
                        out_zero_point: int) -> torch.Tensor:
    """``quantize_per_tensor(act(F.group_norm(x + shift, ...)), out_scale, out_zero_point)`` as uint8 in ``x``'s
    layout (``act``: SiLU or none; ``shift``: one value per sample and channel, or ``None``), in one pass: what an
    int8 convolution after the norm reads. Call :func:`serves` first."""
    return torch.ops.diffusekit.group_norm_quantize(x, groups, weight, bias, eps, shift, silu, out_scale,
                                                    out_zero_point)


def serves(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """Whether :func:`group_norm` can stand in for ``F.group_norm`` here (the library is loaded, float32 on the CPU,
    outside autograd: :func:`diffusekit.cpu_attention.serves_tensors`)."""
    return x.dim() >= 2 and cpu_attention.serves_tensors(x, *(() if weight is None else (weight,)))
