"""Issue 13: first call and warm start of optimize() (AOTInductor packages), SD 1.5 UNet step.

One fresh process per run (``--variant``): ``eager`` (fp32 reference; saves its output), ``exact`` (fp32,
the default ``optimize()``: no freezing, a bound AOTInductor package running on the model's own weights), ``compile``
(fp32, ``optimize(packages=False)``: ``torch.compile`` in every process, inductor's FX-graph cache), ``frozen``
(fp32, ``optimize(options={"freezing": True})``: an AOTInductor package holding the weights) or ``int8`` (the int8
UNet folder + ``optimize()``: an AOTInductor package). A compiled variant
run twice in a row shows the cold first call (builds the package) and the warm start (loads it). Each run prints
one JSON line: load time, first-call time, median of the warm calls, relative error to the eager output (max |diff| /
max |eager|, once the eager run saved it), the peak RSS of the process (``VmHWM``) and optimize()'s counters.

    python -m benchmarks.bench_warm_start --variant eager  --folder .bench/sd15-random
    python -m benchmarks.bench_warm_start --variant exact  --folder .bench/sd15-random --cache /tmp/dk-cache  # twice
    python -m benchmarks.bench_warm_start --variant frozen --folder .bench/sd15-random --cache /tmp/dk-cache  # twice
    python -m benchmarks.bench_warm_start --variant int8   --folder .bench/sd15-random-int8 --cache /tmp/dk-cache

``--size 32`` (latents; 256² images) or ``64`` (512²); batch 2 (the CFG batch), 77x768 context, 2 threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from .common import peak_rss_kb, set_threads


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=("eager", "exact", "compile", "frozen", "int8"), required=True)
    parser.add_argument("--folder", required=True, help="a diffusers-format SD folder (its unet/ is loaded)")
    parser.add_argument("--cache", default=None, help="compile cache folder (default: diffusekit's)")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--calls", type=int, default=3, help="warm calls after the first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reference", default="/tmp/bench_warm_start_eager.pt")
    parser.add_argument("--return-dict-false", action="store_true",
                        help="the warm calls pass return_dict=False (checks they share the package)")
    args = parser.parse_args(argv)

    import torch

    import diffusekit
    from diffusekit.optimize import compiled_call

    set_threads(args.threads)
    started = time.perf_counter()
    model = diffusekit.UNet2DConditionModel.from_pretrained(args.folder, subfolder="unet", use_safetensors=True)
    if args.variant == "frozen":
        model.optimize(cache_dir=args.cache, options={"freezing": True})
    elif args.variant == "compile":  # no freezing, torch.compile in this process
        model.optimize(cache_dir=args.cache, packages=False)
    elif args.variant in ("exact", "int8"):  # the default optimize(): a bound package (fp32), a frozen one (int8)
        model.optimize(cache_dir=args.cache)
    load = time.perf_counter() - started
    gen = torch.Generator().manual_seed(0)
    cfg = model.config
    inputs = (torch.randn(2, cfg.in_channels, args.size, args.size, generator=gen), torch.tensor(500),
              torch.randn(2, 77, cfg.cross_attention_dim, generator=gen))

    def call(as_tuple=False):
        with torch.no_grad():
            if as_tuple:
                return model(inputs[0], inputs[1], encoder_hidden_states=inputs[2], return_dict=False)[0]
            return model(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample

    start = time.perf_counter()
    out = call()
    first = time.perf_counter() - start
    warm = []
    for _ in range(args.calls):
        start = time.perf_counter()
        out = call(args.return_dict_false)
        warm.append(time.perf_counter() - start)
    reference = Path(f"{args.reference}.{args.size}")
    rel = None
    if args.variant == "eager":
        torch.save(out, reference)
    elif reference.exists():
        expected = torch.load(reference, weights_only=True)
        rel = ((out - expected).abs().max() / expected.abs().max()).item()
    call_stats = compiled_call(model)
    print(json.dumps({"variant": args.variant, "size": args.size, "load_s": round(load, 2),
                      "first_s": round(first, 2), "warm_s": round(statistics.median(warm), 3) if warm else None,
                      "process_s": round(time.perf_counter() - started, 2), "rel_to_eager": rel,
                      "peak_mib": round(peak_rss_kb() / 1024),
                      "stats": {k: round(v, 2) for k, v in (call_stats.stats if call_stats else {}).items()}}))


if __name__ == "__main__":
    main()
