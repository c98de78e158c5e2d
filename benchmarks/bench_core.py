"""Issue "core": diffusekit vs diffusers on the unconditional DDPM stack, same weights, one process.

Benchmarks (names for ``--only``):

- ``import``   ``import X`` and ``import X`` + first use (``X.UNet2DModel``, ``X.DDPMScheduler``, ``X.DDPMPipeline``),
               each in a fresh ``python -c`` process, timed inside the process (interpreter start-up excluded).
- ``load``     ``UNet2DModel.from_pretrained(folder, use_safetensors=True)`` of google/ddpm-cat-256's exact UNet
               config with random weights (~114M parameters, 455 MB safetensors); time in-process (page cache warm),
               peak RSS in fresh child processes.
- ``forward``  one ``UNet2DModel`` forward (batch 1, no grad) at 64x64 (``--forward-size`` to change; 256 is the
               config's own size).
- ``pipeline`` ``DDPMPipeline(num_inference_steps=25, output_type="np")`` with the same UNet at a small sample size
               (``--pipeline-size``, default 64).

Run ``python -m benchmarks.bench_core`` from the repository root (``--quick`` checks the harness on tiny configs).
"""

from __future__ import annotations

import sys

from .common import (
    OURS, THEIRS, Report, cached_folder, common_args, emit, interleaved, interleaved_children, max_abs_diff,
    peak_rss_kb, process_peak_kb, quiet_environment, reset_peak_rss, rss_kb, run_benchmarks, set_threads,
)

#: google/ddpm-cat-256 unet/config.json (also ddpm-church-256 / ddpm-bedroom-256): 113.7M parameters
CAT_UNET = {
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 128, 256, 256, 512, 512],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D",
                         "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"],
}
#: google/ddpm-cat-256 scheduler/scheduler_config.json
CAT_SCHEDULER = {
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "clip_sample": True,
    "num_train_timesteps": 1000,
    "trained_betas": None,
    "variance_type": "fixed_small",
}
#: --quick: same block layout, 32-64 channels (64 at the 1x1 levels: GroupNorm needs >1 value per group)
QUICK_UNET = {**CAT_UNET, "block_out_channels": [32, 32, 32, 32, 64, 64], "sample_size": 32}

LIBS = (OURS, THEIRS)


def unet_config(quick: bool, sample_size: int | None = None) -> dict:
    config = dict(QUICK_UNET if quick else CAT_UNET)
    if sample_size is not None:
        config["sample_size"] = sample_size
    return config


def build_unet(folder, config) -> None:
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    UNet2DModel(**config).save_pretrained(folder, safe_serialization=True)


def build_ddpm_pipeline(folder, config) -> None:
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    pipe = DDPMPipeline(unet=UNet2DModel(**config), scheduler=DDPMScheduler(**CAT_SCHEDULER))
    pipe.save_pretrained(folder, safe_serialization=True)


def library(name: str):
    if name == OURS:
        import diffusekit as lib
    else:
        import diffusers as lib
    return lib


# ---------------------------------------------------------------------------------------------------- children

IMPORT_CODE = """\
import time
c0, t0 = time.process_time(), time.perf_counter()
import {lib} as lib
c1, t1 = time.process_time(), time.perf_counter()
for name in {names!r}:
    getattr(lib, name)
c2, t2 = time.process_time(), time.perf_counter()
hwm = 0
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        hwm = int(line.split()[1])
import json, sys
print({tag!r} + json.dumps({{"import": t1 - t0, "first_use": t2 - t0, "import_cpu": c1 - c0,
                            "first_use_cpu": c2 - c0, "peak_kb": hwm,
                            "torch_loaded": "torch" in sys.modules}}))
"""


def import_argv(lib: str, names: tuple[str, ...]) -> list[str]:
    from .common import RESULT_TAG

    return ["-c", IMPORT_CODE.format(lib=lib, names=names, tag=RESULT_TAG)]


def child_load(lib_name: str, path: str, threads: int, size: int) -> None:
    """Child: import, reset the peak, load the UNet (timed, peak RSS), then one forward at ``size`` (peak RSS).

    safetensors loads map the file: weights become resident when first read, so the forward's peak is the honest
    "memory to use the model" number; the load's own peak only shows the extra copies a loader makes.
    """
    import time

    import torch

    set_threads(threads)
    lib = library(lib_name)
    cls = lib.UNet2DModel
    base = rss_kb()
    reset = reset_peak_rss()
    cpu, start = time.process_time(), time.perf_counter()
    model = cls.from_pretrained(path, use_safetensors=True)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    load_peak, after_load = peak_rss_kb(), rss_kb()
    x = torch.randn(1, model.config.in_channels, size, size)
    with torch.no_grad():
        model(x, torch.tensor([500]))
    emit({"time": seconds, "cpu": cpu, "base_kb": base, "load_peak_kb": load_peak, "after_load_kb": after_load,
          "peak_kb": peak_rss_kb(), "reset": reset, "process_peak_kb": process_peak_kb(),
          "torch": torch.__version__})


# ---------------------------------------------------------------------------------------------------- benchmarks


def bench_import(report: Report, args) -> None:
    names = ("UNet2DModel", "DDPMScheduler", "DDPMPipeline")
    repeat = args.repeat or (2 if args.quick else 7)
    runs = interleaved_children({lib: import_argv(lib, names) for lib in LIBS}, repeat=repeat, warmup=1)
    from .common import Stats

    for key, label in (("import", "`import X`"), ("first_use", "`import X` + first use of 3 names")):
        stats = {lib: Stats([r[key] for r in runs[lib]], [r[key + "_cpu"] for r in runs[lib]]) for lib in LIBS}
        note = ""
        if key == "import":
            note = "torch imported: " + ", ".join(f"{lib} {runs[lib][0]['torch_loaded']}" for lib in LIBS)
        report.time_row(label, stats, target=0.3, note=note)
    report.memory_row("RSS after import + first use", [r["peak_kb"] for r in runs[OURS]],
                      [r["peak_kb"] for r in runs[THEIRS]], target=None)


def bench_load(report: Report, args) -> None:
    import torch

    config = unet_config(args.quick)
    folder = cached_folder(args.workdir, "ddpm-cat-unet" + ("-quick" if args.quick else ""), config,
                           lambda f: build_unet(f, config))
    ours_cls, theirs_cls = library(OURS).UNet2DModel, library(THEIRS).UNet2DModel
    repeat = args.repeat or (2 if args.quick else 7)
    stats = interleaved({
        OURS: lambda: ours_cls.from_pretrained(folder, use_safetensors=True),
        THEIRS: lambda: theirs_cls.from_pretrained(folder, use_safetensors=True),
    }, repeat=repeat, warmup=1)
    ours, theirs = ours_cls.from_pretrained(folder), theirs_cls.from_pretrained(folder)
    n_params = sum(p.numel() for p in ours.parameters())
    theirs_sd = theirs.state_dict()
    same = all(torch.equal(v, theirs_sd[k]) for k, v in ours.state_dict().items())
    report.time_row("UNet2DModel.from_pretrained (in-process, warm cache)", stats,
                    note=f"{n_params / 1e6:.1f}M params; identical weights: {same}")
    del ours, theirs

    mem_repeat = 2 if args.quick else 3
    size = 32 if args.quick else args.forward_size
    cases = {lib: ["-m", "benchmarks.bench_core", "--child", "load", "--lib", lib, "--path", str(folder),
                   "--threads", str(args.threads), "--forward-size", str(size)] for lib in LIBS}
    runs = interleaved_children(cases, repeat=mem_repeat)
    from .common import Stats

    report.time_row("UNet2DModel.from_pretrained (fresh process)",
                    {lib: Stats([r["time"] for r in runs[lib]], [r["cpu"] for r in runs[lib]]) for lib in LIBS})
    note = "VmHWM reset after imports" if runs[OURS][0]["reset"] else "whole-process peak"
    report.memory_row("peak RSS during load (fresh process)", [r["load_peak_kb"] for r in runs[OURS]],
                      [r["load_peak_kb"] for r in runs[THEIRS]], note=note + "; safetensors maps the file")
    size = 32 if args.quick else args.forward_size
    report.memory_row(f"peak RSS: load + one {size}x{size} forward", [r["peak_kb"] for r in runs[OURS]],
                      [r["peak_kb"] for r in runs[THEIRS]], note=note)
    report.memory_row("RSS growth: load + forward", [r["peak_kb"] - r["base_kb"] for r in runs[OURS]],
                      [r["peak_kb"] - r["base_kb"] for r in runs[THEIRS]], target=None,
                      note=f"fp32 weights: {n_params * 4 / 2**20:.0f} MiB")


def bench_forward(report: Report, args) -> None:
    import torch

    config = unet_config(args.quick)
    folder = cached_folder(args.workdir, "ddpm-cat-unet" + ("-quick" if args.quick else ""), config,
                           lambda f: build_unet(f, config))
    size = 32 if args.quick else args.forward_size
    ours = library(OURS).UNet2DModel.from_pretrained(folder, use_safetensors=True)
    theirs = library(THEIRS).UNet2DModel.from_pretrained(folder, use_safetensors=True)
    x = torch.randn(1, config["in_channels"], size, size, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])

    def run(model):
        with torch.no_grad():
            return model(x, t).sample

    diff = max_abs_diff(run(ours), run(theirs))
    repeat = args.repeat or (2 if args.quick else (10 if size <= 64 else 3))
    stats = interleaved({OURS: lambda: run(ours), THEIRS: lambda: run(theirs)}, repeat=repeat, warmup=1)
    report.time_row(f"UNet2DModel forward {size}x{size}, batch 1", stats, note=f"max abs diff {diff:.1e}")


def bench_pipeline(report: Report, args) -> None:
    import torch

    size = 32 if args.quick else args.pipeline_size
    config = unet_config(args.quick, sample_size=size)
    folder = cached_folder(args.workdir, f"ddpm-cat-pipeline-{size}" + ("-quick" if args.quick else ""),
                           {"unet": config, "scheduler": CAT_SCHEDULER}, lambda f: build_ddpm_pipeline(f, config))
    pipes = {}
    for lib in LIBS:
        pipe = library(lib).DDPMPipeline.from_pretrained(folder, use_safetensors=True)
        pipe.set_progress_bar_config(disable=True)
        pipes[lib] = pipe
    steps = 25

    def run(lib):
        return pipes[lib](num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                          output_type="np").images

    diff = max_abs_diff(run(OURS), run(THEIRS))
    repeat = args.repeat or (1 if args.quick else 3)
    stats = interleaved({lib: (lambda lib=lib: run(lib)) for lib in LIBS}, repeat=repeat, warmup=0 if not args.quick
                        else 1)
    report.time_row(f"DDPMPipeline {steps} steps at {size}x{size}", stats,
                    note=f"max abs diff of images {diff:.1e}")


BENCHMARKS = {"import": bench_import, "load": bench_load, "forward": bench_forward, "pipeline": bench_pipeline}


def main(argv: list[str] | None = None) -> None:
    parser = common_args(__doc__.split("\n\n")[0])
    parser.add_argument("--forward-size", type=int, default=64, help="UNet forward size (default 64; config: 256)")
    parser.add_argument("--pipeline-size", type=int, default=64, help="DDPM pipeline sample size (default 64)")
    parser.add_argument("--child", default=None, help=argparse_hidden())
    parser.add_argument("--lib", default=None, help=argparse_hidden())
    parser.add_argument("--path", default=None, help=argparse_hidden())
    args = parser.parse_args(argv)
    quiet_environment(args.threads)
    if args.child == "load":
        child_load(args.lib, args.path, args.threads, args.forward_size)
        return
    set_threads(args.threads)
    report = Report("core: DDPM stack (google/ddpm-cat-256 UNet config, random weights)", args,
                    ["-m", "benchmarks.bench_core", *(sys.argv[1:] if argv is None else argv)])
    run_benchmarks(BENCHMARKS, report, args)


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
