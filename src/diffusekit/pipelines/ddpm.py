"""Unconditional image generation with a ``UNet2DModel`` and any scheduler (DDPM by default).

Extension (DDPM and DDIM): ``callback_on_step_end(pipe, i, t, {"latents": sample})`` and
``callback_on_step_end_tensor_inputs=["latents"]``, the last two call arguments, as the Stable Diffusion pipelines take
them (diffusers' unconditional pipelines have no step callback): called after every step with the current sample
(pixel space, (B, C, H, W) in about [-1, 1]); a returned ``{"latents": tensor}`` replaces it, and
``pipe._interrupt = True`` skips the remaining steps (the sample so far is returned). ``pipe.num_timesteps`` and
``pipe.interrupt`` are per call and per thread. Used by ``diffusekit serve`` for per-step progress and previews.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..random import Generator, randn_tensor
from .base import DiffusionPipeline, ImagePipelineOutput
from .image_processor import check_output_type, postprocess
from .pieces import CallState, callback_tensor_names


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


class UnconditionalStepCallbackMixin:
    """Per-call, per-thread ``num_timesteps`` / ``interrupt`` for the step callback (see the module docstring)."""

    #: tensors a ``callback_on_step_end`` may ask for (and replace): the current sample
    _callback_tensor_inputs: tuple[str, ...] = ("latents",)
    _num_timesteps = CallState(None)
    _interrupt = CallState(False)
    num_timesteps = property(lambda self: self._num_timesteps, doc="Steps this thread's current (or last) call runs.")
    interrupt = property(lambda self: self._interrupt,
                         doc="True once a callback set ``pipe._interrupt = True``: the remaining steps are skipped.")


class DDPMPipeline(UnconditionalStepCallbackMixin, DiffusionPipeline):
    """``pipe(batch_size=1, generator=None, num_inference_steps=1000, output_type="pil").images``.

    Differs from diffusers: two more call arguments, last, ``callback_on_step_end`` and
    ``callback_on_step_end_tensor_inputs`` (per-step callback, see :mod:`diffusekit.pipelines.ddpm`).
    """

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
        callback_on_step_end: StepCallback = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> ImagePipelineOutput | tuple[Any]:
        return sample_unconditional(self, batch_size, generator, num_inference_steps, output_type, return_dict,
                                    callback_on_step_end, callback_on_step_end_tensor_inputs)


StepCallback = Callable[..., dict[str, Any]] | None


def sample_unconditional(pipe: DiffusionPipeline, batch_size: int, generator: Generator, num_inference_steps: int,
                         output_type: str | None, return_dict: bool, callback_on_step_end: StepCallback = None,
                         callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
                         **step_kwargs: Any) -> ImagePipelineOutput | tuple[Any]:
    """The sampling loop of DDPMPipeline and DDIMPipeline (``step_kwargs`` go to ``scheduler.step``)."""
    _check_call(batch_size, num_inference_steps, generator)
    output_type = check_output_type(output_type, ("pil", "np", "pt"))
    names = callback_tensor_names(callback_on_step_end, callback_on_step_end_tensor_inputs)
    if not set(names) <= set(pipe._callback_tensor_inputs):
        raise ValueError(f"callback_on_step_end_tensor_inputs must be among {list(pipe._callback_tensor_inputs)}, "
                         f"got {list(names)}")
    pipe._interrupt = False
    scheduler = pipe._fresh_scheduler()
    # noise is drawn on the generator's device, so a seed gives the same image on every device
    image = randn_tensor(_sample_shape(pipe.unet, batch_size), generator, pipe.device, pipe.unet.dtype)
    scheduler.set_timesteps(num_inference_steps, device=pipe.device)
    pipe._num_timesteps = len(scheduler.timesteps)
    for i, t in enumerate(pipe.progress_bar(scheduler.timesteps)):
        if pipe.interrupt:
            continue
        model_output = pipe.unet(image, t).sample  # (B, C, H, W)
        image = scheduler.step(model_output, t, image, generator=generator, **step_kwargs).prev_sample
        if callback_on_step_end is not None:
            returned = callback_on_step_end(pipe, i, t, {name: image for name in names}) or {}
            image = returned.get("latents", image)
    images = postprocess(image, output_type)
    return ImagePipelineOutput(images=images) if return_dict else (images,)
