"""DPM-Solver++(2S) SDE with Brownian-tree noise (k-diffusion's ``sample_dpmpp_sde``; "DPM++ SDE" in A1111).

Needs the optional ``torchsde`` package (``pip install torchsde`` or ``pip install diffusekit[sde]``), imported only
when a scheduler is built.
"""

from __future__ import annotations

import importlib

import numpy as np
import torch

from ..configuration import register_to_config
from . import core
from .base import SchedulerMixin, SchedulerOutput

DPMSolverSDESchedulerOutput = SchedulerOutput  # prev_sample, pred_original_sample (as diffusers' output)

_TORCHSDE_MISSING = (
    "DPMSolverSDEScheduler draws its noise from a Brownian tree, which needs the optional package torchsde: "
    "pip install torchsde  (or: pip install 'diffusekit[sde]')"
)


def _torchsde():
    try:
        return importlib.import_module("torchsde")
    except ImportError as err:
        raise ImportError(_TORCHSDE_MISSING) from err


class BrownianTreeNoiseSampler:
    """Noise for a step ``sigma -> sigma_next``: the Brownian increment ``W(sigma_next) - W(sigma)`` divided by its
    std, from a torchsde Brownian tree over ``[sigma_min, sigma_max]``. Asking for the same interval twice gives the
    same noise, so the noise is a function of the schedule, not of the step count. ``seed``: one int, or one per
    batch entry (then each image has its own tree)."""

    def __init__(self, x: torch.Tensor, sigma_min: float, sigma_max: float, seed):
        torchsde = _torchsde()
        self.batched = isinstance(seed, (list, tuple))
        if self.batched and len(seed) != x.shape[0]:
            raise ValueError(f"noise_sampler_seed has {len(seed)} seeds for a batch of {x.shape[0]}")
        seeds = list(seed) if self.batched else [seed]
        size = x.shape[1:] if self.batched else x.shape
        self._args = (x, sigma_min, sigma_max, seed)
        t0, t1 = torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)
        self.trees = [
            torchsde.BrownianInterval(t0=t0, t1=t1, size=size, dtype=x.dtype, device=x.device, entropy=s, tol=1e-6,
                                      pool_size=24, halfway_tree=True)
            for s in seeds
        ]

    def clone(self) -> "BrownianTreeNoiseSampler":
        """A fresh tree with the same seed and range: it yields the same noise for the same intervals (torchsde's
        trees are deterministic given their entropy), without sharing the original's caches."""
        return BrownianTreeNoiseSampler(*self._args)

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        a, b = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        lo, hi, sign = (a, b, 1.0) if a < b else (b, a, -1.0)
        w = torch.stack([tree(lo, hi) for tree in self.trees]) * sign
        w = w if self.batched else w[0]
        return w / (b - a).abs().sqrt()


def _t(sigma):  # sigma -> "time" t = -log(sigma)
    return sigma.log().neg()


def _sigma(t):  # t -> sigma = exp(-t)
    return t.neg().exp()


class DPMSolverSDEScheduler(SchedulerMixin):
    """Stochastic DPM-Solver++(2S); same config keys, defaults and results (same ``noise_sampler_seed``) as
    diffusers' ``DPMSolverSDEScheduler``.

    Each solver step takes two model evaluations (``order = 2``): an ancestral half step to the midpoint in
    ``log(sigma)``, then the full step using the midpoint's prediction; the noise of both comes from one Brownian
    tree. The final step to sigma 0 is a plain Euler step. Predictions: epsilon or v_prediction. Sigma spacing:
    ``timestep_spacing`` and karras / exponential / beta sigmas. ``step(..., generator=)`` seeds the Brownian tree
    when ``noise_sampler_seed`` is ``None`` (diffusers draws that seed from the global RNG).
    """

    order = 2

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas=None,
        prediction_type: str = "epsilon",
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        noise_sampler_seed=None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        _torchsde()  # fail now, with the install hint, rather than at the first step
        self._check_common_options()
        self._init_train_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        self.noise_sampler_seed = noise_sampler_seed
        self.set_timesteps(num_train_timesteps, None, num_train_timesteps)

    @classmethod
    def _prediction_types(cls) -> tuple[str, ...]:
        return ("epsilon", "v_prediction")

    def __copy__(self):
        new = super().__copy__()
        if self.noise_sampler is not None:
            new.noise_sampler = self.noise_sampler.clone()
        return new

    @property
    def use_karras_sigmas(self) -> bool:
        return self.config.use_karras_sigmas

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        """Standard deviation of the initial noise (k-diffusion convention, see ``core.init_noise_sigma_for``)."""
        return core.init_noise_sigma_for(self.sigmas, self.config.timestep_spacing)

    @property
    def state_in_first_order(self) -> bool:
        """True before the half step of a solver step, False between it and the full step."""
        return self.sample is None

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        num_train_timesteps: int | None = None,
        timesteps=None,
        sigmas=None,
    ) -> None:
        """Build the interleaved schedule: ``num_inference_steps`` sigmas and, between each pair, the midpoint in
        log-sigma (where the second model evaluation happens)."""
        cfg, owner = self.config, type(self).__name__
        self._check_set_timesteps_args(num_inference_steps, timesteps, sigmas)
        n = num_inference_steps
        T = num_train_timesteps or cfg.num_train_timesteps
        ts = core.spaced_timesteps(T, n, cfg.timestep_spacing, cfg.steps_offset, owner=owner)
        train = core.train_sigmas(self.alphas_cumprod)
        log_sigmas = np.log(train)
        sig = core.interp_sigmas(ts, train)
        kind = self._sigma_kind()
        if kind is not None:
            sig = core.convert_sigmas(kind, sig, n)
            ts = np.array([core.sigma_to_t(s, log_sigmas) for s in sig])
        # midpoints in t = -log(sigma) between consecutive sigmas
        t = -np.log(sig)
        mid_sigmas = np.exp(-(t[:-1] + np.diff(t) * 0.5))
        mid_ts = np.array([core.sigma_to_t(s, log_sigmas) for s in mid_sigmas])

        sig32 = torch.from_numpy(np.concatenate([sig, [0.0]]).astype(np.float32))
        self.sigmas = torch.cat([sig32[:1], sig32[1:-1].repeat_interleave(2), sig32[-1:]])
        both = np.empty(2 * n - 1, dtype=np.float64)
        both[0::2] = ts
        both[1::2] = mid_ts
        self.timesteps = torch.from_numpy(both.astype(np.float32)).to(device=device)
        self.num_inference_steps = n
        self.sample = None
        self.mid_point_sigma = None
        self.noise_sampler = None
        self._reset_run_state()

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """``sample / sqrt(sigma^2 + 1)`` at the current sigma (the midpoint sigma during the second evaluation)."""
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index] if self.state_in_first_order else self.mid_point_sigma
        return sample / ((sigma**2 + 1) ** 0.5)

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        return_dict: bool = True,
        s_noise: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> SchedulerOutput | tuple:
        """Half step (first evaluation) or full step (second evaluation) of DPM-Solver++(2S) SDE.

        ``s_noise`` scales the injected noise; ``generator`` seeds the Brownian tree when ``noise_sampler_seed`` is
        ``None`` (read at the first step of a run only).
        """
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        if self.noise_sampler is None:
            seed = self.noise_sampler_seed
            if seed is None:
                gen = generator[0] if isinstance(generator, (list, tuple)) else generator
                device = gen.device if gen is not None else "cpu"
                seed = int(torch.randint(0, 2**63 - 1, [], generator=gen, device=device).item())
            positive = self.sigmas[self.sigmas > 0]
            self.noise_sampler = BrownianTreeNoiseSampler(sample, positive.min().item(), self.sigmas.max().item(),
                                                          seed)
        first = self.state_in_first_order
        sigma, sigma_next = (self.sigmas[i], self.sigmas[i + 1]) if first else (self.sigmas[i - 1], self.sigmas[i])
        t, t_next = _t(sigma), _t(sigma_next)
        t_mid = t + (t_next - t) * 0.5
        sigma_input = sigma if first else _sigma(t_mid)
        x0 = core.ve_x0(model_output, sample, sigma_input, self.config.prediction_type)

        if sigma_next == 0:  # last step: Euler to sigma 0
            prev_sample = sample + (sample - x0) / sigma * (sigma_next - sigma)
        else:
            if first:
                t_next = t_mid
            else:
                sample = self.sample  # the full step starts where the half step started
            sigma_from, sigma_to = _sigma(t), _sigma(t_next)
            sigma_up = torch.minimum(sigma_to, (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
            sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
            t_down = _t(sigma_down)
            prev_sample = (_sigma(t_down) / _sigma(t)) * sample - (t - t_down).expm1() * x0
            prev_sample = prev_sample + self.noise_sampler(_sigma(t), _sigma(t_next)) * s_noise * sigma_up
            if first:
                self.sample, self.mid_point_sigma = sample, _sigma(t_next)
            else:
                self.sample, self.mid_point_sigma = None, None

        self._step_index = i + 1
        if not return_dict:
            return (prev_sample, x0)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """``x0 + sigma(t) * noise`` at schedule ``timesteps`` (img2img start)."""
        return self._add_noise_by_sigma(original_samples, noise, timesteps)
