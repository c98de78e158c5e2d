"""Image conversion shared by all pipelines: model tensors in [-1, 1] <-> PIL / numpy / torch for the user."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def check_output_type(output_type: str | None, allowed: tuple[str, ...] = OUTPUT_TYPES) -> str:
    output_type = output_type or "pil"
    if output_type not in allowed:
        raise ValueError(f"output_type={output_type!r}; expected one of {list(allowed)}")
    return output_type


def numpy_to_pil(images: np.ndarray) -> list:
    """(B, H, W, C) floats in [0, 1] -> list of PIL images (grayscale for C == 1)."""
    from PIL import Image

    if images.ndim == 3:
        images = images[None]
    images = (images * 255).round().astype("uint8")
    if images.shape[-1] == 1:
        return [Image.fromarray(image[..., 0], mode="L") for image in images]
    return [Image.fromarray(image) for image in images]


def postprocess(images: torch.Tensor, output_type: str = "pil", denormalize: bool | list[bool] = True) -> Any:
    """Turn a (B, C, H, W) batch from the model's [-1, 1] range into ``output_type``.

    "pt": a float tensor (B, C, H, W) in [0, 1]; "np": float32 array (B, H, W, C) in [0, 1]; "pil": a list of
    PIL images; "latent": the input unchanged. ``denormalize`` may be a list with one flag per image (images the
    safety checker blacked out are left as they are).
    """
    output_type = check_output_type(output_type)
    if output_type == "latent":
        return images
    if isinstance(denormalize, bool):
        denormalize = [denormalize] * images.shape[0]
    if any(denormalize):
        images = torch.stack([(im / 2 + 0.5).clamp(0, 1) if d else im for im, d in zip(images, denormalize)])
    if output_type == "pt":
        return images
    array = images.detach().cpu().permute(0, 2, 3, 1).float().numpy()
    if output_type == "np":
        return array
    return numpy_to_pil(array)
