"""Stable Diffusion depth-to-image: image-to-image whose UNet also sees a depth map (5 input channels).

The depth map (any size, any scale: larger = farther or nearer, only its shape matters) is resized to the latent
size with bicubic interpolation and scaled to [-1, 1] per image, as in diffusers. Give it as ``depth_map`` (a
(B, H, W) or (H, W) tensor or array), or let the ``depth_estimator`` component (transformers'
``DPTForDepthEstimation``, with its ``feature_extractor``, a ``DPTImageProcessor``) estimate it from the image.
Those two components are the only ones diffusekit does not implement: loading them imports transformers (the
``depth`` extra) lazily; without it, load the pipeline with ``depth_estimator=None, feature_extractor=None`` and pass
``depth_map`` to each call.

Differences from diffusers, on purpose (besides those of image-to-image): a constant depth map becomes zeros
(diffusers divides by zero); the depth map's size is taken from the image correctly for numpy inputs (diffusers
swaps height and width there); numpy depth maps are accepted; both components are optional.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

from .base import ImagePipelineOutput
from .call_signatures import CALLBACKS, OURS, OUTPUT, SAMPLING, call_signature
from .stable_diffusion_img2img import StableDiffusionImg2ImgPipeline

_NEEDS_TRANSFORMERS = (
    "{name} is a transformers class (the depth estimator of StableDiffusionDepth2ImgPipeline): loading it needs "
    "the transformers package, which is not installed. Install it (`pip install 'diffusekit[depth]'` or `pip "
    "install transformers`), or do without the estimator: load the pipeline with depth_estimator=None, "
    "feature_extractor=None and give each call a depth map, pipe(prompt, image=..., depth_map=<(B, H, W) tensor>)."
)


class _TransformersComponent:
    """Loads the transformers class of the same name (for ``["transformers", Name]`` entries of model_index.json
    that diffusekit does not implement itself); transformers is imported only here."""

    _pipeline_component = True  # model_index.json may name it (pipelines/base.py: _resolve_class)

    _library_name = "transformers"

    def __init__(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} only loads transformers' class: use "
                        f"{type(self).__name__}.from_pretrained(...) or transformers.{type(self).__name__}")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None, **kwargs):
        try:
            import transformers
        except ImportError as err:
            raise ImportError(_NEEDS_TRANSFORMERS.format(name=cls.__name__)) from err
        # older names (DPTFeatureExtractor, in SD 2 depth checkpoints) are gone from recent transformers
        loader = getattr(transformers, cls.__name__, None) or getattr(transformers, cls._fallback)
        return loader.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)


class DPTForDepthEstimation(_TransformersComponent):
    """transformers' ``DPTForDepthEstimation`` (the depth estimator of SD 2 depth checkpoints), loaded lazily."""

    _fallback = "AutoModelForDepthEstimation"


class DPTImageProcessor(_TransformersComponent):
    """transformers' DPT image processor (the depth estimator's preprocessing), loaded lazily."""

    _fallback = "AutoImageProcessor"


class DPTImageProcessorPil(DPTImageProcessor):
    """The name transformers 5 saves its DPT image processor under when torchvision is missing."""


class DPTFeatureExtractor(DPTImageProcessor):
    """The name of the DPT processor in SD 2 depth checkpoints (older transformers)."""


def normalize_depth(depth: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) depth -> (B, 1, h, w) at ``size`` (bicubic), scaled to [-1, 1] per image (a flat map: zeros)."""
    depth = torch.nn.functional.interpolate(depth.unsqueeze(1), size=size, mode="bicubic", align_corners=False)
    low = torch.amin(depth, dim=[1, 2, 3], keepdim=True)
    high = torch.amax(depth, dim=[1, 2, 3], keepdim=True)
    span = high - low
    return torch.where(span > 0, 2.0 * (depth - low) / span.clamp_min(torch.finfo(depth.dtype).tiny) - 1.0,
                       torch.zeros_like(depth))


class StableDiffusionDepth2ImgPipeline(StableDiffusionImg2ImgPipeline):
    """``pipe(prompt, image=..., depth_map=None, strength=0.8).images``: depth-guided image-to-image.

    Components: ``vae``, ``text_encoder``, ``tokenizer``, ``unet`` (latents + depth: 5 input channels),
    ``scheduler``; ``depth_estimator`` and ``feature_extractor`` may be None when each call passes ``depth_map``.
    There is no safety checker (as in diffusers); the output is an :class:`ImagePipelineOutput`.
    """

    component_names = ("vae", "text_encoder", "tokenizer", "unet", "scheduler", "depth_estimator",
                       "feature_extractor")
    _optional_components = ("depth_estimator", "feature_extractor")
    _option_names = ()
    _callback_tensor_inputs = ("latents", "prompt_embeds", "negative_prompt_embeds", "depth_mask")
    safety_checker = None  # none in depth2img checkpoints; run_safety_checker passes images through

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, depth_estimator=None, feature_extractor=None):
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                              depth_estimator=depth_estimator, feature_extractor=feature_extractor)

    # ------------------------------------------------------------------ depth

    def estimate_depth(self, image: Any, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(B, H, W) depth of the user's ``image`` from ``depth_estimator`` (larger = nearer, DPT's convention)."""
        if self.depth_estimator is None or self.feature_extractor is None:
            raise ValueError(
                "no depth_map was given and this pipeline has no depth estimator (depth_estimator / "
                "feature_extractor are None): pass depth_map=<(B, H, W) tensor or array>, or load the pipeline "
                "with transformers installed so its DPT depth estimator loads"
            )
        images = image if isinstance(image, (list, tuple)) else (
            [image] if not isinstance(image, (np.ndarray, torch.Tensor)) or image.ndim < 4 else list(image))
        pixels = self.feature_extractor(images=images, return_tensors="pt").pixel_values.to(device=device, dtype=dtype)
        # DPT-hybrid's batch norms misbehave in half precision: autocast there, as diffusers does
        autocast = (torch.autocast(device.type, dtype=dtype) if dtype in (torch.float16, torch.bfloat16)
                    else contextlib.nullcontext())
        with autocast:
            return self.depth_estimator(pixels).predicted_depth

    def prepare_depth_map(self, image: Any, depth_map: Any, latent_size: tuple[int, int], batch: int,
                          num_images_per_prompt: int, do_cfg: bool, dtype: torch.dtype,
                          device: torch.device) -> torch.Tensor:
        """The UNet's extra input: (2B or B, 1, h, w) depth in [-1, 1]."""
        if depth_map is None:
            depth = self.estimate_depth(image, device, dtype)
        else:
            depth = torch.as_tensor(np.asarray(depth_map) if not isinstance(depth_map, torch.Tensor) else depth_map)
            if depth.ndim == 4 and depth.shape[1] == 1:
                depth = depth[:, 0]
            elif depth.ndim == 2:
                depth = depth[None]
            if depth.ndim != 3:
                raise ValueError(f"depth_map must be (B, H, W), (H, W) or (B, 1, H, W); got shape "
                                 f"{tuple(depth.shape)}")
            depth = depth.to(device=device, dtype=dtype)
        depth = normalize_depth(depth, latent_size).to(dtype)
        self.check_image_batch(depth, batch, num_images_per_prompt, what="depth map")
        depth = depth.repeat_interleave(batch // depth.shape[0], dim=0)
        return torch.cat([depth] * 2) if do_cfg else depth

    # ------------------------------------------------------------------ call

    @torch.no_grad()
    @call_signature("prompt image depth_map strength num_inference_steps guidance_scale negative_prompt "
                    f"{SAMPLING} prompt_embeds negative_prompt_embeds {OUTPUT} {CALLBACKS} {OURS}")
    def __call__(self, call) -> ImagePipelineOutput | tuple[Any]:
        """Depth-guided image-to-image (diffusers' signature)."""
        device, scheduler, (prompt_embeds, negative_prompt_embeds) = self.prepare_call(call)
        batch, dtype = prompt_embeds.shape[0], prompt_embeds.dtype
        pixels = self.image_processor.preprocess(call.image)
        latent_size = tuple(pixels.shape[-2:]) if self._is_latents(pixels) else \
            tuple(s // self.vae_scale_factor for s in pixels.shape[-2:])
        depth = self.prepare_depth_map(call.image, call.depth_map, latent_size, batch, call.num_images_per_prompt,
                                       self.do_classifier_free_guidance, dtype, device)
        run, latents = self.image_start(call, scheduler, pixels, batch, dtype, device)
        latents = self.denoise_call(call, scheduler, run,
                                    self.loop_tensors(latents, prompt_embeds, negative_prompt_embeds, depth_mask=depth),
                                    batch, device, concat=("depth_mask",))
        images, _ = self.latents_to_images(latents, call.output_type)
        return ImagePipelineOutput(images=images) if call.return_dict else (images,)
