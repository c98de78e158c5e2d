"""FreeU (Si et al., arXiv 2309.11497): rebalance the backbone and the skip features of a UNet's first two up stages.

At up stage 0 (the deepest) and 1, before each resnet joins ``hidden_states`` with a skip tensor:

* the first half of the backbone's channels is multiplied by ``b1`` (stage 0) or ``b2`` (stage 1);
* the skip tensor's lowest spatial frequencies are multiplied by ``s1`` / ``s2``: after ``fftshift`` the 2x2 block
  just above and left of the centre, i.e. the frequencies ``{-1, 0} x {-1, 0}`` of ``fftn`` over ``(H, W)``; the real
  part of the inverse transform is kept (that block is not conjugate-symmetric, so the imaginary part is dropped).
  Computed here as a projection onto those frequencies (real matrix products), not through an FFT.

The same operations in the same order as diffusers' ``apply_freeu`` / ``fourier_filter``: outputs match it to
float32 rounding. One deliberate difference: diffusers turns FreeU off when any factor is ``0`` (it tests the
factors' truth value); here only ``None`` (``disable_freeu()``) turns it off, so a factor of ``0`` does what it says.

Up blocks carry diffusers' attributes ``s1``, ``s2``, ``b1``, ``b2`` (``None``: off) and ``resolution_idx`` (their
index among the UNet's up blocks); ``UNet2DConditionModel.enable_freeu`` sets the factors on every up block.
"""

from __future__ import annotations

import math

import torch

FREEU_STAGES = 2  # up stages 0 and 1 (resolution_idx); the others join their skips unchanged


def _low_frequency_projection(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary parts, (size, size) float64, of the projection onto the frequencies {0, -1} along one axis:
    ``P[m, m'] = (1 + exp(-2 pi i (m - m') / size)) / size`` (one frequency when ``size`` is 1)."""
    if size == 1:
        return torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)
    index = torch.arange(size, dtype=torch.float64)
    angle = 2 * math.pi * (index[:, None] - index[None, :]) / size
    return (1 + torch.cos(angle)) / size, -torch.sin(angle) / size


def low_frequency_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` (B, C, H, W) with its spatial frequencies {-1, 0} x {-1, 0} multiplied by ``scale``; same dtype.

    ``x + (scale - 1) * Re(P_H x P_W^T)``, with ``P`` the projections of :func:`_low_frequency_projection`: the same
    numbers as masking the Fourier transform, in four small real matrix products (no complex tensors, which inductor
    cannot generate code for), in float32.
    """
    height, width = x.shape[-2:]
    (re_h, im_h), (re_w, im_w) = _low_frequency_projection(height), _low_frequency_projection(width)
    to = dict(device=x.device, dtype=torch.float32)
    x32 = x.float()
    low = re_h.to(**to) @ x32 @ re_w.T.to(**to) - im_h.to(**to) @ x32 @ im_w.T.to(**to)  # Re(P_H x P_W^T)
    return (x32 + (scale - 1) * low).to(x.dtype)


class FreeUSkips:
    """Mixin of the UNet up blocks: :meth:`_join` concatenates backbone and skip, with FreeU applied when it is on."""

    resolution_idx: int | None = None
    s1: float | None = None
    s2: float | None = None
    b1: float | None = None
    b2: float | None = None

    def _freeu_factors(self) -> tuple[float, float] | None:
        """(b, s) of this block's stage while FreeU is on, else None."""
        if self.resolution_idx is None or self.resolution_idx >= FREEU_STAGES:
            return None
        if any(getattr(self, name) is None for name in ("s1", "s2", "b1", "b2")):
            return None
        return (self.b1, self.s1) if self.resolution_idx == 0 else (self.b2, self.s2)

    def _join(self, hidden_states: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """``cat([hidden_states, skip], dim=1)``: (B, C_h + C_s, H, W)."""
        factors = self._freeu_factors()
        if factors is not None:
            backbone, skip_scale = factors
            half = hidden_states.shape[1] // 2
            hidden_states = torch.cat([hidden_states[:, :half] * backbone, hidden_states[:, half:]], dim=1)
            skip = low_frequency_scale(skip, skip_scale)
        return torch.cat([hidden_states, skip], dim=1)
