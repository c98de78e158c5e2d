"""DEIS: diffusion exponential integrator sampler, log-rho multistep form (Zhang & Chen 2023,
https://arxiv.org/abs/2204.13902)."""

from __future__ import annotations

import torch

from ..configuration import register_to_config
from . import core
from .base import SchedulerOutput
from .multistep import (
    MultistepSchedulerBase,
    data_prediction,
    deis_coefficients,
    respace_sigmas,
    solver_timesteps,
)

# algorithm / solver names of the other multistep schedulers: a config written for them loads as DEIS log-rho
# (diffusers maps the ODE names only and refuses the SDE ones)
_FOREIGN_ALGORITHMS = ("dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++")
_FOREIGN_SOLVER_TYPES = ("midpoint", "heun", "bh1", "bh2")


class DEISMultistepScheduler(MultistepSchedulerBase):
    """DEIS multistep sampler (``algorithm_type="deis"``, ``solver_type="logrho"``); same config keys, defaults and
    results as diffusers' ``DEISMultistepScheduler``.

    The model output is turned into eps (via x0, so ``thresholding`` applies) and integrated exactly against the
    Lagrange interpolant of the last ``solver_order`` (1-3) eps values in log(sigma/alpha). ``lower_order_final``
    lowers the order over the last steps of short (< 15 step) schedules. Note that, as in diffusers, the final
    sigma is the smallest training sigma (or the last sigma of a karras / exponential / beta / flow schedule), not 0.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "deis",
        solver_type: str = "logrho",
        lower_order_final: bool = True,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ):
        owner = type(self).__name__
        changes = {}
        if algorithm_type in _FOREIGN_ALGORITHMS:
            changes["algorithm_type"] = "deis"
        else:
            core.check_choice(owner, "algorithm_type", algorithm_type, ("deis",) + _FOREIGN_ALGORITHMS)
        if solver_type in _FOREIGN_SOLVER_TYPES:
            changes["solver_type"] = "logrho"
        else:
            core.check_choice(owner, "solver_type", solver_type, ("logrho",) + _FOREIGN_SOLVER_TYPES)
        core.check_choice(owner, "solver_order", solver_order, (1, 2, 3))
        if changes:
            self._update_config(**changes)
        self._setup_solver()

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        mu: float | None = None,
        timesteps=None,
        sigmas=None,
    ) -> None:
        """Build the schedule for ``num_inference_steps`` (``mu``: dynamic shift of flow sigmas)."""
        cfg, owner = self.config, type(self).__name__
        self._check_set_timesteps_args(num_inference_steps, timesteps, sigmas)
        timesteps = solver_timesteps(
            cfg.num_train_timesteps, num_inference_steps, cfg.timestep_spacing, cfg.steps_offset, owner=owner
        )
        kind = self._sigma_kind()
        if kind is not None:
            sigmas, t_frac = respace_sigmas(kind, self._train_sigmas(), num_inference_steps)
            timesteps = t_frac.round() if kind == "karras" else t_frac
            final = sigmas[-1]
        elif cfg.use_flow_sigmas:
            sigmas, timesteps = self._flow_schedule(num_inference_steps, mu)
            final = sigmas[-1]
        else:
            sigmas = core.interp_sigmas(timesteps, self._train_sigmas())
            final = self._train_sigma_min()
        self._store_schedule(timesteps, sigmas, final, device)

    def convert_model_output(self, model_output: torch.Tensor, *args, sample: torch.Tensor = None, **kwargs):
        """eps at the current step, computed through (thresholded) x0."""
        if sample is None:
            if len(args) > 1:
                sample = args[1]
            else:
                raise ValueError("convert_model_output needs `sample`")
        i = self._step_index
        level = self._level(i)
        x0 = self._threshold(data_prediction(model_output, sample, level, self.sigmas[i], self.config.prediction_type))
        return core.vp_eps_from_x0(sample, x0, level.alpha, level.sigma)

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        return_dict: bool = True,
        generator=None,
    ) -> SchedulerOutput | tuple:
        """Advance ``sample`` one step (``generator`` is accepted and unused: DEIS is deterministic)."""
        i = self._begin_step(timestep)
        cfg = self.config
        n = len(self.timesteps)
        short = cfg.lower_order_final and n < 15
        converted = self.convert_model_output(model_output, sample=sample)
        self.model_outputs = self.model_outputs[1:] + [converted]

        if cfg.solver_order == 1 or self.lower_order_nums < 1 or (i == n - 1 and short):
            order = 1
        elif cfg.solver_order == 2 or self.lower_order_nums < 2 or (i == n - 2 and short):
            order = 2
        else:
            order = 3
        src, dst = self._level(i), self._level(i + 1)
        if order == 1:
            h = dst.lam - src.lam
            prev_sample = (dst.alpha / src.alpha) * sample - (dst.sigma * (torch.exp(h) - 1.0)) * converted
        else:
            levels = [self._level(i - k) for k in range(order)]  # newest first
            weights = deis_coefficients(dst.sigma / dst.alpha, [lv.sigma / lv.alpha for lv in levels])
            acc = sample / src.alpha
            for k, w in enumerate(weights):
                acc = acc + w * self.model_outputs[-(k + 1)]
            prev_sample = dst.alpha * acc

        self.lower_order_nums = min(self.lower_order_nums + 1, cfg.solver_order)
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)
