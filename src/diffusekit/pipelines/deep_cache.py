"""DeepCache-style feature reuse across adjacent denoising steps (Ma et al. 2024, "DeepCache: Accelerating
Diffusion Models for Free"), opt-in, as A1111 / ComfyUI users know it::

    pipe.enable_deep_cache(cache_interval=3, cache_branch_id=0)   # every 3rd step full, the others cached
    image = pipe("a red dress").images[0]
    pipe.disable_deep_cache()
    image = pipe("a red dress", deep_cache=3).images[0]           # or per call (None: the pipeline's setting)

High-level UNet features change slowly from one step to the next: a *full* step runs the whole UNet and keeps the
features the deep layers produce; the following *cached* steps run only the shallow layers around skip branch
``cache_branch_id`` (0: ``conv_in`` and the last up layer; larger ids run more of the UNet) and reuse those
features. The parameters are DeepCache's (``DeepCacheSDHelper.set_params``):

- ``cache_interval``: a full step every ``cache_interval`` steps (1: every step, the same images as without it);
- ``cache_branch_id``: the skip branch (see :mod:`diffusekit.models.deep_cache`; SD 0-11, SDXL 0-8);
- ``skip_mode``: ``"uniform"`` (full steps 0, N, 2N, ...) or ``"non-uniform"`` (the same number of full steps,
  denser around step ``center`` of the schedule and sparser away from it, spaced by a power ``pow``; DeepCache's
  quadratic schedule; ``center`` defaults to 30 % of the steps, ``pow`` to 1.4).

The first step is always full. The cache belongs to one call (two threads running one pipeline never share features).
Under classifier-free guidance the features hold both halves of the batch; a step outside ``guidance_interval`` runs
the conditional half only and takes the conditional half of the cached features; a guided step after an unguided
full step has no unconditional features cached, so it runs in full.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import torch

from ..models.deep_cache import DeepCacheStep

__all__ = ["DeepCacheConfig", "DeepCacheRun", "deep_cache_config"]

SKIP_MODES = ("uniform", "non-uniform")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class DeepCacheConfig:
    """The settings of feature caching (the keywords of ``enable_deep_cache``, checked)."""

    cache_interval: int = 3
    cache_branch_id: int = 0
    skip_mode: str = "uniform"
    center: float | None = None  # non-uniform: the step (fraction of the schedule) the full steps cluster around
    pow: float = 1.4  # non-uniform: spacing exponent (> 1)

    def __post_init__(self):
        if not _is_int(self.cache_interval) or self.cache_interval < 1:
            raise ValueError(f"cache_interval must be an int >= 1 (a full UNet step every cache_interval steps; 1 "
                             f"runs every step in full), got {self.cache_interval!r}")
        if not _is_int(self.cache_branch_id) or self.cache_branch_id < 0:
            raise ValueError(f"cache_branch_id must be an int >= 0 (the skip branch whose shallower layers run on "
                             f"cached steps; 0 is the shallowest), got {self.cache_branch_id!r}")
        if self.skip_mode not in SKIP_MODES:
            raise ValueError(f"skip_mode must be one of {SKIP_MODES}, got {self.skip_mode!r}")
        if self.center is not None and not (isinstance(self.center, numbers.Real) and 0 <= self.center <= 1):
            raise ValueError(f"center must be a fraction of the schedule in [0, 1], got {self.center!r}")
        if isinstance(self.pow, bool) or not isinstance(self.pow, numbers.Real) or not self.pow > 1:
            raise ValueError(f"pow must be a number > 1 (the spacing exponent of the non-uniform schedule), got "
                             f"{self.pow!r}")

    def full_steps(self, steps: int) -> frozenset[int]:
        """The steps (0-based, of ``steps``) that run the whole UNet; always includes step 0."""
        if self.cache_interval == 1:
            return frozenset(range(steps))
        if self.skip_mode == "uniform":
            return frozenset(range(0, steps, self.cache_interval))
        return _clustered_steps(steps, -(-steps // self.cache_interval),
                                round((0.3 if self.center is None else self.center) * steps), self.pow)


def _clustered_steps(steps: int, count: int, center: int, power: float) -> frozenset[int]:
    """``count`` distinct steps in ``[0, steps)`` including 0, dense near ``center``: ``center + sign(u) |u|^p``
    for ``u`` evenly spaced in ``[-center^(1/p), (steps - center)^(1/p)]``. The exponent is lowered in steps of
    0.02 until the steps are distinct (DeepCache's rule); at 1 the spacing is uniform."""
    center = min(max(center, 0), steps - 1)
    power = float(power)
    while True:
        lo, hi = -(center ** (1 / power)), (steps - center) ** (1 / power)
        u = torch.linspace(lo, hi, count + 1, dtype=torch.float64)[:-1]
        picked = {0, *(int(center + float(v.sign() * v.abs() ** power)) for v in u)}
        picked = {min(max(p, 0), steps - 1) for p in picked}
        if len(picked) >= count or power <= 1:
            return frozenset(sorted(picked)[:count] if len(picked) > count else picked)
        power = max(1.0, power - 0.02)


def deep_cache_config(value: Any, default: DeepCacheConfig | None = None) -> DeepCacheConfig | None:
    """A call's ``deep_cache`` argument as settings: ``None`` -> ``default`` (the pipeline's ``enable_deep_cache``),
    ``False`` -> off, an int -> ``cache_interval`` (branch 0), ``(interval, branch)``, a dict of
    ``enable_deep_cache``'s keywords, or a :class:`DeepCacheConfig`."""
    if value is None:
        return default
    if value is False:
        return None
    if isinstance(value, DeepCacheConfig):
        return value
    if _is_int(value):
        return DeepCacheConfig(cache_interval=int(value))
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return DeepCacheConfig(cache_interval=value[0], cache_branch_id=value[1])
    if isinstance(value, dict):
        try:
            return DeepCacheConfig(**value)
        except TypeError:
            pass
    raise ValueError("deep_cache must be None (the pipeline's enable_deep_cache setting), False (off), an int "
                     "cache_interval, a pair (cache_interval, cache_branch_id) or a dict of enable_deep_cache's "
                     f"keywords {[f.name for f in dataclasses.fields(DeepCacheConfig)]}, got {value!r}")


class DeepCacheRun:
    """One call's feature cache: which steps are full, the feature the last full step kept, and whether it holds
    both halves of a guided batch (``[unconditional, conditional]``)."""

    def __init__(self, config: DeepCacheConfig, steps: int):
        self.config = config
        self.full = config.full_steps(steps)
        self.feature: torch.Tensor | None = None
        self.doubled = False
        self.ran: list[bool] = []  # per step: True when it ran in full (for tests and benchmarks)

    def step(self, i: int, doubled: bool) -> DeepCacheStep:
        """The UNet's part for step ``i``; ``doubled``: the step runs both halves of a guided batch."""
        cached = None
        if i not in self.full and self.feature is not None:
            if doubled == self.doubled:
                cached = self.feature
            elif self.doubled:  # an unguided step: the conditional half of a guided step's features
                cached = self.feature.chunk(2)[1]
            # else a guided step with only conditional features cached: run it in full
        self.ran.append(cached is None)
        return DeepCacheStep(self.config.cache_branch_id, cached)

    def keep(self, step: DeepCacheStep, doubled: bool) -> None:
        """After the UNet ran ``step``: keep a full step's feature."""
        if step.feature is not None:
            self.feature, self.doubled = step.feature, doubled
