"""Issue 13: the CPU paths side by side on Stable Diffusion 1.5-sized components, same weights.

Variants (each row runs every variant, one fresh child process per variant, in the same run):

- ``diffusers``  diffusers eager fp32 (the reference).
- ``eager``      diffusekit eager fp32 (the default).
- ``exact``      diffusekit ``optimize()``: the compiled exact path (outputs within 1e-5 relative of eager).
- ``int8``       diffusekit int8 UNet (``pipe.quantize`` once, saved, reloaded from disk) + ``optimize()``.
- ``int8-vae``   the same with the VAE decoder quantized too (``components=("unet", "vae")``); not in the default set.
- ``int8-vae-deepcache``  ``int8-vae`` with DeepCache feature reuse (``pipe.enable_deep_cache()``: interval 3, branch
               0, the recommended setting of BENCHMARKS.md "DeepCache"): end to end only, not in the default set. Less
               UNet work per image, not faster UNet work: an opt-in step saving, its quality measured on the bundled
               model, not a like-for-like comparison with diffusers.
- ``openvino``, ``openvino-int8``  external references, UNet and VAE rows only, not in the default set: diffusers'
  model converted with ``openvino.convert_model`` and compiled at f32 precision (its default on this CPU is bf16,
  slower here), and that model quantized by NNCF (weights + activations, 8 calibration inputs). OpenVINO is not a
  diffusekit dependency: install it beside the venv, e.g. ``pip install --target .bench/site-openvino openvino nncf``
  (plus nncf's requirements, ``--no-deps`` keeps the venv's own packages) and run with
  ``PYTHONPATH=.bench/site-openvino``.

Rows (names for ``--only``):

- ``unet256``  one UNet2DConditionModel step, batch 2 (the CFG batch), 77x768 context, latents 32x32.
- ``unet512``  the same at 64x64 latents.
- ``vae512``   AutoencoderKL.decode of a 4x64x64 latent (512² image), batch 1 (int8 keeps the VAE in float).
- ``e2e512``   StableDiffusionPipeline 512², ``--steps`` steps (25), CFG 7.5: the first call in a fresh process
               (which pays compiling, or loading compiled code from the persistent cache) and a warm second call.

Every child reports the time of its first call, the median of its warm calls, its output (compared with diffusers':
relative error = max |ours - theirs| / max |theirs|) and the peak RSS of the whole process (``VmHWM``: load + all
calls), also shown as a multiple of the fp32 UNet weight file. Compiled variants run two children per row: the
first with the compile cache as the row found it (for the first row: empty, so its first call is the cold compile),
the second with the cache warm; both first-call times are reported. End to end, each variant runs one child: eager
ones one call, compiled ones a first call (with the caches the UNet and VAE rows left, so the text encoder compiles
cold there) and a warm call.

    python -m benchmarks.bench_cpu_paths [--only unet256,unet512,vae512,e2e512] [--steps 25] [--json F]

``--quick`` checks the harness on tiny configs in a minute or two. The random-weight checkpoints (fp32, and the
int8 one made from it) are cached under ``--workdir``; the compile cache lives in ``WORKDIR/compile-cache`` (and is
emptied at the start unless ``--keep-cache``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from .bench_sd import PROMPT, configs, sd_folder
from .common import (
    OURS, THEIRS, cached_folder, common_args, emit, fmt_mib, fmt_time, machine_info, peak_rss_kb, quiet_environment,
    run_child, selected, set_threads,
)

VARIANTS = (THEIRS, "eager", "exact", "int8")
OPTIONAL = ("int8-vae", "int8-vae-deepcache")
#: variants that run only end to end (step savings act across the steps of a pipeline call)
E2E_ONLY = ("int8-vae-deepcache",)
EXTERNAL = ("openvino", "openvino-int8")
COMPILED = ("exact", "int8", "int8-vae", "int8-vae-deepcache")
#: int8 variant -> the components pipe.quantize() quantizes
INT8_COMPONENTS = {"int8": ("unet",), "int8-vae": ("unet", "vae")}
ROWS = ("unet256", "unet512", "vae512", "e2e512")


# ---------------------------------------------------------------------------------------------------- checkpoints


def int8_folder(args, variant: str = "int8") -> Path:
    """The fp32 folder with its UNet (and for ``int8-vae`` its VAE) quantized by diffusekit (calibrated on a short
    256² run), saved and reused."""
    fp32 = sd_folder(args)
    size = 64 if args.quick else 256
    components = INT8_COMPONENTS[variant]
    recipe = {"from": str(fp32), "size": size, "steps": 4, "prompts": [PROMPT, "a red car"], "version": 1,
              **({"components": list(components)} if components != ("unet",) else {})}

    def build(folder: Path) -> None:
        import diffusekit

        set_threads(args.threads)
        pipe = diffusekit.StableDiffusionPipeline.from_pretrained(fp32, use_safetensors=True)
        pipe.set_progress_bar_config(disable=True)
        pipe.quantize(prompts=recipe["prompts"], num_inference_steps=recipe["steps"], height=size, width=size,
                      components=components)
        pipe.save_pretrained(folder)

    return cached_folder(args.workdir, fp32.name + "-" + variant, recipe, build)


# ---------------------------------------------------------------------------------------------------- child


def _inputs(row: str, quick: bool):
    import torch

    cfg = configs(quick)
    gen = torch.Generator().manual_seed(0)
    if row.startswith("unet"):
        size = {"unet256": 32, "unet512": 64}[row] // (4 if quick else 1)
        return (torch.randn(2, cfg["unet"]["in_channels"], size, size, generator=gen), torch.tensor(500),
                torch.randn(2, 77, cfg["unet"]["cross_attention_dim"], generator=gen))
    if row == "vae512":
        size = 16 if quick else 64
        return (torch.randn(1, 4, size, size, generator=gen),)
    return ()


def _openvino(row: str, variant: str, path: str, inputs):
    """diffusers' model converted and compiled by OpenVINO; a callable with the PyTorch model's call shape."""
    import diffusers
    import openvino as ov
    import torch

    class Wrapped(torch.nn.Module):  # a plain tensor out, as convert_model wants
        def __init__(self):
            super().__init__()
            if row.startswith("unet"):
                self.model = diffusers.UNet2DConditionModel.from_pretrained(path, subfolder="unet",
                                                                            use_safetensors=True)
            else:
                self.model = diffusers.AutoencoderKL.from_pretrained(path, subfolder="vae", use_safetensors=True)

        def forward(self, *args):
            if row.startswith("unet"):
                return self.model(args[0], args[1], encoder_hidden_states=args[2]).sample
            return self.model.decode(args[0]).sample

    module = Wrapped().eval().requires_grad_(False)
    example = inputs
    with torch.no_grad():
        ov_model = ov.convert_model(module, example_input=example)
    del module
    if variant == "openvino-int8":
        import nncf

        gen = torch.Generator().manual_seed(1)
        calib = [tuple(torch.randn(x.shape, generator=gen) if x.dim() else torch.tensor(100 * (i + 1))
                       for x in example) for i in range(8)]
        ov_model = nncf.quantize(ov_model, nncf.Dataset(calib, lambda item: tuple(x.numpy() for x in item)),
                                 model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calib))
    compiled = ov.Core().compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})

    def call(*args):
        return torch.from_numpy(compiled([a.numpy() for a in args])[0])

    return call


def _load(row: str, variant: str, path: str, inputs=(), reuse_memory: bool = True):
    if variant in EXTERNAL:
        return _openvino(row, variant, path, inputs)
    if variant == THEIRS:
        import diffusers as lib
    else:
        import diffusekit as lib
    if row.startswith("unet"):
        model = lib.UNet2DConditionModel.from_pretrained(path, subfolder="unet", use_safetensors=True)
    elif row == "vae512":
        model = lib.AutoencoderKL.from_pretrained(path, subfolder="vae", use_safetensors=True)
    else:
        model = lib.StableDiffusionPipeline.from_pretrained(path, use_safetensors=True)
        model.set_progress_bar_config(disable=True)
        if variant.endswith("-deepcache"):
            model.enable_deep_cache()
    if variant in COMPILED:
        model.optimize(reuse_memory=reuse_memory)
    return model


def child(args) -> None:
    import torch
    from safetensors.torch import save_file

    set_threads(args.threads)
    inputs = _inputs(args.row, args.quick)
    start = time.perf_counter()
    model = _load(args.row, args.variant, args.path, inputs, reuse_memory=not args.no_reuse_memory)
    load_time = time.perf_counter() - start

    def call():
        with torch.no_grad():
            if args.variant in EXTERNAL:
                return model(*inputs)
            if args.row.startswith("unet"):
                return model(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample
            if args.row == "vae512":
                return model.decode(inputs[0]).sample
            size = 64 if args.quick else 512
            images = model(PROMPT, height=size, width=size, num_inference_steps=args.steps, guidance_scale=7.5,
                           generator=torch.Generator().manual_seed(0), output_type="np").images
            return torch.from_numpy(images)

    start = time.perf_counter()
    out = call()
    first = time.perf_counter() - start
    warm = []
    for _ in range(args.calls if args.calls is not None else 3):
        start = time.perf_counter()
        out = call()
        warm.append(time.perf_counter() - start)
    save_file({"out": out.detach().float().contiguous()}, args.out)
    emit({"load": load_time, "first": first, "warm": warm, "peak_kb": peak_rss_kb()})


# ---------------------------------------------------------------------------------------------------- parent


def _weights_kb(folder: Path) -> float:
    return (folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size / 1024


def run_row(row: str, args, folders: dict[str, Path], results: list[dict]) -> None:
    import torch
    from safetensors.torch import load_file

    e2e = row == "e2e512"
    outs: dict[str, torch.Tensor] = {}
    line = {"row": row, "variants": {}}
    for variant in args.variants:
        if (variant in EXTERNAL and e2e) or (variant in E2E_ONLY and not e2e):
            continue
        compiled = variant in COMPILED
        # end to end, eager variants take one call (their first call is a warm one), compiled ones a second, warm
        # call, in one child: the UNet and VAE rows before it have already measured cold compiles
        calls = args.calls if args.calls is not None else ((1 if compiled else 0) if e2e else 3)
        runs = []
        for attempt in range(2 if compiled and not e2e else 1):
            out_file = Path(args.workdir) / f"out-{row}-{variant}.safetensors"
            argv = ["-m", "benchmarks.bench_cpu_paths", "--child", "--row", row, "--variant", variant,
                    "--path", str(folders[variant]), "--out", str(out_file), "--threads", str(args.threads),
                    "--steps", str(args.steps), "--calls", str(calls), "--workdir", args.workdir,
                    *(["--quick"] if args.quick else []), *(["--no-reuse-memory"] if args.no_reuse_memory else [])]
            print(f"  {row} {variant} run {attempt + 1} ...", flush=True)
            runs.append(run_child(argv, timeout=3600))
            outs[variant] = load_file(out_file)["out"]
        last = runs[-1]
        line["variants"][variant] = {
            "load": last["load"], "first_cold": runs[0]["first"], "first": last["first"],
            "warm": statistics.median(last["warm"]) if last["warm"] else last["first"],
            "warm_all": last["warm"], "peak_kb": max(r["peak_kb"] for r in runs), "runs": runs,
        }
    ref = outs[THEIRS] if THEIRS in outs else outs.get("eager")  # the reference: diffusers, else our eager
    for variant, out in outs.items():
        v = line["variants"][variant]
        v["rel_err"] = None if ref is None else float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        base = line["variants"].get(THEIRS)
        v["ratio"] = v["warm"] / base["warm"] if base else None
        v["weights_ratio"] = v["peak_kb"] / _weights_kb(args.fp32_folder)
        ratio = "-" if v["ratio"] is None else f"{v['ratio']:.2f}"
        print(f"    {variant}: warm {fmt_time(v['warm'])} first {fmt_time(v['first'])} "
              f"(cold {fmt_time(v['first_cold'])}) peak {fmt_mib(v['peak_kb'])} ratio {ratio} "
              f"rel err {v['rel_err']}", flush=True)
    results.append(line)


ROW_TITLES = {
    "unet256": "UNet step, latents 32x32 (256²), batch 2",
    "unet512": "UNet step, latents 64x64 (512²), batch 2",
    "vae512": "VAE decode 64x64 -> 512², batch 1",
    "e2e512": "text-to-image 512², {steps} steps, CFG 7.5",
}


def markdown(results: list[dict], args, command: str, info: dict) -> str:
    variants = list(args.variants)
    head = "| row | " + " | ".join(variants) + " |"
    lines = [f"`{command}`", "", "Time (ratio to diffusers), then first call in a fresh process (cold cache / warm "
             "cache), peak RSS of the process (x the fp32 UNet weight file), relative error vs diffusers (or vs "
             "diffusekit eager when diffusers is not run).", "",
             head, "|---|" + "---|" * len(variants)]
    for line in results:
        cells = []
        for variant in variants:
            v = line["variants"].get(variant)
            if v is None:
                cells.append("")
                continue
            ratio = "" if v["ratio"] is None else f" ({v['ratio']:.2f}x)"
            first = fmt_time(v["first"])
            if variant in COMPILED and len(v["runs"]) > 1:
                first = f"{fmt_time(v['first_cold'])} / {fmt_time(v['first'])}"
            err = "" if v["rel_err"] is None or variant == THEIRS else f"; err {v['rel_err']:.1e}"
            cells.append(f"{fmt_time(v['warm'])}{ratio}; first {first}; {fmt_mib(v['peak_kb'])} "
                         f"({v['weights_ratio']:.2f}x){err}")
        lines.append(f"| {ROW_TITLES[line['row']].format(steps=args.steps)} | " + " | ".join(cells) + " |")
    lines += ["", f"Machine: {info['cpu']}, {info['usable_cpus']} usable CPUs, torch {info['torch']} "
                  f"({info['torch_threads']} threads), diffusers {info['diffusers']}, diffusekit "
                  f"{info['diffusekit_commit']}; load average at start "
                  f"{', '.join(f'{x:.2f}' for x in info['loadavg_start'])}, at end "
                  f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = common_args(__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=25, help="text-to-image steps (default 25)")
    parser.add_argument("--calls", type=int, default=None, help="warm calls per child (default 3; 1 end to end)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the variants")
    parser.add_argument("--keep-cache", action="store_true", help="keep the compile cache from an earlier run")
    parser.add_argument("--no-reuse-memory", action="store_true",
                        help="optimize(reuse_memory=False): leave malloc as it is (the A/B of docs/PERFORMANCE.md)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--path", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quiet_environment(args.threads)
    cache = Path(args.workdir).resolve() / ("compile-cache" + ("-quick" if args.quick else ""))
    os.environ["DIFFUSEKIT_CACHE_DIR"] = str(cache)
    if args.child:
        child(args)
        return
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    known = VARIANTS + OPTIONAL + EXTERNAL
    unknown = set(args.variants) - set(known)
    if unknown:
        parser.error(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(known)}")
    if cache.exists() and not args.keep_cache:
        shutil.rmtree(cache)
    set_threads(args.threads)
    command = "python -m benchmarks.bench_cpu_paths " + " ".join(sys.argv[1:] if argv is None else argv)
    info = machine_info(args.threads)
    fp32 = args.fp32_folder = sd_folder(args)
    folders = {v: fp32 for v in args.variants}
    for variant in args.variants:
        base = variant.removesuffix("-deepcache")
        if base in INT8_COMPONENTS:
            folders[variant] = int8_folder(args, base)
    results: list[dict] = []
    for row in ROWS:
        if selected(args, row):
            print(f"[{row}]", flush=True)
            run_row(row, args, folders, results)
    text = markdown(results, args, command, info)
    print("\n" + text + "\n", flush=True)
    if args.json:
        import json

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"command": command, "machine": info, "rows": results,
                                               "markdown": text}, indent=2) + "\n")


if __name__ == "__main__":
    main()
