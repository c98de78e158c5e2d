"""Scheduler maths, written once: every scheduler class is a thin adapter over these functions.

Conventions
-----------
* A *discrete-time* (VP) model sees ``x_t = alpha_t * x0 + sigma_t * eps`` with ``alpha_t = sqrt(alphas_cumprod[t])``
  and ``sigma_t = sqrt(1 - alphas_cumprod[t])``.
* A *k-diffusion* (VE) scheduler works on ``x = x0 + sigma * eps`` with ``sigma = sqrt((1 - a) / a)``; the model input
  is ``x / sqrt(sigma**2 + 1)``, which is the VP sample.
* Schedules (training betas, inference timesteps, sigma schedules) are built with numpy on the CPU, in float64 where
  we choose, then cast; the schedulers turn them into torch tensors on the requested device.
* Nothing here keeps state: functions take arrays and return new arrays (no in-place update of an argument), so
  scheduler copies can share every tensor.

Sections: option validation; training noise schedule (betas); inference timesteps; sigma schedules and
sigma<->timestep interpolation; parameterisation (epsilon / sample / v_prediction) conversion; x0 clipping and dynamic
thresholding; noise (``randn_tensor``, ``add_noise``); k-diffusion step pieces (ancestral split, LMS coefficients).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch

from .. import random as _random

# --------------------------------------------------------------------------------------------------------------------
# option validation
# --------------------------------------------------------------------------------------------------------------------

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "exp", "laplace")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def check_choice(owner: str, name: str, value, allowed: Iterable) -> None:
    """Raise ``ValueError`` naming the argument and the allowed values when ``value`` is not one of ``allowed``."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{owner}: {name}={value!r} is not supported; choose one of {list(allowed)}")


def sigma_schedule_kind(
    owner: str, use_karras_sigmas: bool | None, use_exponential_sigmas: bool | None, use_beta_sigmas: bool | None
) -> str | None:
    """Return ``"karras"``, ``"exponential"``, ``"beta"`` or ``None``; more than one flag set is a ``ValueError``."""
    chosen = [
        kind
        for kind, flag in (
            ("karras", use_karras_sigmas), ("exponential", use_exponential_sigmas), ("beta", use_beta_sigmas)
        )
        if flag
    ]
    if len(chosen) > 1:
        raise ValueError(
            f"{owner}: only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas may be True "
            f"(got {', '.join('use_' + k + '_sigmas' for k in chosen)})"
        )
    return chosen[0] if chosen else None


# --------------------------------------------------------------------------------------------------------------------
# training noise schedule
# --------------------------------------------------------------------------------------------------------------------


def betas_for_alpha_bar(num_train_timesteps: int, max_beta: float = 0.999, alpha_transform_type: str = "cosine"):
    """Betas that discretise a continuous ``alpha_bar(t)``, ``t`` in [0, 1] (float64 numpy).

    ``beta_i = min(1 - alpha_bar((i + 1) / N) / alpha_bar(i / N), max_beta)``. ``"cosine"`` is the improved-DDPM
    schedule (``squaredcos_cap_v2``); ``"exp"`` is ``exp(-12 t)``; ``"laplace"`` the Laplace noise schedule.
    """
    if alpha_transform_type == "cosine":

        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    elif alpha_transform_type == "exp":

        def alpha_bar(t):
            return math.exp(-12.0 * t)

    elif alpha_transform_type == "laplace":

        def alpha_bar(t):
            lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * abs(0.5 - t) + 1e-6)
            snr = math.exp(lmb)
            return math.sqrt(snr / (1 + snr))

    else:
        raise ValueError(f"alpha_transform_type={alpha_transform_type!r}; choose 'cosine', 'exp' or 'laplace'")
    n = num_train_timesteps
    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], dtype=np.float64)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas so the last timestep has zero SNR (Lin et al. 2023, Algorithm 1); float64 in and out.

    ``sqrt(alphas_cumprod)`` is shifted so its last value is 0 and scaled so its first value is unchanged.
    """
    betas = np.asarray(betas, dtype=np.float64)
    sqrt_ac = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ac[0], sqrt_ac[-1]
    sqrt_ac = (sqrt_ac - last) * (first / (first - last))
    ac = sqrt_ac**2
    alphas = np.concatenate([ac[:1], ac[1:] / ac[:-1]])
    return 1.0 - alphas


def make_betas(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    trained_betas=None,
    rescale_betas_zero_snr: bool = False,
    owner: str = "scheduler",
) -> np.ndarray:
    """Training betas as a float64 numpy array (cast to float32 by :func:`make_alphas_cumprod`'s callers).

    ``trained_betas`` (a list/array) wins over ``beta_schedule``. ``linear``: linspace(beta_start, beta_end);
    ``scaled_linear``: linspace(sqrt(beta_start), sqrt(beta_end))**2 (Stable Diffusion); ``squaredcos_cap_v2``:
    cosine alpha_bar; ``sigmoid``: sigmoid(linspace(-6, 6)) scaled to [beta_start, beta_end]; ``exp`` / ``laplace``:
    those alpha_bar transforms.
    """
    if trained_betas is not None:
        betas = np.asarray(
            trained_betas.detach().cpu().numpy() if isinstance(trained_betas, torch.Tensor) else trained_betas,
            dtype=np.float64,
        ).reshape(-1)
    else:
        check_choice(owner, "beta_schedule", beta_schedule, BETA_SCHEDULES)
        n = num_train_timesteps
        if beta_schedule == "linear":
            betas = np.linspace(beta_start, beta_end, n, dtype=np.float64)
        elif beta_schedule == "scaled_linear":
            betas = np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
        elif beta_schedule == "squaredcos_cap_v2":
            betas = betas_for_alpha_bar(n, alpha_transform_type="cosine")
        elif beta_schedule == "exp":
            betas = betas_for_alpha_bar(n, alpha_transform_type="exp")
        elif beta_schedule == "laplace":
            betas = betas_for_alpha_bar(n, alpha_transform_type="laplace")
        else:  # sigmoid
            x = np.linspace(-6.0, 6.0, n, dtype=np.float64)
            betas = 1.0 / (1.0 + np.exp(-x)) * (beta_end - beta_start) + beta_start
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def make_train_schedule(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(betas, alphas, alphas_cumprod)`` as float32 CPU tensors, computed in float64 then cast.

    Takes :func:`make_betas`' arguments. The tensors are treated as immutable by every scheduler (never written in
    place), so copies of a scheduler share them.
    """
    betas64 = make_betas(*args, **kwargs)
    alphas64 = 1.0 - betas64
    cumprod64 = np.cumprod(alphas64)
    as32 = lambda a: torch.from_numpy(a.astype(np.float32))  # noqa: E731
    return as32(betas64), as32(alphas64), as32(cumprod64)


# --------------------------------------------------------------------------------------------------------------------
# inference timesteps
# --------------------------------------------------------------------------------------------------------------------


def spaced_timesteps(
    num_train_timesteps: int,
    num_inference_steps: int,
    timestep_spacing: str,
    steps_offset: int = 0,
    owner: str = "scheduler",
) -> np.ndarray:
    """Descending inference timesteps as float64 (discrete schedulers round them; sigma schedulers keep them).

    * ``linspace``: ``linspace(0, T - 1, n)`` reversed (not rounded here: ``np.round`` it for integer timesteps).
    * ``leading``: ``arange(n) * (T // n) + steps_offset`` reversed (the DDIM paper / Stable Diffusion 1.x).
    * ``trailing``: ``round(arange(T, 0, -T / n)) - 1`` (ends at the last training step; "Common Diffusion Noise
      Schedules and Sample Steps are Flawed", Table 2).
    """
    check_choice(owner, "timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
    T, n = num_train_timesteps, num_inference_steps
    if n is None or n < 1:
        raise ValueError(f"{owner}: num_inference_steps must be a positive integer, got {n!r}")
    if n > T:
        raise ValueError(
            f"{owner}: num_inference_steps={n} cannot be larger than num_train_timesteps={T}: the model was trained "
            f"on {T} timesteps only"
        )
    if timestep_spacing == "linspace":
        return np.linspace(0, T - 1, n, dtype=np.float64)[::-1].copy()
    if timestep_spacing == "leading":
        ratio = T // n
        return (np.arange(0, n) * ratio).round()[::-1].astype(np.float64) + steps_offset
    ratio = T / n
    return np.round(np.arange(T, 0, -ratio)).astype(np.float64) - 1


def check_custom_timesteps(owner: str, timesteps: Sequence, num_train_timesteps: int) -> np.ndarray:
    """Validate user timesteps (strictly descending, within ``[0, num_train_timesteps)``) as an int64 array."""
    arr = np.asarray(
        timesteps.detach().cpu().numpy() if isinstance(timesteps, torch.Tensor) else timesteps
    ).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{owner}: custom timesteps must not be empty")
    if np.any(arr[1:] >= arr[:-1]):
        raise ValueError(f"{owner}: custom timesteps must be strictly descending, got {arr.tolist()}")
    if arr[0] >= num_train_timesteps or arr[-1] < 0:
        raise ValueError(
            f"{owner}: custom timesteps must lie in [0, {num_train_timesteps}) (num_train_timesteps), "
            f"got {arr.tolist()}"
        )
    return arr


def previous_timesteps(timesteps: Sequence[int]) -> np.ndarray:
    """The timestep each step of a descending schedule moves to: the next entry, and ``-1`` ("final") for the last.

    This is the one rule every discrete scheduler here uses: the previous timestep comes from the schedule itself,
    never from a stride such as ``t - T // n`` (which is wrong for ``linspace`` spacing, custom timesteps and
    ``trailing`` spacing when ``n`` does not divide ``T``; diffusers issue #9261).
    """
    arr = np.asarray(timesteps, dtype=np.int64).reshape(-1)
    return np.concatenate([arr[1:], np.array([-1], dtype=np.int64)])


# --------------------------------------------------------------------------------------------------------------------
# sigma schedules (k-diffusion / VE view of a VP model)
# --------------------------------------------------------------------------------------------------------------------


def train_sigmas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """``sqrt((1 - a) / a)`` for every training timestep, ascending in t (float32 numpy)."""
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()


def interp_sigmas(timesteps: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """Sigma at (possibly fractional) ``timesteps`` by linear interpolation in t over the training sigmas."""
    return np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)


def sigma_to_t(sigma, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep(s) of ``sigma`` by linear interpolation in log-sigma over ``log_sigmas`` (ascending).

    Vectorised over ``sigma``. Sigmas outside the training range clamp to the first / last timestep. The lower
    bracket is the last entry with ``log_sigmas[i] <= log(sigma)`` (0 when there is none), as in diffusers.
    """
    sigma = np.asarray(sigma)
    log_sigmas = np.asarray(log_sigmas)
    log_sigma = np.log(np.maximum(sigma, 1e-10)).reshape(-1)
    if np.all(np.diff(log_sigmas) >= 0):  # the usual case: O(n log T)
        low = np.searchsorted(log_sigmas, log_sigma, side="right") - 1
        low = np.clip(low, 0, log_sigmas.shape[0] - 2)
    else:  # a non-monotone trained schedule: the general (dense) form
        dists = log_sigma[None, :] - log_sigmas[:, None]  # (T, n)
        low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    lo, hi = log_sigmas[low], log_sigmas[high]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    t = (1 - w) * low + w * high
    return t.reshape(sigma.shape)


def karras_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) eq. 5: ``(max^(1/rho) + i/(n-1) * (min^(1/rho) - max^(1/rho)))^rho``, descending."""
    ramp = np.linspace(0, 1, num_inference_steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int) -> np.ndarray:
    """Sigmas evenly spaced in log-sigma from ``sigma_max`` down to ``sigma_min``."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_inference_steps))


def _betainc(a: float, b: float, x: np.ndarray) -> np.ndarray:
    """Regularised incomplete beta ``I_x(a, b)`` (vectorised, float64), by its continued fraction (modified Lentz)."""
    x = np.asarray(x, dtype=np.float64)
    out = np.where(x <= 0, 0.0, 1.0)
    inner = (x > 0) & (x < 1)
    if not inner.any():
        return out
    xi = x[inner]
    flip = xi > (a + 1) / (a + b + 2)  # use the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) where the fraction is slow
    aa = np.where(flip, b, a)
    bb = np.where(flip, a, b)
    xx = np.where(flip, 1 - xi, xi)
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    log_front = aa * np.log(xx) + bb * np.log1p(-xx) - log_beta - np.log(aa)
    tiny = 1e-300
    c = np.ones_like(xx)
    d = 1 - (aa + bb) * xx / (aa + 1)
    d = 1 / np.where(np.abs(d) < tiny, tiny, d)
    f = d.copy()
    for m in range(1, 300):
        num = m * (bb - m) * xx / ((aa + 2 * m - 1) * (aa + 2 * m))
        for coef in (num, -(aa + m) * (aa + bb + m) * xx / ((aa + 2 * m) * (aa + 2 * m + 1))):
            d = 1 + coef * d
            d = 1 / np.where(np.abs(d) < tiny, tiny, d)
            c = 1 + coef / c
            c = np.where(np.abs(c) < tiny, tiny, c)
            delta = c * d
            f = f * delta
        if np.all(np.abs(delta - 1) < 1e-15):
            break
    val = np.exp(log_front) * f
    out[inner] = np.where(flip, 1 - val, val)
    return out


def beta_ppf(q, a: float, b: float) -> np.ndarray:
    """Quantile function of the Beta(a, b) distribution (vectorised, float64, to ~1e-15).

    Bisection narrows each root to a 2**-12 bracket, then safeguarded Newton steps (falling back to bisection when a
    step leaves the bracket) converge quadratically, until no root moves by more than a few ulps.
    """
    q = np.asarray(q, dtype=np.float64)
    edge = (q <= 0) | (q >= 1)  # answered exactly below; kept out of the convergence test
    lo = np.zeros_like(q)
    hi = np.ones_like(q)
    for _ in range(12):
        mid = 0.5 * (lo + hi)
        below = _betainc(a, b, mid) < q
        lo = np.where(below, mid, lo)
        hi = np.where(below, hi, mid)
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    x = 0.5 * (lo + hi)
    for _ in range(200):  # Newton converges in a few steps; far tails (q ~ 1e-12) may bisect for a while first
        f = _betainc(a, b, x) - q
        lo = np.where(f < 0, x, lo)
        hi = np.where(f < 0, hi, x)
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            pdf = np.exp((a - 1) * np.log(x) + (b - 1) * np.log1p(-x) - log_beta)
            newton = x - f / pdf
        inside = np.isfinite(newton) & (newton >= lo) & (newton <= hi)
        x_new = np.where(inside, newton, 0.5 * (lo + hi))
        converged = np.all((np.abs(x_new - x) <= 4e-15 * np.abs(x)) | (f == 0) | edge)  # f has ulp noise
        x = x_new
        if converged:
            break
    return np.where(q <= 0, 0.0, np.where(q >= 1, 1.0, x))


def beta_sigmas(
    sigma_min: float, sigma_max: float, num_inference_steps: int, alpha: float = 0.6, beta: float = 0.6
) -> np.ndarray:
    """"Beta Sampling is All You Need" (Lee et al. 2024): sigmas at Beta(alpha, beta) quantiles, descending."""
    ppf = beta_ppf(1 - np.linspace(0, 1, num_inference_steps), alpha, beta)
    return sigma_min + ppf * (sigma_max - sigma_min)


def convert_sigmas(
    kind: str | None,
    in_sigmas: np.ndarray,
    num_inference_steps: int,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> np.ndarray:
    """Re-space a descending sigma array with the named schedule (``karras``/``exponential``/``beta``; ``None``: as is).

    The range is ``[sigma_min, sigma_max]`` where given, else the ends of ``in_sigmas``.
    """
    if kind is None:
        return in_sigmas
    lo = sigma_min if sigma_min is not None else float(in_sigmas[-1])
    hi = sigma_max if sigma_max is not None else float(in_sigmas[0])
    if kind == "karras":
        return karras_sigmas(lo, hi, num_inference_steps)
    if kind == "exponential":
        return exponential_sigmas(lo, hi, num_inference_steps)
    if kind == "beta":
        return beta_sigmas(lo, hi, num_inference_steps)
    raise ValueError(f"unknown sigma schedule {kind!r}; choose 'karras', 'exponential' or 'beta'")


def discrete_sigma_schedule(
    alphas_cumprod: torch.Tensor,
    num_inference_steps: int,
    timestep_spacing: str,
    steps_offset: int = 0,
    sigma_kind: str | None = None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    timesteps: Sequence[float] | None = None,
    interpolation_type: str = "linear",
    owner: str = "scheduler",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The common k-diffusion inference schedule of a discrete-time model.

    Returns ``(timesteps, sigmas, log_sigmas)``: ``n`` descending (fractional) timesteps, their ``n`` sigmas (no final
    sigma appended) and the float32 log of the training sigmas. Timesteps come from ``timestep_spacing`` (or the
    given custom ``timesteps``); sigmas are interpolated in t over the training sigmas (``interpolation_type=
    "linear"``) or, with ``"log_linear"``, spaced evenly in log-sigma over the whole training range (diffusers'
    ``EulerDiscreteScheduler`` option, which yields ``n + 1`` sigmas); with ``sigma_kind`` the sigmas are re-spaced
    (karras / exponential / beta) and the timesteps recomputed from them by log-sigma interpolation.
    """
    num_train = alphas_cumprod.shape[0]
    if timesteps is not None:
        ts = np.asarray(timesteps, dtype=np.float32)
    else:
        ts = spaced_timesteps(num_train, num_inference_steps, timestep_spacing, steps_offset, owner).astype(np.float32)
    sig_train = train_sigmas(alphas_cumprod)
    log_sigmas = np.log(sig_train)
    if interpolation_type == "linear":
        sigmas = interp_sigmas(ts, sig_train)
    elif interpolation_type == "log_linear":
        # float32 like diffusers (torch.linspace default dtype)
        sigmas = torch.linspace(float(log_sigmas[-1]), float(log_sigmas[0]), len(ts) + 1).exp().numpy()
    else:
        raise ValueError(f"{owner}: interpolation_type={interpolation_type!r}; choose 'linear' or 'log_linear'")
    if sigma_kind is not None:
        sigmas = convert_sigmas(sigma_kind, sigmas, len(ts), sigma_min, sigma_max)
        ts = sigma_to_t(sigmas, log_sigmas)
    return ts, sigmas, log_sigmas


def sigmas_to_tensor(sigmas: np.ndarray, final_sigma: float | None, device=None) -> torch.Tensor:
    """float32 tensor of ``sigmas`` with ``final_sigma`` appended (``None``: nothing appended)."""
    if final_sigma is not None:
        sigmas = np.concatenate([np.asarray(sigmas, dtype=np.float64), [final_sigma]])
    return torch.from_numpy(np.asarray(sigmas).astype(np.float32)).to(device=device)


def init_noise_sigma_for(sigmas: torch.Tensor, timestep_spacing: str) -> torch.Tensor:
    """Standard deviation of the initial noise of a k-diffusion scheduler (diffusers' convention).

    ``max(sigma)`` for ``linspace``/``trailing`` spacing, ``sqrt(max(sigma)**2 + 1)`` for ``leading``.
    """
    max_sigma = sigmas.max()
    if timestep_spacing in ("linspace", "trailing"):
        return max_sigma
    return (max_sigma**2 + 1) ** 0.5


# --------------------------------------------------------------------------------------------------------------------
# parameterisation: what the model predicts -> x0 (and eps)
# --------------------------------------------------------------------------------------------------------------------


def vp_x0_eps(
    model_output: torch.Tensor, sample: torch.Tensor, alpha_t, sigma_t, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0, eps)`` from a VP model output, where ``sample = alpha_t * x0 + sigma_t * eps``.

    ``alpha_t = sqrt(alphas_cumprod[t])``, ``sigma_t = sqrt(1 - alphas_cumprod[t])``; v-prediction is
    ``v = alpha_t * eps - sigma_t * x0``.
    """
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (sample - sigma_t * eps) / alpha_t
    elif prediction_type == "sample":
        x0 = model_output
        eps = (sample - alpha_t * x0) / sigma_t
    elif prediction_type == "v_prediction":
        x0 = alpha_t * sample - sigma_t * model_output
        eps = alpha_t * model_output + sigma_t * sample
    else:
        raise ValueError(f"prediction_type={prediction_type!r}; choose one of {list(PREDICTION_TYPES)}")
    return x0, eps


def vp_eps_from_x0(sample: torch.Tensor, x0: torch.Tensor, alpha_t, sigma_t) -> torch.Tensor:
    """Recover eps from (possibly clipped) x0: ``(sample - alpha_t * x0) / sigma_t``."""
    return (sample - alpha_t * x0) / sigma_t


def ve_x0(model_output: torch.Tensor, sample: torch.Tensor, sigma, prediction_type: str) -> torch.Tensor:
    """x0 from a model output in the k-diffusion (VE) view, where ``sample = x0 + sigma * eps``.

    The model saw the VP input ``sample / sqrt(sigma**2 + 1)``; for v-prediction that gives
    ``x0 = sample / (sigma**2 + 1) - v * sigma / sqrt(sigma**2 + 1)``.
    """
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"prediction_type={prediction_type!r}; choose one of {list(PREDICTION_TYPES)}")


# --------------------------------------------------------------------------------------------------------------------
# VP transfers between two timesteps (alphas_cumprod values a_t -> a_prev)
# --------------------------------------------------------------------------------------------------------------------


def posterior_variance(alpha_prod_t, alpha_prod_t_prev):
    """Variance of q(x_prev | x_t, x0): ``(1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)`` (DDPM's beta tilde; DDIM's
    sigma_t**2 at eta=1)."""
    return (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)


def ddpm_posterior_mean(x0: torch.Tensor, sample: torch.Tensor, alpha_prod_t, alpha_prod_t_prev) -> torch.Tensor:
    """Mean of q(x_prev | x_t, x0) (Ho et al. 2020, eq. 7) for a step between two arbitrary timesteps."""
    beta_prod_t = 1 - alpha_prod_t
    current_alpha_t = alpha_prod_t / alpha_prod_t_prev
    current_beta_t = 1 - current_alpha_t
    x0_coeff = (alpha_prod_t_prev**0.5 * current_beta_t) / beta_prod_t
    sample_coeff = current_alpha_t**0.5 * (1 - alpha_prod_t_prev) / beta_prod_t
    return x0_coeff * x0 + sample_coeff * sample


def ddim_transfer(x0: torch.Tensor, eps: torch.Tensor, alpha_prod_t_prev, std_dev_t=0.0) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) without its noise term: ``sqrt(a_prev) x0 + sqrt(1 - a_prev - std**2) eps``."""
    direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5 * eps
    return alpha_prod_t_prev**0.5 * x0 + direction


# --------------------------------------------------------------------------------------------------------------------
# x0 clipping / dynamic thresholding
# --------------------------------------------------------------------------------------------------------------------


def threshold_sample(sample: torch.Tensor, dynamic_thresholding_ratio: float, sample_max_value: float) -> torch.Tensor:
    """Dynamic thresholding (Imagen, Saharia et al. 2022): per sample, clamp to the ``ratio`` quantile ``s`` of
    ``|x0|`` (``s`` clamped to ``[1, sample_max_value]``) and divide by ``s``. Computed in float32 or float64."""
    dtype = sample.dtype
    batch, channels, *rest = sample.shape
    if dtype not in (torch.float32, torch.float64):
        sample = sample.float()  # quantile needs float32/64; clamp is missing for CPU half
    flat = sample.reshape(batch, channels * int(np.prod(rest)))
    s = torch.quantile(flat.abs(), dynamic_thresholding_ratio, dim=1)
    s = torch.clamp(s, min=1, max=sample_max_value).unsqueeze(1)  # (B, 1)
    flat = torch.clamp(flat, -s, s) / s
    return flat.reshape(batch, channels, *rest).to(dtype)


def process_x0(
    x0: torch.Tensor,
    thresholding: bool = False,
    clip_sample: bool = False,
    dynamic_thresholding_ratio: float = 0.995,
    sample_max_value: float = 1.0,
    clip_sample_range: float = 1.0,
) -> torch.Tensor:
    """Dynamic thresholding when enabled, else clipping to ``[-clip_sample_range, clip_sample_range]`` when enabled."""
    if thresholding:
        return threshold_sample(x0, dynamic_thresholding_ratio, sample_max_value)
    if clip_sample:
        return x0.clamp(-clip_sample_range, clip_sample_range)
    return x0


# --------------------------------------------------------------------------------------------------------------------
# noise
# --------------------------------------------------------------------------------------------------------------------


randn_tensor = _random.randn_tensor  # one implementation for the whole package (diffusekit.random)


def expand_to(coef: torch.Tensor, ndim: int) -> torch.Tensor:
    """Flatten a per-sample coefficient and append singleton dims so it broadcasts against an ``ndim`` tensor."""
    coef = coef.flatten()
    return coef.reshape(coef.shape + (1,) * (ndim - 1))


def vp_add_noise(
    original_samples: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """``sqrt(a_t) * x0 + sqrt(1 - a_t) * noise`` at integer ``timesteps`` (one per batch entry, or one for all)."""
    ac = alphas_cumprod.to(device=original_samples.device, dtype=original_samples.dtype)
    a_t = ac[torch.as_tensor(timesteps, device=original_samples.device).long()]
    return expand_to(a_t**0.5, original_samples.ndim) * original_samples + expand_to(
        (1 - a_t) ** 0.5, original_samples.ndim
    ) * noise


def vp_velocity(
    sample: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """The v-prediction target ``sqrt(a_t) * noise - sqrt(1 - a_t) * x0`` (``sample`` is x0)."""
    ac = alphas_cumprod.to(device=sample.device, dtype=sample.dtype)
    a_t = ac[torch.as_tensor(timesteps, device=sample.device).long()]
    return expand_to(a_t**0.5, sample.ndim) * noise - expand_to((1 - a_t) ** 0.5, sample.ndim) * sample


def ve_velocity(sample: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The v-prediction target at noise level ``sigma`` (``alpha_t = 1 / sqrt(sigma**2 + 1)``, ``sigma_t =
    sigma * alpha_t``): ``alpha_t * noise - sigma_t * x0`` (``sample`` is x0)."""
    sigma = expand_to(sigma.to(device=sample.device, dtype=sample.dtype), sample.ndim)
    alpha_t = 1 / (sigma**2 + 1) ** 0.5
    return alpha_t * noise - sigma * alpha_t * sample


def ve_add_noise(original_samples: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """k-diffusion forward process ``x0 + sigma * noise`` (``sigma`` per batch entry, or one for all)."""
    sigma = sigma.to(device=original_samples.device, dtype=original_samples.dtype)
    return original_samples + noise * expand_to(sigma, original_samples.ndim)


# --------------------------------------------------------------------------------------------------------------------
# k-diffusion step pieces
# --------------------------------------------------------------------------------------------------------------------


def ancestral_split(sigma_from, sigma_to, eta: float = 1.0):
    """Split a step ``sigma_from -> sigma_to`` into a deterministic part down to ``sigma_down`` and fresh noise of
    std ``sigma_up`` (k-diffusion ``get_ancestral_step``): returns ``(sigma_up, sigma_down)``."""
    sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    if eta != 1.0:
        sigma_up = sigma_up * eta
        sigma_up = torch.minimum(torch.as_tensor(sigma_to), torch.as_tensor(sigma_up))
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_up, sigma_down


def to_d(sample: torch.Tensor, x0: torch.Tensor, sigma) -> torch.Tensor:
    """The probability-flow ODE derivative ``dx/dsigma = (x - x0) / sigma`` (k-diffusion ``to_d``)."""
    return (sample - x0) / sigma


def geometric_mean_sigma(sigma_a: torch.Tensor, sigma_b: torch.Tensor) -> torch.Tensor:
    """``exp((log a + log b) / 2)``: the log-space midpoint KDPM2 evaluates at (elementwise, float32 like diffusers)."""
    return sigma_a.log().lerp(sigma_b.log(), 0.5).exp()


def lms_coefficient(sigmas: Sequence[float], index: int, order: int, current_order: int) -> float:
    """Linear multistep coefficient: the integral from ``sigmas[index]`` to ``sigmas[index + 1]`` of the Lagrange
    basis polynomial of node ``sigmas[index - current_order]`` over nodes ``sigmas[index - k]``, ``k < order``.

    Integrated exactly (the integrand is a polynomial), in float64.
    """
    nodes = [float(sigmas[index - k]) for k in range(order)]
    own = nodes[current_order]
    poly = np.poly1d([1.0])
    for k, node in enumerate(nodes):
        if k != current_order:
            poly = poly * np.poly1d([1.0, -node]) / (own - node)
    antideriv = poly.integ()
    return float(antideriv(float(sigmas[index + 1])) - antideriv(float(sigmas[index])))
