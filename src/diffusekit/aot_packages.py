"""Warm start in seconds for ``optimize()``'s frozen paths: AOTInductor packages cached on disk.

With freezing (the int8 QDQ models, and float models with ``options={"freezing": True}``) inductor bakes the weights
into the compiled code as pre-packed oneDNN constants, and its FX-graph cache refuses such graphs: through
``torch.compile`` every process would pay the whole compile again (minutes for an SD UNet on 2 cores). Instead,
per model state x input signature, ``optimize()`` builds one shared library with AOTInductor (``torch.export`` +
``torch._inductor.aot_compile`` with freezing; int8 patterns lowered to oneDNN qconv / qlinear as under
``torch.compile``) and keeps it here; a later process loads it (``dlopen``, no dynamo, no inductor import) and runs.

**What a package holds**: the generated code *and* the frozen weights (pre-packed for oneDNN; they cannot be
supplied at load time: AOTInductor folds the packing into the constants at compile time). Hence the key covers the
weights: a sha256 over every parameter and buffer (names, dtypes, shapes, bytes; about 2 s per GB), plus the
structure of the module tree (types, configs, plain attributes), the input signature (tree structure, shapes,
dtypes, non-tensor values), the inductor settings, the torch build, diffusekit's version and source, and the CPU.
Weights edited after ``optimize()`` change the key (a new package is built; nothing stale can be loaded).

**Where**: ``<compile cache>/aoti/<key>/`` (``model.so`` + ``manifest.json``), written into a temporary folder and
renamed into place (a crash leaves no half entry; two processes building the same key: the first rename wins).
**Disk**: about the weights' size per package (SD 1.5 UNet: ~3.3 GB float32, ~0.9 GB int8) per input shape; the
least recently used packages are removed once the folder holds more than ``DIFFUSEKIT_AOTI_CACHE_GB`` (default 20) GB.

**Trust boundary**: a package is native code that runs when loaded. diffusekit loads packages only from its own
cache folder (created ``0700``), only ones it built itself under the key computed from the live model, and checks
each against its manifest (size and sha256 of ``model.so``) before loading; a model folder or any other path is never
loaded as a package. Whoever can write to the cache folder can run code as you (as with inductor's own cache or your
site-packages): keep ``DIFFUSEKIT_CACHE_DIR`` private.

A package that is missing, corrupt or fails to load is rebuilt (one warning); a call this path cannot serve (hooks on
the model, non-tensor inputs other than ``bool`` / ``str`` / ``None``, inputs off the CPU, an export or AOT compile
that fails) goes to ``torch.compile`` (with freezing, per process), which falls back to eager as before.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)

FORMAT = 1
LIMIT_ENV = "DIFFUSEKIT_AOTI_CACHE_GB"
DEFAULT_LIMIT_GB = 20.0
#: sentinel: this call cannot be served by a package (the caller compiles in-process instead)
NOT_HANDLED = object()

_SIMPLE = (bool, int, float, str, type(None), torch.dtype, torch.device)


# ------------------------------------------------------------------------------------------------ keys


@functools.cache
def source_digest() -> str:
    """sha256 of diffusekit's own Python sources (a development tree changes without a version bump); once per
    process."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def machine() -> dict[str, str]:
    """The build and CPU a package is specific to (a cache folder shared by machines must not mix them)."""
    return dict(_machine())


@functools.cache
def _machine() -> tuple[tuple[str, str], ...]:
    """:func:`machine`, read once per process (every compiled call keys its package with it)."""
    flags = ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "")
    return (("torch", torch.__version__), ("torch_git", getattr(torch.version, "git_version", "")),
            ("cpu_capability", torch.backends.cpu.get_cpu_capability()),
            ("cpu_flags", hashlib.sha256(flags.encode()).hexdigest()[:16]))


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer of ``module``: name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for name, tensor in itertools.chain(module.named_parameters(remove_duplicate=False),
                                        module.named_buffers(remove_duplicate=False)):
        data = tensor.detach()
        h.update(f"{name}|{data.dtype}|{tuple(data.shape)}\n".encode())
        if data.numel():
            h.update(data.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _describe(value: Any, depth: int = 0) -> Any:
    """A JSON-able description of a plain attribute value (objects by type and, one level deep, their attributes)."""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, _SIMPLE):
        return value if isinstance(value, (bool, int, str, type(None))) else str(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [_describe(v, depth + 1) for v in items]
    if isinstance(value, dict):
        return [[str(k), _describe(v, depth + 1)] for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))]
    if isinstance(value, torch.Tensor):
        return ["tensor", str(value.dtype), list(value.shape)]  # a plain tensor attribute: its bytes below
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    if depth < 2 and hasattr(value, "__dict__") and not callable(value):
        return [kind, _describe({k: v for k, v in vars(value).items() if not k.startswith("__")}, depth + 1)]
    return kind


def _skipped_attribute(key: str) -> bool:
    return key in ("_parameters", "_buffers", "_modules", "_compiled_call_impl", "training") or "hook" in key


def structure(module: torch.nn.Module) -> list:
    """Types and plain attributes of every submodule: what the traced graph depends on beside weights and inputs."""
    out = []
    for name, sub in module.named_modules(remove_duplicate=False):
        attrs = {k: v for k, v in vars(sub).items() if not _skipped_attribute(k)}
        out.append([name, f"{type(sub).__module__}.{type(sub).__qualname__}", _describe(attrs)])
    return out


def has_hooks(module: torch.nn.Module) -> bool:
    """Whether forward hooks would run (an exported graph would not run them)."""
    from torch.nn.modules import module as nn_module

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def input_signature(args: tuple, kwargs: dict) -> tuple[list, Any] | None:
    """(description, flat tensors) of a call's inputs, or ``None`` when a package cannot serve them: a non-tensor
    leaf other than ``bool`` / ``str`` (a number would be baked into the graph; an object may be mutated by the
    call), or a tensor off the CPU."""
    from torch.utils import _pytree as pytree

    leaves, spec = pytree.tree_flatten((args, kwargs))
    described = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            if leaf.device.type != "cpu" or leaf.requires_grad:
                return None
            described.append([str(leaf.dtype), list(leaf.shape)])
        elif leaf is None or isinstance(leaf, (bool, str)):
            described.append(leaf)
        else:
            return None
    return [str(spec), described], [x for x in leaves if isinstance(x, torch.Tensor)]


def package_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------ store


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


class CorruptPackage(Exception):
    """A cache entry that does not match its manifest (or fails to load)."""


class Package:
    """A loaded package: call it with the same (args, kwargs) structure it was built for."""

    def __init__(self, entry: Path, key: str) -> None:
        manifest_path = entry / "manifest.json"
        try:
            manifest = json.loads(manifest_path.read_text())
            so = entry / "model.so"
            if manifest.get("format") != FORMAT or manifest.get("key") != key:
                raise CorruptPackage("manifest does not match the key")
            if so.stat().st_size != manifest["size"] or _file_sha256(so) != manifest["sha256"]:
                raise CorruptPackage("model.so does not match its manifest (size / sha256)")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CorruptPackage(f"{type(err).__name__}: {err}") from err
        try:
            from torch.utils import _pytree as pytree

            # loading copies the weights out of the library's mapping: its pages go back while and after it does,
            # so the process holds one copy of the weights, not two
            with _paging_out(so):
                self.runner = torch._C._aoti.AOTIModelContainerRunnerCpu(str(so), 1)
            in_spec, out_spec = self.runner.get_call_spec()
            self.out_spec = pytree.treespec_loads(out_spec)
            self.in_spec = in_spec
        except Exception as err:  # noqa: BLE001 - a library that does not load is a corrupt entry
            raise CorruptPackage(f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}") from err
        self.nbytes = manifest["size"]
        with contextlib.suppress(OSError):
            os.utime(manifest_path)  # least recently used eviction reads this

    def __call__(self, tensors: list[torch.Tensor]) -> Any:
        from torch.utils import _pytree as pytree

        return pytree.tree_unflatten(self.runner.run([t.contiguous() for t in tensors]), self.out_spec)


#: a native thread paging one mapped file out (MADV_PAGEOUT) every few ms: the runner's constructor copies the
#: weights out of the library holding the GIL, so a Python thread could not run meanwhile. Built with the C++ compiler
#: inductor uses anyway, once per cache folder (``pageout-<hash>.so``, next to the packages, same trust boundary).
_PAGEOUT_C = r"""
/* diffusekit: a native thread that hands the pages of one mapped file back to the OS (MADV_PAGEOUT) every few
   milliseconds, while the Python thread (holding the GIL) copies weights out of that file. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#ifndef MADV_PAGEOUT
#define MADV_PAGEOUT 21
#endif

static char target[4096];
static volatile int running;
static pthread_t worker;
static unsigned interval_us;

static void page_out(void) {
    FILE *maps = fopen("/proc/self/maps", "r");
    char line[8192], path[4096];
    unsigned long lo, hi;
    if (!maps) return;
    while (fgets(line, sizeof line, maps)) {
        path[0] = 0;
        if (sscanf(line, "%lx-%lx %*s %*s %*s %*s %4095[^\n]", &lo, &hi, path) == 3 && !strcmp(path, target))
            madvise((void *)lo, hi - lo, MADV_PAGEOUT);
    }
    fclose(maps);
}

static void *loop(void *arg) {
    (void)arg;
    while (running) {
        page_out();
        usleep(interval_us);
    }
    return NULL;
}

int diffusekit_pageout_start(const char *path, unsigned every_us) {
    if (running || strlen(path) >= sizeof target) return -1;
    strcpy(target, path);
    interval_us = every_us;
    running = 1;
    if (pthread_create(&worker, NULL, loop, NULL)) { running = 0; return -1; }
    return 0;
}

void diffusekit_pageout_stop(void) {
    if (!running) return;
    running = 0;
    pthread_join(worker, NULL);
    page_out();
}
"""
_pageout_lib: Any = None


def _pageout_helper(folder: Path) -> Any:
    """The helper library (built on first use), or ``None`` where it cannot be built or loaded."""
    global _pageout_lib
    if _pageout_lib is not None:
        return _pageout_lib or None
    _pageout_lib = False
    if not os.path.exists("/proc/self/maps"):
        return None
    try:
        import ctypes
        import subprocess

        from .optimize import _cpp_compiler

        target = folder / f"pageout-{hashlib.sha256(_PAGEOUT_C.encode()).hexdigest()[:16]}.so"
        if not target.exists():
            compiler = _cpp_compiler()
            if compiler is None:
                return None
            with tempfile.TemporaryDirectory(prefix=".tmp-pageout-", dir=folder) as tmp:
                source = Path(tmp) / "pageout.c"
                source.write_text(_PAGEOUT_C)
                built = Path(tmp) / "pageout.so"
                subprocess.run([compiler, "-x", "c", "-O2", "-shared", "-fPIC", "-o", str(built), str(source),
                                "-lpthread"], check=True, capture_output=True, timeout=120)
                os.replace(built, target)
        lib = ctypes.CDLL(str(target))
        lib.diffusekit_pageout_start.argtypes = [ctypes.c_char_p, ctypes.c_uint]
        lib.diffusekit_pageout_start.restype = ctypes.c_int
        _pageout_lib = lib
        return lib
    except Exception as err:  # noqa: BLE001 - an optimisation of peak memory only
        logger.info("page-out helper unavailable (%s): loading packages without it", err)
        return None


@contextlib.contextmanager
def _paging_out(so: Path):
    """While the block runs, page the mapped library ``so`` out from a native thread (the Python fallback thread
    only gets to run around the GIL-holding load, so it just pages out afterwards)."""
    from .optimize import _MappedFile

    lib = _pageout_helper(so.parent.parent)
    started = lib is not None and lib.diffusekit_pageout_start(os.path.realpath(so).encode(), 20000) == 0
    try:
        with contextlib.nullcontext() if started else _MappedFile(so).while_compiling(every=0.1):
            yield
    finally:
        if started:
            lib.diffusekit_pageout_stop()


def _root(folder: Path) -> Path:
    root = folder / "aoti"
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    return root


def build(module: torch.nn.Module, args: tuple, kwargs: dict, options: dict[str, Any], folder: Path, key: str,
          description: dict[str, Any]) -> Path:
    """Export ``module`` for these inputs, AOT-compile it (``options``: inductor settings, freezing among them) and
    store it atomically as ``<folder>/aoti/<key>``; returns that entry."""
    import torch._inductor  # noqa: F401  (only here: never imported to load a package)

    root = _root(folder)
    entry = root / key
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:16]}-", dir=root))
    try:
        start = time.perf_counter()
        with torch.no_grad():  # freezing is an inference transform: inductor applies it only without grad
            program = torch.export.export(_Forward(module), args, kwargs, strict=False)
            target = tmp / "build" / "model.so"
            built = torch._inductor.aot_compile(program.module(), args, kwargs,
                                                options={**options, "aot_inductor.output_path": str(target)})
        del program
        so = tmp / "model.so"
        os.replace(built, so)
        shutil.rmtree(tmp / "build", ignore_errors=True)
        manifest = {"format": FORMAT, "key": key, "size": so.stat().st_size, "sha256": _file_sha256(so),
                    "seconds": round(time.perf_counter() - start, 1), "created": time.time(), **description}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
        try:
            os.rename(tmp, entry)
        except OSError:  # another process stored the same key meanwhile: theirs is as good
            if not (entry / "manifest.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    evict(root, keep=entry)
    return entry


class _Forward(torch.nn.Module):
    """``module.forward`` as its own module, so exporting never re-enters the compiled call installed on it."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.inner = module

    def forward(self, *args, **kwargs):
        return self.inner.forward(*args, **kwargs)


def limit_bytes() -> float:
    try:
        return float(os.environ.get(LIMIT_ENV, DEFAULT_LIMIT_GB)) * 2**30
    except ValueError:
        return DEFAULT_LIMIT_GB * 2**30


def evict(root: Path, keep: Path | None = None) -> None:
    """Remove the least recently used entries until the folder is within :func:`limit_bytes` (never ``keep``), and
    temporary folders of builds that died more than a day ago."""
    entries = []
    for path in root.iterdir():
        with contextlib.suppress(OSError):
            if path.name.startswith(".tmp-"):
                if time.time() - path.stat().st_mtime > 86400:
                    shutil.rmtree(path, ignore_errors=True)
                continue
            used = (path / "manifest.json").stat().st_mtime
            size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
            entries.append((used, size, path))
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):
        if total <= limit_bytes():
            break
        if keep is not None and path == keep:
            continue
        shutil.rmtree(path, ignore_errors=True)
        total -= size


def remove(entry: Path) -> None:
    shutil.rmtree(entry, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ per model


class Packages:
    """The packages of one optimized module, one per input signature (what ``CompiledCall`` consults first)."""

    def __init__(self, module: torch.nn.Module, folder: Path, options: dict[str, Any],
                 stats: dict[str, float], release: Callable[[], None] | None = None) -> None:
        self.module = module
        self.folder = folder
        self.options = {k: v for k, v in options.items() if k != "fx_graph_cache"}
        self.stats = stats
        self.release = release  # hands the module's own weight pages back (after hashing them, after a load)
        self.loaded: dict[str, Package] = {}
        self._weights: str | None = None
        self.disabled: str | None = None

    def reset(self) -> None:
        """The weights changed: forget the loaded packages and the weights' digest."""
        self.loaded.clear()
        self._weights = None

    def key(self, signature: list) -> tuple[str, dict[str, Any]]:
        if self._weights is None:
            start = time.perf_counter()
            self._weights = weights_digest(self.module)
            self.stats["hash_seconds"] += time.perf_counter() - start
            if self.release is not None:
                self.release()
        from . import __version__

        module = self.module
        parts = {"format": FORMAT, "inputs": signature, "weights": self._weights, "structure": structure(module),
                 "config": _describe(dict(getattr(module, "config", {}) or {})), "options": _describe(self.options),
                 "diffusekit": __version__, "source": source_digest(), **machine()}
        description = {"model": f"{type(module).__module__}.{type(module).__qualname__}", "inputs": signature,
                       "weights": self._weights, "torch": torch.__version__, "diffusekit": __version__}
        return package_key(parts), description

    def __call__(self, args: tuple, kwargs: dict, compiling: Callable[[], Any]) -> Any:
        """This call's output from its package (loaded or built as needed), or :data:`NOT_HANDLED`."""
        if self.disabled is not None or has_hooks(self.module):
            return NOT_HANDLED
        kwargs = dict(sorted(kwargs.items()))
        found = input_signature(args, kwargs)
        if found is None:
            return NOT_HANDLED
        signature, tensors = found
        key, description = self.key(signature)
        package = self.loaded.get(key)
        if package is None:
            package = self._get(key, description, args, kwargs, compiling)
            if package is None:
                return NOT_HANDLED
            self.loaded[key] = package
        return package(tensors)

    def _get(self, key: str, description: dict, args, kwargs, compiling) -> Package | None:
        entry = _root(self.folder) / key
        name = type(self.module).__name__
        if (entry / "manifest.json").exists():
            start = time.perf_counter()
            try:
                package = Package(entry, key)
            except CorruptPackage as err:
                warnings.warn(f"{name}.optimize(): the cached AOTInductor package {entry} is unusable ({err}); "
                              f"rebuilding it", RuntimeWarning, stacklevel=4)
                remove(entry)
            else:
                self.stats["aoti_loads"] += 1
                self.stats["aoti_load_seconds"] += time.perf_counter() - start
                logger.info("%s: loaded AOTInductor package %s in %.1f s", name, entry.name[:12],
                            time.perf_counter() - start)
                if self.release is not None:
                    self.release()
                return package
        start = time.perf_counter()
        packs = _weight_packs()
        try:
            with compiling():
                entry = build(self.module, args, kwargs, self.options, self.folder, key, description)
            package = Package(entry, key)
        except Exception as err:  # noqa: BLE001 - the input's fault (re-raised by eager) or the compiler's
            raise BuildFailed(err) from err
        seconds = time.perf_counter() - start
        self.stats["aoti_builds"] += 1
        self.stats["weight_packs"] += _weight_packs() - packs
        self.stats["compile_seconds"] += seconds
        logger.info("%s: built AOTInductor package %s in %.1f s", name, entry.name[:12], seconds)
        if self.release is not None:
            self.release()
        return package


def _weight_packs() -> int:
    """oneDNN weight pre-packings inductor's freezing passes did so far (float and int8 conv / linear)."""
    from torch._dynamo.utils import counters

    return sum(v for k, v in counters["inductor"].items()
               if k.endswith(("weight_pack_matcher_count", "weight_prepack_matcher_count")))


class BuildFailed(Exception):
    """Exporting or AOT-compiling failed (the caller decides: the input's fault, or fall back to torch.compile)."""
