"""Warm start in seconds for ``optimize()`` on the CPU: AOTInductor packages cached on disk.

Per model structure x input signature, ``optimize()`` builds one shared library with AOTInductor (``torch.export`` +
``torch._inductor.aot_compile``) and keeps it here; a later process loads it (``dlopen``, no dynamo, no inductor
import) and runs. Two kinds:

* **bound** (the exact path, no freezing; the default): the library holds generated code only. The weights are
  *inputs* of the compiled graph (exported through ``torch.func.functional_call``), so every call passes the live
  model's parameters and buffers (memory-mapped from safetensors: no copy, the process holds what eager holds).
  In-place edits (``fuse_lora``, ``load_state_dict``) and replaced parameters are seen by the next call, and the
  key holds the weights' *layout* (names, dtypes, shapes, strides), not their values: a fine-tune or a LoRA-fused
  model of the same architecture shares the package. Not ``aot_inductor.package_constants_in_so=False`` with
  user-managed constants: inductor still inlines small constants (measured: a ``Linear`` bias of 8 values became
  literals in the kernel, so editing it was not seen), and the handles the runtime keeps of user-managed constants
  are never released.
* **frozen** (int8 QDQ models, float models with ``options={"freezing": True}``): inductor bakes the weights into
  the library as pre-packed oneDNN constants (they cannot be supplied at load time: the packing is folded at
  compile time), and its FX-graph cache refuses frozen graphs. The key therefore covers the weights: a sha256 over
  every parameter and buffer (its bytes, about 1.7 GB/s on an idle core, or where it lies in its never-written
  checkpoint file: :func:`weights_digest`); weights edited after ``optimize()`` give a new package.

**Key**: the structure of the module tree (types, configs, plain attributes, the training flag), the input
signature (tree structure, shapes, dtypes, ``bool`` / ``str`` values), the weights' layout (bound) or digest
(frozen), the inductor settings, the torch build, diffusekit's version and source, and the CPU. ``return_dict`` is
not in it: a model whose ``forward`` takes ``return_dict`` (default ``True``) is built once, returning its output
class; ``return_dict=False`` gets ``output.to_tuple()`` (what every diffusekit model returns then). The key is
computed once per signature and reused while a cheap check (:class:`StructureWatch`: the identity of every plain
attribute value, submodule, parameter and hook of the tree) says nothing changed; a change re-describes the tree.

**Where**: ``<compile cache>/aoti/<key>/`` (``model.so`` + ``manifest.json``), written into a temporary folder,
the library fsynced (:func:`_flush`), and renamed into place (a crash leaves no half entry; two processes building
the same key: the first rename wins).
**Disk**: bound packages are code only (7.5 MB for the SD 1.5 UNet at one shape); frozen ones hold the weights
(SD 1.5 UNet: ~3.3 GB float32, ~0.9 GB int8) per input shape; the least recently used packages are removed once the
folder holds more than ``DIFFUSEKIT_AOTI_CACHE_GB`` (default 20) GB.

**Trust boundary**: a package is native code that runs when loaded. diffusekit loads packages only from its own
cache folder (created ``0700``), only ones it built itself under the key computed from the live model, and checks
each against its manifest (size, and sha256 up to ``FULL_CHECK_BYTES``, of ``model.so``) before loading; a model folder or any other path is never
loaded as a package. Whoever can write to the cache folder can run code as you (as with inductor's own cache or your
site-packages): keep ``DIFFUSEKIT_CACHE_DIR`` private.

**Object inputs**: an argument whose class implements the small protocol of :class:`PackageInput` (DeepCache's
per-step :class:`~diffusekit.models.deep_cache.DeepCacheStep`) is served too: the package takes its tensors as inputs,
its static part goes into the key, the graph rebuilds the object, and the tensors the call writes into it are
package outputs, written back into the caller's object.

A package that is missing is built (a log line); one that is corrupt or fails to load is rebuilt (one warning); a
call this path cannot serve (hooks on the model, non-tensor inputs other than ``bool`` / ``str`` / ``None`` and the
object inputs above, inputs or weights off the CPU, an export or AOT compile that fails) goes to ``torch.compile``
(per process), which falls back to eager as before.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import inspect
import logging
import operator
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from ._native import build_library, cpu_flags

logger = logging.getLogger(__name__)

FORMAT = 2
LIMIT_ENV = "DIFFUSEKIT_AOTI_CACHE_GB"
DEFAULT_LIMIT_GB = 20.0
#: a package's library up to this size is checked against its manifest's sha256 before loading; a bigger one (a
#: frozen package holding gigabytes of weights) by its size only: written atomically (temporary folder + rename), a
#: damaged one is truncated, and reading it all again would cost seconds of the warm start
FULL_CHECK_BYTES = 256 << 20
#: sentinel: this call cannot be served by a package (the caller compiles in-process instead)
NOT_HANDLED = object()

_SIMPLE = (bool, int, float, str, type(None), torch.dtype, torch.device)


# ------------------------------------------------------------------------------------------------ keys


@functools.cache
def source_digest() -> str:
    """sha256 of diffusekit's own sources: Python, and the C++ of its kernel library, whose ops (and their schemas) a
    package calls (a development tree changes without a version bump); once per process."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(p for pattern in ("*.py", "*.cpp", "*.h") for p in root.rglob(pattern)):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def machine() -> dict[str, str]:
    """The build and CPU a package is specific to (a cache folder shared by machines must not mix them)."""
    return dict(_machine())


@functools.cache
def _machine() -> tuple[tuple[str, str], ...]:
    """:func:`machine`, read once per process (every compiled call keys its package with it)."""
    flags = " ".join(sorted(cpu_flags()))
    return (("torch", torch.__version__), ("torch_git", getattr(torch.version, "git_version", "")),
            ("cpu_capability", torch.backends.cpu.get_cpu_capability()),
            ("cpu_flags", hashlib.sha256(flags.encode()).hexdigest()[:16]))


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer of ``module``: name, dtype, shape and bytes -- or, for a tensor that
    still *is* a stretch of its checkpoint file (memory-mapped, no page of the mapping ever written, see
    :func:`_clean_file_spans`), where in which file: (path, inode, size, mtime in ns, offset, strides) instead of its
    bytes, so a warm start does not read gigabytes to find its package. A file rewritten since changes its mtime
    (or inode, or size); a tensor edited in place leaves its mapping dirty and is hashed by its bytes."""
    h = hashlib.sha256()
    spans = _clean_file_spans()
    for name, tensor in itertools.chain(module.named_parameters(remove_duplicate=False),
                                        module.named_buffers(remove_duplicate=False)):
        data = tensor.detach()
        h.update(f"{name}|{data.dtype}|{tuple(data.shape)}\n".encode())
        if not data.numel():
            continue
        where = _file_place(data, spans)
        if where is not None:
            h.update(f"file|{where}|{data.stride()}\n".encode())
        else:
            h.update(data.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _clean_file_spans() -> list[tuple[int, int, int, str]]:
    """(start, end, file offset, file identity) of this process's file mappings none of whose pages was ever
    written by this process (``Anonymous`` and ``Swap`` 0 in ``/proc/self/smaps``: a page written in a private file
    mapping becomes an anonymous copy; ``Private_Dirty`` also counts a freshly written file's own page cache) and
    whose file is still
    the one at its path (same inode); identity = ``path|inode|size|mtime_ns``. Empty where smaps is unreadable."""
    spans: list[tuple[int, int, int, str]] = []
    try:
        with open("/proc/self/smaps") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return spans
    current: list | None = None
    for line in lines:
        fields = line.split(maxsplit=5)
        if "-" in fields[0] and len(fields) >= 5 and ":" not in fields[0]:  # a mapping's header line
            if current is not None and current[-1]:
                spans.append(tuple(current[:4]))
            current = None
            if len(fields) == 6 and fields[5].startswith("/") and fields[4] != "0":
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                path = fields[5]
                with contextlib.suppress(OSError, ValueError):
                    st = os.stat(path)
                    if st.st_ino == int(fields[4]):
                        current = [lo, hi, int(fields[2], 16), f"{path}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}",
                                   True]
        elif current is not None and fields[0] in ("Anonymous:", "Swap:") and fields[1] != "0":
            current[-1] = False
    if current is not None and current[-1]:
        spans.append(tuple(current[:4]))
    return spans


def _file_place(tensor: torch.Tensor, spans: list[tuple[int, int, int, str]]) -> str | None:
    """``identity|offset`` of the file stretch ``tensor``'s whole storage lies in, or ``None``."""
    if tensor.device.type != "cpu":
        return None
    start = tensor.untyped_storage().data_ptr()
    end = start + tensor.untyped_storage().nbytes()
    for lo, hi, offset, identity in spans:
        if lo <= start and end <= hi:
            return f"{identity}|{offset + start - lo + tensor.storage_offset() * tensor.element_size()}"
    return None


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
    if isinstance(value, torch.Tensor):  # a plain tensor attribute: the traced graph holds it as a constant
        data = value.detach().cpu().contiguous()
        digest = hashlib.sha256(data.reshape(-1).view(torch.uint8).numpy().data).hexdigest() if data.numel() else ""
        return ["tensor", str(value.dtype), list(value.shape), digest]
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    if depth < 2 and hasattr(value, "__dict__") and not callable(value):
        return [kind, _describe({k: v for k, v in vars(value).items() if not k.startswith("__")}, depth + 1)]
    return kind


def _skipped_attribute(key: str) -> bool:
    return key in ("_parameters", "_buffers", "_modules", "_compiled_call_impl") or "hook" in key


def structure(module: torch.nn.Module) -> list:
    """Types and plain attributes (the training flag among them) of every submodule: what the traced graph depends on
    beside weights and inputs."""
    out = []
    for name, sub in module.named_modules(remove_duplicate=False):
        attrs = {k: v for k, v in vars(sub).items() if not _skipped_attribute(k)}
        out.append([name, f"{type(sub).__module__}.{type(sub).__qualname__}", _describe(attrs)])
    return out


def has_hooks(module: torch.nn.Module) -> bool:
    """Whether forward hooks would run (an exported graph would not run them)."""
    return _global_hooks() or any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def _global_hooks() -> bool:
    from torch.nn.modules import module as nn_module

    return bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks)


_ATOMS = (bool, int, float, str, type(None), tuple, frozenset, torch.dtype, torch.device, torch.Size)
#: module attributes whose changes cannot change a traced forward (hooks other than forward ones, our own call)
_UNWATCHED = frozenset({"_backward_pre_hooks", "_backward_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
                        "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks", "_compiled_call_impl",
                        "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                        "_forward_pre_hooks_with_kwargs"})


class StructureWatch:
    """A cheap test for "this module tree may have changed since the last look" (a few ms for an SD UNet, against
    15-30 ms to describe it with :func:`structure` and hash that).

    A look records, for every submodule, its attribute dict: names and values by identity, plus one level inside
    mutable values (the items of dicts such as ``_modules``, ``_parameters``, ``_buffers`` and the forward hook
    dicts, the members of lists and sets, the attributes of plain objects) and the in-place version of plain tensor
    attributes (tuples and other immutable values need no look inside). It keeps references to everything it
    recorded, so an identity can never be reused by a new object: equal identities mean unchanged values. Caught:
    attributes set (even to an equal value: a false alarm, which only costs one :func:`structure`), submodules or
    parameters replaced or added, forward hooks registered or removed, ``train()`` / ``eval()``, a tensor attribute
    edited in place. Not caught: a change deeper than one level inside an attribute value (e.g. a list inside a dict
    attribute) -- nothing in diffusekit's models keeps graph-relevant state there. (``param.data = ...`` keeps the
    parameter object: :meth:`Packages._check_layout` looks at every call's weights.)
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.modules: list[torch.nn.Module] = []
        self._inside: tuple[list, list, list] = ([], [], [])  # mutable values: dicts, collections, tensors
        self._seen: tuple[list, list] | None = None

    @staticmethod
    def _inside_of(modules: list[torch.nn.Module]) -> tuple[list, list, list]:
        """The mutable attribute values to look into (found once per look, reused while the attributes are the
        same objects): dicts (and plain objects' ``__dict__``), lists and sets, tensors."""
        dicts, collections, tensors = [], [], []
        for sub in modules:
            for name, value in sub.__dict__.items():
                if type(value) in _ATOMS or name in _UNWATCHED:
                    continue
                if isinstance(value, dict):
                    dicts.append(value)
                elif isinstance(value, (list, set)):
                    collections.append(value)
                elif isinstance(value, torch.Tensor):
                    tensors.append(value)
                elif hasattr(value, "__dict__") and not isinstance(value, (torch.nn.Module, type)):
                    dicts.append(vars(value))
        return dicts, collections, tensors

    def _look(self) -> tuple[list, list]:
        same: list = []  # compared by identity
        extend = same.extend
        for sub in self.modules:
            attrs = sub.__dict__
            same.append(attrs)
            extend(attrs)
            extend(attrs.values())
        dicts, collections, tensors = self._inside
        for value in dicts:
            extend(value)
            extend(value.values())
        for value in collections:
            extend(value)
        return same, [len(value) for value in collections] + [t._version for t in tensors]

    def changed(self) -> bool:
        """Whether the tree may have changed since the last call (always on the first); then looks again."""
        if self._seen is not None:
            same, versions = self._look()
            seen_same, seen_versions = self._seen
            if len(same) == len(seen_same) and all(map(operator.is_, same, seen_same)) and versions == seen_versions:
                return False
        self.modules = list(self.module.modules())
        self._inside = self._inside_of(self.modules)
        self._seen = self._look()
        return True


class PackageInput:
    """The protocol of an object argument a package can serve (a model's per-call state, such as DeepCache's step):

    - ``package_split()`` -> ``(static, tensors)``: ``static`` (JSON-able) goes into the key, ``tensors`` (a tuple of
      tensors or ``None``) into the graph's inputs;
    - ``package_join(static, tensors)`` (classmethod): the object again, from those parts (inside the graph);
    - ``package_results()`` -> a tuple of tensors: what the call wrote into the object (read inside the graph, after
      the call; package outputs);
    - ``package_take(results)``: write those outputs into the caller's object.

    Subclassing is optional: any class with these four methods is served."""

    METHODS = ("package_split", "package_join", "package_results", "package_take")


def is_package_input(value: Any) -> bool:
    """Whether ``value`` implements :class:`PackageInput`."""
    return all(callable(getattr(value, name, None)) for name in PackageInput.METHODS)


def split_objects(kwargs: dict) -> tuple[dict, dict[str, tuple[type, Any]]]:
    """Keyword arguments with every :class:`PackageInput` object replaced by its tensors (under the same name, as a
    tuple), and ``{name: (class, static)}`` for them (empty when there are none)."""
    objects, plain = {}, dict(kwargs)
    for name, value in kwargs.items():
        if is_package_input(value):
            static, tensors = value.package_split()
            objects[name] = (type(value), static)
            plain[name] = tuple(tensors)
    return plain, objects


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


def call_signature(args: tuple, kwargs: dict) -> tuple[list, list[torch.Tensor], dict, dict] | None:
    """(description, flat tensors, keyword arguments with object inputs as their tensors, the object inputs) of a
    call (:func:`split_objects`, :func:`input_signature`), or ``None`` when a package cannot serve it."""
    kwargs, objects = split_objects(kwargs)
    found = input_signature(args, kwargs)
    if found is None:
        return None
    signature, tensors = found
    if objects:
        signature = [*signature, {name: [f"{cls.__module__}.{cls.__qualname__}", static]
                                  for name, (cls, static) in objects.items()}]
    return signature, tensors, kwargs, objects


def package_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------ store


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _flush(path: Path) -> None:
    """Write ``path``'s pages to disk now (``fsync``). A freshly written library's pages stay dirty for up to ~30 s
    (the kernel's writeback delay), and dirty pages are not handed back by ``MADV_PAGEOUT``: a frozen package loaded
    in that window (by its builder, or a process started right after) kept the library's weight pages resident
    beside the copy the loader makes (measured: 3.1 of 5.8 MB of a test package's library resident 10 s after its
    build, 0.2 MB once written back; a process loading the SD 1.5 int8 UNet's package right after its build and
    running one 512² step peaked at 2284 MiB, 1480 MiB with this)."""
    with contextlib.suppress(OSError):  # best effort (e.g. a platform refusing fsync on this file): memory only
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class CorruptPackage(Exception):
    """A cache entry that does not match its manifest (or fails to load)."""


class Package:
    """A loaded package: call it with the same (args, kwargs) structure it was built for."""

    def __init__(self, entry: Path, key: str, bound: bool = False) -> None:
        manifest_path = entry / "manifest.json"
        try:
            manifest = json.loads(manifest_path.read_text())
            so = entry / "model.so"
            if manifest.get("format") != FORMAT or manifest.get("key") != key:
                raise CorruptPackage("manifest does not match the key")
            size = so.stat().st_size
            if size != manifest["size"] or (size <= FULL_CHECK_BYTES and _file_sha256(so) != manifest["sha256"]):
                raise CorruptPackage("model.so does not match its manifest (size / sha256)")
            if "extern_sha256" in manifest and _file_sha256(entry / "model.json") != manifest["extern_sha256"]:
                raise CorruptPackage("model.json does not match its manifest (sha256)")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CorruptPackage(f"{type(err).__name__}: {err}") from err
        try:
            from torch.utils import _pytree as pytree

            # a frozen package's loader copies the weights out of the library's mapping: its pages go back while and
            # after it does, so the process holds one copy of the weights, not two (a bound one holds no weights)
            with contextlib.nullcontext() if bound else _paging_out(so):
                self.runner = torch._C._aoti.AOTIModelContainerRunnerCpu(str(so), 1)
            in_spec, out_spec = self.runner.get_call_spec()
            self.out_spec = pytree.treespec_loads(out_spec)
            self.in_spec = in_spec
        except Exception as err:  # noqa: BLE001 - a library that does not load is a corrupt entry
            raise CorruptPackage(f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}") from err
        self.nbytes = manifest["size"]
        with contextlib.suppress(OSError):
            os.utime(manifest_path)  # least recently used eviction reads this

    def __call__(self, tensors: list[torch.Tensor], weights: list[torch.Tensor] = ()) -> Any:
        """Run on the call's input ``tensors`` (made contiguous, as when built) after the bound ``weights`` (as they
        are: their strides are in the key)."""
        from torch.utils import _pytree as pytree

        flat = [*weights, *(t.contiguous() for t in tensors)]
        return pytree.tree_unflatten(self.runner.run(flat), self.out_spec)


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

        from .optimize import _cpp_compiler

        target = folder / f"pageout-{hashlib.sha256(_PAGEOUT_C.encode()).hexdigest()[:16]}.so"
        if not target.exists():
            compiler = _cpp_compiler()
            if compiler is None:
                return None

            def command(tmp: Path) -> list[str]:
                source = tmp / "pageout.c"
                source.write_text(_PAGEOUT_C)
                return [compiler, "-x", "c", "-O2", "-shared", "-fPIC", "-o", str(tmp / target.name), str(source),
                        "-lpthread"]

            build_library(target, command, 120)
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
          description: dict[str, Any], weights: tuple[list[str], list[torch.Tensor]] | None = None,
          objects: dict[str, tuple[type, Any]] | None = None) -> Path:
    """Export ``module`` for these inputs, AOT-compile it (``options``: inductor settings, freezing among them) and
    store it atomically as ``<folder>/aoti/<key>``; returns that entry. ``weights`` (names, tensors): build a bound
    package, whose first input is the list of these parameters and buffers (see the module docstring). ``objects``
    (from :func:`split_objects`; ``kwargs`` then holds their tensors): the package rebuilds them and returns
    ``(output, results)``."""
    import torch._inductor  # noqa: F401  (only here: never imported to load a package)
    from torch.utils import _pytree as pytree

    root = _root(folder)
    entry = root / key
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:16]}-", dir=root))
    args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.contiguous(), (args, kwargs))  # as when run
    if weights is not None:
        wrapper: torch.nn.Module = _Bound(module, weights[0])
        args = ([t.detach() for t in weights[1]], *args)
    else:
        wrapper = _Forward(module)
    if objects:
        wrapper = _WithObjects(wrapper, objects)
    try:
        start = time.perf_counter()
        with torch.no_grad():  # freezing is an inference transform: inductor applies it only without grad
            program = torch.export.export(wrapper, args, kwargs, strict=False)
            target = tmp / "build" / "model.so"
            built = torch._inductor.aot_compile(program.module(), args, kwargs,
                                                options={**options, "aot_inductor.output_path": str(target)})
        del program
        so = tmp / "model.so"
        os.replace(built, so)
        _flush(so)
        manifest = {"format": FORMAT, "key": key, "size": so.stat().st_size, "sha256": _file_sha256(so),
                    "seconds": round(time.perf_counter() - start, 1), "created": time.time(), **description}
        # a graph calling custom ops (diffusekit.cpu_attention) runs them through AOTInductor's proxy executor,
        # which reads their calls from ``model.json`` next to the library (inductor names it after its wrapper)
        extern = [Path(built).with_suffix(".json"), *sorted((tmp / "build").rglob("*.wrapper.json"))]
        extern = next((path for path in extern if path.exists()), None)
        if extern is not None:
            os.replace(extern, tmp / "model.json")
            manifest["extern_sha256"] = _file_sha256(tmp / "model.json")
        shutil.rmtree(tmp / "build", ignore_errors=True)
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


class _WithObjects(torch.nn.Module):
    """``inner`` called with the object inputs rebuilt from their tensors (``objects``: name -> (class, static));
    returns ``(output, {name: results})``, the tensors the call wrote into each object as outputs."""

    def __init__(self, inner: torch.nn.Module, objects: dict[str, tuple[type, Any]]) -> None:
        super().__init__()
        self.inner = inner
        self.objects = objects

    def forward(self, *args, **kwargs):
        rebuilt = {name: cls.package_join(static, kwargs[name]) for name, (cls, static) in self.objects.items()}
        out = self.inner(*args, **{**kwargs, **rebuilt})
        return out, {name: tuple(obj.package_results()) for name, obj in rebuilt.items()}


class _Bound(torch.nn.Module):
    """``module.forward`` with its parameters and buffers as the first input (``torch.func.functional_call``): the
    exported graph takes the weights as inputs and holds none of their values."""

    def __init__(self, module: torch.nn.Module, names: list[str]) -> None:
        super().__init__()
        self.inner = module
        self.names = list(names)

    def forward(self, weights, *args, **kwargs):
        compiled = self.inner._compiled_call_impl  # never re-enter the compiled call installed on the module
        self.inner._compiled_call_impl = None
        try:
            return torch.func.functional_call(self.inner, dict(zip(self.names, weights)), args, kwargs)
        finally:
            self.inner._compiled_call_impl = compiled


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
    """The packages of one optimized module, one per input signature (what ``CompiledCall`` consults first).

    ``bound``: the weights are inputs of the package (the exact path); else frozen into it (see the module docstring).
    """

    def __init__(self, module: torch.nn.Module, folder: Path, options: dict[str, Any],
                 stats: dict[str, float], release: Callable[[], None] | None = None, bound: bool = False) -> None:
        self.module = module
        self.folder = folder
        self.options = {k: v for k, v in options.items() if k != "fx_graph_cache"}
        self.stats = stats
        self.release = release  # hands the module's own weight pages back (after hashing them, after a load)
        self.bound = bound
        self.loaded: dict[str, Package] = {}
        self.disabled: str | None = None
        self.watch = StructureWatch(module)
        self._weights: str | None = None  # frozen: the weights' digest
        self._static: str | None = None  # digest of what the key holds beside the inputs and the weights
        self._keys: dict[str, tuple[str, dict[str, Any]]] = {}  # signature (JSON) -> (key, description)
        self._hooks = False
        self._names: list[str] = []
        self._tensors: list[torch.Tensor] = []
        self._layout: list | None = None
        self._return_dict = _return_dict_default(module)

    def reset(self) -> None:
        """The weights changed (in place or replaced): a frozen model forgets its packages and the weights' digest
        (they are baked in); a bound one needs nothing (it passes the live weights to every call)."""
        if not self.bound:
            self.loaded.clear()
            self._weights = None
            self._keys.clear()

    def _refresh(self) -> None:
        """Describe the module again when :class:`StructureWatch` says it may have changed."""
        if not self.watch.changed() and self._static is not None:
            return
        module = self.module
        self._hooks = any(m._forward_hooks or m._forward_pre_hooks for m in self.watch.modules)
        named = list(itertools.chain(module.named_parameters(), module.named_buffers()))
        self._names = [name for name, _ in named]
        self._tensors = [tensor for _, tensor in named]
        self._layout = None
        from . import __version__

        parts = {"format": FORMAT, "bound": self.bound, "structure": structure(module),
                 "config": _describe(dict(getattr(module, "config", {}) or {})), "options": _describe(self.options),
                 "diffusekit": __version__, "source": source_digest(), **machine()}
        static = package_key(parts)
        if static != self._static:
            self._static = static
            self._keys.clear()

    def _check_layout(self) -> bool:
        """Bound: whether every weight is a CPU tensor; a changed dtype / shape / stride (``.data`` swapped,
        ``.to()``) changes the key."""
        layout = [(t.dtype, t.shape, t.stride(), t.device) for t in self._tensors]
        if layout != self._layout:
            if any(device.type != "cpu" for *_, device in layout):
                return False
            self._layout = layout
            self._weights = package_key({"weights": [[name, str(dtype), list(shape), list(stride)] for
                                                     name, (dtype, shape, stride, _) in zip(self._names, layout)]})
            self._keys.clear()
        return True

    def key(self, signature: list) -> tuple[str, dict[str, Any]]:
        """The package key of this input signature (cached while the module and its weights' layout / digest are
        unchanged)."""
        self._refresh()
        if self.bound:
            self._check_layout()
        return self._key(signature)

    def _key(self, signature: list) -> tuple[str, dict[str, Any]]:
        if not self.bound and self._weights is None:
            start = time.perf_counter()
            self._weights = weights_digest(self.module)
            self.stats["hash_seconds"] += time.perf_counter() - start
            if self.release is not None:
                self.release()
            self._keys.clear()
        text = json.dumps(signature, default=str)
        found = self._keys.get(text)
        if found is None:
            from . import __version__

            key = package_key({"static": self._static, "inputs": signature, "weights": self._weights})
            description = {"model": f"{type(self.module).__module__}.{type(self.module).__qualname__}",
                           "inputs": signature, "weights": "bound (inputs)" if self.bound else self._weights,
                           "torch": torch.__version__, "diffusekit": __version__}
            found = self._keys[text] = (key, description)
        return found

    def __call__(self, args: tuple, kwargs: dict, compiling: Callable[[], Any]) -> Any:
        """This call's output from its package (loaded or built as needed), or :data:`NOT_HANDLED`."""
        if self.disabled is not None or _global_hooks():
            return NOT_HANDLED
        self._refresh()
        if self._hooks:
            return NOT_HANDLED
        as_tuple = False
        original = kwargs
        if self._return_dict and "return_dict" in kwargs:  # one package: the output class, made a tuple here
            kwargs = dict(kwargs)
            as_tuple = not kwargs.pop("return_dict")
        found = call_signature(args, dict(sorted(kwargs.items())))
        if found is None:
            return NOT_HANDLED
        signature, tensors, kwargs, objects = found
        if self.bound and not self._check_layout():
            return NOT_HANDLED
        key, description = self._key(signature)
        package = self.loaded.get(key)
        if package is None:
            package = self._get(key, description, args, kwargs, compiling, objects)
            if package is None:
                return NOT_HANDLED
            self.loaded[key] = package
        out = package(tensors, self._tensors if self.bound else ())
        if objects:
            out, results = out
            for name in objects:
                original[name].package_take(results[name])
        if as_tuple:
            to_tuple = getattr(out, "to_tuple", None)
            if to_tuple is None:  # not an output class: return_dict goes into the signature from now on
                self._return_dict = False
                return NOT_HANDLED
            out = to_tuple()
        return out

    def _get(self, key: str, description: dict, args, kwargs, compiling,
             objects: dict[str, tuple[type, Any]] | None = None) -> Package | None:
        entry = _root(self.folder) / key
        name = type(self.module).__name__
        if (entry / "manifest.json").exists():
            start = time.perf_counter()
            try:
                package = Package(entry, key, bound=self.bound)
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
                entry = build(self.module, args, kwargs, self.options, self.folder, key, description,
                              weights=(self._names, self._tensors) if self.bound else None, objects=objects)
            package = Package(entry, key, bound=self.bound)
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


def _return_dict_default(module: torch.nn.Module) -> bool:
    """Whether ``module.forward`` takes ``return_dict`` defaulting to ``True`` (diffusekit's models: the output class,
    or its ``to_tuple()`` with ``False``)."""
    try:
        parameter = inspect.signature(module.forward).parameters.get("return_dict")
    except (TypeError, ValueError):
        return False
    return parameter is not None and parameter.default is True


def _weight_packs() -> int:
    """oneDNN weight pre-packings inductor's freezing passes did so far (float and int8 conv / linear)."""
    from torch._dynamo.utils import counters

    return sum(v for k, v in counters["inductor"].items()
               if k.endswith(("weight_pack_matcher_count", "weight_prepack_matcher_count")))


class BuildFailed(Exception):
    """Exporting or AOT-compiling failed (the caller decides: the input's fault, or fall back to torch.compile)."""
