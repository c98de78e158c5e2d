"""Native code diffusekit builds at run time (the fused CPU attention kernel, the package loader's page-out
helper): the CPU's feature flags, and an atomic build of a shared library into the compile cache; and the C
library's malloc setting the CPU fast paths ask for (:func:`keep_freed_memory`)."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

logger = logging.getLogger(__name__)


def _cpuinfo(field: str) -> str:
    """The value of ``field`` on ``/proc/cpuinfo``'s first processor (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as handle:
            line = next((line for line in handle if line.split(":")[0].strip() == field), "")
    except OSError:
        return ""
    return line.partition(":")[2].strip()


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where there is none), read once per process."""
    return frozenset(_cpuinfo("flags").split())


@functools.cache
def cpu_vendor() -> str:
    """The CPU's vendor (``/proc/cpuinfo``'s ``vendor_id``: ``GenuineIntel``, ``AuthenticAMD``, ...; empty where
    there is none), read once per process."""
    return _cpuinfo("vendor_id")


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


# glibc's mallopt() parameter numbers (<malloc.h>)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
#: keep at most this much free memory at the top of the heap before handing it back (mallopt takes an int)
TRIM_THRESHOLD = 2**31 - 1
# a user who tuned malloc (or swapped it) has chosen: leave it alone
_MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


@functools.cache
def keep_freed_memory() -> str | None:
    """Let glibc's malloc keep the memory a model's call frees, for the next call to reuse: large blocks come from
    the heap instead of fresh ``mmap`` s (``M_MMAP_MAX`` 0) and free memory stays in the process up to 2 GiB
    (``M_TRIM_THRESHOLD``). Process-wide, once.

    Why: by default each block over 32 MiB (and, once the heap trims, smaller ones) is a fresh mapping, so every
    step of a compiled model faults in and zeroes its activations again: measured on the SD 1.5 int8 UNet at 512²,
    about 170 000 page faults and 8-11 % of the step; on its int8 VAE decoder 15-26 % (docs/PERFORMANCE.md, "Memory kept
    for reuse"). The cost: memory a call freed is not handed back to the OS until the top of the heap holds 2 GiB
    free (the peak is the same; the process stays near it between calls).

    Returns why nothing was changed (``None``: applied): not glibc, a user's own ``MALLOC_*`` / ``GLIBC_TUNABLES``
    malloc setting or another allocator in ``LD_PRELOAD`` (their choice stands), or ``mallopt`` refused.
    """
    try:
        libc_version = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError, OSError):
        libc_version = ""
    if not libc_version.startswith("glibc"):
        return "the C library is not glibc"
    if any(name in os.environ for name in _MALLOC_ENV) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "malloc is tuned by the environment (MALLOC_* / GLIBC_TUNABLES)"
    preload = os.environ.get("LD_PRELOAD", "")
    if any(name in preload for name in _OTHER_ALLOCATORS):
        return "another allocator is preloaded (LD_PRELOAD)"
    try:
        mallopt = ctypes.CDLL(None).mallopt
        mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
        if mallopt(_M_MMAP_MAX, 0) != 1 or mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
            return "mallopt refused the setting"
    except (OSError, AttributeError) as err:
        return f"mallopt is not available ({err})"
    logger.info("malloc keeps freed memory for reuse (M_MMAP_MAX 0, M_TRIM_THRESHOLD %d)", TRIM_THRESHOLD)
    return None
