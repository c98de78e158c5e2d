"""Image conversion shared by all pipelines: model tensors in [-1, 1] <-> PIL / numpy / torch for the user."""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import numpy as np
import torch

from ..configuration import ConfigMixin, register_to_config

logger = logging.getLogger(__name__)

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


# ====================================================================================================================
# preprocessing: user images and masks -> model tensors
# ====================================================================================================================

#: resampling filters by diffusers' names (PIL inputs only; arrays and tensors are resized with nearest neighbour)
RESAMPLE_FILTERS = {"nearest": 0, "lanczos": 1, "bilinear": 2, "linear": 2, "bicubic": 3}
RESIZE_MODES = ("default", "fill", "crop")


def _pil():
    from PIL import Image

    return Image


def _is_pil(x: Any) -> bool:
    try:
        return isinstance(x, _pil().Image)
    except ImportError:  # pragma: no cover - Pillow is a dependency
        return False


def image_kind(image: Any) -> str | None:
    """``"pil"``, ``"np"`` or ``"pt"`` for one image / a batch / a list of one kind; None for anything else."""
    items = image if isinstance(image, (list, tuple)) else [image]
    if len(items) == 0:
        return None
    for kind, check in (("pil", _is_pil), ("np", lambda x: isinstance(x, np.ndarray)),
                        ("pt", lambda x: isinstance(x, torch.Tensor))):
        if all(check(x) for x in items):
            if kind != "pil" and not all(x.ndim in (2, 3, 4) for x in items):
                return None
            return kind
    return None


def image_size(image: Any) -> tuple[int, int]:
    """(height, width) of a pipeline image input as given (PIL, numpy (H, W[, C]) / (B, H, W, C), torch
    (C, H, W) / (B, C, H, W)); for a list, of its first item."""
    first = image[0] if isinstance(image, (list, tuple)) else image
    if _is_pil(first):
        return first.height, first.width
    if isinstance(first, np.ndarray):
        if first.ndim == 4 or (first.ndim == 3 and first.shape[-1] in (1, 3, 4)):
            return tuple(first.shape[-3:-1])
        return tuple(first.shape[-2:])
    return tuple(first.shape[-2:])


class VaeImageProcessor(ConfigMixin):
    """Images and masks for the VAE, with the options and numerics of diffusers' ``VaeImageProcessor``.

    ``preprocess`` takes a PIL image, a numpy array ((H, W), (H, W, C) or (B, H, W, C), values in [0, 1]), a torch
    tensor ((C, H, W) or (B, C, H, W), values in [0, 1]) or a list of one of these, and returns a float tensor
    (B, C, H, W): resized so that H and W are multiples of ``vae_scale_factor`` (PIL images with ``resample``,
    arrays and tensors with nearest neighbour, as diffusers), mapped to [-1, 1] when ``do_normalize`` (a tensor that
    already has negative values is taken to be in [-1, 1] and left as it is), thresholded at 0.5 to {0, 1} when
    ``do_binarize``. A tensor with ``vae_latent_channels`` channels is taken to be latents and returned unchanged.

    The mask processor of the inpainting pipeline is ``VaeImageProcessor(do_normalize=False, do_binarize=True,
    do_convert_grayscale=True)``; ``pipe.mask_processor.blur(mask, blur_factor=33)`` softens a PIL mask first.

    Differences from diffusers, on purpose: uint8 arrays and tensors are divided by 255 (diffusers would treat
    0..255 values as [0, 1] ones); a list mixing kinds of input, or an empty list, is a ``TypeError`` naming them.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, do_resize: bool = True, vae_scale_factor: int = 8, vae_latent_channels: int = 4,
                 resample: str = "lanczos", reducing_gap: int | None = None, do_normalize: bool = True,
                 do_binarize: bool = False, do_convert_rgb: bool = False, do_convert_grayscale: bool = False):
        if do_convert_rgb and do_convert_grayscale:
            raise ValueError("do_convert_rgb and do_convert_grayscale cannot both be True")
        if resample not in RESAMPLE_FILTERS:
            raise ValueError(f"resample={resample!r}; expected one of {sorted(RESAMPLE_FILTERS)}")

    def __repr__(self) -> str:
        return f"VaeImageProcessor({', '.join(f'{k}={v!r}' for k, v in self.config.items())})"

    # ------------------------------------------------------------------ conversions

    numpy_to_pil = staticmethod(numpy_to_pil)

    @staticmethod
    def pil_to_numpy(images) -> np.ndarray:
        """PIL image(s) -> float32 array (B, H, W[, C]) in [0, 1]."""
        images = images if isinstance(images, (list, tuple)) else [images]
        return np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])

    @staticmethod
    def numpy_to_pt(images: np.ndarray) -> torch.Tensor:
        """(B, H, W[, C]) array -> (B, C, H, W) tensor."""
        if images.ndim == 3:
            images = images[..., None]
        return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))

    @staticmethod
    def pt_to_numpy(images: torch.Tensor) -> np.ndarray:
        return images.detach().cpu().permute(0, 2, 3, 1).float().numpy()

    @staticmethod
    def normalize(images):
        """[0, 1] -> [-1, 1]."""
        return 2.0 * images - 1.0

    @staticmethod
    def denormalize(images):
        """[-1, 1] -> [0, 1], clamped."""
        return (images * 0.5 + 0.5).clamp(0, 1)

    @staticmethod
    def binarize(image):
        """Values below 0.5 -> 0, the rest -> 1 (a new tensor)."""
        return (image >= 0.5).to(image.dtype)

    @staticmethod
    def convert_to_rgb(image):
        """A PIL image in RGB mode."""
        return image.convert("RGB")

    @staticmethod
    def convert_to_grayscale(image):
        """A PIL image in grayscale ("L") mode."""
        return image.convert("L")

    @staticmethod
    def blur(image, blur_factor: int = 4):
        """Gaussian blur of a PIL image (a soft mask edge); radius ``blur_factor``."""
        from PIL import ImageFilter

        return image.filter(ImageFilter.GaussianBlur(blur_factor))

    # ------------------------------------------------------------------ sizes

    def get_default_height_width(self, image, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """``height``/``width`` or the image's own size, rounded down to multiples of ``vae_scale_factor``.

        ``image``: a PIL image, a (B, C, H, W) tensor or a (B, H, W[, C]) array.
        """
        if _is_pil(image):
            size = (image.height, image.width)
        elif isinstance(image, torch.Tensor):
            size = tuple(image.shape[2:4])
        else:
            size = tuple(image.shape[1:3])
        height = size[0] if height is None else height
        width = size[1] if width is None else width
        factor = self.config.vae_scale_factor
        return height - height % factor, width - width % factor

    def _filter(self) -> int:
        return RESAMPLE_FILTERS[self.config.resample]

    def resize(self, image, height: int, width: int, resize_mode: str = "default"):
        """Resize to (height, width). PIL: ``resize_mode`` "default" (stretch), "fill" (fit inside, pad by stretching
        the edge rows/columns) or "crop" (cover, centre crop); arrays (B, H, W, C) and tensors (B, C, H, W):
        nearest-neighbour interpolation, "default" only."""
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode={resize_mode!r}; expected one of {list(RESIZE_MODES)}")
        if not _is_pil(image):
            if resize_mode != "default":
                raise ValueError(f"resize_mode={resize_mode!r} needs PIL images; got {type(image).__name__}")
            if isinstance(image, np.ndarray):
                return self.pt_to_numpy(self.resize(self.numpy_to_pt(image), height, width))
            return torch.nn.functional.interpolate(image, size=(height, width))
        if resize_mode == "default":
            return image.resize((width, height), resample=self._filter(), reducing_gap=self.config.reducing_gap)
        if resize_mode == "fill":
            return _resize_and_fill(image, width, height, self._filter())
        return _resize_and_crop(image, width, height, self._filter())

    # ------------------------------------------------------------------ preprocess / postprocess

    def preprocess(self, image, height: int | None = None, width: int | None = None, resize_mode: str = "default",
                   crops_coords: tuple[int, int, int, int] | None = None) -> torch.Tensor:
        """Pipeline input -> float tensor (B, C, H, W); see the class docstring."""
        kind = image_kind(image)
        if kind is None:
            kinds = sorted({type(x).__name__ for x in (image if isinstance(image, (list, tuple)) else [image])})
            raise TypeError(
                "image must be a PIL image, a numpy array or a torch tensor (2-4 dims), or a non-empty list of one "
                f"of these kinds; got {', '.join(kinds) or 'an empty list'}"
            )
        cfg = self.config
        single = not isinstance(image, (list, tuple))
        items = [image] if single else list(image)
        if kind == "pil":
            if crops_coords is not None:
                items = [im.crop(crops_coords) for im in items]
            if cfg.do_resize:
                height, width = self.get_default_height_width(items[0], height, width)
                items = [self.resize(im, height, width, resize_mode) for im in items]
            if cfg.do_convert_rgb:
                items = [im.convert("RGB") for im in items]
            elif cfg.do_convert_grayscale:
                items = [im.convert("L") for im in items]
            sizes = {im.size for im in items}
            if len(sizes) > 1:
                raise ValueError(f"the images of a batch must have one size; got {sorted(sizes)} (w, h)")
            images = self.numpy_to_pt(self.pil_to_numpy(items))
        elif kind == "np":
            items = [_unit_range(x) for x in items]
            if cfg.do_convert_grayscale and single and items[0].ndim == 3:
                # one (H, W, 1) image, or a batch of (H, W) masks: give it a batch / channel axis
                items = [items[0][None] if items[0].shape[-1] == 1 else items[0][..., None]]
            images = np.concatenate(items) if items[0].ndim == 4 else np.stack(items)
            images = self.numpy_to_pt(images)
            height, width = self.get_default_height_width(images, height, width)
            if cfg.do_resize:
                images = self.resize(images, height, width)
        else:
            items = [_unit_range(x) for x in items]
            if cfg.do_convert_grayscale and single and items[0].ndim == 3:
                items = [items[0].unsqueeze(1)]  # one tensor of (B, H, W) masks: add the channel axis
            if items[0].ndim == 2:
                items = [x[None] for x in items]  # (H, W) -> (1, H, W)
            images = torch.cat(items) if items[0].ndim == 4 else torch.stack(items)
            if images.shape[1] == cfg.vae_latent_channels:
                return images  # latents: no resizing, no normalisation
            height, width = self.get_default_height_width(images, height, width)
            if cfg.do_resize:
                images = self.resize(images, height, width)
        if cfg.do_normalize:
            if images.min() < 0:
                logger.warning(
                    "image values are in [%.3g, %.3g]: taken to be in [-1, 1] already and not normalised; pass "
                    "images in [0, 1]", float(images.min()), float(images.max()),
                )
            else:
                images = self.normalize(images)
        if cfg.do_binarize:
            images = self.binarize(images)
        return images

    def postprocess(self, image: torch.Tensor, output_type: str = "pil", do_denormalize: list[bool] | None = None):
        """(B, C, H, W) tensor -> ``output_type`` ("pil", "np", "pt" or "latent")."""
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"postprocess takes a torch tensor (B, C, H, W), got {type(image).__name__}")
        return postprocess(image, output_type, self.config.do_normalize if do_denormalize is None else do_denormalize)

    # ------------------------------------------------------------------ inpainting crops

    @staticmethod
    def get_crop_region(mask_image, width: int, height: int, pad: int = 0) -> tuple[int, int, int, int]:
        """The box (x1, y1, x2, y2) around the mask's non-zero pixels, grown by ``pad`` on every side and then
        widened (or heightened) to the aspect ratio ``width / height``, kept inside the image.

        An all-black mask gives the whole image (diffusers divides by zero there).
        """
        mask = np.asarray(mask_image.convert("L"))
        h, w = mask.shape
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        if len(rows) == 0:
            return 0, 0, w, h
        x1, x2 = max(int(cols[0]) - pad, 0), min(int(cols[-1]) + 1 + pad, w)
        y1, y2 = max(int(rows[0]) - pad, 0), min(int(rows[-1]) + 1 + pad, h)
        return expand_to_ratio((x1, y1, x2, y2), width / height, w, h)

    def apply_overlay(self, mask, init_image, image, crop_coords: tuple[int, int, int, int] | None = None):
        """Paste the generated ``image`` (of the crop ``crop_coords``, or of the whole picture) over ``init_image``
        where ``mask`` is white, keeping ``init_image``'s pixels where it is black (PIL images)."""
        from PIL import Image, ImageOps

        width, height = init_image.size
        # the original, premultiplied by the inverted mask, so it composites over the generated pixels
        kept = Image.new("RGBa", (width, height))
        kept.paste(init_image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
        kept = kept.convert("RGBA")
        if crop_coords is not None:
            x1, y1, x2, y2 = crop_coords
            canvas = Image.new("RGBA", (width, height))
            canvas.paste(self.resize(image, height=y2 - y1, width=x2 - x1, resize_mode="crop"), (x1, y1))
            image = canvas.convert("RGB")
        image = image.convert("RGBA")
        image.alpha_composite(kept)
        return image.convert("RGB")


def _unit_range(x):
    """uint8 arrays / tensors -> float32 in [0, 1]; bool -> float32 {0, 1}; other dtypes unchanged."""
    if isinstance(x, np.ndarray):
        if x.dtype == np.uint8:
            return x.astype(np.float32) / 255.0
        return x.astype(np.float32) if x.dtype == np.bool_ else x
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    return x.float() if x.dtype == torch.bool else x


def expand_to_ratio(box: tuple[int, int, int, int], ratio: float, limit_w: int,
                    limit_h: int) -> tuple[int, int, int, int]:
    """Grow ``box`` (x1, y1, x2, y2) along one axis to the aspect ratio ``ratio`` (width / height), centred, kept
    inside a ``limit_w`` x ``limit_h`` image (A1111's ``expand_crop_region``, its integer arithmetic)."""
    x1, y1, x2, y2 = box
    if (x2 - x1) / (y2 - y1) > ratio:
        y1, y2 = _grow_span(y1, y2, (x2 - x1) / ratio, limit_h)
    else:
        x1, x2 = _grow_span(x1, x2, (y2 - y1) * ratio, limit_w)
    return x1, y1, x2, y2


def _grow_span(lo: int, hi: int, wanted: float, limit: int) -> tuple[int, int]:
    """Grow [lo, hi) about its centre to ``int(wanted)`` long, then shift it back inside [0, limit)."""
    extra = int(wanted - (hi - lo))
    lo, hi = lo - extra // 2, hi + extra - extra // 2
    if hi >= limit:  # past the far edge: shift back
        lo, hi = lo - (hi - limit), limit
    if lo < 0:  # past the near edge: shift forward
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


def _resize_and_crop(image, width: int, height: int, resample: int):
    """Scale ``image`` to cover (width, height) keeping its aspect ratio, centred; the overflow is cut off."""
    from PIL import Image

    wide = width / height > image.width / image.height  # the target is wider than the image
    scaled_w = width if wide else image.width * height // image.height
    scaled_h = height if not wide else image.height * width // image.width
    scaled = image.resize((scaled_w, scaled_h), resample=resample)
    out = Image.new("RGB", (width, height))
    out.paste(scaled, box=(width // 2 - scaled_w // 2, height // 2 - scaled_h // 2))
    return out


def _resize_and_fill(image, width: int, height: int, resample: int):
    """Scale ``image`` to fit inside (width, height) keeping its aspect ratio, centred; the empty bands are filled
    by stretching the image's outermost row (top/bottom) or column (left/right)."""
    from PIL import Image

    target, source = width / height, image.width / image.height
    scaled_w = width if target < source else image.width * height // image.height
    scaled_h = height if target >= source else image.height * width // image.width
    scaled = image.resize((scaled_w, scaled_h), resample=resample)
    out = Image.new("RGB", (width, height))
    out.paste(scaled, box=(width // 2 - scaled_w // 2, height // 2 - scaled_h // 2))
    if target < source:  # bands above and below
        band = height // 2 - scaled_h // 2
        if band > 0:
            out.paste(scaled.resize((width, band), box=(0, 0, width, 0)), box=(0, 0))
            out.paste(scaled.resize((width, band), box=(0, scaled.height, width, scaled.height)),
                      box=(0, band + scaled_h))
    elif target > source:  # bands left and right
        band = width // 2 - scaled_w // 2
        if band > 0:
            out.paste(scaled.resize((band, height), box=(0, 0, 0, height)), box=(0, 0))
            out.paste(scaled.resize((band, height), box=(scaled.width, 0, scaled.width, height)),
                      box=(band + scaled_w, 0))
    return out


# ====================================================================================================================
# CLIP image preprocessing (the safety checker's feature_extractor)
# ====================================================================================================================

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_CONFIG = "preprocessor_config.json"


@dataclasses.dataclass
class BatchFeature:
    """What :class:`CLIPImageProcessor` returns: ``out.pixel_values`` (or ``out["pixel_values"]``)."""

    pixel_values: Any

    def __getitem__(self, key: str):
        return getattr(self, key)

    def to(self, *args, **kwargs) -> "BatchFeature":
        return BatchFeature(self.pixel_values.to(*args, **kwargs))


class CLIPImageProcessor:
    """transformers' ``CLIPImageProcessor`` (its PIL backend's numerics): RGB, resize the shortest side to
    ``size["shortest_edge"]`` (bicubic, on 8-bit pixels), center crop to ``crop_size`` (zero padding when smaller),
    rescale by ``rescale_factor`` and normalise with ``image_mean`` / ``image_std``.

    Reads and writes ``preprocessor_config.json`` (``feature_extractor/`` in SD folders); ``size`` / ``crop_size``
    given as plain ints (old files) work too. ``processor(images, return_tensors="pt").pixel_values`` is a float32
    tensor (B, 3, H, W). Images: PIL, or arrays / tensors in [0, 1] (float) or 0..255 (uint8), (H, W, C) or
    (C, H, W), single or in a list.
    """

    _pipeline_component = True  # model_index.json may name it (pipelines/base.py: _resolve_class)

    _library_name = "transformers"  # model_index.json entry: ["transformers", "CLIPImageProcessor"]

    def __init__(self, do_resize: bool = True, size: int | dict[str, int] | None = None, resample: int = 3,
                 do_center_crop: bool = True, crop_size: int | dict[str, int] | None = None, do_rescale: bool = True,
                 rescale_factor: float = 1 / 255, do_normalize: bool = True,
                 image_mean: float | list[float] | None = None, image_std: float | list[float] | None = None,
                 do_convert_rgb: bool = True, **unused: Any):
        size = 224 if size is None else size
        self.size = {"shortest_edge": size} if isinstance(size, int) else dict(size)
        crop = 224 if crop_size is None else crop_size
        self.crop_size = {"height": crop, "width": crop} if isinstance(crop, int) else dict(crop)
        if "shortest_edge" not in self.size and not {"height", "width"} <= set(self.size):
            raise ValueError(f"size must hold 'shortest_edge' or 'height' and 'width', got {self.size}")
        self.do_resize, self.resample, self.do_center_crop = do_resize, int(resample), do_center_crop
        self.do_rescale, self.rescale_factor, self.do_normalize = do_rescale, rescale_factor, do_normalize
        self.image_mean = list(OPENAI_CLIP_MEAN if image_mean is None else image_mean)
        self.image_std = list(OPENAI_CLIP_STD if image_std is None else image_std)
        self.do_convert_rgb = do_convert_rgb

    def to_dict(self) -> dict[str, Any]:
        return {
            "do_resize": self.do_resize, "size": self.size, "resample": self.resample,
            "do_center_crop": self.do_center_crop, "crop_size": self.crop_size, "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor, "do_normalize": self.do_normalize, "image_mean": self.image_mean,
            "image_std": self.image_std, "do_convert_rgb": self.do_convert_rgb,
            "image_processor_type": "CLIPImageProcessor",
        }

    def __repr__(self) -> str:
        return f"CLIPImageProcessor({self.to_dict()})"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None, **hub_kwargs: Any):
        from ..configuration import read_json
        from ..hub import resolve_file, split_hub_kwargs

        hub = split_hub_kwargs(hub_kwargs)
        path = resolve_file(pretrained_model_name_or_path, PREPROCESSOR_CONFIG, subfolder, **hub)
        return cls(**read_json(path, what="image processor config"))

    def save_pretrained(self, save_directory, **_ignored: Any):
        from pathlib import Path

        from .._io import atomic_write_text

        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / PREPROCESSOR_CONFIG, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    # ------------------------------------------------------------------ processing

    def _to_uint8_rgb(self, image) -> "np.ndarray":
        """One image -> (H, W, C) uint8 array (RGB when do_convert_rgb)."""
        if not _is_pil(image):
            array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
            if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
                array = array.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
            if array.dtype != np.uint8:
                array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
            image = _pil().fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)
        if self.do_convert_rgb:
            if "A" in image.getbands() or image.info.get("transparency") is not None:  # onto white, as transformers
                rgba = image.convert("RGBA")
                image = _pil().alpha_composite(_pil().new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            image = image.convert("RGB")
        return np.asarray(image)

    def _resize(self, array: "np.ndarray") -> "np.ndarray":
        height, width = array.shape[:2]
        if "shortest_edge" in self.size:
            short_side = self.size["shortest_edge"]
            short, long = sorted((height, width))
            new_long = int(short_side * long / short)
            new_h, new_w = (new_long, short_side) if width <= height else (short_side, new_long)
        else:
            new_h, new_w = self.size["height"], self.size["width"]
        resized = _pil().fromarray(array).resize((new_w, new_h), resample=self.resample)
        return np.asarray(resized)

    def _center_crop(self, array: "np.ndarray") -> "np.ndarray":
        """Crop (H, W, C) to crop_size about the centre, zero-padding first when the image is smaller."""
        crop_h, crop_w = self.crop_size["height"], self.crop_size["width"]
        height, width = array.shape[:2]
        pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
        if pad_h or pad_w:  # centred in a zero canvas (the extra row / column goes before)
            top, left = -(-pad_h // 2), -(-pad_w // 2)
            array = np.pad(array, ((top, pad_h - top), (left, pad_w - left), (0, 0)))
            height, width = array.shape[:2]
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        return array[top : top + crop_h, left : left + crop_w]

    def preprocess(self, images, return_tensors: str | None = "pt", **_ignored: Any) -> BatchFeature:
        items = images if isinstance(images, (list, tuple)) else (
            list(images) if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4 else [images])
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)
        out = []
        for image in items:
            array = self._to_uint8_rgb(image)
            if array.ndim == 2:
                array = array[..., None]
            if self.do_resize:
                array = self._resize(array)
                array = array[..., None] if array.ndim == 2 else array
            if self.do_center_crop:
                array = self._center_crop(array)
            values = array.astype(np.float32)
            if self.do_rescale:
                values = (array.astype(np.float64) * self.rescale_factor).astype(np.float32)
            if self.do_normalize:
                values = (values - mean) / std
            out.append(values.transpose(2, 0, 1))  # (C, H, W)
        batch = np.stack(out)
        if return_tensors is None:
            return BatchFeature(list(batch))
        if return_tensors not in ("pt", "np"):
            raise ValueError(f"return_tensors={return_tensors!r}; expected 'pt', 'np' or None")
        return BatchFeature(torch.from_numpy(batch) if return_tensors == "pt" else batch)

    __call__ = preprocess


CLIPFeatureExtractor = CLIPImageProcessor  # the name older SD folders use in model_index.json
CLIPImageProcessorPil = CLIPImageProcessor  # the name transformers 5 saves it under when torchvision is missing
