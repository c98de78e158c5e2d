"""Stable Diffusion XL inpainting: SDXL's prompt encoding and size conditioning with the inpainting pieces of
:mod:`.stable_diffusion_inpaint` (9-channel inpainting UNets, e.g. ``diffusers/stable-diffusion-xl-1.0-inpainting-0.1``,
or ordinary SDXL UNets with the kept region put back after each step). ``denoising_start`` / ``denoising_end`` hand
latents between a base and a refiner as in :mod:`.stable_diffusion_xl_img2img`.

Differences from diffusers: those of :class:`.StableDiffusionXLPipeline` and of SD inpainting (``image`` and
``mask_image`` of one size, at least one step whatever the strength).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..random import Generator
from .pieces import cut_at_denoising_end, set_strength_schedule
from .stable_diffusion_inpaint import InpaintMixin
from .stable_diffusion_xl import Size, StableDiffusionXLPipelineOutput
from .stable_diffusion_xl_img2img import StableDiffusionXLImg2ImgPipeline


class StableDiffusionXLInpaintPipeline(InpaintMixin, StableDiffusionXLImg2ImgPipeline):
    """``pipe(prompt, image=..., mask_image=...).images``: SDXL inpainting (white in the mask = repaint).

    Inputs as :class:`.StableDiffusionInpaintPipeline`; components and options as
    :class:`.StableDiffusionXLImg2ImgPipeline`.
    """

    _callback_tensor_inputs = ("latents", "prompt_embeds", "add_text_embeds", "add_time_ids", "mask",
                               "masked_image_latents")

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        image: Any = None,
        mask_image: Any = None,
        masked_image_latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        strength: float = 0.9999,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 7.5,
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
        factor = self.vae_scale_factor
        height = height or self.unet.config.sample_size * factor
        width = width or self.unet.config.sample_size * factor
        self.check_inpaint_inputs(image, mask_image, height, width, padding_mask_crop, output_type,
                                  masked_image_latents)
        unet_kind = self._unet_kind()
        output_type, device, scheduler, embeds = self._prepare_call(
            prompt, prompt_2, negative_prompt, negative_prompt_2, prompt_embeds, negative_prompt_embeds,
            pooled_prompt_embeds, negative_pooled_prompt_embeds, num_inference_steps, num_images_per_prompt,
            denoising_start, denoising_end, ip_adapter_image, ip_adapter_image_embeds, output_type,
            callback_on_step_end_tensor_inputs, clip_skip, height=height, width=width, strength=strength,
            guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
            cross_attention_kwargs=cross_attention_kwargs,
        )
        prompt_embeds, negative_prompt_embeds, pooled, negative_pooled = embeds
        batch, dtype = prompt_embeds.shape[0], prompt_embeds.dtype
        run, _ = set_strength_schedule(scheduler, num_inference_steps, strength, device, timesteps, sigmas,
                                       denoising_start)
        init_image, mask, crop = self.inpaint_pixels(image, mask_image, height, width, padding_mask_crop)
        latents, noise, image_latents = self.inpaint_latents(
            scheduler, run, init_image, latents, batch, num_images_per_prompt, generator, dtype, device, height,
            width, from_noise=strength == 1.0, need_image_latents=unet_kind == 4, add_noise=denoising_start is None,
        )
        mask, masked = self.mask_latents(init_image, mask, masked_image_latents, latents.shape[2:], batch,
                                         num_images_per_prompt, generator, dtype, device)
        ids, negative_ids = self.image_time_ids(
            latents.shape[-2] * factor, latents.shape[-1] * factor, original_size, crops_coords_top_left, target_size,
            aesthetic_score, negative_aesthetic_score, negative_original_size, negative_crops_coords_top_left,
            negative_target_size,
        )
        extras = self.size_conditioning(pooled, negative_pooled, ids, negative_ids, batch, device)
        run = cut_at_denoising_end(scheduler, run, denoising_end)
        latents = self.denoise(
            scheduler, run,
            self.loop_tensors(latents, prompt_embeds, negative_prompt_embeds, mask=mask, masked_image_latents=masked,
                              **extras),
            generator=generator, eta=eta,
            timestep_cond=self.guidance_condition(guidance_scale, batch, device, latents.dtype),
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            concat=("mask", "masked_image_latents") if unet_kind == 9 else (),
            added_cond={"text_embeds": "add_text_embeds", "time_ids": "add_time_ids"},
            after_step=self.keep_unmasked(scheduler, run, image_latents, noise) if unet_kind == 4 else None,
        )
        images = self.latents_to_images(latents, output_type)
        if crop is not None:
            images = [self.image_processor.apply_overlay(mask_image, image, im, crop) for im in images]
        return StableDiffusionXLPipelineOutput(images=images) if return_dict else (images,)
