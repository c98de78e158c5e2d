"""PNDM: pseudo numerical methods for diffusion models (Liu et al. 2022): Runge-Kutta warm-up, then linear multistep."""

from __future__ import annotations

import numpy as np
import torch

from ..configuration import register_to_config
from . import core
from .base import SchedulerMixin, SchedulerOutput


class PNDMScheduler(SchedulerMixin):
    """PNDM sampler; same config keys and defaults as diffusers' ``PNDMScheduler``.

    With ``skip_prk_steps=False`` the first three steps are pseudo Runge-Kutta steps (four model evaluations each, at
    a step's start, twice at its midpoint and at its end), then pseudo linear multistep (PLMS, one evaluation per
    step). With ``skip_prk_steps=True`` (Stable Diffusion's setting) PLMS starts at once with a Heun-like second
    evaluation. ``timesteps`` lists every model evaluation, so its length is not ``num_inference_steps``.

    **Difference from diffusers (deliberate).** Every step moves between consecutive entries of the base schedule
    (the final step to ``final_alpha_cumprod``) and a Runge-Kutta midpoint is ``t_next + (t - t_next) // 2``.
    diffusers uses the stride ``num_train_timesteps // num_inference_steps`` instead, which is the same thing for
    ``leading`` spacing and for ``trailing`` spacing when ``num_inference_steps`` divides ``num_train_timesteps``
    (identical results there) but not for ``linspace`` spacing or other trailing step counts (diffusers issue #9261).
    Also, when the stride is odd (e.g. 1000 // 8 = 125) diffusers' first Runge-Kutta sub-step lands on
    ``t - stride // 2`` while the model is then evaluated at the midpoint ``t_next + stride // 2``, one timestep
    lower; here the sub-step lands on the midpoint it evaluates next.

    **Starting part-way (img2img, ``set_begin_index``).** A run that begins at evaluation ``begin_index`` takes one
    linear-multistep step per evaluation from there (orders 1, 2, 3, 4 as the history fills), so every remaining step
    of the schedule is taken once and the run ends at the final alpha. diffusers restarts its Heun warm-up there,
    which spends one evaluation redoing the first step and then treats the sample as one step further along than it
    is: one step of the schedule is skipped and noise is left in the image. A run starting at evaluation 1 (the
    warm-up's repeat of timestep 1) leaves that evaluation unused. Only ``skip_prk_steps=True`` schedules can start
    part-way (the Runge-Kutta warm-up evaluations are not whole steps).
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
        skip_prk_steps: bool = False,
        set_alpha_to_one: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
    ):
        self._check_common_options()
        self._init_train_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.pndm_order = 4
        self.num_inference_steps = None
        self.timesteps = None
        self.prk_timesteps = None
        self.plms_timesteps = None
        self._reset_solver_state()
        self._reset_run_state()

    @classmethod
    def _prediction_types(cls) -> tuple[str, ...]:
        return ("epsilon", "v_prediction")

    def _reset_solver_state(self) -> None:
        self.ets: list[torch.Tensor] = []  # model outputs (eps) at the base schedule's timesteps, newest last
        self.counter = 0
        self.cur_model_output = 0  # Runge-Kutta accumulator
        self.cur_sample = None  # sample at the start of the current Runge-Kutta / Heun step

    @property
    def step_index(self) -> int | None:
        return self.counter if self.num_inference_steps is not None else None

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """PNDM does not scale the model input."""
        return sample

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps=None,
        sigmas=None,
    ) -> None:
        """Build the evaluation timesteps for ``num_inference_steps`` solver steps."""
        self._check_set_timesteps_args(num_inference_steps, timesteps, sigmas)
        cfg = self.config
        base = np.round(
            core.spaced_timesteps(
                cfg.num_train_timesteps, num_inference_steps, cfg.timestep_spacing, cfg.steps_offset,
                owner=type(self).__name__,
            )
        ).astype(np.int64)  # descending
        n = len(base)
        after = core.previous_timesteps(base)  # where each base step goes (-1: final alpha)
        if cfg.skip_prk_steps:
            # evaluations b0, b1, b1, b2, ..., b_{n-1}; the second redoes b0 -> b1 with the averaged slope (Heun)
            if n > 1:
                evals = np.concatenate([base[:2], base[1:]])
                froms = np.concatenate([base[:1], base[:1], base[1:]])
                tos = np.concatenate([after[:1], after])
            else:
                evals, froms, tos = base, base, after
            self.prk_timesteps = np.array([], dtype=np.int64)
            self.plms_timesteps = evals
        else:
            if n < 4:
                raise ValueError(
                    f"{type(self).__name__}: skip_prk_steps=False needs num_inference_steps >= 4 (got {n}); "
                    "use skip_prk_steps=True for fewer steps"
                )
            prk_evals, prk_froms, prk_tos = [], [], []
            for k in range(3):  # three Runge-Kutta steps b_k -> b_{k+1}
                t, t_next = int(base[k]), int(after[k])
                mid = t_next + (t - t_next) // 2
                prk_evals += [t, mid, mid, t_next]
                prk_froms += [t] * 4
                prk_tos += [mid, mid, t_next, t_next]
            self.prk_timesteps = np.array(prk_evals, dtype=np.int64)
            self.plms_timesteps = base[3:].copy()
            evals = np.concatenate([self.prk_timesteps, self.plms_timesteps])
            froms = np.concatenate([np.array(prk_froms, dtype=np.int64), base[3:]])
            tos = np.concatenate([np.array(prk_tos, dtype=np.int64), after[3:]])
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.from_numpy(evals.astype(np.int64)).to(device)
        self._froms = froms.astype(np.int64).tolist()
        self._tos = tos.astype(np.int64).tolist()
        self._reset_solver_state()
        self._reset_run_state()

    def step(
        self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True,
        generator: torch.Generator | None = None,
    ) -> SchedulerOutput | tuple:
        """Advance one model evaluation: a Runge-Kutta sub-step during the warm-up (:meth:`step_prk`), else a PLMS
        step (:meth:`step_plms`)."""
        self._check_can_step()
        if self.counter < len(self.prk_timesteps):
            return self.step_prk(model_output, timestep, sample, return_dict)
        return self.step_plms(model_output, timestep, sample, return_dict)

    def step_prk(
        self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True
    ) -> SchedulerOutput | tuple:
        """One Runge-Kutta sub-step of the warm-up (the first ``len(prk_timesteps)`` evaluations, four per step).

        Public as in diffusers. Called outside the warm-up it raises (diffusers would compute from the wrong
        timesteps).
        """
        self._check_can_step()
        if self.counter >= len(self.prk_timesteps):
            raise ValueError(
                f"{type(self).__name__}.step_prk: the Runge-Kutta warm-up is over (or skip_prk_steps=True); "
                "call step() or step_plms()"
            )
        prev_sample = self._step_prk(model_output, sample)
        self.counter += 1
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

    def step_plms(
        self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True
    ) -> SchedulerOutput | tuple:
        """One pseudo linear multistep step (every evaluation after the warm-up). Public as in diffusers."""
        self._check_can_step()
        if self.counter < len(self.prk_timesteps):
            raise ValueError(
                f"{type(self).__name__}.step_plms: PLMS steps need the three Runge-Kutta warm-up steps first "
                f"({len(self.prk_timesteps) - self.counter} evaluations left); call step() or step_prk()"
            )
        begin = self._begin_index or 0
        if begin and begin + self.counter == 1:
            # evaluation 1 of a skip_prk schedule repeats timestep 1 for the Heun warm-up; a run starting there
            # takes its first step at evaluation 2, so this one changes nothing (one spare model call)
            prev_sample = sample
        else:
            prev_sample = self._step_plms(model_output, sample, begin)
        self.counter += 1
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

    def _check_can_step(self) -> None:
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps before step")
        begin = self._begin_index or 0
        if begin and not self.config.skip_prk_steps:
            raise ValueError(
                f"{type(self).__name__}: starting part-way (begin_index={begin}) needs skip_prk_steps=True; the "
                "Runge-Kutta warm-up evaluations are not whole steps"
            )
        if begin + self.counter >= len(self._froms):
            raise ValueError(f"{type(self).__name__}: the schedule is finished; call set_timesteps again")

    def _step_prk(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        phase = self.counter % 4
        if phase == 0:
            self.cur_model_output = self.cur_model_output + 1 / 6 * model_output
            self.ets = self.ets + [model_output]
            self.cur_sample = sample
        elif phase in (1, 2):
            self.cur_model_output = self.cur_model_output + 1 / 3 * model_output
        else:
            model_output = self.cur_model_output + 1 / 6 * model_output
            self.cur_model_output = 0
        cur_sample = self.cur_sample if self.cur_sample is not None else sample
        return self._transfer(cur_sample, self._froms[self.counter], self._tos[self.counter], model_output)

    def _step_plms(self, model_output: torch.Tensor, sample: torch.Tensor, begin: int = 0) -> torch.Tensor:
        if not self.config.skip_prk_steps and len(self.ets) < 3:
            raise ValueError(f"{type(self).__name__}: PLMS steps need the three Runge-Kutta warm-up steps first")
        position = begin + self.counter
        heun = begin == 0  # a run from the start warms up with a Heun step; one from part-way does not
        if self.counter != 1 or not heun:
            self.ets = self.ets[-3:] + [model_output]
        ets = self.ets
        if len(ets) == 1 and not heun:
            pass  # first step of a part-way run: first order
        elif len(ets) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(ets) == 1 and self.counter == 1:
            model_output = (model_output + ets[-1]) / 2
            sample = self.cur_sample
            self.cur_sample = None
        elif len(ets) == 2:
            model_output = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            model_output = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            model_output = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        if not heun:  # evaluations from `begin` on are whole steps: b_k -> b_k+1 for each, to the final alpha
            return self._transfer(sample, self._froms[position], self._tos[position], model_output)
        return self._transfer(sample, self._froms[self.counter], self._tos[self.counter], model_output)

    def _transfer(self, sample: torch.Tensor, t: int, prev_t: int, model_output: torch.Tensor) -> torch.Tensor:
        """PNDM's transfer x_t -> x_prev (Liu et al. 2022, eq. 9) with the (combined) model output as eps."""
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        if self.config.prediction_type == "v_prediction":
            _, model_output = core.vp_x0_eps(model_output, sample, alpha_prod_t**0.5, beta_prod_t**0.5, "v_prediction")
        sample_coeff = (alpha_prod_t_prev / alpha_prod_t) ** 0.5
        denom = alpha_prod_t * beta_prod_t_prev**0.5 + (alpha_prod_t * beta_prod_t * alpha_prod_t_prev) ** 0.5
        return sample_coeff * sample - (alpha_prod_t_prev - alpha_prod_t) * model_output / denom

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """Forward process q(x_t | x0) at integer ``timesteps``."""
        return core.vp_add_noise(original_samples, noise, self.alphas_cumprod, timesteps)
