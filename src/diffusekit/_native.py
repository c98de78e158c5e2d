"""Native code diffusekit builds at run time (the fused CPU attention kernel, the package loader's page-out
helper): the CPU's feature flags, and an atomic build of a shared library into the compile cache."""

from __future__ import annotations

import functools
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Callable


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where there is none), read once per process."""
    try:
        with open("/proc/cpuinfo") as handle:
            line = next((line for line in handle if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def build_library(target: Path, command: Callable[[Path], list[str]], timeout: float) -> None:
    """Build the shared library ``target``: ``command(folder)`` gives the compiler's arguments, which write
    ``folder / target.name``; ``folder`` is a private temporary folder beside ``target`` (for sources too). The
    library is renamed into place only once the compiler succeeded, so a failed, killed or concurrent build never
    leaves a half-written one. A failure raises ``RuntimeError`` with the compiler's last line of output."""
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with tempfile.TemporaryDirectory(prefix=f".tmp-{target.stem}-", dir=target.parent) as tmp:
        argv = command(Path(tmp))
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip().splitlines()
            raise RuntimeError(f"{Path(argv[0]).name} exited with {done.returncode}: "
                               f"{detail[-1][:300] if detail else 'no output'}")
        os.replace(Path(tmp) / target.name, target)  # atomic; a concurrent build of the same key writes the same
