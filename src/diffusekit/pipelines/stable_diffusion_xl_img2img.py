"""Stable Diffusion XL image-to-image, and the refiner: SDXL's prompt encoding and size conditioning
(:mod:`.stable_diffusion_xl`) on image-to-image latents (:class:`.pieces.ImageToImageMixin`).

The refiner (``stabilityai/stable-diffusion-xl-refiner-1.0``) has only ``text_encoder_2`` and conditions on an
aesthetic score instead of the target size (``requires_aesthetics_score`` in model_index.json). Ensemble of experts,
as in diffusers::

    latents = base(prompt, num_inference_steps=40, denoising_end=0.8, output_type="latent").images
    image = refiner(prompt, image=latents, num_inference_steps=40, denoising_start=0.8).images[0]

``denoising_start`` picks the steps below that fraction of the schedule and starts from ``image`` (latents) as it
is, without adding noise; ``strength`` is then ignored. Differences from diffusers: those of
:class:`.StableDiffusionXLPipeline`, and at least one step runs whatever the strength (as in SD image-to-image).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..random import Generator
from .pieces import ImageToImageMixin, cut_at_denoising_end, set_strength_schedule
from .stable_diffusion_xl import Size, StableDiffusionXLPipeline, StableDiffusionXLPipelineOutput, _size


class XLImageConditioningMixin:
    """Time ids of SDXL's image-to-image and inpainting pipelines: original size + crop + (aesthetic score when
    ``requires_aesthetics_score``, else target size), with diffusers' defaults for the negative ones."""

    def image_time_ids(self, height: int, width: int, original_size, crops_coords_top_left, target_size,
                       aesthetic_score: float, negative_aesthetic_score: float, negative_original_size,
                       negative_crops_coords_top_left, negative_target_size) -> tuple[tuple, tuple]:
        size = (height, width)
        original = _size(original_size, "original_size", size)
        target = _size(target_size, "target_size", size)
        crops = _size(crops_coords_top_left, "crops_coords_top_left", (0, 0))
        negative_original = _size(negative_original_size, "negative_original_size", original)
        negative_target = _size(negative_target_size, "negative_target_size", target)
        if self._options.get("requires_aesthetics_score", False):
            negative_crops = _size(negative_crops_coords_top_left, "negative_crops_coords_top_left", (0, 0))
            return (*original, *crops, aesthetic_score), (*negative_original, *negative_crops, negative_aesthetic_score)
        return (*original, *crops, *target), (*negative_original, *crops, *negative_target)  # (sic) diffusers' crops


class StableDiffusionXLImg2ImgPipeline(XLImageConditioningMixin, ImageToImageMixin, StableDiffusionXLPipeline):
    """``pipe(prompt, image=..., strength=0.3).images``: SDXL image-to-image and the refiner (module docstring).

    Components as :class:`StableDiffusionXLPipeline` (``text_encoder`` / ``tokenizer`` may be None: the refiner);
    options ``requires_aesthetics_score`` and ``force_zeros_for_empty_prompt``.
    """

    _option_names = ("requires_aesthetics_score", "force_zeros_for_empty_prompt", "add_watermarker")

    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler,
                 image_encoder=None, feature_extractor=None, requires_aesthetics_score: bool = False,
                 force_zeros_for_empty_prompt: bool = True, add_watermarker: bool | None = None):
        super().__init__(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, image_encoder,
                         feature_extractor, force_zeros_for_empty_prompt, add_watermarker)
        self.register_options(requires_aesthetics_score=requires_aesthetics_score)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        image: Any = None,
        strength: float = 0.3,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Generator = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: Any = None,
        ip_adapter_image_embeds: Any = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        original_size: Size | None = None,
        crops_coords_top_left: Size = (0, 0),
        target_size: Size | None = None,
        negative_original_size: Size | None = None,
        negative_crops_coords_top_left: Size = (0, 0),
        negative_target_size: Size | None = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> StableDiffusionXLPipelineOutput | tuple[Any]:
        if image is None:
            raise ValueError("image is required: the picture (or the base model's latents) to start from")
        output_type, device, scheduler, embeds = self._prepare_call(
            prompt, prompt_2, negative_prompt, negative_prompt_2, prompt_embeds, negative_prompt_embeds,
            pooled_prompt_embeds, negative_pooled_prompt_embeds, num_inference_steps, num_images_per_prompt,
            denoising_start, denoising_end, ip_adapter_image, ip_adapter_image_embeds, output_type,
            callback_on_step_end_tensor_inputs, clip_skip, strength=strength, guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale, cross_attention_kwargs=cross_attention_kwargs,
        )
        prompt_embeds, negative_prompt_embeds, pooled, negative_pooled = embeds
        image = self.image_processor.preprocess(image)
        batch = prompt_embeds.shape[0]
        run, _ = set_strength_schedule(scheduler, num_inference_steps, strength, device, timesteps, sigmas,
                                       denoising_start)
        if latents is None:
            latents = self.image_latents(image, batch, num_images_per_prompt, generator, prompt_embeds.dtype, device)
            if denoising_start is None:
                latents, _ = self.noised_latents(scheduler, latents, run[:1], generator)
        ids, negative_ids = self.image_time_ids(
            latents.shape[-2] * self.vae_scale_factor, latents.shape[-1] * self.vae_scale_factor, original_size,
            crops_coords_top_left, target_size, aesthetic_score, negative_aesthetic_score, negative_original_size,
            negative_crops_coords_top_left, negative_target_size,
        )
        extras = self.size_conditioning(pooled, negative_pooled, ids, negative_ids, batch, device)
        latents = self.denoise(
            scheduler, cut_at_denoising_end(scheduler, run, denoising_end),
            self.loop_tensors(latents, prompt_embeds, negative_prompt_embeds, **extras),
            generator=generator, eta=eta,
            timestep_cond=self.guidance_condition(guidance_scale, batch, device, latents.dtype),
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            added_cond={"text_embeds": "add_text_embeds", "time_ids": "add_time_ids"},
        )
        images = self.latents_to_images(latents, output_type)
        return StableDiffusionXLPipelineOutput(images=images) if return_dict else (images,)

