"""Shared test setup: deterministic, quiet, and small enough for 2 CPU cores."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    import torch

    # tiny models: thread start-up costs more than it saves, and CI has 2 cores
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield


def assert_close(actual, expected, rtol: float = 1e-5, atol: float = 1e-5, msg: str = "") -> None:
    """``torch.testing.assert_close`` on tensors or arrays, with our default fp32 parity tolerance."""
    import numpy as np
    import torch

    if isinstance(actual, np.ndarray):
        actual = torch.from_numpy(actual)
    if isinstance(expected, np.ndarray):
        expected = torch.from_numpy(expected)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=msg or None)


def run_json_child(script: str, *argv: str, timeout: float = 600) -> dict:
    """Run ``script`` (Python source) in a fresh interpreter with this checkout's ``src`` first on the path, one
    thread and no inherited ``TORCHINDUCTOR_CACHE_DIR``; return the JSON object its last line of output prints."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    done = subprocess.run([sys.executable, "-c", script, *argv], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
