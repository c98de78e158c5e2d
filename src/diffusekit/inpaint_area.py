"""AUTOMATIC1111's "Inpaint area: Only masked" (``inpaint_full_res`` in its API): inpaint a crop around the mask at
the full working size, then paste it back into the untouched image.

A1111's order (``modules/processing.py``, ``StableDiffusionProcessingImg2Img.init``; ``modules/masking.py``;
``apply_overlay`` / ``uncrop``), which :func:`diffusekit.generation.generate` follows when a request's
``extra["Inpaint area"]`` is ``"Only masked"``:

1. the mask is made binary and blurred (``Mask blur``, :mod:`diffusekit.mask_blur`) at its own size, as A1111
   does (a mask of another size than the image is then resized to the image's, which A1111 does not: it expects
   them alike); the image is not resized to the working size;
2. the crop region is the bounding box of the blurred mask's non-zero pixels, widened by ``Masked area padding``
   pixels on each side (clipped to the image), then grown along one axis to the working size's aspect ratio
   (:func:`expand_crop_region`, A1111's integer arithmetic); a blank mask has no region: the request runs as
   image-to-image on the whole picture, as A1111 does;
3. the image and the blurred mask are cropped to it and scaled to the working size with A1111's "resize and fill"
   (:func:`resize_image` mode 2, Lanczos), and the pipeline inpaints that;
4. each result is scaled back to the region's size with "crop and resize" (mode 1), placed at the region on a
   transparent canvas of the image's size, and the original image, with alpha ``255 - blurred mask`` (not doubled,
   unlike whole-picture inpainting), is composited over it.

The result has the input image's size. Pillow and numpy; the widening and the resize modes are those of
:mod:`diffusekit.pipelines.image_processor` (diffusers ported them from A1111).
"""

from __future__ import annotations

from typing import Any

__all__ = ["INPAINT_AREA_KEY", "ONLY_MASKED", "PADDING_KEY", "crop_region", "crop_to_masks", "expand_crop_region",
           "only_masked", "only_masked_padding", "paste_back", "resize_image"]

#: the infotext keys A1111 records "only masked" inpainting under
INPAINT_AREA_KEY, PADDING_KEY = "Inpaint area", "Masked area padding"
ONLY_MASKED = "Only masked"


def only_masked_padding(params) -> int | None:
    """The padding of a request for "only masked" inpainting (``params.extra``), None for the whole picture."""
    area = params.extra.get(INPAINT_AREA_KEY)
    if area is None or area == "" or str(area).lower() == "whole picture":
        return None
    if str(area).lower() != ONLY_MASKED.lower():
        raise ValueError(f"{INPAINT_AREA_KEY} must be {ONLY_MASKED!r} or 'Whole picture', got {area!r}")
    value = params.extra.get(PADDING_KEY, 0)
    try:
        padding = int(float(value))
    except (TypeError, ValueError):
        raise ValueError(f"{PADDING_KEY} must be a number of pixels >= 0, got {value!r}") from None
    if padding < 0:
        raise ValueError(f"{PADDING_KEY} must be a number of pixels >= 0, got {value!r}")
    return padding


def crop_region(mask, padding: int = 0) -> tuple[int, int, int, int] | None:
    """A1111's ``get_crop_region_v2``: ``(x1, y1, x2, y2)`` around the mask's non-zero pixels, ``padding`` pixels
    wider on each side within the image; None for a blank mask."""
    box = mask.convert("L").getbbox()
    if not box:
        return None
    x1, y1, x2, y2 = box
    if not padding:
        return box
    return max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, mask.size[0]), min(y2 + padding, mask.size[1])


def expand_crop_region(region: tuple[int, int, int, int], width: int, height: int, image_width: int,
                       image_height: int) -> tuple[int, int, int, int]:
    """A1111's ``expand_crop_region``: grow ``region`` along one axis to the aspect ratio ``width / height``,
    centred, shifted back inside the image (and cut at its edge if it is still too large). The growing is the
    inpainting image processor's (``VaeImageProcessor.get_crop_region``, diffusers' port of the same code)."""
    from .pipelines.image_processor import expand_to_ratio

    return expand_to_ratio(region, width / height, image_width, image_height)


def resize_image(mode: int, image, width: int, height: int) -> Any:
    """A1111's ``images.resize_image`` without an upscaler (its default), Lanczos: 0 just resize, 1 crop and resize
    (scale to cover, centre), 2 resize and fill (scale to fit, centre, the empty bands filled by stretching the edge
    rows or columns). Modes 1 and 2 return RGB images, as A1111's; they are the image processor's ``"crop"`` /
    ``"fill"`` resizes (diffusers ported them from A1111)."""
    from PIL import Image

    from .pipelines.image_processor import _resize_and_crop, _resize_and_fill

    modes = {0: lambda *a: image.resize((width, height), resample=Image.LANCZOS), 1: _resize_and_crop,
             2: _resize_and_fill}
    if mode not in modes:
        raise ValueError(f"resize mode must be 0 (just resize), 1 (crop and resize) or 2 (resize and fill), got "
                         f"{mode!r}")
    return modes[mode](image, width, height, Image.LANCZOS)


def only_masked(image, blurred_mask, width: int, height: int, padding: int):
    """Steps 2 and 3 for one image: ``(image crop, mask crop, paste)`` at the working size, ``paste`` being what
    :func:`paste_back` needs; None for a blank mask. ``blurred_mask`` is step 1's, at the image's size."""
    from .mask_blur import overlay_for

    region = crop_region(blurred_mask, padding)
    if region is None:
        return None
    region = expand_crop_region(region, width, height, blurred_mask.width, blurred_mask.height)
    crop_image = resize_image(2, image.convert("RGB").crop(region), width, height)
    crop_mask = resize_image(2, blurred_mask.convert("L").crop(region), width, height).convert("L")
    return crop_image, crop_mask, (region, overlay_for(image, blurred_mask, double=False))


def paste_back(generated, paste) -> Any:
    """Step 4: ``generated`` (the working size) scaled into its region of a transparent canvas of the image's size,
    the original composited over it through the blurred mask; RGB."""
    from PIL import Image

    (x1, y1, x2, y2), overlay = paste
    canvas = Image.new("RGBA", overlay.size)
    canvas.paste(resize_image(1, generated.convert("RGB"), x2 - x1, y2 - y1), (x1, y1))
    canvas.alpha_composite(overlay)
    return canvas.convert("RGB")


def crop_to_masks(image: Any, mask: Any, requests: list, width: int | None, height: int | None,
                  padding: int) -> tuple[Any, Any, list] | None:
    """Steps 1 to 3 for one pipeline call of :func:`diffusekit.generation.generate`: ``(images, masks, pastes)``
    to run and paste back, one paste per output image; None when every mask is blank (run image-to-image).

    ``image`` / ``mask``: one for all or one per output image (PIL); ``requests``: each output image's parameters
    (their ``Mask blur`` applies); ``width`` / ``height``: the working size (default the image's).
    """
    from .mask_blur import blurred_at_size, mask_blurs_of, pil_per_image

    count = len(requests)
    images, masks = pil_per_image(image, mask, count, f"{INPAINT_AREA_KEY}: {ONLY_MASKED} crops PIL images: pass the "
                                  "image and the mask as PIL images")
    done: dict[tuple, Any] = {}
    crops = []
    for picture, one_mask, request in zip(images, masks, requests):
        blurs = mask_blurs_of(request)
        key = (id(picture), id(one_mask), blurs)
        if key not in done:  # the crop region is found on the mask, cut from the image: the mask takes its size
            done[key] = only_masked(picture, blurred_at_size(one_mask, blurs, picture.size), width or picture.width,
                                    height or picture.height, padding)
        crops.append(done[key])
    if all(crop is None for crop in crops):
        return None
    if any(crop is None for crop in crops):
        raise ValueError(f"{INPAINT_AREA_KEY}: {ONLY_MASKED} with a blank mask for some images of a batch but not "
                         "all: run them separately")
    pastes = [crop[2] for crop in crops]
    if len({id(crop) for crop in crops}) == 1:
        crop_image, crop_mask, _ = crops[0]
        return ([crop_image] * count if isinstance(image, (list, tuple)) else crop_image), crop_mask, pastes
    return [crop[0] for crop in crops], [crop[1] for crop in crops], pastes
