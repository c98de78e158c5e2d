"""Unconditional image generation with DDIM (any scheduler config is converted to DDIM, as in diffusers)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..random import Generator, randn_tensor
from .base import DiffusionPipeline, ImagePipelineOutput
from .ddpm import _check_call, _sample_shape
from .image_processor import check_output_type, postprocess

logger = logging.getLogger(__name__)


class DDIMPipeline(DiffusionPipeline):
    """``pipe(batch_size=1, generator=None, eta=0.0, num_inference_steps=50, output_type="pil").images``."""

    component_names = ("unet", "scheduler")

    def __init__(self, unet, scheduler):
        from ..schedulers.ddim import DDIMScheduler

        # any scheduler's config converts to DDIM, so a DDPM checkpoint runs here unchanged
        self.register_modules(unet=unet, scheduler=DDIMScheduler.from_config(scheduler.config))

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: Generator = None,
        eta: float = 0.0,
        num_inference_steps: int = 50,
        use_clipped_model_output: bool | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple[Any]:
        _check_call(batch_size, num_inference_steps, generator)
        output_type = check_output_type(output_type, ("pil", "np", "pt"))
        if not 0.0 <= eta <= 1.0:
            logger.warning("eta=%s is outside [0, 1] (0 is DDIM, 1 is DDPM); results may be poor", eta)
        scheduler = self._fresh_scheduler()
        image = randn_tensor(_sample_shape(self.unet, batch_size), generator, self.device, self.unet.dtype)
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        for t in self.progress_bar(scheduler.timesteps):
            model_output = self.unet(image, t).sample  # (B, C, H, W)
            image = scheduler.step(
                model_output, t, image, eta=eta, use_clipped_model_output=use_clipped_model_output,
                generator=generator,
            ).prev_sample
        images = postprocess(image, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)
