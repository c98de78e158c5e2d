"""Issue "SD text-to-image": diffusekit vs diffusers on Stable Diffusion 1.5-sized components, same weights.

One SD 1.5-shaped folder is built with random weights by diffusers + transformers (UNet 860M, VAE 84M, CLIP text
encoder 123M parameters, the real 49408-token CLIP vocabulary, PNDM scheduler as SD 1.5 ships it) and saved as
``StableDiffusionPipeline.save_pretrained`` writes it (plus ``vocab.json``/``merges.txt``, as Hub checkpoints have).
Both libraries load that folder.

Benchmarks (names for ``--only``):

- ``import``    ``import X`` + ``X.StableDiffusionPipeline`` in fresh processes (diffusers pulls in transformers here).
- ``unet``      one ``UNet2DConditionModel`` step, batch 2 (the classifier-free-guidance batch), 77x768 text context,
                latents 32x32 (256² image) and 64x64 (512² image).
- ``vae``       ``AutoencoderKL.decode`` of a 4x32x32 latent to a 256² image, batch 1.
- ``pipeline``  ``StableDiffusionPipeline(prompt, 256x256, --steps steps, guidance 7.5, output_type="np")``.
- ``memory``    fresh process per library: ``StableDiffusionPipeline.from_pretrained(folder)`` then one 1-step 256²
                call; load time, peak RSS of the load, peak RSS of load + step.

Run ``python -m benchmarks.bench_sd`` from the repository root (``--quick`` checks the harness on tiny configs).
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

from .common import (
    OURS, REPO, THEIRS, Report, Stats, cached_folder, common_args, emit, interleaved, interleaved_children,
    max_abs_diff, peak_rss_kb, process_peak_kb, quiet_environment, reset_peak_rss, rss_kb, run_benchmarks, set_threads,
)

LIBS = (OURS, THEIRS)
PROMPT = "a photograph of an astronaut riding a horse"

#: stable-diffusion-v1-5 unet/config.json (859.5M parameters)
SD15_UNET = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
#: stable-diffusion-v1-5 vae/config.json (83.7M parameters)
SD15_VAE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "norm_num_groups": 32, "out_channels": 3, "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
#: stable-diffusion-v1-5 text_encoder/config.json (openai/clip-vit-large-patch14's text tower, 123M parameters)
SD15_TEXT = {
    "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768,
    "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1,
    "projection_dim": 768, "vocab_size": 49408,
}
#: stable-diffusion-v1-5 scheduler/scheduler_config.json
SD15_SCHEDULER = {
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None,
}

#: --quick: same block types, tiny widths; a 1000-token slice of the CLIP vocabulary (bos 998, eos 999)
QUICK_UNET = {**SD15_UNET, "block_out_channels": [32, 32, 64, 64], "cross_attention_dim": 32, "layers_per_block": 1,
              "attention_head_dim": 4, "sample_size": 8}
QUICK_VAE = {**SD15_VAE, "block_out_channels": [32, 32, 32, 32], "layers_per_block": 1, "sample_size": 64}
QUICK_TEXT = {**SD15_TEXT, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "projection_dim": 32, "vocab_size": 1000, "bos_token_id": 998,
              "eos_token_id": 999, "pad_token_id": 999}
QUICK_MERGES = 486


def configs(quick: bool) -> dict:
    if quick:
        return {"unet": QUICK_UNET, "vae": QUICK_VAE, "text": QUICK_TEXT, "merges": QUICK_MERGES,
                "scheduler": SD15_SCHEDULER}
    return {"unet": SD15_UNET, "vae": SD15_VAE, "text": SD15_TEXT, "merges": None, "scheduler": SD15_SCHEDULER}


def _clip_assets():
    """tests/clip_assets.py (writes a CLIP tokenizer folder from the real vocabulary), loaded by path."""
    spec = importlib.util.spec_from_file_location("_bench_clip_assets", REPO / "tests" / "clip_assets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_sd(folder: Path, cfg: dict) -> None:
    import tempfile

    import diffusers
    import torch
    import transformers

    clip_assets = _clip_assets()
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**cfg["unet"])
    vae = diffusers.AutoencoderKL(**cfg["vae"])
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg["text"])).eval()
    with tempfile.TemporaryDirectory() as tmp:
        clip_assets.write_clip_tokenizer(tmp, num_merges=cfg["merges"])
        tokenizer = transformers.CLIPTokenizer.from_pretrained(tmp)
    scheduler = diffusers.PNDMScheduler.from_config(cfg["scheduler"])  # ignores keys it no longer takes
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    # Hub SD checkpoints carry vocab.json + merges.txt beside tokenizer.json (transformers 5 writes only the latter)
    clip_assets.write_clip_tokenizer(folder / "tokenizer", num_merges=cfg["merges"])


def sd_folder(args) -> Path:
    cfg = configs(args.quick)
    return cached_folder(args.workdir, "sd15-random" + ("-quick" if args.quick else ""), cfg,
                         lambda f: build_sd(f, cfg))


def library(name: str):
    if name == OURS:
        import diffusekit as lib
    else:
        import diffusers as lib
    return lib


def text_encoder_class(name: str):
    if name == OURS:
        from diffusekit import CLIPTextModel
    else:
        from transformers import CLIPTextModel
    return CLIPTextModel


def load_pipeline(lib_name: str, folder) -> object:
    pipe = library(lib_name).StableDiffusionPipeline.from_pretrained(folder, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _release() -> None:
    import gc

    gc.collect()


# ---------------------------------------------------------------------------------------------------- children

IMPORT_CODE = """\
import time
c0, t0 = time.process_time(), time.perf_counter()
import {lib} as lib
lib.StableDiffusionPipeline
c1, t1 = time.process_time(), time.perf_counter()
hwm = 0
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        hwm = int(line.split()[1])
import json, sys
print({tag!r} + json.dumps({{"time": t1 - t0, "cpu": c1 - c0, "peak_kb": hwm,
                            "transformers_loaded": "transformers" in sys.modules}}))
"""


def child_memory(lib_name: str, path: str, threads: int, size: int) -> None:
    """Child: import, reset the peak, load the pipeline (timed, peak), run one 1-step call (peak)."""
    import torch

    set_threads(threads)
    lib = library(lib_name)
    cls = lib.StableDiffusionPipeline
    base = rss_kb()
    reset = reset_peak_rss()
    cpu, start = time.process_time(), time.perf_counter()
    pipe = cls.from_pretrained(path, use_safetensors=True)
    load_time, load_cpu = time.perf_counter() - start, time.process_time() - cpu
    load_peak = peak_rss_kb()
    after_load = rss_kb()
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    pipe(PROMPT, height=size, width=size, num_inference_steps=1, generator=torch.Generator().manual_seed(0),
         output_type="np")
    step_time = time.perf_counter() - start
    emit({"load_time": load_time, "load_cpu": load_cpu, "step_time": step_time, "base_kb": base,
          "load_peak_kb": load_peak, "after_load_kb": after_load, "peak_kb": peak_rss_kb(), "reset": reset,
          "process_peak_kb": process_peak_kb()})


# ---------------------------------------------------------------------------------------------------- benchmarks


def bench_import(report: Report, args) -> None:
    from .common import RESULT_TAG

    repeat = args.repeat or (2 if args.quick else 7)
    cases = {lib: ["-c", IMPORT_CODE.format(lib=lib, tag=RESULT_TAG)] for lib in LIBS}
    runs = interleaved_children(cases, repeat=repeat, warmup=1)
    stats = {lib: Stats([r["time"] for r in runs[lib]], [r["cpu"] for r in runs[lib]]) for lib in LIBS}
    report.time_row("`import X; X.StableDiffusionPipeline`", stats, target=0.3,
                    note="transformers imported: " + ", ".join(f"{lib} {runs[lib][0]['transformers_loaded']}"
                                                               for lib in LIBS))
    report.memory_row("RSS after that import", [r["peak_kb"] for r in runs[OURS]],
                      [r["peak_kb"] for r in runs[THEIRS]], target=None)


def bench_unet(report: Report, args) -> None:
    import torch

    folder = sd_folder(args)
    cfg = configs(args.quick)["unet"]
    models = {lib: library(lib).UNet2DConditionModel.from_pretrained(folder, subfolder="unet", use_safetensors=True)
              for lib in LIBS}
    gen = torch.Generator().manual_seed(0)
    context = torch.randn(2, 77, cfg["cross_attention_dim"], generator=gen)
    t = torch.tensor(500)
    sizes = [8, 16] if args.quick else [32, 64]
    for size in sizes:
        x = torch.randn(2, cfg["in_channels"], size, size, generator=gen)

        def run(lib, x=x):
            with torch.no_grad():
                return models[lib](x, t, encoder_hidden_states=context).sample

        diff = max_abs_diff(run(OURS), run(THEIRS))
        default = 2 if args.quick else (5 if size <= 32 else 3)
        stats = interleaved({lib: (lambda lib=lib: run(lib)) for lib in LIBS}, repeat=args.repeat or default,
                            warmup=0)  # the parity run above was the warm-up
        report.time_row(f"UNet2DConditionModel step, latents {size}x{size} ({size * 8}² image), batch 2", stats,
                        note=f"max abs diff {diff:.1e}")
    models.clear()  # free the weights before the next benchmark
    _release()


def bench_vae(report: Report, args) -> None:
    import torch

    folder = sd_folder(args)
    models = {lib: library(lib).AutoencoderKL.from_pretrained(folder, subfolder="vae", use_safetensors=True)
              for lib in LIBS}
    size = 8 if args.quick else 32
    z = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(0))

    def run(lib):
        with torch.no_grad():
            return models[lib].decode(z).sample

    diff = max_abs_diff(run(OURS), run(THEIRS))
    stats = interleaved({lib: (lambda lib=lib: run(lib)) for lib in LIBS},
                        repeat=args.repeat or (2 if args.quick else 5), warmup=0)
    report.time_row(f"AutoencoderKL.decode {size}x{size} -> {size * 8}² image, batch 1", stats,
                    note=f"max abs diff {diff:.1e}")
    models.clear()  # free the weights before the next benchmark
    _release()


def bench_text(report: Report, args) -> None:
    import torch

    folder = sd_folder(args)
    models = {lib: text_encoder_class(lib).from_pretrained(folder, subfolder="text_encoder", use_safetensors=True)
              for lib in LIBS}
    vocab = configs(args.quick)["text"]["vocab_size"]
    ids = torch.randint(0, vocab - 2, (2, 77), generator=torch.Generator().manual_seed(0))

    def run(lib):
        with torch.no_grad():
            return models[lib](ids)[0]

    diff = max_abs_diff(run(OURS), run(THEIRS))
    stats = interleaved({lib: (lambda lib=lib: run(lib)) for lib in LIBS},
                        repeat=args.repeat or (2 if args.quick else 10), warmup=1)
    report.time_row("CLIPTextModel forward, 2x77 tokens (vs transformers)", stats, note=f"max abs diff {diff:.1e}")
    models.clear()  # free the weights before the next benchmark
    _release()


def bench_pipeline(report: Report, args) -> None:
    import torch

    folder = sd_folder(args)
    pipes = {lib: load_pipeline(lib, folder) for lib in LIBS}
    size = 64 if args.quick else 256
    steps = args.steps

    def run(lib):
        return pipes[lib](PROMPT, height=size, width=size, num_inference_steps=steps,
                          generator=torch.Generator().manual_seed(0), output_type="np").images

    diff = max_abs_diff(run(OURS), run(THEIRS))
    stats = interleaved({lib: (lambda lib=lib: run(lib)) for lib in LIBS},
                        repeat=args.repeat or (1 if args.quick else 3), warmup=0)
    scheduler = type(pipes[OURS].scheduler).__name__
    report.time_row(f"StableDiffusionPipeline {size}², {steps} steps, CFG 7.5 ({scheduler})", stats,
                    note=f"max abs diff of images {diff:.1e}")
    pipes.clear()
    _release()


def bench_memory(report: Report, args) -> None:
    folder = sd_folder(args)
    size = 64 if args.quick else 256
    cases = {lib: ["-m", "benchmarks.bench_sd", "--child", "memory", "--lib", lib, "--path", str(folder),
                   "--threads", str(args.threads), "--size", str(size)] for lib in LIBS}
    runs = interleaved_children(cases, repeat=1 if args.quick else (args.repeat or 2), timeout=1800)
    report.time_row("StableDiffusionPipeline.from_pretrained (fresh process)",
                    {lib: Stats([r["load_time"] for r in runs[lib]], [r["load_cpu"] for r in runs[lib]])
                     for lib in LIBS})
    note = "VmHWM reset after imports" if runs[OURS][0]["reset"] else "whole-process peak"
    report.memory_row("peak RSS: load", [r["load_peak_kb"] for r in runs[OURS]],
                      [r["load_peak_kb"] for r in runs[THEIRS]], note=note)
    report.memory_row(f"peak RSS: load + one 1-step {size}² call", [r["peak_kb"] for r in runs[OURS]],
                      [r["peak_kb"] for r in runs[THEIRS]], note=note)
    report.memory_row(f"RSS growth: load + one 1-step {size}² call", [r["peak_kb"] - r["base_kb"] for r in runs[OURS]],
                      [r["peak_kb"] - r["base_kb"] for r in runs[THEIRS]], target=None,
                      note="over the RSS after imports; safetensors maps the files, weights count once read")


BENCHMARKS = {"import": bench_import, "unet": bench_unet, "vae": bench_vae, "text": bench_text,
              "pipeline": bench_pipeline, "memory": bench_memory}


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = common_args(__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="pipeline inference steps (default 4)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--lib", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--path", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=256, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quiet_environment(args.threads)
    if args.child == "memory":
        child_memory(args.lib, args.path, args.threads, args.size)
        return
    set_threads(args.threads)
    report = Report("SD text-to-image: Stable Diffusion 1.5 configs, random weights", args,
                    ["-m", "benchmarks.bench_sd", *(sys.argv[1:] if argv is None else argv)])
    run_benchmarks(BENCHMARKS, report, args)


if __name__ == "__main__":
    main()
