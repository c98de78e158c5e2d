"""The floor a CPU puts under each path: its measured peak multiply-add rate per instruction kind, times the
multiply-adds of each SD 1.5 component, against the measured times and issue 13's targets.

What a path can never beat on this machine, whatever its kernels: every multiply-add of the model has to go through
the CPU's vector units, at best at one instruction per cycle per core. The script

1. builds three tight loops (12 independent accumulators each, so latency hides behind throughput) with the C++
   compiler inductor uses and times them on one thread (thread CPU time, so other work on the machine does not count):
   float32 FMA (``vfmadd231ps``, 16 multiply-adds per instruction), int8 dot product (``vpdpbusd``, 64) and bfloat16
   dot product (``vdpbf16ps``, 32), each on 512-bit registers; then the same loops on ``--threads`` threads at once
   (wall clock: all cores busy, as in a model step);
2. counts the multiply-adds of diffusekit's SD 1.5 UNet (batch 2: the CFG batch, 77x768 context) at 32x32 and 64x64
   latents (and at 64x64 with the exact path's Winograd convolutions, ``unet512-winograd``), of the VAE decoder (one 4x64x64 latent) and of the text encoder, on the meta device (no weights, no
   compute: ``torch.utils.flop_counter``), split into convolutions, linear layers and the attention products;
3. prints the floor of each path: exact (float32: every multiply-add at the FMA peak) and int8 (convolutions and
   linear layers at the ``vpdpbusd`` peak, the attention products at the ``vdpbf16ps`` peak of diffusekit's fused
   kernel); the softmax, norms and memory traffic come on top, so the real floor is higher still.

``--kernels`` also times oneDNN's convolutions alone on the UNet's main shapes (batch 2, one thread, thread CPU time):
float32 (what diffusers and the exact path run) and int8 (``onednn.qconv_pointwise`` with a pre-packed weight, what
the int8 path's graph calls), as a share of the peak above: how close the libraries' kernels already run to it.

``--reference`` gives measured diffusers eager times (seconds, ``name=value``: unet256, unet512, vae512) to print
each floor as a ratio to them; without it the floors are in seconds only::

    python -m benchmarks.bench_floor --threads 2 --reference unet256=2.74 unet512=10.28
"""

from __future__ import annotations

import argparse
import ctypes
import json
import tempfile
import threading
import time
from pathlib import Path

import torch

# each loop: n iterations of 12 independent accumulations into 512-bit registers; returns a value so nothing is
# optimised away
LOOPS = r"""
#include <immintrin.h>
#define LOOP(NAME, T, INIT, OP, FOLD)                                                   \
  extern "C" double NAME(long n) {                                                      \
    T a[12];                                                                            \
    for (int i = 0; i < 12; ++i) a[i] = INIT;                                           \
    for (long k = 0; k < n; ++k)                                                        \
      for (int i = 0; i < 12; ++i) a[i] = OP;                                           \
    double s = 0;                                                                       \
    for (int i = 0; i < 12; ++i) s += FOLD;                                             \
    return s;                                                                           \
  }
LOOP(fma_f32, __m512, _mm512_set1_ps(1e-3f * i),
     _mm512_fmadd_ps(a[i], _mm512_set1_ps(0.999f), _mm512_set1_ps(1e-4f)), _mm512_reduce_add_ps(a[i]))
LOOP(dot_u8s8, __m512i, _mm512_set1_epi32(i),
     _mm512_dpbusd_epi32(a[i], _mm512_set1_epi8(3), _mm512_set1_epi8(5)), _mm512_reduce_add_epi32(a[i]))
LOOP(dot_bf16, __m512, _mm512_set1_ps(i),
     _mm512_dpbf16_ps(a[i], (__m512bh)_mm512_set1_epi16(0x3f80), (__m512bh)_mm512_set1_epi16(0x3a80)),
     _mm512_reduce_add_ps(a[i]))
"""
#: instruction -> (loop symbol, multiply-adds per instruction, what uses it)
KINDS = {
    "vfmadd231ps": ("fma_f32", 16, "float32 (the exact path)"),
    "vpdpbusd": ("dot_u8s8", 64, "int8 convolutions and linear layers"),
    "vdpbf16ps": ("dot_bf16", 32, "the fused attention kernel's products"),
}
FLAGS = {"vfmadd231ps": "avx512f", "vpdpbusd": "avx512_vnni", "vdpbf16ps": "avx512_bf16"}


def build_loops(folder: Path) -> ctypes.CDLL:
    source = folder / "loops.cpp"
    source.write_text(LOOPS)
    from diffusekit._native import build_library
    from diffusekit.optimize import _cpp_compiler  # the compiler inductor (and diffusekit's own kernel) uses

    compiler = _cpp_compiler()
    if compiler is None:
        raise SystemExit("no C++ compiler found (needed to build the peak loops): install g++ or clang, or set CXX")
    target = folder / "loops.so"
    build_library(target, lambda tmp: [compiler, "-O3", "-march=native", "-shared", "-fPIC", str(source),
                                       "-o", str(tmp / target.name)], timeout=120)
    lib = ctypes.CDLL(str(target))
    for symbol, _, _ in KINDS.values():
        getattr(lib, symbol).restype = ctypes.c_double
        getattr(lib, symbol).argtypes = [ctypes.c_long]
    return lib


def peak_rates(lib: ctypes.CDLL, threads: int, iterations: int, repeat: int) -> dict:
    """Giga multiply-adds per second: one thread (its CPU time, best of ``repeat``) and ``threads`` at once (wall)."""
    from diffusekit._native import cpu_flags

    rates = {}
    for name, (symbol, macs, use) in KINDS.items():
        if FLAGS[name] not in cpu_flags():
            rates[name] = None
            continue
        fn = getattr(lib, symbol)
        per_call = iterations * 12 * macs
        single = []
        for _ in range(repeat):
            start = time.thread_time()
            fn(iterations)
            single.append(per_call / (time.thread_time() - start) / 1e9)
        walls = []
        for _ in range(repeat):
            workers = [threading.Thread(target=fn, args=(iterations,)) for _ in range(threads)]  # ctypes drops the GIL
            start = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            walls.append(threads * per_call / (time.perf_counter() - start) / 1e9)
        rates[name] = {"use": use, "gmac_per_s_one_core": round(max(single), 1),
                       f"gmac_per_s_{threads}_threads": round(max(walls), 1)}
    return rates


def count_macs(model, **inputs) -> dict[str, float]:
    """Multiply-adds (GMAC) of one forward by kind, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(**inputs)
    kinds = {"conv": 0.0, "linear": 0.0, "attention": 0.0}
    for op, flops in counter.get_flop_counts()["Global"].items():
        name = str(op)
        kind = ("conv" if "convolution" in name else "linear" if name in ("aten.mm", "aten.addmm") else "attention")
        kinds[kind] += flops / 2e9
    return kinds


def component_macs() -> dict[str, dict[str, float]]:
    """GMAC by kind of each SD 1.5 component at the shapes of issue 13's rows (diffusekit's models, meta device)."""
    from diffusekit import AutoencoderKL, CLIPTextModel, CLIPTextConfig, UNet2DConditionModel

    from .bench_sd import configs

    cfg = configs(quick=False)
    meta = torch.device("meta")
    with meta:
        unet = UNet2DConditionModel.from_config(cfg["unet"])
        vae = AutoencoderKL.from_config(cfg["vae"])
        text = CLIPTextModel(CLIPTextConfig(**cfg["text"]))
    context = torch.empty(2, 77, 768, device=meta)
    out = {f"unet{8 * size}": count_macs(unet, sample=torch.empty(2, 4, size, size, device=meta),
                                         timestep=torch.tensor(500), encoder_hidden_states=context)
           for size in (32, 64)}
    for layer in unet.modules():  # the exact path's Winograd convolutions, where its rule serves them
        if hasattr(layer, "winograd"):
            layer.winograd = True
    winograd = count_macs(unet, sample=torch.empty(2, 4, 64, 64, device=meta), timestep=torch.tensor(500),
                          encoder_hidden_states=context)
    # Winograd's tile products are batched matmuls, counted with the attention's: move the extra ones to conv (its
    # weight transform is a matmul, counted with the linear layers)
    extra = winograd["attention"] - out["unet512"]["attention"]
    out["unet512-winograd"] = {**winograd, "conv": winograd["conv"] + extra, "attention": winograd["attention"] - extra}
    out["vae512"] = count_macs(vae.decode, z=torch.empty(1, 4, 64, 64, device=meta))
    out["text"] = count_macs(text, input_ids=torch.zeros(2, 77, dtype=torch.long, device=meta))
    return {name: {kind: round(v, 1) for kind, v in kinds.items()} for name, kinds in out.items()}


def floors(macs: dict, rates: dict, threads: int) -> dict:
    """Seconds each path needs at the peak rates (``threads`` cores, each at its one-core peak)."""
    def rate(name):
        return rates[name]["gmac_per_s_one_core"] * threads if rates.get(name) else None

    fp32, u8, bf16 = rate("vfmadd231ps"), rate("vpdpbusd"), rate("vdpbf16ps")
    out = {}
    for name, kinds in macs.items():
        row = {"exact (float32)": sum(kinds.values()) / fp32 if fp32 else None}
        if u8 and bf16:
            row["int8 (int8 GEMMs, bf16 attention)"] = (kinds["conv"] + kinds["linear"]) / u8 + kinds["attention"] / bf16
        out[name] = row
    return out


#: (in channels, out channels, latent size, kernel) of the SD 1.5 UNet's main convolutions
CONV_SHAPES = ((320, 320, 64, 3), (640, 640, 32, 3), (1280, 1280, 16, 3), (1280, 1280, 8, 3), (320, 320, 64, 1))


def conv_kernels(rates: dict, repeat: int) -> list[dict]:
    """GMAC/s of oneDNN's float32 and int8 convolutions alone, one thread, and their share of the one-core peak."""
    torch.set_num_threads(1)

    def best(fn):
        fn()
        times = []
        for _ in range(repeat):
            start = time.thread_time()
            fn()
            times.append(time.thread_time() - start)
        return min(times)

    rows = []
    for c_in, c_out, size, k in CONV_SHAPES:
        pad, macs = k // 2, 2 * size * size * c_in * c_out * k * k / 1e9
        x = torch.randn(2, c_in, size, size)
        w = torch.randn(c_out, c_in, k, k) * 0.02
        fp32 = best(lambda: torch.nn.functional.conv2d(x, w, padding=pad))
        row = {"conv": f"{c_in}->{c_out} {size}x{size} k{k}",
               "fp32_gmac_s": round(macs / fp32, 1),
               "fp32_of_peak": round(macs / fp32 / rates["vfmadd231ps"]["gmac_per_s_one_core"], 2)}
        if rates.get("vpdpbusd"):
            xq = torch.randint(0, 255, x.shape, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
            wq = torch.randint(-127, 127, w.shape, dtype=torch.int8)
            x_scale, x_zp = torch.tensor(0.02), torch.tensor(128, dtype=torch.int32)
            w_scale, w_zp = torch.full((c_out,), 0.01), torch.zeros(c_out, dtype=torch.int64)
            packed = torch.ops.onednn.qconv_prepack(wq, w_scale, 0.02, 128, [1, 1], [pad, pad], [1, 1], 1,
                                                    xq.shape)
            bias = torch.zeros(c_out)
            int8 = best(lambda: torch.ops.onednn.qconv_pointwise.tensor(
                xq, x_scale, x_zp, packed, w_scale, w_zp, bias, [1, 1], [pad, pad], [1, 1], 1, 1.0, 0,
                torch.float32, "none", [None], ""))
            row.update(int8_gmac_s=round(macs / int8, 1),
                       int8_of_peak=round(macs / int8 / rates["vpdpbusd"]["gmac_per_s_one_core"], 2))
        rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=20_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--reference", nargs="*", default=[], help="diffusers eager times: unet256=S unet512=S ...")
    parser.add_argument("--kernels", action="store_true", help="also time oneDNN's convolutions alone")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rates = peak_rates(build_loops(Path(tmp)), args.threads, args.iterations, args.repeat)
    print(json.dumps({"peak": rates}, indent=1), flush=True)
    macs = component_macs()
    print(json.dumps({"gmac": macs}, indent=1), flush=True)
    reference = {k: float(v) for k, v in (item.split("=", 1) for item in args.reference)}
    result = {}
    for name, row in floors(macs, rates, args.threads).items():
        result[name] = {path: (None if s is None else
                               {"floor_s": round(s, 2),
                                **({"floor_vs_diffusers": round(s / reference[name], 3)} if name in reference else {})})
                        for path, s in row.items()}
    print(json.dumps({"floors": result, "diffusers_eager_s": reference}, indent=1), flush=True)
    if args.kernels:
        print(json.dumps({"conv_kernels_one_thread": conv_kernels(rates, args.repeat)}, indent=1))


if __name__ == "__main__":
    main()
