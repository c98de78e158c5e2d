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

from ..random import Generator, randn_tensor
from .image_processor import VaeImageProcessor, check_output_type
from .stable_diffusion import StableDiffusionPipeline, StableDiffusionPipelineOutput, _custom_schedule


def check_strength(strength: float) -> None:
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be a number in [0, 1] (1: start from noise), got {strength!r}")


def set_strength_schedule(scheduler, num_inference_steps: int, strength: float, device: torch.device,
                          timesteps: Sequence[int] | None = None,
                          sigmas: Sequence[float] | None = None) -> tuple[torch.Tensor, int]:
    """Build the schedule on ``scheduler`` and keep its last ``int(steps * strength)`` steps (at least one).

    Returns ``(timesteps to run, number of steps)``; the scheduler's begin index is set to the first kept step, so
    ``add_noise`` and ``step`` of sigma schedulers start from the right place. With custom ``timesteps`` /
    ``sigmas`` the step count is their length, as in diffusers.
    """
    custom = _custom_schedule(timesteps, sigmas)
    scheduler.set_timesteps(None if custom else num_inference_steps, device=device, **custom)
    steps = len(scheduler.timesteps) if custom else num_inference_steps
    kept = max(min(int(steps * strength), steps), 1)
    start = (steps - kept) * scheduler.order
    scheduler.set_begin_index(start)
    return scheduler.timesteps[start:], kept


class StableDiffusionImg2ImgPipeline(StableDiffusionPipeline):
    """``pipe(prompt, image=..., strength=0.8).images``: text-guided image-to-image.

    ``image``: a PIL image, a numpy array ((H, W, C) or (B, H, W, C), values in [0, 1]), a torch tensor
    ((C, H, W) or (B, C, H, W), values in [0, 1]), or a list of these; or VAE latents (B, 4, h, w). It is resized
    to a multiple of the VAE scale factor (8 for SD), which sets the output size. Same components as
    :class:`StableDiffusionPipeline`.
    """

    @property
    def image_processor(self) -> VaeImageProcessor:
        return VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True,
                                 vae_latent_channels=self.vae.config.latent_channels)

    # ------------------------------------------------------------------ image latents

    def encode_vae_image(self, image: torch.Tensor, generator: Generator) -> torch.Tensor:
        """Pixels (B, 3, H, W) in [-1, 1] -> latents (B, 4, h, w) sampled from the VAE posterior and scaled; with a
        list of generators, image ``i`` is sampled with ``generator[i]``."""
        config = self.vae.config
        image = image.to(device=self.vae.device, dtype=self.vae.dtype)
        if isinstance(generator, (list, tuple)):
            latents = torch.cat([self.vae.encode(image[i : i + 1]).latent_dist.sample(generator[i])
                                 for i in range(image.shape[0])])
        else:
            latents = self.vae.encode(image).latent_dist.sample(generator)
        if config.get("shift_factor") is not None:
            latents = latents - config.shift_factor
        return latents * config.scaling_factor

    def _is_latents(self, image: torch.Tensor) -> bool:
        return image.shape[1] == self.vae.config.latent_channels

    def check_image_batch(self, image: torch.Tensor, batch: int, num_images_per_prompt: int, what: str = "image"):
        prompts = batch // num_images_per_prompt
        if image.shape[0] not in (1, prompts):
            raise ValueError(f"got {image.shape[0]} {what}s for {prompts} prompt(s): pass one {what}, or one "
                             "per prompt")

    def image_latents(self, image: torch.Tensor, batch: int, num_images_per_prompt: int, generator: Generator,
                      dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Clean latents of ``image`` (pixels, or latents passed as they are), one row per output image."""
        self.check_image_batch(image, batch, num_images_per_prompt)
        if isinstance(generator, (list, tuple)) and len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for {batch} images: pass one generator per image")
        repeat = batch // image.shape[0]
        image = image.to(device=device, dtype=dtype)
        if self._is_latents(image):
            return image.repeat_interleave(repeat, dim=0)
        if isinstance(generator, (list, tuple)):  # each output image gets its own posterior sample
            return self.encode_vae_image(image.repeat_interleave(repeat, dim=0), generator).to(dtype)
        return self.encode_vae_image(image, generator).to(dtype).repeat_interleave(repeat, dim=0)

    def noised_latents(self, scheduler, latents: torch.Tensor, timestep: torch.Tensor,
                       generator: Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(latents noised to timestep, the noise)``."""
        noise = randn_tensor(latents.shape, generator, latents.device, latents.dtype)
        return scheduler.add_noise(latents, noise, timestep.repeat(latents.shape[0])), noise

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
        cfg = guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None

        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, num_images_per_prompt, cfg, negative_prompt, prompt_embeds, negative_prompt_embeds,
            clip_skip,
        )
        batch = prompt_embeds.shape[0]
        run, _ = set_strength_schedule(scheduler, num_inference_steps, strength, device, timesteps, sigmas)
        latents = self.image_latents(image, batch, num_images_per_prompt, generator, prompt_embeds.dtype, device)
        latents, _ = self.noised_latents(scheduler, latents, run[:1], generator)
        latents = self.denoise(
            scheduler, run, latents, prompt_embeds, negative_prompt_embeds, do_cfg=cfg,
            guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, generator=generator, eta=eta,
            timestep_cond=self.guidance_condition(guidance_scale, batch, device, latents.dtype),
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        images, nsfw = self.latents_to_images(latents, output_type)
        if not return_dict:
            return (images, nsfw)
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=nsfw)
