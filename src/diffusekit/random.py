"""Seeded noise that does not depend on the device it ends up on.

Noise is drawn on the generator's device and then moved, so ``torch.manual_seed(0)`` gives the same image on CPU and
GPU, and the same numbers as diffusers' ``randn_tensor``. A list of generators seeds each batch item separately.
"""

from __future__ import annotations

from typing import Sequence

import torch

Generator = torch.Generator | Sequence[torch.Generator] | None


def randn_tensor(
    shape: Sequence[int],
    generator: Generator = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Standard normal noise of ``shape`` on ``device``, drawn from ``generator`` (or a list, one per batch item)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    shape = tuple(shape)
    if isinstance(generator, Sequence) and not isinstance(generator, torch.Generator):
        if len(generator) == 1:
            generator = generator[0]
        elif len(generator) != shape[0]:
            raise ValueError(
                f"got a list of {len(generator)} generators for a batch of {shape[0]}: pass one generator per image"
            )
    if isinstance(generator, torch.Generator) or generator is None:
        draw_device = _draw_device(generator, device)
        return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)
    draws = [torch.randn((1, *shape[1:]), generator=g, device=_draw_device(g, device), dtype=dtype) for g in generator]
    return torch.cat([d.to(device) for d in draws], dim=0)


def _draw_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    if generator is None or generator.device.type == device.type:
        return device
    if generator.device.type == "cpu":
        return generator.device
    raise ValueError(f"a generator on {generator.device} cannot make noise for {device}: create it on cpu or {device}")
