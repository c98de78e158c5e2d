"""A fused attention kernel for x86 CPUs with AVX-512 BF16: ``torch.ops.diffusekit.cpu_attention`` (and, built into
the same library, the channels-last GroupNorm of :mod:`diffusekit.cpu_group_norm`, the int8 feed-forward
projection of :mod:`diffusekit.cpu_int8_geglu` and the oneDNN matrix product of :mod:`diffusekit.cpu_matmul`).

``softmax(q kᵀ / sqrt(d)) v`` in one flash-style pass (blocks of queries stream blocks of keys, online softmax in
float32), with both products as bfloat16 dot products accumulated in float32 (``vdpbf16ps``, twice the work per
instruction of a float32 FMA). On the SD 1.5 UNet's 4096-token self-attention it takes less than half the time of
torch's fused float32 CPU kernel, at a relative error of the output of a few 1e-3 (docs/QUANTIZATION.md has the
measurements). It is the attention of the int8 path: ``optimize()`` turns it on for a quantized model on such a CPU;
any model can opt in with ``model.enable_cpu_fused_attention()``. With float32 products (FMAs, and an exponential
accurate to float32) it gives SDPA's numbers to float32 rounding in 0.68-0.75x SDPA's time on the UNet's long
self-attention: the exact path's attention (``Attention.cpu_exact_attention``, which ``optimize()`` of a float model
turns on; docs/PERFORMANCE.md).

- **Built at run time** from ``cpu_attention.cpp``, ``cpu_group_norm.cpp``, ``cpu_int8_geglu.cpp`` and
  ``cpu_linear.cpp`` (next to this file, with the header ``cpu_simd.h``) by the C++ compiler inductor uses, against
  the installed torch's headers, once per machine: ``<compile cache>/native/cpu_attention-<key>.so`` (key: the
  sources, torch, the compiler and the CPU flags), written to a temporary file and renamed into place. Loaded with
  ``torch.ops.load_library``; the op is registered from C++ (so AOTInductor packages can call it), its shape
  function (fake tensor) from Python (so ``torch.compile`` / ``torch.export`` can trace it).
- **Where it cannot be used** (not Linux x86-64, a CPU without AVX-512 BF16 and VNNI, no compiler, a failed build):
  :func:`unavailable_reason` says why, and attention stays torch's ``scaled_dot_product_attention``.
- It serves float32 CPU calls without a mask, outside autograd; anything else goes to SDPA.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
import threading
from pathlib import Path

import torch

from ._native import build_library, cpu_flags

logger = logging.getLogger(__name__)

#: the library's sources: the attention kernel, the GroupNorm and the int8 GEGLU (one build, one load)
SOURCES = tuple(Path(__file__).with_name(name) for name in
                ("cpu_attention.cpp", "cpu_group_norm.cpp", "cpu_int8_geglu.cpp", "cpu_linear.cpp"))
#: headers they include (part of the build key)
HEADERS = (Path(__file__).with_name("cpu_simd.h"),)
#: CPU features the kernels are compiled for (``/proc/cpuinfo`` names; every CPU with AVX-512 BF16 has VNNI)
REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_vnni")
_ARCH_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mavx512vnni", "-mfma"]


def _build_command(compiler: str, sources: tuple[Path, ...], target: Path) -> list[str]:
    torch_dir = Path(torch.__file__).resolve().parent
    lib = torch_dir / "lib"
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    return [compiler, "-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp", *_ARCH_FLAGS, "-w",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{torch_dir / 'include'}",
            f"-I{torch_dir / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
            "-o", str(target), *map(str, sources), f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}"]


def library_path(compiler: str) -> Path:
    """Where the built library for these sources, torch, compiler and CPU lives in the compile cache."""
    from .optimize import _versioned, default_cache_dir

    h = hashlib.sha256()
    for part in (*(source.read_bytes() for source in SOURCES + HEADERS), torch.__version__.encode(), compiler.encode(),
                 " ".join(sorted(cpu_flags())).encode()):
        h.update(part + b"\0")
    return _versioned(default_cache_dir()) / "native" / f"cpu_attention-{h.hexdigest()[:16]}.so"


def _register_fake() -> None:
    @torch.library.register_fake("diffusekit::cpu_attention")
    def _(q, k, v, scale, products=0):
        batch, heads, length, channels = q.shape
        return q.new_empty((batch, length, heads, channels)).transpose(1, 2)

    @torch.library.register_fake("diffusekit::cpu_attention_quantize")
    def _(q, k, v, scale, out_scale, out_zero_point, products=0):
        batch, heads, length, channels = q.shape
        return q.new_empty((batch, length, heads, channels), dtype=torch.uint8)

    @torch.library.register_fake("diffusekit::group_norm")
    def _(x, groups, weight, bias, eps):
        from .cpu_group_norm import output_format

        return torch.empty_like(x, memory_format=output_format(x))

    @torch.library.register_fake("diffusekit::group_norm_quantize")
    def _(x, groups, weight, bias, eps, shift, silu, out_scale, out_zero_point):
        from .cpu_group_norm import output_format

        return torch.empty_like(x, dtype=torch.uint8, memory_format=output_format(x))

    @torch.library.register_fake("diffusekit::linear")
    def _(x, w, bias=None):
        return x.new_empty((*x.shape[:-1], w.shape[-2]))

    @torch.library.register_fake("diffusekit::int8_geglu")
    def _(x, w, colsum, w_scale, bias, x_scale, x_zero_point, out_scale, out_zero_point):
        return x.new_empty((*x.shape[:-1], w.shape[0] * 16))


_lock = threading.Lock()
_loaded = False  # the op is registered in this process (read by serves(): a plain flag, cheap to trace)


def unavailable_reason() -> str | None:
    """Why the fused kernel cannot run here (``None``: built and loaded, ready). Builds it on the first call (about
    ten seconds, once per machine); the answer is kept for the process."""
    with _lock:  # one build and one registration per process, whichever thread asks first
        return _unavailable_reason()


@functools.cache
def _unavailable_reason() -> str | None:
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return f"it is built for Linux on x86-64 only (this is {platform.system()} on {platform.machine()})"
    missing = [flag for flag in REQUIRED_FLAGS if flag not in cpu_flags()]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    from .optimize import _cpp_compiler, _short

    compiler = _cpp_compiler()
    if compiler is None:
        return "no C++ compiler found (install g++ or clang, or set CXX)"
    try:
        target = library_path(compiler)
        if not target.exists():
            logger.info("building the fused CPU attention kernel: %s", target)
            build_library(target, lambda folder: _build_command(compiler, SOURCES, folder / target.name), 600)
        torch.ops.load_library(str(target))
        _register_fake()
        global _loaded
        _loaded = True
    except Exception as err:  # noqa: BLE001 - any failure means: use SDPA
        return f"building or loading it failed ({_short(err)})"
    return None


def available() -> bool:
    """Whether the kernel is ready (building it on first use); see :func:`unavailable_reason`."""
    return unavailable_reason() is None


#: the kinds of the kernel's two products (the op's ``products`` codes)
PRODUCTS = {"bf16": 0, "int8": 1, "float32": 2}


def _products_code(products: str) -> int:
    try:
        return PRODUCTS[products]
    except KeyError:
        raise ValueError(f"products must be one of {sorted(PRODUCTS)}, got {products!r}") from None


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, products: str = "bf16") -> torch.Tensor:
    """``softmax(q kᵀ / sqrt(d)) v`` for float32 CPU tensors ``(B, heads, N, d)`` (last dimension contiguous), as
    ``scaled_dot_product_attention`` without a mask; the result's memory is laid out ``(B, N, heads, d)``. Call
    :func:`available` first (this function is traced by ``torch.compile`` and does no loading itself).

    ``products``, how the two products are computed:

    - ``"bf16"`` (default): bfloat16 dot products, float32 sums; relative error of a few 1e-3.
    - ``"int8"``: int8 dot products (``vpdpbusd``, twice the rate of bf16; q with a scale per token, k and v with one
      per channel after their means over the keys are taken out, the probabilities as uint8 steps of their block's
      row maximum): about 0.6× the time of bf16 at a few times its error (docs/QUANTIZATION.md, "int8 products");
      the int8 path's choice.
    - ``"float32"``: float32 FMAs and an exponential accurate to float32: SDPA's numbers to float32 rounding, the
      exact path's choice (docs/PERFORMANCE.md)."""
    return torch.ops.diffusekit.cpu_attention(query, key, value, query.shape[-1] ** -0.5, _products_code(products))


def attention_quantize(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out_scale: float,
                       out_zero_point: int, *, products: str = "bf16") -> torch.Tensor:
    """:func:`attention`, written as uint8 ``(B, N, heads, d)`` quantized with ``(out_scale, out_zero_point)`` (round
    half to even, like ``quantize_per_tensor``): the input of an int8 output projection, without the float32 result
    in between. Call :func:`available` first."""
    return torch.ops.diffusekit.cpu_attention_quantize(query, key, value, query.shape[-1] ** -0.5, out_scale,
                                                       out_zero_point, _products_code(products))


def serves_tensors(*tensors: torch.Tensor) -> bool:
    """Whether the library's kernels (this attention, :mod:`diffusekit.cpu_group_norm`,
    :mod:`diffusekit.cpu_int8_geglu`) can take these tensors: the library is loaded, they are float32 on the CPU, and
    outside autograd (the kernels have no backward)."""
    return (_loaded and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))


def serves(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask) -> bool:
    """Whether :func:`attention` can stand in for SDPA on these inputs (and the kernel is loaded)."""
    return mask is None and query.shape[-1] > 0 and key.shape[-2] > 0 and serves_tensors(query, key, value)
