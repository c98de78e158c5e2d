"""AUTOMATIC1111's ``mask_blur`` for inpainting: a blurred mask, and the result composited onto the original image.

A1111's order (``modules/processing.py``, ``StableDiffusionProcessingImg2Img.init`` and ``apply_overlay``), which
:func:`diffusekit.generation.generate` follows when a request's ``Mask blur`` is above 0:

1. the mask is taken as A1111 takes it (:func:`binary_mask`: the alpha of an RGBA mask with transparency, rounded;
   otherwise its grey level), at the size it was uploaded at;
2. it is blurred there with a Gaussian of standard deviation ``mask_blur`` pixels (A1111's ``mask_blur_x`` /
   ``mask_blur_y`` when they differ), first along the rows, then along the columns, each pass
   ``2 * int(2.5 * sigma + 0.5) + 1`` taps wide (a pass of sigma 0 is skipped), borders mirrored without repeating
   the edge pixel, in the 8-bit fixed point OpenCV uses (A1111 runs ``cv2.GaussianBlur`` on 8-bit images; the
   tests check the result equals OpenCV's bit for bit);
3. only then is it resized to the working size (A1111's resize mode 0, "just resize": Lanczos), as the image is;
   that resized blurred mask is what the pipeline gets (its latent mask);
4. the overlay mask is the resized blurred mask doubled and clipped to 255 (so the original shows through only
   where the blurred mask is below one half), and the original image (resized to the working size) with alpha
   ``255 - overlay mask`` is alpha-composited over each generated image, as A1111 does with PIL's premultiplied
   ``RGBa`` paste and ``alpha_composite``.

Blurring before resizing matters when the upload's size differs from the working size: the blur's reach is in the
upload's pixels (a 4-pixel blur of a 1024² mask for a 512² image reaches 2 pixels of the image), as in A1111.

A request carries the blur in ``params.extra``: ``Mask blur`` (the key A1111 records, when X and Y are equal), or
``Mask blur X`` / ``Mask blur Y`` (a diffusekit key pair: A1111 records nothing when they differ, so its PNGs
cannot be remade; ``--from-png`` remakes ours). With both at 0 nothing here runs: the pipeline's output is
returned as it is (A1111 would still paste the original back outside the hard mask; diffusekit keeps the diffusers
output, which it always returned).
Only numpy and Pillow; OpenCV is a test-time reference (``tests/test_mask_blur.py``).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["MASK_BLUR_KEY", "MASK_BLUR_X_KEY", "MASK_BLUR_Y_KEY", "apply_overlay", "apply_overlays", "blur_mask",
           "blur_masks", "blurred_at_size", "binary_mask", "gaussian_kernel", "mask_blur_of", "mask_blurs_of",
           "mask_blur_extra", "overlay_for", "pil_per_image"]

#: the infotext key A1111 records the blur under (only when above 0); a request carries it in ``params.extra``
MASK_BLUR_KEY = "Mask blur"
#: diffusekit's keys for separate X / Y blurs (A1111's ``mask_blur_x`` / ``mask_blur_y`` when they differ)
MASK_BLUR_X_KEY, MASK_BLUR_Y_KEY = "Mask blur X", "Mask blur Y"


def binary_mask(mask) -> Any:
    """A1111's ``create_binary_mask`` (with its default ``mask_round``): a PIL mask -> mode ``L``. An ``RGBA`` mask
    whose alpha channel is not all opaque (a painted-over upload) is its alpha, 255 above 128 and 0 otherwise; any
    other mask is its grey level, unchanged (A1111 rounds only the alpha)."""
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        return mask.getchannel("A").point(lambda v: 255 if v > 128 else 0)
    return mask.convert("L")


def gaussian_kernel(sigma: float) -> list[int]:
    """The 1-D Gaussian of ``sigma`` A1111 blurs with, in OpenCV's 8-bit fixed point: ``2 * int(2.5 * sigma + 0.5)
    + 1`` integer taps summing to 256 (the float taps times 256, rounded left to right with the rounding error
    carried to the next tap, mirrored, the centre tap taking what is left)."""
    import math

    radius = int(2.5 * sigma + 0.5)
    n = 2 * radius + 1
    scale = -0.125 / (sigma * sigma)
    values = [math.exp((x * x) * scale) for x in range(1 - n, 0, 2)]  # x: twice the offset from the centre
    total = 2 * sum(values) + 1.0
    taps, err, side = [0] * n, 0.0, 0
    for i, value in enumerate(values):
        adjusted = value / total * 256 + err
        rounded = _round_half_away(adjusted)
        err = adjusted - rounded
        taps[i] = taps[n - 1 - i] = rounded
        side += rounded
    taps[radius] = 256 - 2 * side
    return taps


def _round_half_away(x: float) -> int:
    return int(math.floor(x + 0.5)) if x >= 0 else -int(math.floor(-x + 0.5))


def _blur_axis(array, taps: list[int], axis: int):
    """One 8-bit pass along ``axis``: integer taps (sum 256), mirrored borders without repeating the edge pixel
    (OpenCV's default), the sum divided by 256 rounding halves up, as OpenCV's fixed-point blur of 8-bit images."""
    import numpy as np

    radius = len(taps) // 2
    pad = [(0, 0), (0, 0)]
    pad[axis] = (radius, radius)
    padded = np.pad(array.astype(np.int64), pad, mode="reflect")  # numpy's "reflect" is OpenCV's REFLECT_101
    total = np.zeros(array.shape, dtype=np.int64)
    length = array.shape[axis]
    for tap, weight in enumerate(taps):
        total += weight * (padded[tap:tap + length, :] if axis == 0 else padded[:, tap:tap + length])
    return ((total + 128) >> 8).clip(0, 255).astype(np.uint8)


def blur_mask(mask, mask_blur: float, mask_blur_y: float | None = None) -> Any:
    """Steps 1 and 2: the mask (:func:`binary_mask`) blurred along the rows (sigma ``mask_blur``) then the columns
    (sigma ``mask_blur_y``, default the same), as A1111's two ``cv2.GaussianBlur`` calls (a PIL ``L`` image)."""
    import numpy as np
    from PIL import Image

    array = np.asarray(binary_mask(mask))  # (H, W) uint8
    mask_blur_y = mask_blur if mask_blur_y is None else mask_blur_y
    for axis, sigma in ((1, mask_blur), (0, mask_blur_y)):
        if sigma > 0:
            array = _blur_axis(array, gaussian_kernel(float(sigma)), axis=axis)
    return Image.fromarray(array, "L")


def overlay_for(image, blurred_mask, double: bool = True) -> Any:
    """Step 4's overlay: ``image`` (RGB, resized to the mask's size if it differs) with alpha ``255 - min(2 *
    mask, 255)`` (``255 - mask`` with ``double=False``, as A1111's "only masked" inpainting), built as A1111 builds it
    (a premultiplied paste), as an ``RGBA`` image."""
    import numpy as np
    from PIL import Image, ImageOps

    for_overlay = blurred_mask.convert("L")
    if double:
        doubled = np.clip(np.asarray(for_overlay).astype(np.float32) * 2, 0, 255).astype(np.uint8)
        for_overlay = Image.fromarray(doubled, "L")
    image = image.convert("RGB")
    if image.size != for_overlay.size:
        image = image.resize(for_overlay.size, Image.LANCZOS)
    overlay = Image.new("RGBa", image.size)
    overlay.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(for_overlay))
    return overlay.convert("RGBA")


def apply_overlay(generated, overlay) -> Any:
    """``generated`` (PIL) with ``overlay`` alpha-composited over it, back in RGB (A1111's ``apply_overlay``); an
    overlay of another size (a pipeline that rounded the size to a multiple of 8) is resized to the image's."""
    from PIL import Image

    if generated.size != overlay.size:
        overlay = overlay.resize(generated.size, Image.LANCZOS)
    composited = generated.convert("RGBA")
    composited.alpha_composite(overlay)
    return composited.convert("RGB")


# ---------------------------------------------------------------------------------------------- one request


def _pixels(params, key: str) -> float | None:
    value = params.extra.get(key)
    if value is None or value == "":
        return None
    try:
        blur = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a number of pixels >= 0, got {value!r}") from None
    if not blur >= 0 or math.isinf(blur):
        raise ValueError(f"{key} must be a number of pixels >= 0, got {value!r}")
    return blur


def mask_blurs_of(params) -> tuple[float, float]:
    """A request's ``(X, Y)`` blur: ``Mask blur X`` / ``Mask blur Y`` where given, else ``Mask blur`` (``params.extra``;
    numbers, or their text from a PNG's parameters), 0 when absent."""
    both = _pixels(params, MASK_BLUR_KEY)
    x, y = _pixels(params, MASK_BLUR_X_KEY), _pixels(params, MASK_BLUR_Y_KEY)
    return (both or 0.0) if x is None else x, (both or 0.0) if y is None else y


def mask_blur_of(params) -> float:
    """A request's ``Mask blur`` (the X blur when X and Y differ), 0 when absent."""
    return mask_blurs_of(params)[0]


def mask_blur_extra(x: float, y: float) -> dict[str, float]:
    """The ``params.extra`` entries for a blur of ``x`` / ``y`` pixels: ``{"Mask blur": x}`` when equal and above 0
    (what A1111 records), both diffusekit keys when they differ, nothing for 0."""
    number = lambda v: int(v) if float(v).is_integer() else v  # noqa: E731
    if x == y:
        return {MASK_BLUR_KEY: number(x)} if x > 0 else {}
    return {MASK_BLUR_X_KEY: number(x), MASK_BLUR_Y_KEY: number(y)}


def pil_per_image(image: Any, mask: Any, count: int, message: str) -> tuple[list, list]:
    """``image`` / ``mask`` (one for all or a list, one per output image) as two lists of ``count`` PIL images;
    ``ValueError(message)`` when any is not a PIL image."""
    images = list(image) if isinstance(image, (list, tuple)) else [image] * count
    masks = list(mask) if isinstance(mask, (list, tuple)) else [mask] * count
    if not all(hasattr(x, "convert") for x in images + masks):
        raise ValueError(message)
    return images, masks


def blur_masks(image: Any, mask: Any, requests: list, size: tuple[int | None, int | None]) -> tuple[Any, Any]:
    """``(mask for the pipeline, overlays or None)`` for one pipeline call of :func:`diffusekit.generation.generate`.

    ``image`` / ``mask``: one for all or one per output image; ``requests``: each output image's parameters. With
    every ``Mask blur`` at 0 the mask comes back as it was and there is nothing to composite. Otherwise each mask
    is taken as A1111 takes it (:func:`binary_mask`) and blurred at its own size (the upload's), then resized to
    ``size`` (width, height; default the image's) if it differs, in A1111's order (steps 1 to 3 above), and an
    overlay made from its image; images with a blur of 0 get ``None``.
    """
    blurs = [mask_blurs_of(r) for r in requests]
    if not any(x or y for x, y in blurs):
        return mask, None
    images, masks = pil_per_image(image, mask, len(requests), f"{MASK_BLUR_KEY} needs the image and the mask as PIL "
                                  "images (A1111 blurs 8-bit masks); pass PIL images, or a blur of 0")
    blurred, overlays = [], []
    for picture, one_mask, blur in zip(images, masks, blurs):
        if not any(blur):
            blurred.append(one_mask)
            overlays.append(None)
            continue
        target = size if size[0] and size[1] else picture.size
        one_mask = blurred_at_size(one_mask, blur, target)
        blurred.append(one_mask)
        overlays.append(overlay_for(picture, one_mask))
    single = not isinstance(mask, (list, tuple)) and len(set(blurs)) == 1
    return (blurred[0] if single else blurred), overlays


def blurred_at_size(mask, blur: tuple[float, float], size: tuple[int, int]) -> Any:
    """Steps 1 to 3 for one mask: :func:`blur_mask` at the mask's own size (``blur``: X and Y), then resized to
    ``size`` (width, height) with A1111's "just resize" (Lanczos) if it differs; a PIL ``L`` image."""
    blurred = blur_mask(mask, *blur)
    if blurred.size == tuple(size):
        return blurred
    from .inpaint_area import resize_image

    return resize_image(0, blurred, *size)


def apply_overlays(images: list, overlays: list) -> list:
    """Each generated image with its overlay composited over it (``None``: unchanged)."""
    if not all(hasattr(x, "convert") for x in images):
        raise ValueError(f"{MASK_BLUR_KEY} composites PIL images: use output_type='pil', or a blur of 0")
    return [image if overlay is None else apply_overlay(image, overlay) for image, overlay in zip(images, overlays)]
