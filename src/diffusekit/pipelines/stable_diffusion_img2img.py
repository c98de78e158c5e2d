"""Stable Diffusion image-to-image: start from a noised encoding of the user's image instead of pure noise.

``strength`` (0..1) says how far back into the noise schedule the image is sent: the schedule of
``num_inference_steps`` steps is built as usual, and only its last ``int(num_inference_steps * strength)`` steps
run, starting from the image latents noised to the first of them. ``strength=1.0`` runs every step, from the image
noised to the schedule's first (noisiest) timestep; ``strength=0.5`` with 50 steps runs 25 steps.

Differences from diffusers, on purpose:
- At least one step always runs: diffusers builds an empty schedule when ``int(num_inference_steps * strength)`` is
  0 (``strength=0``, or e.g. ``strength=0.1`` with 5 steps) and fails; here the last step of the schedule runs, so a
  tiny strength returns the image nearly unchanged.
- Several images with several prompts pair up in order, and ``num_images_per_prompt`` repeats each pair
  (diffusers tiles the image batch, pairing image ``i`` with prompt ``i % n``). The number of images must be 1 or
  the number of prompts; diffusers also accepted a divisor of it (a path it deprecates).
- PIL inputs are converted to RGB first (an RGBA or grayscale PIL image would reach diffusers' VAE with the wrong
  number of channels), and uint8 arrays / tensors are read as 0..255.
- A VAE whose config sets ``shift_factor`` encodes to ``(z - shift_factor) * scaling_factor`` (the inverse of the
  decoding in :class:`StableDiffusionPipeline`); SD VAEs have no shift.
- ``guidance_rescale`` is accepted, as in text-to-image.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Sequence

import torch

from ..random import Generator
from .image_processor import check_output_type
from .pieces import ImageToImageMixin, check_strength, set_strength_schedule
from .stable_diffusion import StableDiffusionPipeline, StableDiffusionPipelineOutput

__all__ = ["StableDiffusionImg2ImgPipeline", "check_strength", "set_strength_schedule"]


class StableDiffusionImg2ImgPipeline(ImageToImageMixin, StableDiffusionPipeline):
    """``pipe(prompt, image=..., strength=0.8).images``: text-guided image-to-image.

    ``image``: a PIL image, a numpy array ((H, W, C) or (B, H, W, C), values in [0, 1]), a torch tensor
    ((C, H, W) or (B, C, H, W), values in [0, 1]), or a list of these; or VAE latents (B, 4, h, w). It is resized
    to a multiple of the VAE scale factor (8 for SD), which sets the output size. Same components as
    :class:`StableDiffusionPipeline`.
    """

    # ------------------------------------------------------------------ call

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        strength: float = 0.8,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Generator = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> StableDiffusionPipelineOutput | tuple[Any, ...]:
        """Run ``int(num_inference_steps * strength)`` steps (at least 1) from ``image``; see the module docstring."""
        if image is None:
            raise ValueError("image is required: the picture to start from (PIL, numpy, torch, or a list)")
        check_strength(strength)
        self.check_prompt_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                 num_inference_steps, num_images_per_prompt)
        self.check_callback_inputs(callback_on_step_end_tensor_inputs)
        output_type = check_output_type(output_type)
        image = self.image_processor.preprocess(image)
        device = self.device
        scheduler = self._fresh_scheduler()
        self.begin_call(guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, clip_skip=clip_skip,
                        cross_attention_kwargs=cross_attention_kwargs)

        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, num_images_per_prompt, self.do_classifier_free_guidance, negative_prompt, prompt_embeds,
            negative_prompt_embeds, clip_skip,
        )
        batch = prompt_embeds.shape[0]
        run, _ = set_strength_schedule(scheduler, num_inference_steps, strength, device, timesteps, sigmas)
        latents = self.image_latents(image, batch, num_images_per_prompt, generator, prompt_embeds.dtype, device)
        latents, _ = self.noised_latents(scheduler, latents, run[:1], generator)
        latents = self.denoise(
            scheduler, run, self.loop_tensors(latents, prompt_embeds, negative_prompt_embeds),
            generator=generator, eta=eta,
            timestep_cond=self.guidance_condition(guidance_scale, batch, device, latents.dtype),
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        images, nsfw = self.latents_to_images(latents, output_type)
        if not return_dict:
            return (images, nsfw)
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=nsfw)
