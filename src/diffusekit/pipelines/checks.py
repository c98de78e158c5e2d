"""Argument checks shared by every pipeline: each refuses a bad argument with a ``ValueError`` that names it,
before any work is done. Pipelines call these helpers rather than repeating the checks.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

MAX_IMAGE_SIDE = 16384  # pixels; beyond this the latents alone would not fit any machine's memory


def _positive_int(name: str, value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be a whole number ({what}), got {type(value).__name__} {excerpt(repr(value))}")
    if value <= 0:
        raise ValueError(f"{name} must be positive ({what}), got {value}")
    return int(value)


def checked_image_size(pipe: Any, height: Any, width: Any, multiple: int = 1) -> tuple[int, int]:
    """Checked ``(height, width)``, each defaulting to the UNet's sample size times the VAE scale factor.

    Each must be a positive int, a multiple of the VAE scale factor and of ``multiple`` (diffusers' text-to-image SD
    pipelines require 8 whatever the VAE), and at most ``MAX_IMAGE_SIDE``.
    """
    scale = int(pipe.vae_scale_factor)
    factor = math.lcm(scale, multiple)
    why = "the VAE scale factor" if factor == scale else f"{multiple}, as in diffusers, and the VAE scale factor"
    default = getattr(pipe, "default_sample_size", None) or pipe.unet.config.sample_size
    sides = []
    for name, value, index in (("height", height, 0), ("width", width, 1)):
        if value is None:
            value = (default[index] if isinstance(default, (list, tuple)) else default) * scale
        value = _positive_int(name, value, "of pixels")
        if value % factor:
            raise ValueError(f"{name}={value}: height and width must be multiples of {factor} ({why}); "
                             f"use {max(factor, value - value % factor)} or {value - value % factor + factor}")
        if value > MAX_IMAGE_SIDE:
            raise ValueError(f"{name}={value} is larger than {MAX_IMAGE_SIDE} pixels; generate smaller and upscale")
        sides.append(value)
    return sides[0], sides[1]


def check_steps(num_inference_steps: Any) -> int:
    """``num_inference_steps`` as a positive int."""
    return _positive_int("num_inference_steps", num_inference_steps, "of denoising steps")


def excerpt(text: str, limit: int = 120) -> str:
    """``text`` cut to ``limit`` characters for a log line or error message, saying how long it was."""
    if len(text) <= limit:
        return text
    return f"{text[: limit // 2]} ... {text[-limit // 4:]} ({len(text)} characters)"
