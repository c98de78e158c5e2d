"""int8 speed and memory on the full-size SD 1.5 UNet (random weights): fp32 eager vs int8 compiled, one step.

Random weights give unrepresentative activation ranges: fine for speed and memory, not for quality
(``bench_int8_quality`` measures quality on a trained model). Steps:

- ``build``: quantize the fp32 UNet of ``--folder`` (calibrated on 3 random 32x32 CFG batches at t = 900, 500, 100)
  and save it to ``--out`` (once).
- ``time``: one process, both models loaded; a CFG step (batch 2, 77x768 context) at ``--latent`` 32 (256² image)
  and 64 (512²): fp32 eager vs int8 compiled with inductor freezing, interleaved; relative error of the int8 output.
- ``vae``: the VAE decoder at 512² (a 4x64x64 latent, batch 1): the fp32 VAE of ``--folder`` eager and compiled
  (``optimize()``, the exact path an int8 pipeline uses for its VAE by default) vs its decoder quantized in this
  process (calibrated on 3 random latents; ``components=("unet", "vae")`` in ``pipe.quantize``) and compiled,
  interleaved; relative error of each against fp32 eager.
- ``profile``: the int8 UNet of ``--out`` compiled, one CFG step at ``--latents`` (the last one given) under
  ``torch.profiler`` after a warm-up: time by kind of kernel (fused CPU SDPA, oneDNN int8 conv / linear, inductor's
  fused GroupNorm / LayerNorm / quantize kernels, the layers kept float), and the share of the self-attention calls
  over the most tokens.
- ``attention``: the first-stage self-attention product alone at ``--latents`` (batch 2, 8 heads of 40 channels,
  latents² tokens): torch's fused CPU SDPA in float32 and bfloat16, and the attention-times-values product as a float
  matmul vs an int8 ``torch._int_mm`` (what an int8 attention kernel could gain; torch has no fused int8 SDPA); then
  diffusekit's fused bf16 CPU kernel vs float32 SDPA on the first-stage self- and cross-attention and the
  second-stage self-attention (time ratio, relative and max error).
- ``fused``: the int8 UNet of ``--out`` compiled with attention through SDPA and through diffusekit's fused CPU
  kernel (optimize()'s default for int8 where it runs), interleaved (``--with-fp32``: and fp32 eager).
- ``exact``: the fp32 UNet of ``--folder`` under ``optimize()`` (the exact path), one of its CPU defaults on and off
  (``--choice``): ``attention`` through the fused kernel's float32 products or SDPA, ``winograd``: the 3x3
  convolutions through Winograd F(2x2, 3x3) or oneDNN's direct one, ``gemm``: those on the smallest images (8x8 and
  4x4 latents) through one matrix product or the direct one, ``upsample``: the UNet upsamplers' convolution computed
  before the upsampling or after it, ``gemm-upsample``: those two together (Winograd on in both settings);
  interleaved in one process. ``--model vae``: the VAE's decode of one latent instead of the UNet's step.
- ``memory``: a fresh process loads one model (``--variant fp32|int8|int8-eager``), runs one step (compiled for
  ``int8``), and prints its peak RSS next to the fp32 weight file's size.

Full-size runs want a quiet machine (nothing else heavy running)::

    python -m benchmarks.bench_int8_speed build --folder .bench/sd15-random --out DIR
    python -m benchmarks.bench_int8_speed time --folder .bench/sd15-random --out DIR
    python -m benchmarks.bench_int8_speed memory --folder .bench/sd15-random --out DIR
    python -m benchmarks.bench_int8_speed vae --folder .bench/sd15-random --out DIR
    python -m benchmarks.bench_int8_speed profile --out DIR --latents 64
    python -m benchmarks.bench_int8_speed attention --out DIR --latents 64
    python -m benchmarks.bench_int8_speed fused --out DIR --latents 64 --with-fp32
    python -m benchmarks.bench_int8_speed exact --folder .bench/sd15-random --latents 64 --repeat 4
    python -m benchmarks.bench_int8_speed exact --choice winograd --folder .bench/sd15-random --latents 64 --repeat 4
    python -m benchmarks.bench_int8_speed exact --choice winograd --model vae --folder .bench/sd15-random --latents 64
    python -m benchmarks.bench_int8_speed exact --choice gemm --folder .bench/sd15-random --latents 32 64 --repeat 5
    python -m benchmarks.bench_int8_speed exact --choice gemm-upsample --folder .bench/sd15-random \
        --latents 32 64 --repeat 7
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


def inputs(latent: int, seed: int = 0, t: int = 500):
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(2, 4, latent, latent, generator=g), timestep=torch.tensor(t),
                encoder_hidden_states=torch.randn(2, 77, 768, generator=g))


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def compiled(model):
    """Prefer the library's optimize(); plain torch.compile with global freezing otherwise."""
    if hasattr(model, "optimize"):
        return model.optimize()
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    return torch.compile(model)


def build(args):
    from diffusekit import UNet2DConditionModel
    from diffusekit.quantization import quantize_model

    unet = UNet2DConditionModel.from_pretrained(args.folder, subfolder="unet")
    start = time.perf_counter()
    quantize_model(unet, [inputs(32, seed=i, t=t) for i, t in enumerate((900, 500, 100))])
    print(f"quantized in {time.perf_counter() - start:.1f} s")
    unet.save_pretrained(args.out)


def timing(args):
    from diffusekit import UNet2DConditionModel

    fp32 = UNet2DConditionModel.from_pretrained(args.folder, subfolder="unet")
    int8 = UNet2DConditionModel.from_pretrained(args.out)
    fast = compiled(int8)
    results = {}
    with torch.no_grad():
        for latent in args.latents:
            x = inputs(latent, seed=7)
            start = time.perf_counter()
            out8 = fast(**x).sample
            first = time.perf_counter() - start
            ref = fp32(**x).sample
            eager8 = int8(**x).sample if args.eager_int8 else None
            times = {"fp32_eager": [], "int8_compiled": []}
            for _ in range(args.repeat):
                for name, fn in (("fp32_eager", fp32), ("int8_compiled", fast)):
                    start = time.perf_counter()
                    fn(**x)
                    times[name].append(time.perf_counter() - start)
            med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
            results[latent] = {
                "fp32_eager_s": round(med["fp32_eager"], 3), "int8_compiled_s": round(med["int8_compiled"], 3),
                "ratio": round(med["int8_compiled"] / med["fp32_eager"], 3), "int8_first_call_s": round(first, 1),
                "rel_err_vs_fp32": round(float((out8 - ref).norm() / ref.norm()), 4),
                **({"compiled_vs_eager_int8_rel": float((out8 - eager8).norm() / eager8.norm())}
                   if eager8 is not None else {}),
            }
            print(latent, json.dumps(results[latent]), flush=True)
    from torch._dynamo.utils import counters

    print(json.dumps({k: v for k, v in counters["inductor"].items() if k.startswith("q")}))


def vae(args):
    from diffusekit import AutoencoderKL
    from diffusekit.quantization import quantize_model
    from diffusekit.quantization.pipeline import VAE_MODULES_TO_NOT_CONVERT

    load = lambda: AutoencoderKL.from_pretrained(args.folder, subfolder="vae")  # noqa: E731
    fp32, exact, int8 = load(), load().optimize(), load()
    size = args.latents[-1]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        calibration = [torch.randn(1, 4, size, size, generator=g) for _ in range(3)]
        start = time.perf_counter()
        quantize_model(int8, lambda m: [m.decode(z) for z in calibration],
                       modules_to_not_convert=VAE_MODULES_TO_NOT_CONVERT)
        print(f"quantized the decoder in {time.perf_counter() - start:.1f} s", flush=True)
        int8.optimize()
        z = torch.randn(1, 4, size, size, generator=g)
        ref = fp32.decode(z).sample
        result = {"latent": size}
        variants = {"fp32_eager": fp32, "fp32_optimize": exact, "int8_optimize": int8}
        for name, model in variants.items():
            if name != "fp32_eager":
                start = time.perf_counter()
                out = model.decode(z).sample
                result[f"{name}_first_call_s"] = round(time.perf_counter() - start, 1)
                result[f"{name}_rel_err"] = round(float((out - ref).norm() / ref.norm()), 5)
                print(json.dumps(result), flush=True)
        times = {name: [] for name in variants}
        for _ in range(args.repeat):
            for name, model in variants.items():
                start = time.perf_counter()
                model.decode(z)
                times[name].append(time.perf_counter() - start)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    result.update({f"{k}_s": round(v, 3) for k, v in med.items()})
    result.update({f"{k}_ratio": round(v / med["fp32_eager"], 3) for k, v in med.items() if k != "fp32_eager"})
    print(json.dumps(result), flush=True)


PROFILE_KINDS = (  # (kind, test on a profiler event name), first match wins
    ("attention (fused CPU SDPA, float)", lambda n: n.startswith("aten::_scaled_dot_product")),
    # cpu_attention, and cpu_attention_quantize (before an int8 output projection: int8 products by default)
    ("attention (diffusekit fused kernel)", lambda n: n.startswith("diffusekit::cpu_attention")),
    ("int8 conv (oneDNN)", lambda n: n == "onednn::qconv_pointwise"),
    ("int8 linear (oneDNN)", lambda n: n == "onednn::qlinear_pointwise"),
    ("int8 feed-forward projection + GEGLU (diffusekit kernel)", lambda n: n == "diffusekit::int8_geglu"),
    ("GroupNorm, alone or + SiLU + quantize (diffusekit kernel)", lambda n: n.startswith("diffusekit::group_norm")),
    ("fused GroupNorm (+SiLU, +quantize)", lambda n: n.startswith("graph_") and "group_norm" in n),
    ("fused LayerNorm (+quantize)", lambda n: n.startswith("graph_") and "layer_norm" in n),
    ("fused quantize / layout", lambda n: n.startswith("graph_") and "quantize" in n),
    ("other fused pointwise", lambda n: n.startswith("graph_")),
    ("layers kept float (conv_in/out, time embeddings)",
     lambda n: n in ("mkl::_mkl_linear", "mkldnn::_convolution_pointwise", "aten::addmm", "aten::mm")),
)


def profile(args):
    import torch._inductor.config as inductor_config
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from diffusekit import UNet2DConditionModel

    inductor_config.cpp.enable_kernel_profile = True  # name inductor's C++ kernels in the profile
    # compiled in process (use_cache=False), not run from an AOTInductor package, whose kernels the profiler
    # cannot name; both come from the same inductor lowering
    model = UNet2DConditionModel.from_pretrained(args.out).optimize(use_cache=False)
    x = inputs(args.latents[-1], seed=7)
    with torch.no_grad():
        start = time.perf_counter()
        model(**x)
        print(f"first call (compile) {time.perf_counter() - start:.1f} s", flush=True)
        start = time.perf_counter()
        model(**x)
        print(f"warm step {time.perf_counter() - start:.2f} s", flush=True)
        with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            model(**x)
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=40,
                                                              max_name_column_width=60, max_shapes_column_width=90))
    events = [e for e in prof.events() if e.name in ("## Call CompiledFxGraph None ##",) or
              any(test(e.name) for _, test in PROFILE_KINDS)]
    total = sum(e.cpu_time_total for e in events if e.name.startswith("## Call CompiledFxGraph"))
    by_kind: dict[str, float] = {}
    for e in events:
        for kind, test in PROFILE_KINDS:
            if test(e.name):
                by_kind[kind] = by_kind.get(kind, 0.0) + e.self_cpu_time_total
                break
    sdpa = sorted((e.self_cpu_time_total for e in events if PROFILE_KINDS[0][1](e.name) or PROFILE_KINDS[1][1](e.name)),
                  reverse=True)
    tokens = args.latents[-1] ** 2
    widest = [t for t in sdpa if t > sdpa[0] / 3]  # the self-attention calls over the full-resolution tokens
    print(json.dumps({"profiled_step_ms": round(total / 1e3), **{k: f"{v / 1e3:.0f} ms ({100 * v / total:.1f} %)"
                                                                for k, v in by_kind.items()},
                      f"self-attention over {tokens} tokens": f"{len(widest)} calls, {sum(widest) / 1e3:.0f} ms "
                                                                f"({100 * sum(widest) / total:.1f} %)"}, indent=1))


def attention(args):
    import torch.nn.functional as F

    # one thread: CPU time (steadier than the wall clock on a shared machine; the same for a single thread)
    clock = time.process_time if args.threads == 1 else time.perf_counter

    def best(fn, repeat=args.repeat):
        fn()
        times = []
        for _ in range(repeat):
            start = clock()
            fn()
            times.append(clock() - start)
        return min(times)

    tokens, heads, dim = args.latents[-1] ** 2, 8, 40
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, heads, tokens, dim, generator=g) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    out_b = F.scaled_dot_product_attention(qb, kb, vb).float()
    probs = torch.rand(tokens, tokens, generator=g)
    values = torch.randn(tokens, 48, generator=g)
    probs8 = torch.randint(0, 128, (tokens, tokens), dtype=torch.int8, generator=g)
    values8 = torch.randint(-127, 128, (tokens, 48), dtype=torch.int8, generator=g)
    flops = 2 * 2 * (2 * heads) * tokens * tokens * dim  # q·kᵀ and p·v, batch 2 x heads
    result = {"tokens": tokens, "sdpa_fp32_s": best(lambda: F.scaled_dot_product_attention(q, k, v)),
              "sdpa_bf16_s": best(lambda: F.scaled_dot_product_attention(qb, kb, vb)),
              "sdpa_bf16_rel_err": float((out_b - ref).norm() / ref.norm()),
              "pv_fp32_matmul_gflops": 2 * tokens * tokens * 48 / best(lambda: probs @ values) / 1e9,
              "pv_int8_int_mm_gops": 2 * tokens * tokens * 48 / best(lambda: torch._int_mm(probs8, values8)) / 1e9}
    result["sdpa_fp32_gflops"] = flops / result["sdpa_fp32_s"] / 1e9
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}), flush=True)
    fused_attention(args, best)


def fused_attention(args, best):
    """diffusekit's fused CPU kernel (bf16, int8 and float32 products) vs float32 SDPA on the UNet's attention shapes at
    ``--latents``: the first-stage self-attention (8 heads x 40 channels; also with peaked rows), cross-attention (77
    text tokens) and the second-stage self-attention (a quarter of the tokens, 80 channels); time ratio and error of
    the output."""
    import torch.nn.functional as F

    from diffusekit import cpu_attention

    reason = cpu_attention.unavailable_reason()
    if reason is not None:
        print(json.dumps({"fused_attention": f"unavailable: {reason}"}))
        return
    tokens = args.latents[-1] ** 2
    g = torch.Generator().manual_seed(0)
    shapes = {"self": (tokens, tokens, 40, 1.0), "self, peaked": (tokens, tokens, 40, 2.0),
              "cross": (tokens, 77, 40, 1.0), "self-stage2": (tokens // 4, tokens // 4, 80, 1.0)}
    for name, (nq, nk, dim, spread) in shapes.items():
        # heads split from a (B, N, heads * d) projection, as the attention layers do; k with an offset; the
        # scores have a standard deviation of spread²
        q = (torch.randn(2, nq, 8, dim, generator=g) * spread).transpose(1, 2)
        k = (torch.randn(2, nk, 8, dim, generator=g) * spread + 0.5).transpose(1, 2)
        v = torch.randn(2, nk, 8, dim, generator=g).transpose(1, 2)
        ref = F.scaled_dot_product_attention(q, k, v)
        out = cpu_attention.attention(q, k, v)
        out8 = cpu_attention.attention(q, k, v, products="int8")
        out32 = cpu_attention.attention(q, k, v, products="float32")
        sdpa_s = best(lambda: F.scaled_dot_product_attention(q, k, v))
        fused_s = best(lambda: cpu_attention.attention(q, k, v))
        int8_s = best(lambda: cpu_attention.attention(q, k, v, products="int8"))
        float32_s = best(lambda: cpu_attention.attention(q, k, v, products="float32"))
        print(json.dumps({"case": name, "shape": f"q {list(q.shape)} k {list(k.shape)}", "sdpa_fp32_s": round(sdpa_s, 4),
                          "fused_s": round(fused_s, 4), "ratio": round(fused_s / sdpa_s, 3),
                          "rel_err": float(f"{float((out - ref).norm() / ref.norm()):.2e}"),
                          "max_abs_err": float(f"{float((out - ref).abs().max()):.2e}"),
                          # int8 products (the int8 path's default): time against the bf16 kernel, error vs SDPA
                          "int8_products_s": round(int8_s, 4), "int8_vs_bf16": round(int8_s / fused_s, 3),
                          "int8_rel_err": float(f"{float((out8 - ref).norm() / ref.norm()):.2e}"),
                          "int8_max_abs_err": float(f"{float((out8 - ref).abs().max()):.2e}"),
                          # float32 products (the exact path's attention): time and error against SDPA
                          "float32_products_s": round(float32_s, 4), "float32_vs_sdpa": round(float32_s / sdpa_s, 3),
                          "float32_max_abs_err": float(f"{float((out32 - ref).abs().max()):.2e}"),
                          "ref_max_abs": round(float(ref.abs().max()), 3)}), flush=True)


def fused_step(args):
    """The int8 UNet of ``--out`` compiled by optimize() with attention through torch's SDPA and through the fused
    CPU kernel (its default where it runs), plus fp32 eager from ``--folder`` with ``--with-fp32``; one process,
    interleaved, one CFG step per latent size: times, ratios, the step's change from the kernel."""
    from diffusekit import UNet2DConditionModel

    models = {}
    if args.with_fp32:
        models["fp32_eager"] = UNet2DConditionModel.from_pretrained(args.folder, subfolder="unet")
    for name in args.attention:
        model = UNet2DConditionModel.from_pretrained(args.out)
        if name == "sdpa":
            model.disable_cpu_fused_attention()
        elif not model.enable_cpu_fused_attention():
            sys.exit("the fused CPU attention kernel is unavailable here")
        models[f"int8_{name}"] = model.optimize()
    with torch.no_grad():
        for latent in args.latents:
            x = inputs(latent, seed=7)
            outs, result = {}, {}
            for name, model in models.items():
                start = time.perf_counter()
                outs[name] = model(**x).sample
                result[f"{name}_first_call_s"] = round(time.perf_counter() - start, 1)
            times = {name: [] for name in models}
            for _ in range(args.repeat):
                for name, model in models.items():
                    start = time.perf_counter()
                    model(**x)
                    times[name].append(time.perf_counter() - start)
            med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
            result.update({f"{k}_s": round(v, 3) for k, v in med.items()})
            base = "fp32_eager" if "fp32_eager" in med else None
            for name in med:
                if base and name != base:
                    result[f"{name}_ratio_to_fp32"] = round(med[name] / med[base], 3)
            if "int8_sdpa" in outs and "int8_fused" in outs:
                a, b = outs["int8_sdpa"], outs["int8_fused"]
                result["fused_vs_sdpa_time"] = round(med["int8_fused"] / med["int8_sdpa"], 3)
                result["fused_vs_sdpa_rel_err"] = float(f"{float((b - a).norm() / a.norm()):.2e}")
            print(latent, json.dumps(result), flush=True)


_WINOGRAD = ("diffusekit.models.winograd", "Conv2d", "winograd")  # Winograd vs direct 3x3 convolutions
_GEMM = ("diffusekit.models.winograd", "Conv2d", "gemm")  # one matrix product vs direct on the smallest images
_UPSAMPLE = ("diffusekit.models.resnet", "Upsample2D", "fused_upsample")  # upsampling fused into the convolution
#: exact_step's choices: layer classes and their switches (each turned on by optimize() where it runs), or the
#: inductor options that turn a default off (a second model, compiled with them)
EXACT_CHOICES = {
    "onednn": {"post_grad_custom_post_pass": None},  # float32 matrix products on oneDNN vs MKL (cpu_matmul)
    "attention": [("diffusekit.models.attention", "Attention", "cpu_exact_attention")],  # kernel vs SDPA
    "winograd": [_WINOGRAD],
    "gemm": [_GEMM],
    "upsample": [_UPSAMPLE],
    "gemm-upsample": [_GEMM, _UPSAMPLE],  # both against the direct convolution on small images and upsampling
}


def exact_step(args):
    """The fp32 UNet of ``--folder`` under ``optimize()`` (the exact path), one of its defaults (``--choice``) on and
    off: the attention through the kernel's float32 products or torch's SDPA (``Attention.cpu_exact_attention``), or
    the 3x3 convolutions through Winograd or oneDNN's direct one (``winograd.Conv2d.winograd``), on the smallest
    images through one matrix product or the direct one (``winograd.Conv2d.gemm``), or the upsamplers' convolution
    before the upsampling or after it (``Upsample2D.fused_upsample``); ``--choice gemm-upsample`` switches the last two
    together; ``--choice onednn``: the float32 matrix products on oneDNN or MKL (``diffusekit.cpu_matmul``: a second
    model, compiled without it, on the same weights). One process, the two settings interleaved (each is its own
    package); time per step and the outputs' difference."""
    import importlib

    from diffusekit import AutoencoderKL, UNet2DConditionModel

    def load(options=None):
        if args.model == "vae":
            return AutoencoderKL.from_pretrained(args.folder, subfolder="vae").optimize(options=options)
        return UNet2DConditionModel.from_pretrained(args.folder, subfolder="unet").optimize(options=options)

    choice = EXACT_CHOICES[args.choice]
    models = {True: load()}
    if isinstance(choice, dict):  # options: a second model (the same memory-mapped weights) compiled with them
        models[False] = load(choice)
        switches = []
    else:
        models[False] = models[True]
        switches = [(getattr(importlib.import_module(module), cls), switch) for module, cls, switch in choice]
    layers = [(m, switch) for kind, switch in switches for m in models[True].modules() if isinstance(m, kind)]
    model = models[True]

    def run(x):
        if args.model == "vae":
            return model.decode(x["sample"][:1]).sample  # one 4 x latents² latent
        return model(**x).sample

    def choose(on: bool) -> None:
        nonlocal model
        model = models[on]
        for layer, switch in layers:
            setattr(layer, switch, on)

    with torch.no_grad():
        for latent in args.latents:
            x = inputs(latent, seed=7)
            outs, times = {}, {True: [], False: []}
            result = {"model": args.model, "choice": args.choice, "latents": latent}
            for on in (True, False):
                choose(on)
                start = time.perf_counter()
                outs[on] = run(x)
                result[f"{'on' if on else 'off'}_first_call_s"] = round(time.perf_counter() - start, 1)
            for _ in range(args.repeat):
                for on in (True, False):
                    choose(on)
                    start = time.perf_counter()
                    run(x)
                    times[on].append(time.perf_counter() - start)
            med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
            diff = outs[True] - outs[False]
            result.update({"on_s": round(med[True], 3), "off_s": round(med[False], 3),
                           "on_calls_s": [round(t, 2) for t in times[True]],
                           "off_calls_s": [round(t, 2) for t in times[False]],
                           "on_vs_off_time": round(med[True] / med[False], 3),
                           "max_abs_diff_rel": float(f"{float(diff.abs().max() / outs[False].abs().max()):.2e}")})
            print(json.dumps(result), flush=True)


def memory_child(args):
    from diffusekit import UNet2DConditionModel

    torch.set_num_threads(2)
    model = UNet2DConditionModel.from_pretrained(args.folder if args.variant == "fp32" else args.out,
                                                 **({"subfolder": "unet"} if args.variant == "fp32" else {}))
    loaded = peak_mb()
    if args.variant == "int8":
        model = compiled(model)
    with torch.no_grad():
        model(**inputs(args.latents[0]))
    print(json.dumps({"variant": args.variant, "peak_after_load_mb": round(loaded), "peak_mb": round(peak_mb())}))


def memory(args):
    weights = (Path(args.folder) / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size / 2**20
    int8_file = (Path(args.out) / "diffusion_pytorch_model.safetensors").stat().st_size / 2**20
    print(json.dumps({"fp32_weight_file_mb": round(weights), "int8_weight_file_mb": round(int8_file)}))
    for variant in args.variants:
        out = subprocess.run([sys.executable, "-m", "benchmarks.bench_int8_speed", "memory-child", "--variant",
                              variant, "--folder", args.folder, "--out", args.out, "--latents",
                              str(args.latents[0])], capture_output=True, text=True, env=os.environ)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        if not line:
            print(out.stderr[-2000:])
            continue
        row = json.loads(line[-1])
        row["peak_vs_fp32_file"] = round(row["peak_mb"] / weights, 3)
        print(json.dumps(row), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("step", choices=["build", "time", "vae", "profile", "attention", "fused", "exact", "memory",
                                         "memory-child"])
    parser.add_argument("--folder", default=".bench/sd15-random")
    parser.add_argument("--out", help="the int8 UNet's folder (every step but exact)")
    parser.add_argument("--latents", type=int, nargs="*", default=[32, 64])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eager-int8", action="store_true", help="also compare compiled int8 with eager int8")
    parser.add_argument("--variant", default="int8")
    parser.add_argument("--attention", nargs="*", default=["sdpa", "fused"], choices=["sdpa", "fused"],
                        help="fused: the int8 UNet's attention variants to time")
    parser.add_argument("--with-fp32", action="store_true", help="fused: also time fp32 eager (--folder)")
    parser.add_argument("--variants", nargs="*", default=["fp32", "int8", "int8-eager"])
    parser.add_argument("--choice", default="attention", choices=sorted(EXACT_CHOICES),
                        help="exact: the default to switch on and off")
    parser.add_argument("--model", default="unet", choices=["unet", "vae"],
                        help="exact: the UNet's CFG step, or the VAE's decode of one latent")
    args = parser.parse_args()
    if args.out is None and args.step != "exact":
        parser.error(f"{args.step} needs --out")
    torch.set_num_threads(args.threads)
    steps = {"build": build, "time": timing, "vae": vae, "profile": profile, "attention": attention,
             "fused": fused_step, "exact": exact_step, "memory": memory, "memory-child": memory_child}
    steps[args.step](args)


if __name__ == "__main__":
    main()
