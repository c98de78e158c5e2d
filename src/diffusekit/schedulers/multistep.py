"""Shared maths of the exponential-integrator samplers: DPM-Solver(++) multistep and singlestep, UniPC and DEIS.

All of them integrate the probability-flow ODE of a VP model exactly in its linear part and approximate the model
output by a polynomial in the half log-SNR ``lambda = log(alpha) - log(sigma)``:

* a schedule entry ``s`` (the k-diffusion sigma ``sqrt((1 - a) / a)``, or the flow-matching sigma) gives the noise
  level ``alpha_t, sigma_t`` (:func:`noise_level`), so ``x_t = alpha_t * x0 + sigma_t * eps``;
* the model output is turned into a *data* prediction x0 (DPM-Solver++, UniPC with ``predict_x0``) or a *noise*
  prediction eps (DPM-Solver, DEIS) by :func:`data_prediction` / :func:`noise_prediction`;
* a step from level ``s`` to level ``t`` with ``h = lambda_t - lambda_s`` is, for data prediction,
  ``x_t = sigma_t/sigma_s x_s - alpha_t (e^{-h} - 1) D0 + ...`` and, for noise prediction,
  ``x_t = alpha_t/alpha_s x_s - sigma_t (e^{h} - 1) D0 + ...``, where ``D0, D1, D2`` are the model output and its
  scaled finite differences in lambda (:func:`multistep_differences`, :func:`singlestep_differences`).

Coefficients are computed in the precision of the schedule (float32 0-d tensors), the way diffusers computes them,
so results agree with diffusers to float32 rounding.

The second half of the module is :class:`MultistepSchedulerBase`: the bookkeeping the four solver classes share
(training schedule, inference timestep spacing, sigma schedules, step index, ``add_noise``).
"""

from __future__ import annotations

import logging
import math
import numbers
from typing import NamedTuple, Sequence

import numpy as np
import torch

from ..configuration import FrozenConfig
from . import core
from .base import SchedulerMixin

logger = logging.getLogger(__name__)

SOLVER_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
TIME_SHIFT_TYPES = ("exponential", "linear")
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24  # replaces alphas_cumprod[-1] = 0 under rescale_betas_zero_snr (finite sigma)

# --------------------------------------------------------------------------------------------------------------------
# inference timesteps and sigma schedules
# --------------------------------------------------------------------------------------------------------------------


def solver_timesteps(
    num_train_timesteps: int,
    num_inference_steps: int,
    timestep_spacing: str = "linspace",
    steps_offset: int = 0,
    last_timestep: int | None = None,
    owner: str = "scheduler",
) -> np.ndarray:
    """Integer timesteps (descending, int64) of the DPM-Solver family, from ``last_timestep - 1`` (default ``T - 1``).

    Unlike the k-diffusion spacing these take ``n + 1`` points and drop the one at 0, so the final step is left to
    the appended final sigma:

    * ``linspace``: ``round(linspace(0, last - 1, n + 1))`` reversed, without the trailing 0;
    * ``leading``: ``arange(n + 1) * (last // (n + 1))`` reversed without the 0, plus ``steps_offset``;
    * ``trailing``: ``round(arange(last, 0, -T / n)) - 1``.
    """
    core.check_choice(owner, "timestep_spacing", timestep_spacing, core.TIMESTEP_SPACINGS)
    n = num_inference_steps
    if n is None or int(n) != n or n < 1:
        raise ValueError(f"{owner}: num_inference_steps must be a positive integer, got {n!r}")
    T = num_train_timesteps
    if n > T:
        raise ValueError(f"{owner}: num_inference_steps={n} cannot exceed num_train_timesteps={T}")
    last = T if last_timestep is None else int(last_timestep)
    if timestep_spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if timestep_spacing == "leading":
        ratio = last // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + steps_offset
    return np.arange(last, 0, -T / n).round().astype(np.int64) - 1


def clipped_timestep_count(lambda_t: torch.Tensor, lambda_min_clipped: float) -> int:
    """Number of training timesteps left after dropping those whose lambda is below ``lambda_min_clipped``
    (the high-noise end; used for cosine schedules, whose last lambdas are extreme)."""
    clipped = int(torch.searchsorted(torch.flip(lambda_t, [0]), lambda_min_clipped).item())
    return lambda_t.shape[0] - clipped


def respace_sigmas(
    kind: str,
    train_sigmas: np.ndarray,
    num_inference_steps: int,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(sigmas, fractional timesteps)``: ``n`` sigmas spanning the training range with the ``kind`` schedule.

    ``kind``: ``karras`` / ``exponential`` / ``beta`` (core's schedules) or ``lu`` (uniform in log-sigma, i.e. in
    lambda; Lu et al.'s DPM-Solver spacing). Timesteps come from log-sigma interpolation over the training sigmas.
    """
    log_sigmas = np.log(train_sigmas)
    if kind == "lu":
        lam = log_sigmas[::-1].copy()  # descending log-sigma
        ramp = np.linspace(0, 1, num_inference_steps)
        sigmas = np.exp(lam[0] + ramp * (lam[-1] - lam[0]))
    else:
        sigmas = core.convert_sigmas(kind, train_sigmas[::-1].copy(), num_inference_steps, sigma_min, sigma_max)
    timesteps = np.array([core.sigma_to_t(s, log_sigmas) for s in sigmas])
    return sigmas, timesteps


def shift_flow_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """Resolution shift of flow-matching sigmas: ``shift * s / (1 + (shift - 1) * s)``."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def time_shift(mu: float, sigmas: np.ndarray, kind: str = "exponential", power: float = 1.0) -> np.ndarray:
    """Dynamic (resolution-dependent) shift of flow sigmas: ``m / (m + (1/s - 1)**power)``, ``m = e^mu`` or ``mu``."""
    m = math.exp(mu) if kind == "exponential" else mu
    return m / (m + (1 / sigmas - 1) ** power)


def stretch_to_terminal(sigmas: np.ndarray, terminal: float) -> np.ndarray:
    """Stretch flow sigmas so the last one equals ``terminal`` (keeps ``1 - s`` proportional)."""
    one_minus = 1 - sigmas
    return 1 - one_minus / (one_minus[-1] / (1 - terminal))


# --------------------------------------------------------------------------------------------------------------------
# noise levels and parameterisation
# --------------------------------------------------------------------------------------------------------------------


class Level(NamedTuple):
    """One noise level: ``x = alpha * x0 + sigma * eps`` and ``lam = log(alpha) - log(sigma)``."""

    alpha: torch.Tensor
    sigma: torch.Tensor
    lam: torch.Tensor


def noise_level(s: torch.Tensor, flow: bool = False) -> Level:
    """The level of schedule entry ``s``: VP from a k-diffusion sigma (``alpha = 1/sqrt(s^2 + 1)``,
    ``sigma = s * alpha``) or, for flow matching, ``alpha = 1 - s`` and ``sigma = s``."""
    if flow:
        alpha, sigma = 1 - s, s
    else:
        alpha = 1 / ((s**2 + 1) ** 0.5)
        sigma = s * alpha
    return Level(alpha, sigma, torch.log(alpha) - torch.log(sigma))


def data_prediction(
    model_output: torch.Tensor, sample: torch.Tensor, level: Level, s: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """x0 from the model output (``flow_prediction``: the velocity, ``x0 = x - s * v``)."""
    if prediction_type == "flow_prediction":
        return sample - s * model_output
    return core.vp_x0_eps(model_output, sample, level.alpha, level.sigma, prediction_type)[0]


def noise_prediction(
    model_output: torch.Tensor, sample: torch.Tensor, level: Level, prediction_type: str
) -> torch.Tensor:
    """eps from the model output (VP parameterisations only)."""
    if prediction_type == "epsilon":
        return model_output
    return core.vp_x0_eps(model_output, sample, level.alpha, level.sigma, prediction_type)[1]


# --------------------------------------------------------------------------------------------------------------------
# DPM-Solver / DPM-Solver++ (Lu et al. 2022a, 2022b), ODE and SDE forms
# --------------------------------------------------------------------------------------------------------------------

DPM_ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver")
DPM_SOLVER_TYPES = ("midpoint", "heun")


class DPMCoefficients(NamedTuple):
    """``x_t = scale * x_s + c0 * D0 + c1 * D1 + c2 * D2 + noise_std * z``.

    ``c1_midpoint`` / ``c1`` are the D1 weights of the midpoint and Heun (``solver_type``) second-order forms;
    third-order updates use ``c1`` and ``c2``. ``c2`` is ``None`` where the algorithm has no third order.
    """

    scale: torch.Tensor
    c0: torch.Tensor
    c1_midpoint: torch.Tensor
    c1: torch.Tensor
    c2: torch.Tensor | None
    noise_std: torch.Tensor | None


def dpm_coefficients(algorithm: str, src: Level, dst: Level) -> DPMCoefficients:
    """Step coefficients from level ``src`` to ``dst`` (``h = dst.lam - src.lam``).

    Data prediction (``dpmsolver++``) integrates with ``e^{-h}``, noise prediction (``dpmsolver``) with ``e^{h}``;
    the SDE forms (Lu et al. 2022b, sec. 4) double the drift and add ``sigma_t sqrt(1 - e^{-2h})`` noise.
    """
    h = dst.lam - src.lam
    a_t, s_t = dst.alpha, dst.sigma
    if algorithm == "dpmsolver++":
        e = torch.exp(-h) - 1.0
        return DPMCoefficients(
            s_t / src.sigma, -(a_t * e), -0.5 * (a_t * e), a_t * (e / h + 1.0), -(a_t * ((e + h) / h**2 - 0.5)), None
        )
    if algorithm == "dpmsolver":
        e = torch.exp(h) - 1.0
        return DPMCoefficients(
            a_t / src.alpha, -(s_t * e), -0.5 * (s_t * e), -(s_t * (e / h - 1.0)), -(s_t * ((e - h) / h**2 - 0.5)),
            None,
        )
    if algorithm == "sde-dpmsolver++":
        e2 = 1.0 - torch.exp(-2.0 * h)
        return DPMCoefficients(
            s_t / src.sigma * torch.exp(-h),
            a_t * e2,
            0.5 * (a_t * e2),
            a_t * (e2 / (-2.0 * h) + 1.0),
            a_t * ((e2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5),
            s_t * torch.sqrt(1.0 - torch.exp(-2 * h)),
        )
    if algorithm == "sde-dpmsolver":
        e = torch.exp(h) - 1.0
        return DPMCoefficients(
            a_t / src.alpha, -(2.0 * (s_t * e)), -(s_t * e), -(2.0 * (s_t * (e / h - 1.0))), None,
            s_t * torch.sqrt(torch.exp(2 * h) - 1.0),
        )
    raise ValueError(f"algorithm_type={algorithm!r}; choose one of {list(DPM_ALGORITHMS)}")


def dpm_update(
    sample: torch.Tensor,
    derivatives: Sequence[torch.Tensor],
    coef: DPMCoefficients,
    solver_type: str = "heun",
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply one DPM-Solver update with ``derivatives = (D0,)``, ``(D0, D1)`` or ``(D0, D1, D2)``.

    ``solver_type`` picks the D1 weight of a second-order update (``midpoint`` or ``heun``); a third-order update
    always uses the Heun-type weight for D1.
    """
    x = coef.scale * sample + coef.c0 * derivatives[0]
    if len(derivatives) == 2:
        x = x + (coef.c1_midpoint if solver_type == "midpoint" else coef.c1) * derivatives[1]
    elif len(derivatives) == 3:
        if coef.c2 is None:
            raise ValueError("this algorithm has no third-order update")
        x = x + coef.c1 * derivatives[1] + coef.c2 * derivatives[2]
    if coef.noise_std is not None:
        if noise is None:
            raise ValueError("a stochastic (sde-) update needs `noise`")
        x = x + coef.noise_std * noise
    return x


def multistep_differences(outputs: Sequence[torch.Tensor], lams: Sequence[torch.Tensor], lam_t: torch.Tensor):
    """``(D0, [D1, [D2]])`` of a multistep update from the newest ``len(outputs)`` model outputs.

    ``outputs`` / ``lams`` run oldest to newest (the newest, ``m0`` at ``lams[-1]``, is the current point); the
    differences are scaled by the step ``h = lam_t - lams[-1]`` (backward differences in lambda, times h).
    """
    m0 = outputs[-1]
    if len(outputs) == 1:
        return (m0,)
    h = lam_t - lams[-1]
    r0 = (lams[-1] - lams[-2]) / h
    d1_0 = (1.0 / r0) * (m0 - outputs[-2])
    if len(outputs) == 2:
        return (m0, d1_0)
    r1 = (lams[-2] - lams[-3]) / h
    d1_1 = (1.0 / r1) * (outputs[-2] - outputs[-3])
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
    return (m0, d1, d2)


def singlestep_differences(
    outputs: Sequence[torch.Tensor], lams: Sequence[torch.Tensor], lam_t: torch.Tensor, solver_type: str
):
    """``(D0, [D1, [D2]])`` of a singlestep update: all differences are taken at the *oldest* point of the block
    (the start ``s`` of the step ``s -> t``); ``outputs`` / ``lams`` run oldest to newest.

    For order 3 with ``solver_type="midpoint"`` only ``(D0, D1)`` are used (DPM-Solver-3's cheaper form), with the
    Heun-type weight; pass the result to :func:`dpm_update` accordingly (see :func:`singlestep_update`).
    """
    base = outputs[0]
    if len(outputs) == 1:
        return (base,)
    h = lam_t - lams[0]
    if len(outputs) == 2:
        r0 = (lams[1] - lams[0]) / h
        return (base, (1.0 / r0) * (outputs[1] - base))
    r1 = (lams[1] - lams[0]) / h  # middle point
    r0 = (lams[2] - lams[0]) / h  # newest point
    d1_mid = (1.0 / r1) * (outputs[1] - base)
    d1_new = (1.0 / r0) * (outputs[2] - base)
    if solver_type == "midpoint":
        return (base, d1_new)
    d1 = (r0 * d1_mid - r1 * d1_new) / (r0 - r1)
    d2 = 2.0 * (d1_new - d1_mid) / (r0 - r1)
    return (base, d1, d2)


def singlestep_update(
    sample: torch.Tensor,
    outputs: Sequence[torch.Tensor],
    lams: Sequence[torch.Tensor],
    coef: DPMCoefficients,
    lam_t: torch.Tensor,
    solver_type: str,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One singlestep DPM-Solver update of order ``len(outputs)`` from the block start ``sample``."""
    d = singlestep_differences(outputs, lams, lam_t, solver_type)
    if len(outputs) == 3 and solver_type == "midpoint":
        # third-order midpoint form: D1 only, but with the Heun-type (exact phi_2) weight
        x = coef.scale * sample + coef.c0 * d[0] + coef.c1 * d[1]
        return x + coef.noise_std * noise if coef.noise_std is not None else x
    return dpm_update(sample, d, coef, solver_type, noise)


# --------------------------------------------------------------------------------------------------------------------
# UniPC (Zhao et al. 2023): unified predictor (UniP) and corrector (UniC) with the B(h) variants
# --------------------------------------------------------------------------------------------------------------------

UNIPC_SOLVER_TYPES = ("bh1", "bh2")


class UniPCSystem(NamedTuple):
    """The order conditions of a UniPC update: ``R rho = b`` and the exponential weights."""

    R: torch.Tensor  # (order, order): R[i, k] = r_k ** i
    b: torch.Tensor  # (order,)
    h_phi_1: torch.Tensor  # e^{hh} - 1
    B_h: torch.Tensor  # hh (bh1) or e^{hh} - 1 (bh2)


def unipc_system(rks: torch.Tensor, hh: torch.Tensor, order: int, variant: str) -> UniPCSystem:
    """Build the UniPC linear system for nodes ``rks`` (relative lambda offsets, the last one 1) and step ``hh``.

    ``hh`` is ``-h`` for data prediction and ``h`` for noise prediction. ``b_i = i! * h phi_{i+1}(hh) / B(h)``
    with the phi functions built by the recurrence ``phi_{k+1} = (phi_k - 1/k!) / hh``.
    """
    h_phi_1 = torch.expm1(hh)
    if variant == "bh1":
        B_h = hh
    elif variant == "bh2":
        B_h = torch.expm1(hh)
    else:
        raise ValueError(f"solver_type={variant!r}; choose one of {list(UNIPC_SOLVER_TYPES)}")
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    rows, b = [], []
    for i in range(1, order + 1):
        rows.append(torch.pow(rks, i - 1))
        b.append(h_phi_k * factorial / B_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return UniPCSystem(torch.stack(rows), torch.stack(b), h_phi_1, B_h)


def unipc_update(
    x: torch.Tensor,
    history: Sequence[torch.Tensor],
    history_lams: Sequence[torch.Tensor],
    src: Level,
    dst: Level,
    order: int,
    predict_x0: bool,
    variant: str,
    model_t: torch.Tensor | None = None,
) -> torch.Tensor:
    """One UniPC update from ``x`` at level ``src`` to level ``dst``.

    ``history`` runs newest first: ``history[0]`` is the (converted) model output at ``src`` and ``history[k]``
    (``k < order``) the one ``k`` steps earlier, at ``history_lams[k]``. Without ``model_t`` this is the predictor
    UniP-``order``; with ``model_t`` (the model output at ``dst``) it is the corrector UniC-``order``, whose effective
    accuracy is one order higher.
    """
    m0 = history[0]
    h = dst.lam - src.lam
    rks, diffs = [], []
    for k in range(1, order):
        rk = (history_lams[k] - src.lam) / h
        rks.append(rk)
        diffs.append((history[k] - m0) / rk)
    rks.append(torch.ones((), device=h.device, dtype=h.dtype))
    hh = -h if predict_x0 else h
    system = unipc_system(torch.stack(rks), hh, order, variant)
    if predict_x0:
        weight = dst.alpha
        x_lin = dst.sigma / src.sigma * x - dst.alpha * system.h_phi_1 * m0
    else:
        weight = dst.sigma
        x_lin = dst.alpha / src.alpha * x - dst.sigma * system.h_phi_1 * m0
    device, dtype = x.device, x.dtype
    if model_t is None:  # predictor: rho solves the system without the unknown newest node
        if not diffs:
            return x_lin.to(dtype)
        if order == 2:
            rhos = torch.full((1,), 0.5, dtype=dtype, device=device)
        else:
            rhos = torch.linalg.solve(system.R[:-1, :-1], system.b[:-1]).to(device=device, dtype=dtype)
        res = _weighted_sum(rhos, diffs)
        return (x_lin - weight * system.B_h * res).to(dtype)
    if order == 1:
        rhos = torch.full((1,), 0.5, dtype=dtype, device=device)
    else:
        rhos = torch.linalg.solve(system.R, system.b).to(device=device, dtype=dtype)
    res = _weighted_sum(rhos[:-1], diffs) if diffs else 0
    return (x_lin - weight * system.B_h * (res + rhos[-1] * (model_t - m0))).to(dtype)


def _weighted_sum(weights: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_k weights[k] * tensors[k]``."""
    return torch.einsum("k,k...->...", weights, torch.stack(list(tensors)))


# --------------------------------------------------------------------------------------------------------------------
# DEIS (Zhang & Chen 2023), log-rho multistep: exact integrals of the Lagrange interpolant of eps in log(rho)
# --------------------------------------------------------------------------------------------------------------------


def deis_coefficients(rho_t: torch.Tensor, rhos: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Weights ``c_j`` with ``x_t / alpha_t = x_s / alpha_s + sum_j c_j eps_j`` for nodes ``rhos`` (newest first;
    ``rho = sigma / alpha``; the step runs from ``rhos[0]`` to ``rho_t``). Orders 2 and 3.

    ``c_j = integral_{rho_s}^{rho_t} L_j(log rho) d rho`` with ``L_j`` the Lagrange basis polynomial of node ``j``;
    the antiderivatives below are that integral in closed form (``u = log rho``).
    """
    logs = [_log32(r) for r in rhos]
    lt = _log32(rho_t)
    if len(rhos) == 2:

        def anti(r, lr, j):
            lb, lc = logs[j], logs[1 - j]
            return r * (-lc + lr - 1) / (lb - lc)

    elif len(rhos) == 3:

        def anti(r, lr, j):
            lb, lc, ld = logs[j], logs[(j + 1) % 3], logs[(j + 2) % 3]
            num = r * (lc * (ld - lr + 1) - ld * lr + ld + lr**2 - 2 * lr + 2)
            return num / ((lb - lc) * (lb - ld))

    else:
        raise ValueError(f"DEIS log-rho weights are implemented for orders 2 and 3, not {len(rhos)}")
    ls = logs[0]
    return [anti(rho_t, lt, j) - anti(rhos[0], ls, j) for j in range(len(rhos))]


def _log32(x: torch.Tensor) -> torch.Tensor:
    """log of a CPU scalar through numpy, whose float32 log is the one diffusers' DEIS uses (bitwise parity)."""
    x = x.detach()
    if x.device.type != "cpu":
        return torch.log(x)
    return torch.from_numpy(np.asarray(np.log(x.numpy()))).to(x.dtype)


# --------------------------------------------------------------------------------------------------------------------
# shared scheduler bookkeeping
# --------------------------------------------------------------------------------------------------------------------


class MultistepSchedulerBase(SchedulerMixin):
    """Bookkeeping shared by the solver schedulers (UniPC, DPM-Solver multistep/singlestep, DEIS).

    Subclasses declare their diffusers ``__init__`` (``@register_to_config``) and call :meth:`_setup_solver`.
    Per-run state: ``timesteps``, ``sigmas`` (float32, CPU, one longer than ``timesteps``: the final sigma),
    ``num_inference_steps``, the step index, ``model_outputs`` (a list, copied by ``copy.copy``) and
    ``lower_order_nums``. The training schedule tensors are shared by copies and never written in place.
    """

    order = 1
    _prediction_types_allowed = SOLVER_PREDICTION_TYPES

    @classmethod
    def _prediction_types(cls) -> tuple[str, ...]:
        return cls._prediction_types_allowed

    def _update_config(self, **changes) -> None:
        """Record a normalised option (diffusers' ``register_to_config`` after construction)."""
        self._config = FrozenConfig({**self._config, **changes})

    def _setup_solver(self) -> None:
        cfg = self.config
        owner = type(self).__name__
        self._check_common_options()
        order = cfg.get("solver_order", 1)
        if isinstance(order, bool) or not isinstance(order, numbers.Integral) or order < 1:
            raise ValueError(f"{owner}: solver_order must be a positive integer, got {order!r}")
        if "final_sigmas_type" in cfg:
            core.check_choice(owner, "final_sigmas_type", cfg.final_sigmas_type, FINAL_SIGMAS_TYPES)
        if cfg.get("use_dynamic_shifting", False):
            core.check_choice(owner, "time_shift_type", cfg.get("time_shift_type"), self._time_shift_types())
        self._init_train_schedule(
            cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule, cfg.trained_betas,
            cfg.get("rescale_betas_zero_snr", False),
        )
        if cfg.get("rescale_betas_zero_snr", False):
            # zero terminal SNR means infinite sigma: use a tiny alpha instead so every formula stays finite
            ac = self.alphas_cumprod.clone()
            ac[-1] = ZERO_SNR_ALPHA_CUMPROD
            self.alphas_cumprod = ac
        self._derive_from_alphas_cumprod()
        self.init_noise_sigma = 1.0
        T = cfg.num_train_timesteps
        self.timesteps = torch.from_numpy(np.linspace(0, T - 1, T, dtype=np.float32)[::-1].copy())
        self.num_inference_steps = None
        self._flow_shift = cfg.get("flow_shift", 1.0)
        self._reset_history()
        self._reset_run_state()

    def _derive_from_alphas_cumprod(self) -> None:
        """Training-time ``alpha_t``, ``sigma_t``, ``lambda_t`` and k-diffusion ``sigmas`` from ``alphas_cumprod``."""
        self.alpha_t = torch.sqrt(self.alphas_cumprod)
        self.sigma_t = torch.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5

    @classmethod
    def _time_shift_types(cls) -> tuple[str, ...]:
        return ("exponential",)

    def _reset_history(self) -> None:
        order = self.config.get("solver_order", 1)
        self.model_outputs: list = [None] * order
        self.lower_order_nums = 0

    # ---- schedule ------------------------------------------------------------------------------------------------

    @property
    def _flow(self) -> bool:
        return bool(self.config.get("use_flow_sigmas", False))

    def _train_sigmas(self) -> np.ndarray:
        return core.train_sigmas(self.alphas_cumprod)

    def _train_sigma_min(self) -> float:
        a0 = self.alphas_cumprod[0]
        return float(((1 - a0) / a0) ** 0.5)

    def _flow_schedule(self, num_inference_steps: int, mu: float | None) -> tuple[np.ndarray, np.ndarray]:
        """``(sigmas, timesteps)`` of flow matching: ``linspace(1, 1/T)`` shifted by ``flow_shift`` (or ``e^mu``)."""
        T = self.config.num_train_timesteps
        if mu is not None:
            if not self.config.get("use_dynamic_shifting", False):
                raise ValueError(f"{type(self).__name__}: `mu` needs use_dynamic_shifting=True")
            self._flow_shift = math.exp(mu)
        sigmas = 1.0 - np.linspace(1, 1 / T, num_inference_steps + 1)
        sigmas = shift_flow_sigmas(sigmas, self._flow_shift)[::-1][:-1].copy()
        return sigmas, sigmas * T

    def _store_schedule(self, timesteps: np.ndarray, sigmas: np.ndarray, final_sigma, device=None) -> None:
        """Set ``timesteps`` (int64, truncated like ``astype``) on ``device`` and ``sigmas`` + final (float32, CPU)."""
        sigmas = np.concatenate([np.asarray(sigmas, dtype=np.float64), [float(final_sigma)]]).astype(np.float32)
        self.sigmas = torch.from_numpy(sigmas)
        self.timesteps = torch.from_numpy(np.asarray(timesteps)).to(device=device, dtype=torch.int64)
        self.num_inference_steps = len(timesteps)
        self._reset_history()
        self._reset_run_state()

    # ---- stepping helpers ------------------------------------------------------------------------------------------

    def _level(self, index: int, device=None) -> Level:
        s = self.sigmas[index]
        if device is not None:
            s = s.to(device)
        return noise_level(s, self._flow)

    def _check_ready(self) -> None:
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) before step()")

    def _init_step_index(self, timestep) -> None:
        super()._init_step_index(timestep)
        # A fresh run whose first timestep is repeated (sigma schedules truncated to integers, e.g. karras over a
        # cosine schedule) must start at 0: the "second occurrence" rule (for img2img into a Heun schedule) would
        # run past the end of the schedule.
        if self._begin_index is None and self._step_index == 1 and bool(self.timesteps[0] == self.timesteps[1]):
            self._step_index = 0

    def _begin_step(self, timestep) -> int:
        self._check_ready()
        if self._step_index is None:
            self._init_step_index(timestep)
        return self._step_index

    def _threshold(self, x0: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.thresholding:
            return core.threshold_sample(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
        return x0

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """These solvers take the VP sample as the model input: no scaling."""
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """``alpha * x0 + sigma * noise`` at schedule ``timesteps`` (or at the current / begin step once a begin
        index is set, as img2img pipelines do)."""
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps before add_noise")
        device = original_samples.device
        timesteps = torch.as_tensor(timesteps, device=device).reshape(-1)
        if self._begin_index is None:
            schedule = self.timesteps.to(device)
            indices = [self.index_for_timestep(t, schedule) for t in timesteps]
        elif self._step_index is not None:
            indices = [self._step_index] * timesteps.shape[0]
        else:
            indices = [self._begin_index] * timesteps.shape[0]
        s = self.sigmas.to(device=device, dtype=original_samples.dtype)[indices]
        s = core.expand_to(s, original_samples.ndim)
        level = noise_level(s, self._flow)
        return level.alpha * original_samples + level.sigma * noise
