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

from typing import Any

import torch

from .call_signatures import CALLBACKS, OURS, OUTPUT, SAMPLING, XL_EMBEDS, XL_SIZES, call_signature
from .pieces import ImageToImageMixin, cut_at_denoising_end
from .stable_diffusion_xl import ADDED_COND, StableDiffusionXLPipeline, StableDiffusionXLPipelineOutput, _size


class XLImageConditioningMixin:
    """Time ids of SDXL's image-to-image and inpainting pipelines: original size + crop + (aesthetic score when
    ``requires_aesthetics_score``, else target size), with diffusers' defaults for the negative ones."""

    def time_id_pairs(self, call, height: int, width: int) -> tuple[tuple, tuple]:
        size = (height, width)
        original = _size(call.original_size, "original_size", size)
        target = _size(call.target_size, "target_size", size)
        crops = _size(call.crops_coords_top_left, "crops_coords_top_left", (0, 0))
        negative_original = _size(call.negative_original_size, "negative_original_size", original)
        negative_target = _size(call.negative_target_size, "negative_target_size", target)
        if self._options.get("requires_aesthetics_score", False):
            negative_crops = _size(call.negative_crops_coords_top_left, "negative_crops_coords_top_left", (0, 0))
            return ((*original, *crops, call.aesthetic_score),
                    (*negative_original, *negative_crops, call.negative_aesthetic_score))
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

    def check_call(self, call) -> None:
        self.check_image_call(call)
        super().check_call(call)

    @torch.no_grad()
    @call_signature("prompt prompt_2 image strength=0.3 num_inference_steps timesteps sigmas denoising_start "
                    f"denoising_end guidance_scale=5.0 negative_prompt negative_prompt_2 {SAMPLING} latents "
                    f"{XL_EMBEDS} {OUTPUT} guidance_rescale {XL_SIZES} aesthetic_score negative_aesthetic_score "
                    f"{CALLBACKS} {OURS}")
    def __call__(self, call) -> StableDiffusionXLPipelineOutput | tuple[Any]:
        """SDXL image-to-image / the refiner (diffusers' signature); ``denoising_start`` takes over from a base."""
        device, scheduler, (prompt_embeds, negative_prompt_embeds, pooled, negative_pooled) = self.prepare_call(call)
        batch = prompt_embeds.shape[0]
        pixels = self.image_processor.preprocess(call.image)
        run, latents = self.image_start(call, scheduler, pixels, batch, prompt_embeds.dtype, device,
                                        add_noise=call.denoising_start is None)
        extras = self.call_conditioning(call, pooled, negative_pooled, batch, latents, device)
        latents = self.denoise_call(
            call, scheduler, cut_at_denoising_end(scheduler, run, call.denoising_end),
            self.loop_tensors(latents, prompt_embeds, negative_prompt_embeds, **extras), batch, device,
            added_cond=ADDED_COND,
        )
        return self.output(call, self.latents_to_images(latents, call.output_type))
