"""The exact fast path: ``model.optimize()`` / ``pipe.optimize()`` compile models for inference with inductor.

Outputs stay within 1e-5 relative of eager fp32 (same maths, fused and re-laid-out kernels). What it does:

- **CPU**: inductor: fused C++ kernels (GroupNorm+SiLU and other pointwise chains), oneDNN / MKL convolutions and
  matmuls, compiled code cached on disk. The UNet's wider 3x3 convolutions run as Winograd F(2x2, 3x3), on its
  smallest images as one matrix product, and its upsamplers' before the upsampling (``diffusekit.models.winograd``);
  its larger attention products on diffusekit's float32 kernel. On CPUs where MKL runs its slower code path (AMD),
  the float32 matrix products run on oneDNN instead (``diffusekit.cpu_matmul``). Freezing
  (weights pre-packed for oneDNN) is opt-in (``options={"freezing": True}``) and on by itself for int8 QDQ models
  (``QUANTIZED_OPTIONS``). Settings are a config patch around each compiled call (``CPU_OPTIONS``);
  docs/PERFORMANCE.md has the measurements.
- **CPU graphs run from AOTInductor packages** (:mod:`diffusekit.aot_packages`): each input signature is exported and
  AOT-compiled once per machine into a shared library, keyed by the structure, inputs, settings and versions; a
  later process loads it in seconds (no dynamo, no compile, not even an inductor import). The exact path's packages
  hold code only and take the live weights as inputs (an edited or fine-tuned model reuses them; memory as eager);
  frozen ones hold the pre-packed weights (their key hashes the weights). This is the default for every CPU graph
  (exact and frozen; measured at 512² on a quiet machine: a fresh process's first call 10.8 s for a 10.4 s step,
  against 19.4-21.9 s with ``torch.compile``'s caches; the same step within noise). ``packages=False``, and calls a
  package cannot serve (hooks such as unfused LoRA, numeric arguments, objects other than DeepCache's step) or a
  failed build (one warning) use ``torch.compile`` in the process.
- **CUDA / MPS / other accelerators**: plain ``torch.compile`` (no CPU-only settings); fp16 / bf16 work there.
- **Shapes are static** (``dynamic=False``): each input shape (batch, resolution, prompt length) compiles once,
  specialised (fastest kernels); a pipeline run uses one or two shapes (full and half batch around a guidance
  interval), and the persistent cache makes each shape a one-time cost per machine.
- **Persistent cache**: ``default_cache_dir()`` (env ``DIFFUSEKIT_CACHE_DIR``, else
  ``$XDG_CACHE_HOME/diffusekit/compile``, else ``~/.cache/diffusekit/compile``), one folder per torch + diffusekit
  version: the packages (``aoti/``) and, for the ``torch.compile`` path, inductor's own FX-graph cache. Exact
  packages and unfrozen FX-graph entries hold generated code only (the compiled code takes the parameters as
  inputs), keyed on the graph's structure, shapes, dtypes and settings: a fine-tune of the same architecture shares
  the entry and a changed weight can never be served stale. Frozen packages (int8, ``freezing``) hold their
  pre-packed weights and their key hashes them. The cache is only set while our compiled models run (the
  ``TORCHINDUCTOR_CACHE_DIR`` of the rest of the process is untouched); a user's own ``TORCHINDUCTOR_CACHE_DIR``
  wins over the default folder, an explicit ``cache_dir`` over both. Nothing is written at import.
- **Fallbacks** (never a crash; a warning for each step down): no C++ compiler (CPU) or no inductor -> eager, one
  warning; a package build that fails -> ``torch.compile`` in the process; a compile that fails (e.g. a corrupt
  cache entry, an op inductor cannot lower) -> retried once without inductor's FX-graph cache, then eager. Grad mode
  -> eager (autograd unchanged). Weights changed in place or replaced after optimize() (``load_state_dict``,
  ``fuse_lora``): an exact package or an unfrozen ``torch.compile`` graph takes the live parameters as inputs, so it
  just uses them; a frozen one is recompiled on the next call (it gets a new package, since its weights are part of
  the package's key).

``torch._dynamo`` / ``torch._inductor`` are imported when something compiles, never by ``import diffusekit`` nor by
a process that only loads packages.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
import time
import types
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

logger = logging.getLogger(__name__)

#: inductor settings of the CPU path (a config patch around each compiled call, never set process-wide)
CPU_OPTIONS: dict[str, Any] = {}
#: added for quantized (QDQ) models: freezing is what lets inductor fold quantize/dequantize pairs into oneDNN int8
#: kernels. Frozen graphs run from AOTInductor packages cached on disk (``aot_packages``: built once per machine and
#: weights, loaded in seconds by later processes); ``optimize(options={"freezing": True})`` opts float models in.
QUANTIZED_OPTIONS: dict[str, Any] = {"freezing": True}

_CACHE_ENV = "DIFFUSEKIT_CACHE_DIR"
_counter = itertools.count()


def default_cache_dir() -> Path:
    """Root of diffusekit's compile cache: ``$DIFFUSEKIT_CACHE_DIR``, ``$XDG_CACHE_HOME/diffusekit/compile`` or
    ``~/.cache/diffusekit/compile`` (not created until a compile writes to it)."""
    env = os.environ.get(_CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "diffusekit" / "compile"


def _versioned(root: Path) -> Path:
    """This torch and diffusekit version's folder under ``root``, as an absolute path (the C++ compiler and linker
    run in other working directories: a relative cache folder would be written elsewhere or not at all)."""
    from . import __version__

    return root.expanduser().absolute() / f"torch-{torch.__version__}-diffusekit-{__version__}".replace("+", "_")


@contextlib.contextmanager
def _inductor_cache(folder: Path | None) -> Iterator[None]:
    """Point inductor's on-disk caches at ``folder`` while compiled code runs, then restore the environment."""
    if folder is None:
        yield
        return
    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = old


def _inductor_config(options: dict[str, Any] | None):
    """``torch._inductor.config.patch(**options)`` for the duration of one call (nothing when there are none)."""
    if not options:
        return contextlib.nullcontext()
    from torch._inductor import config

    return config.patch(options)


def _user_inductor_cache() -> bool:
    """Whether the user chose inductor's cache folder (inductor itself exports its default into the environment)."""
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not chosen:
        return False
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir as inductor_default

    return os.path.abspath(chosen) != os.path.abspath(inductor_default())


def unavailable_reason(device: torch.device) -> str | None:
    """Why inductor cannot compile for ``device`` here (``None`` when it can). Imports no inductor (~1-3 s): a warm
    start that only loads packages never needs it."""
    import importlib.util

    try:
        found = importlib.util.find_spec("torch._inductor") is not None
    except (ImportError, ValueError):  # pragma: no cover - a broken torch install
        found = False
    if not found:  # pragma: no cover - a torch build without inductor
        return "torch inductor is unavailable"
    if device.type == "cpu" and _cpp_compiler() is None:
        return "no C++ compiler found (inductor's CPU backend needs one: install g++ or clang, or set CXX)"
    return None


def _cpp_compiler() -> str | None:
    """The C++ compiler inductor would use: ``$CXX``, inductor's ``cpp.cxx`` setting where inductor is imported
    already (a user who changed it has), else the usual names."""
    import sys

    names = [os.environ["CXX"]] if os.environ.get("CXX") else []
    config = sys.modules.get("torch._inductor.config")
    cxx = config.cpp.cxx if config is not None else ()
    names += [c for c in (cxx if isinstance(cxx, (tuple, list)) else (cxx,)) if c]
    names += ["g++", "clang++", "c++"]
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


def _weights_state(module: torch.nn.Module) -> tuple:
    """Identity, storage and in-place version of every parameter and buffer: changes when weights are replaced
    (also ``param.data = ...``, which keeps the version) or edited."""
    return tuple((id(t), t.data_ptr(), t._version) for t in itertools.chain(module.parameters(), module.buffers()))


class _FilePages:
    """The memory-mapped checkpoint pages under a module's weights, handed back to the OS (``MADV_PAGEOUT``).

    Weights load memory-mapped from safetensors. Freezing reads every weight once to build the pre-packed copies the
    compiled code uses; afterwards the originals are only needed by eager calls (grad mode, a fallback, a recompile).
    Paging them out while and after compiling keeps the process near one copy of the weights instead of two: clean
    file pages are dropped and re-read from the file if an eager call touches them again; pages a user changed in
    place (``fuse_lora``) are private copies that ``MADV_PAGEOUT`` never discards (without swap they just stay), so
    no data can be lost. Linux 5.4+; elsewhere a no-op.
    """

    MADV_PAGEOUT = 21
    PAGE = 4096

    def __init__(self, module: torch.nn.Module) -> None:
        self.ranges: list[tuple[int, int]] = []
        self._libc = None
        if not os.path.exists("/proc/self/maps"):
            return
        spans = sorted((t.data_ptr(), t.data_ptr() + t.untyped_storage().nbytes())
                       for t in itertools.chain(module.parameters(), module.buffers())
                       if t.device.type == "cpu" and t.untyped_storage().nbytes() > 0)
        if not spans:
            return
        try:
            with open("/proc/self/maps") as handle:
                maps = [line.split() for line in handle]
        except OSError:
            return
        for fields in maps:  # file-backed mappings (a path in the 6th field) that hold some of the weights
            if len(fields) < 6 or not fields[5].startswith("/"):
                continue
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if any(a < hi and b > lo for a, b in spans):
                self.ranges.append((lo, hi))
        if self.ranges:
            import ctypes

            try:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                self._libc = libc
            except (OSError, AttributeError):
                self.ranges = []

    def page_out(self) -> None:
        for lo, hi in self.ranges:
            if self._libc.madvise(lo, hi - lo, self.MADV_PAGEOUT) != 0:  # EINVAL: a kernel without MADV_PAGEOUT
                self.ranges = []
                return

    @contextlib.contextmanager
    def while_compiling(self, every: float = 0.5) -> Iterator[None]:
        """Page out every ``every`` seconds from a helper thread until the block ends, then once more."""
        if self._libc is None:
            yield
            return
        import threading

        stop = threading.Event()

        def run():
            while not stop.wait(every):
                self.page_out()

        thread = threading.Thread(target=run, name="diffusekit-pageout", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.page_out()


class _MappedFile(_FilePages):
    """The pages of one file mapped into this process (an AOTInductor package's library, whose weights are copied
    out once while it loads), found again at each page-out: the mapping only appears once loading has started."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.path.realpath(path)
        self.ranges = []
        self._libc = None
        if os.path.exists("/proc/self/maps"):
            import ctypes

            with contextlib.suppress(OSError, AttributeError):
                libc = ctypes.CDLL(None, use_errno=True)
                libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                self._libc = libc

    def page_out(self) -> None:
        if self._libc is None:
            return
        try:
            with open("/proc/self/maps") as handle:
                maps = [line.split(maxsplit=5) for line in handle]
        except OSError:
            return
        self.ranges = [tuple(int(x, 16) for x in fields[0].split("-")) for fields in maps
                       if len(fields) == 6 and fields[5].strip() == self.path]
        super().page_out()
        if not self.ranges:  # madvise refused (EINVAL): a kernel without MADV_PAGEOUT
            self._libc = None


def _fresh_entry(module: torch.nn.Module) -> Callable[..., Any]:
    """A function calling ``module`` with a code object of its own: dynamo keeps compiled code (and its recompile
    budget) per code object, so each optimize() gets a clean slate instead of sharing ``Module._call_impl``'s."""
    call = module._call_impl

    def entry(*args, **kwargs):
        return call(*args, **kwargs)

    code = entry.__code__.replace(co_name=f"diffusekit_optimized_{type(module).__name__}_{next(_counter)}")
    return types.FunctionType(code, entry.__globals__, code.co_name, None, entry.__closure__)


class CompiledCall:
    """What ``optimize()`` installs as the module's ``_compiled_call_impl``: compiled inference, eager otherwise.

    ``stats`` counts calls by path (``compiled``, ``eager_grad``, ``eager_fallback``) and compiles (with inductor's
    cache hits / misses), for tests and for ``diffusekit`` benchmarks.
    """

    def __init__(self, module: torch.nn.Module, cache_dir: Path | None, options: dict[str, Any] | None,
                 dynamic: bool | None, mode: str | None, release_weights: bool = False,
                 package_dir: Path | None = None) -> None:
        self.module = module
        self.release_weights = release_weights
        self.cache_dir = cache_dir
        self.options = options
        self.dynamic = dynamic
        self.mode = mode
        self.disabled: str | None = None
        self.stats: dict[str, float] = {"compiled": 0, "eager_grad": 0, "eager_fallback": 0, "compiles": 0,
                                        "fxgraph_cache_hit": 0, "fxgraph_cache_miss": 0, "weight_packs": 0,
                                        "compile_seconds": 0.0, "aoti_builds": 0, "aoti_loads": 0,
                                        "aoti_load_seconds": 0.0, "hash_seconds": 0.0}
        # only a frozen graph holds weights of its own; an unfrozen one takes the live parameters as inputs, and
        # walking every parameter on each call costs more than a small model's step (~3 ms per SD UNet call)
        self.frozen = bool((options or {}).get("freezing"))
        # CPU graphs: AOTInductor packages on disk (aot_packages), so a later process loads instead of compiling;
        # bound to the live weights (exact path) or with the frozen weights inside
        self.packages = None
        if package_dir is not None:
            from . import aot_packages

            self.packages = aot_packages.Packages(module, package_dir, options or {}, self.stats,
                                                  release=self._release_originals if release_weights else None,
                                                  bound=not self.frozen)
        self._build()

    def _build(self) -> None:
        # inductor settings are applied as a config patch around each compiled call, not torch.compile(options=):
        # with options= torch 2.13 never freezes (dynamo decides how to treat parameters from the *global*
        # config while tracing; measured: no oneDNN weight packing at all), and a per-call patch keeps the
        # process-wide config untouched between calls
        self._compiled = None  # torch.compile (imports dynamo) on first use: package-only processes never need it
        self.weights = _weights_state(self.module) if self.frozen else None
        self.seen: set[tuple] = set()
        if getattr(self, "packages", None) is not None:
            self.packages.reset()

    @property
    def compiled(self) -> Callable[..., Any]:
        if self._compiled is None:
            self._compiled = torch.compile(_fresh_entry(self.module), dynamic=self.dynamic, mode=self.mode)
        return self._compiled

    @compiled.setter
    def compiled(self, value: Callable[..., Any]) -> None:
        self._compiled = value

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.module
        if self.disabled is not None:
            self.stats["eager_fallback"] += 1
            return module._call_impl(*args, **kwargs)
        if torch.is_grad_enabled():
            self.stats["eager_grad"] += 1
            return module._call_impl(*args, **kwargs)
        if self.frozen and _weights_state(module) != self.weights:
            logger.info("%s: weights changed since optimize(); recompiling", type(module).__name__)
            self._build()
        if self.packages is not None:
            out = self._from_package(args, kwargs)
            if out is not _not_handled():
                self.stats["compiled"] += 1
                return out
        signature = _signature(args, kwargs)
        first = signature not in self.seen
        try:
            with _inductor_cache(self.cache_dir), _inductor_config(self.options):
                if not first:
                    out = self.compiled(*args, **kwargs)
                else:
                    out = self._first_call(args, kwargs, signature)
        except Exception as err:  # noqa: BLE001 - decided below: the input's fault (re-raised) or the compiler's
            return self._fall_back(err, args, kwargs)
        self.seen.add(signature)
        self.stats["compiled"] += 1
        return out

    def _from_package(self, args, kwargs) -> Any:
        from . import aot_packages

        try:
            with _inductor_cache(self.cache_dir):  # a build's intermediate files go to our folder too
                return self.packages(args, kwargs, self._compiling)
        except aot_packages.BuildFailed as failure:
            err = failure.__cause__ or failure
            out = self.module._call_impl(*args, **kwargs)  # an error in the input raises here, as eager would
            self.packages.disabled = _short(err)
            warnings.warn(f"{type(self.module).__name__}.optimize(): building the AOTInductor package failed "
                          f"({self.packages.disabled}); compiling in this process instead (no warm start)",
                          RuntimeWarning, stacklevel=4)
            self.stats["eager_fallback"] += 1
            return out

    def _compiling(self):
        """Around a build (a package, or a compile in the process): hand the checkpoint's file pages back while
        freezing copies the weights."""
        return _FilePages(self.module).while_compiling() if self.release_weights else contextlib.nullcontext()

    def _release_originals(self) -> None:
        """Hashed, or a package loaded: packages run on their own copy of the (pre-packed) weights, so the
        checkpoint's pages can go back to the OS (re-read from the file if an eager call needs them)."""
        _FilePages(self.module).page_out()

    def _first_call(self, args, kwargs, signature: tuple):
        from torch._dynamo.utils import counters

        before = dict(counters["inductor"])
        start = time.perf_counter()
        with self._compiling():
            out = self.compiled(*args, **kwargs)
        seconds = time.perf_counter() - start
        after = counters["inductor"]
        self.stats["compiles"] += 1
        self.stats["compile_seconds"] += seconds
        for key in ("fxgraph_cache_hit", "fxgraph_cache_miss"):
            self.stats[key] += after.get(key, 0) - before.get(key, 0)
        # oneDNN weight pre-packing that freezing did (conv + linear): proof the CPU settings took effect
        self.stats["weight_packs"] += sum(after.get(k, 0) - before.get(k, 0) for k in after
                                          if k.endswith("weight_pack_matcher_count"))
        logger.info("%s: compiled for %s in %.1f s (inductor cache hits %d, misses %d)", type(self.module).__name__,
                    signature[0], seconds, after.get("fxgraph_cache_hit", 0) -
                    before.get("fxgraph_cache_hit", 0), after.get("fxgraph_cache_miss", 0) -
                    before.get("fxgraph_cache_miss", 0))
        return out

    def _fall_back(self, err: Exception, args, kwargs) -> Any:
        module = self.module
        out = module._call_impl(*args, **kwargs)  # an error in the input raises here, as eager would
        if self.cache_dir is not None and not getattr(self, "_retried", False):
            self._retried = True  # a corrupt cache entry: one more try that neither reads nor writes the cache
            warnings.warn(f"{type(module).__name__}.optimize(): compiling failed ({_short(err)}); retrying once "
                          f"without the compile cache", RuntimeWarning, stacklevel=3)
            self.options = {**(self.options or {}), "fx_graph_cache": False}
            self._build()
            return out
        self.disabled = _short(err)
        warnings.warn(f"{type(module).__name__}.optimize(): compiling failed ({self.disabled}); running eager",
                      RuntimeWarning, stacklevel=3)
        self.stats["eager_fallback"] += 1
        return out


def _not_handled() -> object:
    from .aot_packages import NOT_HANDLED

    return NOT_HANDLED


def _short(err: Exception) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()
    return text[0][:300] if text else type(err).__name__


def _signature(args, kwargs) -> tuple:
    """The input shapes / dtypes (what a static compile specialises on), for stats and logs."""
    from .aot_packages import is_package_input

    def describe(value):
        if isinstance(value, torch.Tensor):
            return (tuple(value.shape), str(value.dtype).removeprefix("torch."))
        if isinstance(value, (list, tuple)):
            return tuple(describe(v) for v in value)
        if isinstance(value, dict):
            return tuple((k, describe(v)) for k, v in sorted(value.items()))
        if is_package_input(value):  # an object input (DeepCache's step): its parts
            static, tensors = value.package_split()
            return (type(value).__name__, repr(static), describe(tuple(tensors)))
        return type(value).__name__

    return (describe(tuple(args)), describe(kwargs))


def _module_device(module: torch.nn.Module) -> torch.device:
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return tensor.device
    return torch.device("cpu")


def optimize_module(module: torch.nn.Module, *, cache_dir: str | os.PathLike | None = None,
                    use_cache: bool = True, dynamic: bool | None = False, mode: str | None = None,
                    options: dict[str, Any] | None = None, release_weights: bool = True,
                    packages: bool | None = None, reuse_memory: bool = True) -> torch.nn.Module:
    """Compile ``module``'s calls for inference in place (see the module docstring); returns ``module``.

    ``cache_dir`` overrides :func:`default_cache_dir`; ``use_cache=False`` neither reads nor writes a persistent
    cache. ``dynamic``, ``mode`` and ``options`` go to ``torch.compile`` (``options`` are added to the CPU defaults
    on CPU; a key set to ``None`` removes a default). Calling it again recompiles (e.g. after changing the device).
    ``release_weights`` (CPU with freezing): hand the memory-mapped checkpoint pages of the weights back to the OS
    while and after compiling, since the compiled code runs on its own pre-packed copies (see :class:`_FilePages`).
    ``packages`` (``None``, the default, or ``True``): on the CPU, with static shapes, the default mode and the
    persistent cache (diffusekit's folder, even where ``TORCHINDUCTOR_CACHE_DIR`` moves inductor's), run from
    AOTInductor packages built once per machine (:mod:`diffusekit.aot_packages`: a later process loads them in
    seconds): bound packages (code only, the live weights as inputs) for the exact path, frozen ones
    for frozen graphs (int8, freezing). Elsewhere (``dynamic`` or ``mode`` set, ``use_cache=False``, accelerators),
    and for calls a package cannot serve, ``torch.compile``. ``False``: ``torch.compile`` in every process (dynamo
    traces each one; inductor's FX-graph cache spares the C++ build of the exact path; frozen graphs, which it does
    not cache, compile in full).
    ``reuse_memory`` (CPU): let malloc keep the memory each call frees for the next one instead of handing it back
    and faulting it in again (:func:`diffusekit._native.keep_freed_memory`: process-wide, once; measured 8-11 % of
    an int8 UNet step at 512², 15-26 % of an int8 VAE decode). ``False`` leaves malloc as it is, for this call.
    """
    device = _module_device(module)
    if device.type == "cpu" and reuse_memory:
        from ._native import keep_freed_memory

        reason = keep_freed_memory()
        if reason is not None:
            logger.info("%s.optimize(): malloc left as it is (%s)", type(module).__name__, reason)
    reason = unavailable_reason(device)
    if reason is not None:
        warnings.warn(f"{type(module).__name__}.optimize(): {reason}; running eager", RuntimeWarning, stacklevel=3)
        module._compiled_call_impl = None
        return module
    merged = dict(CPU_OPTIONS) if device.type == "cpu" else {}
    if device.type == "cpu" and _is_quantized(module):
        merged.update(QUANTIZED_OPTIONS)
        _default_cpu_kernels(module)
    elif device.type == "cpu":
        _default_exact_attention(module)
        _default_winograd(module)
        merged.update(_exact_cpu_options(module))
    merged.update(options or {})
    merged = {k: v for k, v in merged.items() if v is not None}
    ours = _versioned(Path(cache_dir) if cache_dir is not None else default_cache_dir())
    folder = None  # inductor's caches while our compiled code runs: ours, unless the user chose inductor's own
    if use_cache and (cache_dir is not None or not _user_inductor_cache()):
        folder = ours
    elif not use_cache:
        merged["fx_graph_cache"] = False
    frozen = device.type == "cpu" and bool(merged.get("freezing"))
    release = release_weights and frozen
    packages = packages is not False  # None (default) or True: wherever a package can serve
    packages = packages and device.type == "cpu" and use_cache and dynamic is False and mode is None
    # packages live in diffusekit's cache folder whatever TORCHINDUCTOR_CACHE_DIR says (they are not inductor's)
    module._compiled_call_impl = CompiledCall(module, folder, merged or None, dynamic, mode, release,
                                              package_dir=ours if packages else None)
    return module


def _default_cpu_kernels(module: torch.nn.Module) -> None:
    """The int8 path's CPU kernels (``diffusekit.cpu_attention``, one library): the fused bf16 attention for every
    attention layer that has no explicit choice (``enable_`` / ``disable_cpu_fused_attention``), and for every layer
    whose ``cpu_kernel`` is not chosen the GroupNorm kernel (``diffusekit.cpu_group_norm``: fast on the channels-last
    activations of int8 convolutions) and the int8 feed-forward's fused GEGLU (``diffusekit.cpu_int8_geglu``), where
    they run."""
    undecided = [m for m in module.modules() if hasattr(m, "cpu_fused_attention") and m.cpu_fused_attention is None]
    switchable = [m for m in module.modules() if getattr(m, "cpu_kernel", False) is None]  # GroupNorm, FeedForward
    if not (undecided or switchable) or not _cpu_kernels_run(module, "attention, GroupNorm and GEGLU stay torch's"):
        return
    for layer in undecided:
        layer.cpu_fused_attention = True
    for layer in switchable:
        layer.cpu_kernel = True


def _default_exact_attention(module: torch.nn.Module) -> None:
    """The exact path's attention: diffusekit's CPU kernel with float32 products (SDPA's numbers to float32
    rounding, 0.68-0.80x its time on the UNet's self-attention) for every attention layer that has no explicit
    choice, where the kernel runs."""
    undecided = [m for m in module.modules() if getattr(m, "cpu_exact_attention", False) is None
                 and not getattr(m, "cpu_fused_attention", None)]
    if not undecided or not _cpu_kernels_run(module, "attention stays torch's SDPA"):
        return
    for layer in undecided:
        layer.cpu_exact_attention = True


def _default_winograd(module: torch.nn.Module) -> None:
    """The exact path's 3x3 convolutions as Winograd F(2x2, 3x3) (``diffusekit.models.winograd``: 2.25x fewer
    multiply-adds, the direct convolution's rounding), on images too small for it as one matrix product over the
    unfolded input (the direct convolution's own products), and the upsamplers' convolutions computed before the
    upsampling (``Upsample2D.fused_upsample``), in models that declare them measured faster (``_exact_winograd``: the
    conditional UNet), for every such layer and switch that has no explicit choice; each call uses them where their
    rules say they pay."""
    if not getattr(module, "_exact_winograd", False):
        return
    for layer in module.modules():
        for switch in ("winograd", "gemm", "fused_upsample"):
            if getattr(layer, switch, False) is None:
                setattr(layer, switch, True)


def _exact_cpu_options(module: torch.nn.Module) -> dict[str, Any]:
    """The exact path's inductor settings beyond ``CPU_OPTIONS``: its float32 matrix products on oneDNN where MKL
    runs its slower code path (``diffusekit.cpu_matmul``; one log line where they stay on MKL)."""
    from . import cpu_matmul

    reason = cpu_matmul.unavailable_reason()
    if reason is not None:
        logger.info("%s.optimize(): matrix products stay on MKL (%s)", type(module).__name__, reason)
        return {}
    return {"post_grad_custom_post_pass": cpu_matmul.graph_pass()}


def _cpu_kernels_run(module: torch.nn.Module, otherwise: str) -> bool:
    """Whether diffusekit's CPU kernel library runs here (building it on first use); if not, one log line: what
    ``otherwise`` happens, and why."""
    from . import cpu_attention

    reason = cpu_attention.unavailable_reason()
    if reason is not None:
        logger.info("%s.optimize(): %s (the fused CPU kernels are unavailable: %s)", type(module).__name__, otherwise,
                    reason)
    return reason is None


def _is_quantized(module: torch.nn.Module) -> bool:
    """Whether ``module`` holds diffusekit's int8 QDQ layers (``diffusekit.quantization``)."""
    return any(getattr(m, "_needs_freezing", False) for m in module.modules())


def compiled_call(module: torch.nn.Module) -> CompiledCall | None:
    """The :class:`CompiledCall` optimize() installed on ``module`` (``None`` when it runs eager)."""
    call = getattr(module, "_compiled_call_impl", None)
    return call if isinstance(call, CompiledCall) else None


def unoptimize_module(module: torch.nn.Module) -> torch.nn.Module:
    """Back to eager calls."""
    module._compiled_call_impl = None
    return module
