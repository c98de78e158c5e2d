"""Stable Diffusion XL inpainting: SDXL's prompt encoding and size conditioning with the inpainting pieces of
:mod:`.stable_diffusion_inpaint` (9-channel inpainting UNets, e.g. ``diffusers/stable-diffusion-xl-1.0-inpainting-0.1``,
or ordinary SDXL UNets with the kept region put back after each step). ``denoising_start`` / ``denoising_end`` hand
latents between a base and a refiner as in :mod:`.stable_diffusion_xl_img2img`.

Differences from diffusers: those of :class:`.StableDiffusionXLPipeline` and of SD inpainting (``image`` and
``mask_image`` of one size, at least one step whatever the strength).
"""

from __future__ import annotations

from typing import Any

import torch

from .call_signatures import CALLBACKS, OURS, OUTPUT, SAMPLING, XL_EMBEDS, XL_SIZES, call_signature
from .stable_diffusion_inpaint import InpaintMixin
from .stable_diffusion_xl import ADDED_COND, StableDiffusionXLPipelineOutput
from .stable_diffusion_xl_img2img import StableDiffusionXLImg2ImgPipeline


class StableDiffusionXLInpaintPipeline(InpaintMixin, StableDiffusionXLImg2ImgPipeline):
    """``pipe(prompt, image=..., mask_image=...).images``: SDXL inpainting (white in the mask = repaint).

    Inputs as :class:`.StableDiffusionInpaintPipeline`; components and options as
    :class:`.StableDiffusionXLImg2ImgPipeline`.
    """

    _callback_tensor_inputs = ("latents", "prompt_embeds", "add_text_embeds", "add_time_ids", "mask",
                               "masked_image_latents")

    def check_call(self, call) -> None:
        self.check_inpaint_call(call)
        super().check_call(call)

    @torch.no_grad()
    @call_signature("prompt prompt_2 image mask_image masked_image_latents height width padding_mask_crop "
                    "strength=0.9999 num_inference_steps timesteps sigmas denoising_start denoising_end guidance_scale "
                    f"negative_prompt negative_prompt_2 {SAMPLING} latents {XL_EMBEDS} {OUTPUT} guidance_rescale "
                    f"{XL_SIZES} aesthetic_score negative_aesthetic_score {CALLBACKS} {OURS}")
    def __call__(self, call) -> StableDiffusionXLPipelineOutput | tuple[Any]:
        """SDXL inpainting (diffusers' signature): white in ``mask_image`` is repainted."""
        device, scheduler, (prompt_embeds, negative_prompt_embeds, pooled, negative_pooled) = self.prepare_call(call)
        batch = prompt_embeds.shape[0]
        run, latents, extras, loop, crop = self.inpaint_start(call, scheduler, batch, prompt_embeds.dtype, device)
        extras.update(self.call_conditioning(call, pooled, negative_pooled, batch, latents, device))
        latents = self.denoise_call(call, scheduler, run,
                                    self.loop_tensors(latents, prompt_embeds, negative_prompt_embeds, **extras),
                                    batch, device, added_cond=ADDED_COND, **loop)
        return self.output(call, self.paste_back(call, self.latents_to_images(latents, call.output_type), crop))
