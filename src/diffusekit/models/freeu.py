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
:func:`check_freeu` reads a request's factors (command line, server, batch jobs), :func:`freeu_setting` gives a UNet's
current ones, and :func:`freeu_for_call` turns them on for one pipeline call and restores the previous setting.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import threading
import weakref
from typing import Any, Iterator

import torch

FREEU_STAGES = 2  # up stages 0 and 1 (resolution_idx); the others join their skips unchanged
FACTOR_NAMES = ("s1", "s2", "b1", "b2")  # the order of diffusers' enable_freeu(s1, s2, b1, b2)


def check_freeu(value: Any) -> tuple[float, float, float, float] | None:
    """A request's FreeU factors as ``(s1, s2, b1, b2)`` floats: from a list / tuple in that order or a mapping with
    those keys; ``None`` is off. Raises ``ValueError`` naming what is wrong."""
    if value is None:
        return None
    if isinstance(value, dict):
        if set(value) != set(FACTOR_NAMES):
            raise ValueError(f"freeu needs exactly the keys {', '.join(FACTOR_NAMES)}, got {sorted(value)}")
        value = [value[name] for name in FACTOR_NAMES]
    if not isinstance(value, (list, tuple)) or len(value) != len(FACTOR_NAMES):
        raise ValueError(f"freeu must be the four factors [s1, s2, b1, b2] (the order of diffusers' enable_freeu; "
                         f"e.g. [0.9, 0.2, 1.5, 1.6] for SD 1.5) or a mapping of them, got {value!r}")
    for name, factor in zip(FACTOR_NAMES, value):
        if not isinstance(factor, numbers.Real) or isinstance(factor, bool) or not math.isfinite(factor):
            raise ValueError(f"freeu {name} must be a finite number, got {factor!r}")
    return tuple(float(factor) for factor in value)  # type: ignore[return-value]


def freeu_setting(unet) -> tuple[float, float, float, float] | None:
    """``(s1, s2, b1, b2)`` as ``enable_freeu`` set them on ``unet``'s up blocks; None while FreeU is off."""
    for block in getattr(unet, "up_blocks", ()):
        factors = tuple(getattr(block, name, None) for name in FACTOR_NAMES)
        if None not in factors:
            return factors  # type: ignore[return-value]
    return None


def set_factors(block, factors: tuple[float | None, ...]) -> None:
    """Set an up block's ``(s1, s2, b1, b2)``; ``None`` removes the instance attribute (the class default, off), so
    a UNet with FreeU switched off has the same attributes as one that never had it (compiled packages are keyed on
    module attributes: off must be one key)."""
    for name, value in zip(FACTOR_NAMES, factors):
        if value is None:
            vars(block).pop(name, None)
        else:
            setattr(block, name, float(value))


_CALL_LOCKS: "weakref.WeakKeyDictionary[Any, threading.Lock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def freeu_for_call(unet, factors: Any) -> Iterator[None]:
    """``unet`` with FreeU at ``factors`` (checked by :func:`check_freeu`) inside the block and its own setting again
    after it, also when the call fails (``None``: nothing changes). The factors are module state: calls with factors
    on one UNet run one at a time (a lock per UNet), and a call without factors on another thread meanwhile would see
    them, so threads sharing a pipeline keep FreeU per pipeline (``enable_freeu``) or run one call at a time (the
    server's worker does)."""
    factors = check_freeu(factors)
    if factors is None:
        yield
        return
    if not hasattr(unet, "enable_freeu"):
        raise ValueError(f"FreeU is not available for {type(unet).__name__}: it needs a UNet2DConditionModel (Stable "
                         "Diffusion 1.x / 2.x / XL); leave freeu unset for this model")
    with _LOCKS_GUARD:
        lock = _CALL_LOCKS.setdefault(unet, threading.Lock())
    with lock:
        before = [tuple(getattr(block, name) for name in FACTOR_NAMES) for block in unet.up_blocks]
        unet.enable_freeu(*factors)
        try:
            yield
        finally:
            for block, values in zip(unet.up_blocks, before):
                set_factors(block, values)


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
        if any(getattr(self, name) is None for name in FACTOR_NAMES):
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
