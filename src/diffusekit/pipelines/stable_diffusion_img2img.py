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

from typing import Any

import torch

from .call_signatures import CALLBACKS, OURS, OUTPUT, SAMPLING, call_signature
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

    def check_call(self, call) -> None:
        self.check_image_call(call)
        self.check_prompt_inputs(call.prompt, call.negative_prompt, call.prompt_embeds, call.negative_prompt_embeds,
                                 call.num_inference_steps, call.num_images_per_prompt)

    @torch.no_grad()
    @call_signature("prompt image strength num_inference_steps timesteps sigmas guidance_scale negative_prompt "
                    f"{SAMPLING} prompt_embeds negative_prompt_embeds {OUTPUT} guidance_rescale {CALLBACKS} {OURS}")
    def __call__(self, call) -> StableDiffusionPipelineOutput | tuple[Any, ...]:
        """Run ``int(num_inference_steps * strength)`` steps (at least 1) from ``image``; see the module docstring."""
        device, scheduler, (prompt_embeds, negative_prompt_embeds) = self.prepare_call(call)
        batch = prompt_embeds.shape[0]
        pixels = self.image_processor.preprocess(call.image)
        run, latents = self.image_start(call, scheduler, pixels, batch, prompt_embeds.dtype, device)
        latents = self.denoise_call(call, scheduler, run,
                                    self.loop_tensors(latents, prompt_embeds, negative_prompt_embeds), batch, device)
        return self.output(call, *self.latents_to_images(latents, call.output_type))
