"""``GroupNorm``: ``torch.nn.GroupNorm`` (same parameters, keys and numbers) that can run diffusekit's CPU kernel.

Every GroupNorm of diffusekit's models is this class. ``cpu_kernel`` (``None``: not chosen, torch's) routes float32
CPU calls outside autograd to :func:`diffusekit.cpu_group_norm.group_norm`, which is fast in the channels-last layout
an int8 model's convolutions produce; ``optimize()`` of a quantized model turns it on where the kernel runs.
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
