"""UniPC: unified predictor-corrector multistep solver (Zhao et al. 2023, https://arxiv.org/abs/2302.04867)."""

from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
import torch

from ..configuration import register_to_config
from . import core
from .base import SchedulerOutput
from .multistep import (
    UNIPC_SOLVER_TYPES,
    MultistepSchedulerBase,
    data_prediction,
    noise_prediction,
    respace_sigmas,
    shift_flow_sigmas,
    solver_timesteps,
    stretch_to_terminal,
    time_shift,
    unipc_update,
)

# solver types of the other multistep schedulers; a config written for them loads as bh2 (as in diffusers)
_FOREIGN_SOLVER_TYPES = ("midpoint", "heun", "logrho")


class UniPCMultistepScheduler(MultistepSchedulerBase):
    """UniPC multistep sampler; same config keys, defaults and results as diffusers' ``UniPCMultistepScheduler``.

    Each step first corrects the current sample with UniC (using the new model output; skipped for the steps listed
    in ``disable_corrector``), then predicts the next one with UniP of order ``solver_order`` (lower while the
    history fills up, and at the end with ``lower_order_final``). ``predict_x0`` chooses data (default) or noise
    prediction; ``solver_type`` the B(h) variant (``bh1`` / ``bh2``). ``solver_p`` swaps the predictor for another
    scheduler (UniC still corrects). Supports epsilon / sample / v_prediction / flow_prediction, karras / exponential
    / beta / flow sigmas (with static or dynamic shift), ``timestep_spacing``, ``final_sigmas_type`` and custom
    ``sigmas`` (flow sigmas only).
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
        predict_x0: bool = True,
        solver_type: str = "bh2",
        lower_order_final: bool = True,
        disable_corrector: list[int] = [],  # noqa: B006 (diffusers' default; the config gets a copy)
        solver_p=None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: str = "zero",
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        shift_terminal: float | None = None,
    ):
        owner = type(self).__name__
        if solver_type in _FOREIGN_SOLVER_TYPES:
            self._update_config(solver_type="bh2")
        else:
            core.check_choice(owner, "solver_type", solver_type, UNIPC_SOLVER_TYPES + _FOREIGN_SOLVER_TYPES)
        if shift_terminal is not None and not use_flow_sigmas:
            raise ValueError(f"{owner}: shift_terminal needs use_flow_sigmas=True")
        if not predict_x0 and prediction_type == "flow_prediction":
            raise ValueError(f"{owner}: prediction_type='flow_prediction' needs predict_x0=True")
        if not predict_x0 and final_sigmas_type == "zero":
            # diffusers accepts this and returns NaN at the last step (sigma_t * (e^h - 1) = 0 * inf)
            raise ValueError(
                f"{owner}: predict_x0=False (noise prediction) cannot step to sigma 0; use "
                "final_sigmas_type='sigma_min' or predict_x0=True"
            )
        self._setup_solver()
        self.predict_x0 = predict_x0
        self.disable_corrector = list(disable_corrector or ())
        self.solver_p = solver_p
        self.timestep_list: list = [None] * solver_order

    @classmethod
    def _time_shift_types(cls) -> tuple[str, ...]:
        return ("exponential", "linear")

    def _reset_history(self) -> None:
        super()._reset_history()
        self.last_sample = None
        self.this_order = None

    def __copy__(self):
        new = super().__copy__()
        if self.solver_p is not None:
            new.solver_p = copy.copy(self.solver_p)
        return new

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
        timesteps=None,
    ) -> None:
        """Build the schedule for ``num_inference_steps`` (or the custom flow ``sigmas``; ``mu``: dynamic shift)."""
        cfg, owner = self.config, type(self).__name__
        self._check_set_timesteps_args(num_inference_steps, timesteps, sigmas, allow_sigmas=True)
        if cfg.use_dynamic_shifting and mu is None:
            raise ValueError(f"{owner}: pass `mu` to set_timesteps when use_dynamic_shifting=True")
        if sigmas is not None:
            if not cfg.use_flow_sigmas:
                raise ValueError(f"{owner}: custom `sigmas` need use_flow_sigmas=True")
            sigmas = np.asarray(sigmas, dtype=np.float64).copy()
            num_inference_steps = len(sigmas)
        T = cfg.num_train_timesteps
        timesteps = solver_timesteps(T, num_inference_steps, cfg.timestep_spacing, cfg.steps_offset, owner=owner)
        kind = self._sigma_kind()
        sigma_min_final = None
        if kind is not None:
            train = self._train_sigmas() if sigmas is None else sigmas
            sigmas, t_frac = respace_sigmas(kind, train, num_inference_steps, cfg.sigma_min, cfg.sigma_max)
            if kind == "karras" and cfg.use_flow_sigmas:
                sigmas = sigmas / (sigmas + 1)
                timesteps = sigmas * T
            else:
                timesteps = t_frac.round() if kind == "karras" else t_frac
            sigma_min_final = sigmas[-1]
        elif cfg.use_flow_sigmas:
            if sigmas is None:
                sigmas = np.linspace(1, 1 / T, num_inference_steps + 1)[:-1]
            if cfg.use_dynamic_shifting:
                sigmas = time_shift(mu, sigmas, cfg.time_shift_type)
            else:
                sigmas = shift_flow_sigmas(sigmas, cfg.flow_shift)
            if cfg.shift_terminal:
                sigmas = stretch_to_terminal(sigmas, cfg.shift_terminal)
            if abs(sigmas[0] - 1) < 1e-6:
                sigmas = sigmas.copy()
                sigmas[0] -= 1e-6  # sigma 1 would mean alpha 0
            timesteps = sigmas * T
            sigma_min_final = sigmas[-1]
        else:
            sigmas = core.interp_sigmas(timesteps, self._train_sigmas())
            sigma_min_final = self._train_sigma_min()
        final = sigma_min_final if cfg.final_sigmas_type == "sigma_min" else 0.0
        self._store_schedule(timesteps, sigmas, final, device)
        if self.solver_p is not None:
            self.solver_p.set_timesteps(self.num_inference_steps, device=device)

    def _reset_run_state(self) -> None:
        super()._reset_run_state()
        self.timestep_list = [None] * self.config.solver_order

    def convert_model_output(self, model_output: torch.Tensor, *args, sample: torch.Tensor = None, **kwargs):
        """The model output as UniPC uses it: x0 (``predict_x0``) or eps, at the current step's noise level."""
        if sample is None:
            if len(args) > 1:
                sample = args[1]
            else:
                raise ValueError("convert_model_output needs `sample`")
        cfg = self.config
        s = self.sigmas[self._step_index]
        level = self._level(self._step_index)
        if self.predict_x0:
            return self._threshold(data_prediction(model_output, sample, level, s, cfg.prediction_type))
        return noise_prediction(model_output, sample, level, cfg.prediction_type)

    def _history(self, order: int, newest_index: int):
        """(outputs newest first, their lambdas) for ``order`` entries, the newest at schedule index ``newest_index``."""
        outputs = [self.model_outputs[-(k + 1)] for k in range(order)]
        lams = [None] + [self._level(newest_index - k).lam for k in range(1, order)]
        return outputs, lams

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        return_dict: bool = True,
        generator=None,
    ) -> SchedulerOutput | tuple:
        """Correct ``sample`` with UniC (when enabled) and predict the sample at the next timestep with UniP.

        ``generator`` is accepted for a uniform pipeline call and unused (UniPC is deterministic).
        """
        i = self._begin_step(timestep)
        cfg = self.config
        device = sample.device
        converted = self.convert_model_output(model_output, sample=sample)
        if i > 0 and (i - 1) not in self.disable_corrector and self.last_sample is not None:
            outputs, lams = self._history(self.this_order, i - 1)
            sample = unipc_update(
                self.last_sample, outputs, [l if l is None else l.to(device) for l in lams],
                self._level(i - 1, device), self._level(i, device), self.this_order, self.predict_x0,
                cfg.solver_type, model_t=converted,
            )
        self.model_outputs = self.model_outputs[1:] + [converted]
        self.timestep_list = self.timestep_list[1:] + [timestep]

        order = min(cfg.solver_order, len(self.timesteps) - i) if cfg.lower_order_final else cfg.solver_order
        if i == len(self.timesteps) - 1 and float(self.sigmas[i + 1]) == 0.0:
            order = 1  # a step to sigma 0 has h = inf: only the first-order update is finite (diffusers: inf/NaN)
        self.this_order = min(order, self.lower_order_nums + 1)  # warm-up: as many outputs as we have
        self.last_sample = sample
        if self.solver_p is not None:
            prev_sample = self.solver_p.step(model_output, self.timestep_list[-1], sample).prev_sample
        else:
            outputs, lams = self._history(self.this_order, i)
            prev_sample = unipc_update(
                sample, outputs, [l if l is None else l.to(device) for l in lams], self._level(i, device),
                self._level(i + 1, device), self.this_order, self.predict_x0, cfg.solver_type,
            )
        self.lower_order_nums = min(self.lower_order_nums + 1, cfg.solver_order)
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)
