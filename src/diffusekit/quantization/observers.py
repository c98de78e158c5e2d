"""Activation range observers: what calibration records at the input of each layer that gets quantized.

Calibration runs the float model over the whole sampling schedule (every timestep, both halves of the CFG batch), so
an observer sees many calls per layer. Each observer keeps a running ``(low, high)`` over all of them.

- ``minmax``: the smallest and largest value ever seen. Nothing is clipped; a rare outlier widens the scale.
- ``percentile``: per call, the ``percentile`` / ``100 - percentile`` quantiles of (a sample of) the input; the
  running range is the widest of those. Clips the rare extremes of each call and keeps resolution for the rest.
- ``average``: the mean over calls of each call's min and max (clips the calls with the widest ranges).
"""

from __future__ import annotations

import torch

MAX_SAMPLE = 1 << 20  # quantiles are taken over at most this many values of one call (a strided sample)


class MinMaxObserver:
    name = "minmax"

    def __init__(self) -> None:
        self.low = float("inf")
        self.high = float("-inf")
        self.calls = 0

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach()
        low, high = torch.aminmax(x.float())
        self.low = min(self.low, float(low))
        self.high = max(self.high, float(high))
        self.calls += 1

    def range(self) -> tuple[float, float]:
        return self.low, self.high


class PercentileObserver(MinMaxObserver):
    name = "percentile"

    def __init__(self, percentile: float = 99.99) -> None:
        super().__init__()
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile!r}")
        self.percentile = float(percentile)

    def observe(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1).float()
        if flat.numel() > MAX_SAMPLE:
            flat = flat[:: -(-flat.numel() // MAX_SAMPLE)]
        n = flat.numel()
        k = min(n, max(1, round(n * (1.0 - self.percentile / 100.0)) + 1))  # k-th smallest / largest value
        low = float(torch.kthvalue(flat, k).values)
        high = float(torch.kthvalue(flat, n + 1 - k).values)
        self.low = min(self.low, low)
        self.high = max(self.high, high)
        self.calls += 1


class AverageMinMaxObserver(MinMaxObserver):
    """The mean over calls of each call's min and max (PyTorch's moving-average observer without the decay)."""

    name = "average"

    def __init__(self) -> None:
        super().__init__()
        self._low_sum = self._high_sum = 0.0

    def observe(self, x: torch.Tensor) -> None:
        low, high = torch.aminmax(x.detach().float())
        self._low_sum += float(low)
        self._high_sum += float(high)
        self.calls += 1

    def range(self) -> tuple[float, float]:
        return self._low_sum / max(self.calls, 1), self._high_sum / max(self.calls, 1)


OBSERVERS = {"minmax": MinMaxObserver, "percentile": PercentileObserver, "average": AverageMinMaxObserver}


def make_observer(kind: str, percentile: float | None = None):
    if kind not in OBSERVERS:
        raise ValueError(f"observer={kind!r}: expected one of {sorted(OBSERVERS)}")
    if kind == "percentile":
        return PercentileObserver(99.99 if percentile is None else percentile)
    return OBSERVERS[kind]()
