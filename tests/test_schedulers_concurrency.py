"""Two pipelines sharing one loaded scheduler: each call copies it (``copy.copy``) and the copies run independently.

Two threads each copy one scheduler and sample with the same dummy model, stepping in lock-step (a barrier after
every step, so their steps interleave); the results must equal the same two runs done one after the other, and
the shared scheduler must be left untouched.
"""

from __future__ import annotations

import copy
import importlib.util
import threading

import pytest
import torch

import diffusekit
from multistep_helpers import dummy_model, fixed_tensors

HAS_TORCHSDE = importlib.util.find_spec("torchsde") is not None

SCHEDULERS = [
    pytest.param(lambda: diffusekit.UniPCMultistepScheduler(solver_order=3), id="multistep-UniPC"),
    pytest.param(lambda: diffusekit.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++",
                                                                 use_karras_sigmas=True), id="stochastic-DPM++2M-SDE"),
    pytest.param(lambda: diffusekit.DPMSolverSinglestepScheduler(solver_order=3), id="singlestep-DPM"),
    pytest.param(lambda: diffusekit.LCMScheduler(), id="stochastic-LCM"),
    pytest.param(lambda: diffusekit.DDIMScheduler(), id="simple-DDIM"),
    pytest.param(lambda: diffusekit.EulerAncestralDiscreteScheduler(), id="stochastic-EulerAncestral"),
    pytest.param(lambda: diffusekit.DPMSolverSDEScheduler(), id="brownian-DPMSolverSDE",
                 marks=pytest.mark.skipif(not HAS_TORCHSDE, reason="torchsde not installed")),
]


def _sample(shared, seed: int, steps: int = 8, barrier: threading.Barrier | None = None) -> torch.Tensor:
    """What a pipeline call does with its private copy of the shared scheduler."""
    scheduler = copy.copy(shared)
    scheduler.set_timesteps(steps)
    fixed, start = fixed_tensors()
    generator = torch.Generator().manual_seed(seed)
    x = start * scheduler.init_noise_sigma + 0.01 * seed  # the two calls start from different latents
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        x = scheduler.step(dummy_model(model_input, t, fixed), t, x, generator=generator).prev_sample
        if barrier is not None:
            barrier.wait(timeout=60)
    return x


@pytest.mark.parametrize("make", SCHEDULERS)
def test_two_threads_sharing_one_scheduler_match_sequential_runs(make):
    shared = make()
    shared.set_timesteps(5)  # the shared object has some state of its own, which must survive untouched
    before = (shared.timesteps.clone(), shared.step_index, dict(shared.config))

    sequential = [_sample(shared, seed) for seed in (1, 2)]

    barrier = threading.Barrier(2)
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            results[seed] = _sample(shared, seed, barrier=barrier)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in (1, 2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors, errors
    for seed, expected in zip((1, 2), sequential):
        torch.testing.assert_close(results[seed], expected, rtol=0, atol=0)
    assert not torch.equal(results[1], results[2])
    assert torch.equal(shared.timesteps, before[0]) and shared.step_index == before[1]
    assert dict(shared.config) == before[2]
