"""Unconditional image generation with a ``UNet2DModel`` and any scheduler (DDPM by default)."""

from __future__ import annotations

from typing import Any

import torch

from ..random import Generator, randn_tensor
from .base import DiffusionPipeline, ImagePipelineOutput
from .image_processor import check_output_type, postprocess


def _sample_shape(unet, batch_size: int) -> tuple[int, ...]:
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return (batch_size, unet.config.in_channels, *size)


def _check_call(batch_size: int, num_inference_steps: int, generator: Generator) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
    if isinstance(generator, list) and len(generator) not in (1, batch_size):
        raise ValueError(
            f"got {len(generator)} generators for batch_size={batch_size}: pass one generator, or one per image"
        )


class DDPMPipeline(DiffusionPipeline):
    """``pipe(batch_size=1, generator=None, num_inference_steps=1000, output_type="pil").images``."""

    component_names = ("unet", "scheduler")

    def __init__(self, unet, scheduler):
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: Generator = None,
        num_inference_steps: int = 1000,
        output_type: str | None = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple[Any]:
        return sample_unconditional(self, batch_size, generator, num_inference_steps, output_type, return_dict)


def sample_unconditional(pipe: DiffusionPipeline, batch_size: int, generator: Generator, num_inference_steps: int,
                         output_type: str | None, return_dict: bool,
                         **step_kwargs: Any) -> ImagePipelineOutput | tuple[Any]:
    """The sampling loop of DDPMPipeline and DDIMPipeline (``step_kwargs`` go to ``scheduler.step``)."""
    _check_call(batch_size, num_inference_steps, generator)
    output_type = check_output_type(output_type, ("pil", "np", "pt"))
    scheduler = pipe._fresh_scheduler()
    # noise is drawn on the generator's device, so a seed gives the same image on every device
    image = randn_tensor(_sample_shape(pipe.unet, batch_size), generator, pipe.device, pipe.unet.dtype)
    scheduler.set_timesteps(num_inference_steps, device=pipe.device)
    for t in pipe.progress_bar(scheduler.timesteps):
        model_output = pipe.unet(image, t).sample  # (B, C, H, W)
        image = scheduler.step(model_output, t, image, generator=generator, **step_kwargs).prev_sample
    images = postprocess(image, output_type)
    return ImagePipelineOutput(images=images) if return_dict else (images,)
