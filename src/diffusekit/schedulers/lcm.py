"""LCM: multistep sampling of latent consistency models (Luo et al. 2023, https://arxiv.org/abs/2310.04378)."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch

from ..configuration import register_to_config
from ..outputs import BaseOutput
from . import core
from .base import SchedulerMixin

logger = logging.getLogger(__name__)

SIGMA_DATA = 0.5  # the consistency-model boundary condition's data std


@dataclasses.dataclass
class LCMSchedulerOutput(BaseOutput):
    """``prev_sample``: the input of the next step (re-noised); ``denoised``: the consistency model's x0 estimate."""

    prev_sample: torch.Tensor
    denoised: torch.Tensor | None = None


def consistency_scalings(timestep, timestep_scaling: float = 10.0, sigma_data: float = SIGMA_DATA):
    """``(c_skip, c_out)`` of the consistency boundary condition at a discrete timestep:
    ``c_skip = sd^2 / (s^2 + sd^2)``, ``c_out = s / sqrt(s^2 + sd^2)`` with ``s = timestep * timestep_scaling``."""
    scaled = timestep * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


class LCMScheduler(SchedulerMixin):
    """Latent consistency model sampler; same config keys, defaults and results as diffusers' ``LCMScheduler``.

    Each step maps ``x_t`` to the consistency estimate ``denoised = c_out * x0 + c_skip * x_t`` and, except at the
    last step, re-noises it to the next timestep with fresh noise from ``generator``. Inference timesteps are a
    subset of the ``original_inference_steps`` distillation schedule (``k * i - 1``, ``k = T // original_steps``),
    or custom ``timesteps``; ``strength`` < 1 uses the low-noise part only (img2img).
    """

    order = 1
    _compatibles = ()  # not interchangeable with the Karras family (as in diffusers)

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas=None,
        original_inference_steps: int = 50,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        timestep_scaling: float = 10.0,
        rescale_betas_zero_snr: bool = False,
    ):
        self._check_common_options()
        self._init_train_schedule(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr
        )
        self._derive_from_alphas_cumprod()
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.custom_timesteps = False
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64))
        self._reset_run_state()

    def _derive_from_alphas_cumprod(self) -> None:
        """The alpha of the step after the last: 1 (``set_alpha_to_one``) or ``alphas_cumprod[0]``."""
        self.final_alpha_cumprod = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """LCM does not scale the model input."""
        return sample

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        original_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        strength: float = 1.0,
    ) -> None:
        """Pick ``num_inference_steps`` timesteps evenly from the distillation schedule, or use custom ``timesteps``."""
        cfg, owner = self.config, type(self).__name__
        self._check_set_timesteps_args(num_inference_steps, timesteps, None, allow_timesteps=True)
        T = cfg.num_train_timesteps
        original_steps = original_inference_steps if original_inference_steps is not None else cfg.original_inference_steps
        if original_steps > T:
            raise ValueError(f"{owner}: original_inference_steps={original_steps} exceeds num_train_timesteps={T}")
        k = T // original_steps
        origin = np.arange(1, int(original_steps * strength) + 1) * k - 1  # the distillation timesteps, ascending
        if timesteps is not None:
            schedule = core.check_custom_timesteps(owner, timesteps, T).astype(np.int64)
            off_schedule = sorted(set(schedule.tolist()[1:]) - set(origin.tolist()), reverse=True)
            if strength == 1.0 and schedule[0] != T - 1:
                logger.warning("%s: custom timesteps start at %d, not %d; results may be unexpected", owner,
                               schedule[0], T - 1)
            if off_schedule:
                logger.warning("%s: custom timesteps %s are not on the distillation schedule", owner, off_schedule)
            if len(schedule) > original_steps:
                logger.warning("%s: %d custom timesteps exceed original_inference_steps=%d", owner, len(schedule),
                               original_steps)
            self.num_inference_steps = len(schedule)
            self.custom_timesteps = True
            keep = min(int(self.num_inference_steps * strength), self.num_inference_steps)
            schedule = schedule[max(self.num_inference_steps - keep, 0):]
        else:
            n = num_inference_steps
            if n > T:
                raise ValueError(f"{owner}: num_inference_steps={n} exceeds num_train_timesteps={T}")
            if len(origin) // n < 1:
                raise ValueError(
                    f"{owner}: original_inference_steps x strength = {original_steps} x {strength} leaves "
                    f"{len(origin)} timesteps, fewer than num_inference_steps={n}; lower num_inference_steps or "
                    "raise strength"
                )
            if n > original_steps:
                raise ValueError(
                    f"{owner}: num_inference_steps={n} exceeds original_inference_steps={original_steps}: the "
                    "schedule is a subset of the distillation schedule"
                )
            self.num_inference_steps = n
            self.custom_timesteps = False
            descending = origin[::-1].copy()
            picks = np.floor(np.linspace(0, len(descending), num=n, endpoint=False)).astype(np.int64)
            schedule = descending[picks]
        self.timesteps = torch.from_numpy(np.asarray(schedule, dtype=np.int64)).to(device=device)
        self._reset_run_state()

    def get_scalings_for_boundary_condition_discrete(self, timestep):
        """``(c_skip, c_out)`` at ``timestep`` (see :func:`consistency_scalings`)."""
        return consistency_scalings(timestep, self.config.timestep_scaling)

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> LCMSchedulerOutput | tuple:
        """One consistency step: denoise ``sample`` and re-noise to the next timestep (not after the last)."""
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) before step()")
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        cfg = self.config
        alpha_prod_t = self.alphas_cumprod[int(timestep)]  # int: the schedule may live on another device
        c_skip, c_out = self.get_scalings_for_boundary_condition_discrete(timestep)
        x0, _ = core.vp_x0_eps(model_output, sample, alpha_prod_t.sqrt(), (1 - alpha_prod_t).sqrt(),
                               cfg.prediction_type)
        x0 = core.process_x0(x0, cfg.thresholding, cfg.clip_sample, cfg.dynamic_thresholding_ratio,
                             cfg.sample_max_value, cfg.clip_sample_range)
        denoised = c_out * x0 + c_skip * sample
        if i != self.num_inference_steps - 1:
            prev_t = self.timesteps[i + 1] if i + 1 < len(self.timesteps) else timestep  # strength < 1: ends early
            alpha_prod_prev = self.alphas_cumprod[int(prev_t)] if prev_t >= 0 else self.final_alpha_cumprod
            noise = core.randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                      dtype=denoised.dtype)
            prev_sample = alpha_prod_prev.sqrt() * denoised + (1 - alpha_prod_prev).sqrt() * noise
        else:
            prev_sample = denoised
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample, denoised)
        return LCMSchedulerOutput(prev_sample=prev_sample, denoised=denoised)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """Forward process q(x_t | x0) at integer ``timesteps``."""
        return core.vp_add_noise(original_samples, noise, self.alphas_cumprod, timesteps)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """v-prediction training target at integer ``timesteps``."""
        return core.vp_velocity(sample, noise, self.alphas_cumprod, timesteps)

    def previous_timestep(self, timestep):
        """The timestep after ``timestep`` in the schedule (``-1`` after the last)."""
        if self.custom_timesteps or self.num_inference_steps:
            index = int((self.timesteps == timestep).nonzero()[0].item())
            if index == self.timesteps.shape[0] - 1:
                return torch.tensor(-1)
            return self.timesteps[index + 1]
        return timestep - 1
