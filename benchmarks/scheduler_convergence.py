"""Scheduler quality report: error of the final sample against the exact answer, at 5, 10, 20 and 50 steps.

The "model" is the exact denoiser of Gaussian data x0 ~ N(MU, S0^2) (per element), so the probability-flow ODE has a
closed-form solution: in the variance-exploding variable x = x0 + sigma * noise,

    x(sigma_end) - MU = (x(sigma_start) - MU) * sqrt(S0^2 + sigma_end^2) / sqrt(S0^2 + sigma_start^2).

Every deterministic scheduler starts from the same noise and is compared with that exact solution from its own first
sigma to its own last sigma (0 unless ``final_sigmas_type="sigma_min"``), so the error is the solver's discretisation
error alone. The model maps timesteps to sigmas by
the same log-sigma interpolation the schedulers use, so fractional timesteps (Karras sigmas) are consistent.

    .venv/bin/python benchmarks/scheduler_convergence.py            # writes docs/scheduler_convergence.{md,png}

Stochastic samplers (DDPM, Euler a, DPM2 a, DPM++ SDE) do not converge to the ODE solution path by path and LCM
needs a consistency-distilled model, so they are left out of the table.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

import diffusekit

MU, S0 = 0.5, 0.8
STEPS = (5, 10, 20, 50)
TRAIN = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)

# label, class name, options. Options set every solver to end at sigma = 0 (the exact x0).
SCHEDULERS = [
    ("DDIM", "DDIMScheduler", dict(set_alpha_to_one=True)),
    ("PLMS (PNDM)", "PNDMScheduler", dict(skip_prk_steps=True, set_alpha_to_one=True)),
    ("Euler", "EulerDiscreteScheduler", {}),
    ("Euler Karras", "EulerDiscreteScheduler", dict(use_karras_sigmas=True)),
    ("Heun", "HeunDiscreteScheduler", {}),
    ("LMS", "LMSDiscreteScheduler", {}),
    ("LMS Karras", "LMSDiscreteScheduler", dict(use_karras_sigmas=True)),
    ("DPM2", "KDPM2DiscreteScheduler", {}),
    ("DPM++ 2M", "DPMSolverMultistepScheduler", {}),
    ("DPM++ 2M Karras", "DPMSolverMultistepScheduler", dict(use_karras_sigmas=True)),
    ("DPM++ 3M", "DPMSolverMultistepScheduler", dict(solver_order=3)),
    ("DPM++ 2S (singlestep)", "DPMSolverSinglestepScheduler", {}),
    ("UniPC (bh2)", "UniPCMultistepScheduler", {}),
    ("UniPC (bh1)", "UniPCMultistepScheduler", dict(solver_type="bh1")),
    ("DEIS", "DEISMultistepScheduler", {}),
    # Karras sigmas: small steps near sigma = 0, where uniform timesteps take one large step in log-sigma
    ("Heun Karras", "HeunDiscreteScheduler", dict(use_karras_sigmas=True)),
    ("DPM2 Karras", "KDPM2DiscreteScheduler", dict(use_karras_sigmas=True)),
    ("DPM++ 3M Karras", "DPMSolverMultistepScheduler", dict(solver_order=3, use_karras_sigmas=True)),
    ("UniPC (bh2) Karras", "UniPCMultistepScheduler", dict(use_karras_sigmas=True)),
    ("DEIS Karras", "DEISMultistepScheduler", dict(use_karras_sigmas=True)),
]


class GaussianDenoiser:
    """The exact epsilon-prediction model for N(MU, S0^2) data under a discrete VP training schedule."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        ac = alphas_cumprod.double().numpy()
        self.log_sigmas = np.log(np.sqrt((1 - ac) / ac))

    def sigma(self, t) -> float:
        t = float(t)
        return float(np.exp(np.interp(t, np.arange(len(self.log_sigmas)), self.log_sigmas)))

    def __call__(self, x_vp: torch.Tensor, t) -> torch.Tensor:
        sigma = self.sigma(t)
        alpha = 1 / math.sqrt(1 + sigma**2)
        s = sigma * alpha
        return s * (x_vp - alpha * MU) / (alpha**2 * S0**2 + s**2)


def run(cls_name: str, options: dict, steps: int, noise: torch.Tensor) -> float:
    cls = getattr(diffusekit, cls_name)
    params = set(cls._config_params())
    scheduler = cls(**{k: v for k, v in {**TRAIN, **options}.items() if k in params})
    model = GaussianDenoiser(scheduler.alphas_cumprod)
    scheduler.set_timesteps(steps)
    sample = noise.double() * float(scheduler.init_noise_sigma)
    ve = float(scheduler.init_noise_sigma) != 1.0  # sigma schedulers carry x0 + sigma*noise, VP ones alpha*x0 + s*noise
    sigmas = getattr(scheduler, "sigmas", None)
    sigma_start = float(sigmas[0]) if sigmas is not None else model.sigma(scheduler.timesteps[0])
    sigma_end = float(sigmas[-1]) if sigmas is not None else 0.0  # VP schedulers here end at alpha_cumprod = 1
    start_ve = sample if ve else sample * math.sqrt(1 + sigma_start**2)
    exact_ve = MU + (start_ve - MU) * math.sqrt(S0**2 + sigma_end**2) / math.sqrt(S0**2 + sigma_start**2)
    exact = exact_ve if ve else exact_ve / math.sqrt(1 + sigma_end**2)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, t)
        sample = scheduler.step(model(model_input, t), t, sample).prev_sample
    return float(torch.linalg.vector_norm(sample - exact) / torch.linalg.vector_norm(exact))


def fitted_order(steps, errors) -> float:
    """Slope of -log(error) against log(steps) over the last three step counts."""
    x, y = np.log(steps[-3:]), np.log(errors[-3:])
    return float(-np.polyfit(x, y, 1)[0])


def plot(results: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6.5), dpi=110)
    colours = plt.get_cmap("tab20").colors
    markers = "os^vD<>ph*"
    for i, (label, errors) in enumerate(results.items()):
        ax.loglog(STEPS, errors, marker=markers[i % len(markers)], color=colours[i % len(colours)], label=label)
    ref = np.array(STEPS, dtype=float)
    for order, style in ((1, ":"), (2, "--"), (3, "-.")):
        ax.loglog(ref, 0.5 * (ref / ref[0]) ** -order, "k" + style, lw=0.8, label=f"slope {order}")
    ax.set_xlabel("inference steps")
    ax.set_ylabel("relative error of the final sample")
    ax.set_title("Scheduler convergence on an exact Gaussian denoiser (SD training schedule)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/scheduler_convergence")
    args = parser.parse_args(argv)
    noise = torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    results: dict[str, list[float]] = {}
    for label, cls_name, options in SCHEDULERS:
        results[label] = [run(cls_name, options, n, noise) for n in STEPS]
    header = "| scheduler | " + " | ".join(f"{n} steps" for n in STEPS) + " | fitted order (10–50) |"
    lines = [header, "|" + "---|" * (len(STEPS) + 2)]
    for label, errors in results.items():
        cells = " | ".join(f"{e:.2e}" for e in errors)
        lines.append(f"| {label} | {cells} | {fitted_order(STEPS, errors):.2f} |")
    table = "\n".join(lines)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(results, out.with_suffix(".png"))
    out.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
