"""A loss-curve PNG drawn with Pillow (matplotlib is not a dependency)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from .._io import atomic_write


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (the first points average what there is)."""
    if window <= 1 or len(values) == 0:
        return values
    csum = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (csum[idx] - csum[lo]) / (idx - lo)


def plot_losses(path: str | os.PathLike, losses, title: str = "training loss", log_y: bool = True,
                size: tuple[int, int] = (640, 400)) -> Path:
    """Draw raw per-step losses (light) and their moving average (dark) against the step; write ``path``."""
    from PIL import Image, ImageDraw

    values = np.asarray(losses, dtype=np.float64)
    width, height = size
    left, right, top, bottom = 64, 16, 28, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 8), f"{title} ({len(values)} steps)", fill="black")
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    if len(values) >= 2:
        values = np.maximum(values, 1e-12) if log_y else values
        curve = smooth(values, max(1, len(values) // 50))
        ys = np.log10(values) if log_y else values
        lo, hi = np.percentile(ys, 0.5), np.percentile(ys, 99.5)
        lo, hi = min(lo, (np.log10(curve) if log_y else curve).min()), hi
        hi = hi if hi > lo else lo + 1.0

        def to_xy(i, v):
            x = left + (width - left - right) * i / (len(values) - 1)
            y = top + (height - top - bottom) * (1 - (min(max(v, lo), hi) - lo) / (hi - lo))
            return x, y

        draw.line([to_xy(i, v) for i, v in enumerate(ys)], fill=(170, 190, 230), width=1)
        smooth_ys = np.log10(curve) if log_y else curve
        draw.line([to_xy(i, v) for i, v in enumerate(smooth_ys)], fill=(20, 60, 160), width=2)
        for frac in (0.0, 0.5, 1.0):  # y ticks
            v = lo + (hi - lo) * frac
            y = to_xy(0, v)[1]
            label = f"{10 ** v:.3g}" if log_y else f"{v:.3g}"
            draw.text((4, y - 6), label, fill="black")
        for frac in (0.0, 0.5, 1.0):  # x ticks
            i = (len(values) - 1) * frac
            draw.text((to_xy(i, lo)[0] - 10, height - bottom + 6), str(int(math.floor(i)) + 1), fill="black")
        draw.text((width // 2 - 20, height - 18), "step", fill="black")
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    return Path(path)
