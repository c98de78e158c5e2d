"""Unconditional image generation with DDIM (any scheduler config is converted to DDIM, as in diffusers)."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from ..random import Generator
from .base import DiffusionPipeline, ImagePipelineOutput
from .ddpm import StepCallback, UnconditionalStepCallbackMixin, sample_unconditional

logger = logging.getLogger(__name__)


class DDIMPipeline(UnconditionalStepCallbackMixin, DiffusionPipeline):
    """``pipe(batch_size=1, generator=None, eta=0.0, num_inference_steps=50, output_type="pil").images``.

    Differs from diffusers: two more call arguments, last, ``callback_on_step_end`` and
    ``callback_on_step_end_tensor_inputs`` (per-step callback, see :mod:`diffusekit.pipelines.ddpm`).
    """

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
        callback_on_step_end: StepCallback = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> ImagePipelineOutput | tuple[Any]:
        if not 0.0 <= eta <= 1.0:
            logger.warning("eta=%s is outside [0, 1] (0 is DDIM, 1 is DDPM); results may be poor", eta)
        return sample_unconditional(self, batch_size, generator, num_inference_steps, output_type, return_dict,
                                    callback_on_step_end, callback_on_step_end_tensor_inputs, eta=eta, use_clipped_model_output=use_clipped_model_output)
