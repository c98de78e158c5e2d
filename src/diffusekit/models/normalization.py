"""``GroupNorm``: ``torch.nn.GroupNorm`` (same parameters, keys and numbers) that can run diffusekit's CPU kernel.

Every GroupNorm of diffusekit's models is this class. ``cpu_kernel`` (``None``: not chosen, torch's) routes float32
CPU calls outside autograd to :func:`diffusekit.cpu_group_norm.group_norm`, which is fast in the channels-last layout
an int8 model's convolutions produce; ``optimize()`` of a quantized model turns it on where the kernel runs.
:func:`norm_act_conv` is ``conv(act(norm(x + shift)))`` (a ResNet block's, a spatial transformer's input projection);
before an int8 convolution it runs the norm, SiLU and the convolution's input quantization as one kernel pass.
"""

from __future__ import annotations

import torch
from torch import nn


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` with an optional CPU kernel (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cpu_kernel: bool | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_kernel:
            from .. import cpu_group_norm

            if cpu_group_norm.serves(x, self.weight):
                return cpu_group_norm.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x)


def norm_act_conv(norm: nn.Module, act: nn.Module | None, conv: nn.Module, x: torch.Tensor,
                  shift: torch.Tensor | None = None, dropout: nn.Module | None = None) -> torch.Tensor:
    """``conv(dropout(act(norm(x + shift))))`` (``act``: ``None`` for none; ``shift``: e.g. a time embedding
    ``(B, C, 1, 1)``). Where ``norm``'s CPU kernel is on, ``act`` is SiLU or none, dropout does nothing and ``conv`` is
    int8 (``forward_uint8``), the norm of ``x + shift``, the activation and ``conv``'s uint8 input come from one
    kernel pass (:func:`diffusekit.cpu_group_norm.group_norm_quantize`) instead of float32 passes for each."""
    if (getattr(norm, "cpu_kernel", False) and (act is None or type(act) is nn.SiLU)
            and hasattr(conv, "forward_uint8") and (dropout is None or not dropout.training or dropout.p == 0)):
        from .. import cpu_group_norm

        if cpu_group_norm.serves(x, norm.weight) and (
                shift is None or (shift.numel() == x.shape[0] * x.shape[1] and cpu_group_norm.serves(shift, None))):
            scale, zero_point = conv._input_qparams
            q = cpu_group_norm.group_norm_quantize(x, norm.num_groups, norm.weight, norm.bias, norm.eps, shift,
                                                   act is not None, scale, zero_point)
            return conv.forward_uint8(q)
    if shift is not None:
        x = x + shift
    x = norm(x) if act is None else act(norm(x))
    return conv(x if dropout is None else dropout(x))
