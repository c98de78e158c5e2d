"""DDPM: ancestral sampling of the denoising diffusion probabilistic model (Ho et al. 2020)."""

from __future__ import annotations

import numpy as np
import torch

from ..configuration import register_to_config
from . import core
from .base import DiscreteTimestepMixin, SchedulerMixin, SchedulerOutput

DDPMSchedulerOutput = SchedulerOutput

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")


class DDPMScheduler(DiscreteTimestepMixin, SchedulerMixin):
    """Denoising diffusion probabilistic model sampler; same config and results as diffusers' ``DDPMScheduler``.

    Each step samples ``x_prev ~ q(x_prev | x_t, x0_hat)`` where ``x_prev`` is the next entry of ``timesteps`` (the
    final step goes to alpha = 1). ``variance_type`` picks the step noise: ``fixed_small`` (posterior variance),
    ``fixed_large`` (beta), their ``_log`` forms, or ``learned`` / ``learned_range`` from a model that outputs twice
    the sample channels. ``set_timesteps`` accepts custom ``timesteps`` (descending).

    **Difference from diffusers (deliberate).** With ``variance_type="fixed_large_log"`` diffusers takes the square
    root of the log-variance (NaN samples); here the step noise std is ``exp(0.5 * log(beta))``, i.e. the same step
    as ``fixed_large``. ``variance_type=None`` (what a DPM solver's saved config holds) steps as ``fixed_small``, as
    in diffusers; an unknown ``variance_type`` raises, where diffusers silently steps it as ``fixed_small``.
    """

    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        # None: a config written by a DPM solver (`"variance_type": null`); diffusers steps it as fixed_small
        core.check_choice(type(self).__name__, "variance_type", variance_type, (None, *VARIANCE_TYPES))
        self._check_common_options()
        self._init_train_schedule(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr
        )
        self.one = torch.tensor(1.0)
        self.init_noise_sigma = 1.0
        self.variance_type = variance_type
        self.custom_timesteps = False
        self.num_inference_steps = None
        self._set_schedule(np.arange(0, num_train_timesteps)[::-1])
        self._reset_run_state()

    def _get_variance(self, t: int, prev_t: int, predicted_variance=None, variance_type: str | None = None):
        """Step variance (or std / log-variance, per ``variance_type``; see ``step``)."""
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        current_beta_t = 1 - alpha_prod_t / alpha_prod_t_prev
        # clamp: log(0) at the last step would give nan
        variance = torch.clamp(core.posterior_variance(alpha_prod_t, alpha_prod_t_prev), min=1e-20)
        variance_type = variance_type or self.config.variance_type or "fixed_small"
        if variance_type == "fixed_small":
            return variance
        if variance_type == "fixed_small_log":
            return torch.exp(0.5 * torch.log(variance))  # a standard deviation
        if variance_type == "fixed_large":
            return current_beta_t
        if variance_type == "fixed_large_log":
            return torch.log(current_beta_t)
        if predicted_variance is None:
            raise ValueError(
                f"variance_type={variance_type!r} needs a model output with twice the sample's channels "
                "(the second half is the predicted variance)"
            )
        if variance_type == "learned":
            return predicted_variance
        # learned_range: interpolate log-variance between posterior (min) and beta (max)
        frac = (predicted_variance + 1) / 2
        return frac * torch.log(current_beta_t) + (1 - frac) * torch.log(variance)

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """Sample ``x_prev`` from ``x_t`` and the model output; noise is drawn when ``timestep > 0``."""
        t = int(timestep)
        position = self._position(t)
        prev_t = self._prev_list[position]
        variance_type = self.config.variance_type
        if model_output.shape[1] == sample.shape[1] * 2 and variance_type in ("learned", "learned_range"):
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
        else:
            predicted_variance = None

        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        cfg = self.config
        x0, _ = core.vp_x0_eps(model_output, sample, alpha_prod_t**0.5, (1 - alpha_prod_t) ** 0.5, cfg.prediction_type)
        x0 = core.process_x0(
            x0, cfg.thresholding, cfg.clip_sample, cfg.dynamic_thresholding_ratio, cfg.sample_max_value,
            cfg.clip_sample_range,
        )
        prev_sample = core.ddpm_posterior_mean(x0, sample, alpha_prod_t, alpha_prod_t_prev)

        if t > 0:
            noise = core.randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
            )
            variance = self._get_variance(t, prev_t, predicted_variance)
            if variance_type == "fixed_small_log":
                std = variance
            elif variance_type in ("learned_range", "fixed_large_log"):  # log-variances
                std = torch.exp(0.5 * variance)
            else:
                std = variance**0.5
            prev_sample = prev_sample + std * noise

        self._step_index = position + 1
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """Forward process q(x_t | x0) at integer ``timesteps``."""
        return core.vp_add_noise(original_samples, noise, self.alphas_cumprod, timesteps)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """v-prediction training target at integer ``timesteps``."""
        return core.vp_velocity(sample, noise, self.alphas_cumprod, timesteps)
