"""diffusekit vs diffusers on a CUDA GPU, same SD 1.5-sized random weights (``bench_sd``'s folder), one process.

Benchmarks (names for ``--only``):

- ``unet``      one ``UNet2DConditionModel`` step, batch 2 (the CFG batch), 64x64 latents (512² image), 77x768 context.
- ``vae``       ``AutoencoderKL.decode`` of a 1x4x64x64 latent (one 512² image).
- ``pipeline``  ``StableDiffusionPipeline(prompt, 512x512, --steps steps, guidance 7.5, output_type="np")``, with the
                peak GPU memory of the call above what the loaded pipeline holds.
- ``compile``   the UNet step again after ``pipe.optimize()`` (ours) and ``torch.compile(pipe.unet)`` (diffusers'
                tutorial), each after its first (compiling) call, whose time is reported in the note.

Each timed call ends with ``torch.cuda.synchronize()``; rounds alternate the order, as the CPU benchmarks do.
Run ``python -m benchmarks.bench_gpu`` from the repository root on a machine with a GPU (``--quick``: tiny configs).
"""

from __future__ import annotations

import sys
import time

from .bench_sd import PROMPT, sd_folder
from .common import OURS, THEIRS, Report, common_args, interleaved, max_abs_diff, quiet_environment, run_benchmarks


def _synced(fn):
    import torch

    def call():
        out = fn()
        torch.cuda.synchronize()
        return out

    return call


class GPU:
    """Both pipelines, loaded once in ``--dtype`` on the GPU."""

    def __init__(self, args):
        import torch

        from .bench_sd import library

        self.dtype = getattr(torch, args.dtype)
        folder = sd_folder(args)
        self.pipes, self.weights_bytes = {}, {}
        for name in (OURS, THEIRS):
            before = torch.cuda.memory_allocated()
            pipe = library(name).StableDiffusionPipeline.from_pretrained(folder, torch_dtype=self.dtype,
                                                                         use_safetensors=True).to("cuda")
            pipe.set_progress_bar_config(disable=True)
            self.pipes[name] = pipe
            self.weights_bytes[name] = torch.cuda.memory_allocated() - before
        unet = self.pipes[OURS].unet
        g = torch.Generator("cuda").manual_seed(0)
        side = 8 if args.quick else 64
        self.latents = torch.randn(2, 4, side, side, generator=g, device="cuda", dtype=self.dtype)
        self.context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g, device="cuda",
                                   dtype=self.dtype)
        self.t = torch.tensor([500, 500], device="cuda")


_STATE: dict = {}


def state(args) -> GPU:
    if "gpu" not in _STATE:
        _STATE["gpu"] = GPU(args)
    return _STATE["gpu"]


def _unet_cases(s: GPU):
    import torch

    def step(name):
        @torch.no_grad()
        def run():
            return s.pipes[name].unet(s.latents, s.t, encoder_hidden_states=s.context).sample
        return _synced(run)

    return {name: step(name) for name in (OURS, THEIRS)}


def bench_unet(report: Report, args) -> None:
    s = state(args)
    cases = _unet_cases(s)
    diff = max_abs_diff(cases[OURS](), cases[THEIRS]())
    report.time_row(f"UNet step, 64x64 latents, batch 2, {args.dtype}", interleaved(cases, args.repeat or 20, 3),
                    note=f"max abs diff {diff:.1e}")


def bench_vae(report: Report, args) -> None:
    import torch

    s = state(args)
    latent = s.latents[:1]

    def decode(name):
        @torch.no_grad()
        def run():
            return s.pipes[name].vae.decode(latent).sample
        return _synced(run)

    cases = {name: decode(name) for name in (OURS, THEIRS)}
    diff = max_abs_diff(cases[OURS](), cases[THEIRS]())
    report.time_row(f"VAE decode 1x4x64x64, {args.dtype}", interleaved(cases, args.repeat or 10, 2),
                    note=f"max abs diff {diff:.1e}")


def bench_pipeline(report: Report, args) -> None:
    import numpy as np
    import torch

    s = state(args)
    size = 64 if args.quick else 512
    images, peaks = {}, {OURS: [], THEIRS: []}

    def run(name):
        def call():
            torch.cuda.synchronize()
            held = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            out = s.pipes[name](PROMPT, height=size, width=size, num_inference_steps=args.steps, guidance_scale=7.5,
                                generator=torch.Generator("cuda").manual_seed(0), output_type="np").images
            torch.cuda.synchronize()
            peaks[name].append((torch.cuda.max_memory_allocated() - held) / 1024)
            images[name] = out
        return call

    stats = interleaved({name: run(name) for name in (OURS, THEIRS)}, args.repeat or 3, 1)
    diff = float(np.abs(images[OURS] - images[THEIRS]).max())
    report.time_row(f"text-to-image {size}², {args.steps} steps, {args.dtype}", stats,
                    note=f"max abs image diff {diff:.1e}")
    report.memory_row("GPU memory above the loaded pipeline, peak during that call", peaks[OURS], peaks[THEIRS],
                      note=f"weights on the GPU: ours {s.weights_bytes[OURS] / 2**20:.0f} MiB, diffusers "
                           f"{s.weights_bytes[THEIRS] / 2**20:.0f} MiB")


def bench_compile(report: Report, args) -> None:
    import torch

    s = state(args)
    cases = _unet_cases(s)
    eager = cases[OURS]()
    first = {}
    for name in (OURS, THEIRS):
        pipe = s.pipes[name]
        start = time.perf_counter()
        if name == OURS:
            pipe.unet.optimize()
        else:
            pipe.unet = torch.compile(pipe.unet)
        cases = _unet_cases(s)
        cases[name]()
        first[name] = time.perf_counter() - start
    diff = max_abs_diff(cases[OURS](), eager)
    report.time_row(f"UNet step compiled (optimize() / torch.compile), {args.dtype}",
                    interleaved(cases, args.repeat or 20, 3),
                    note=f"first call {first[OURS]:.0f} s / {first[THEIRS]:.0f} s; max abs diff vs eager {diff:.1e}")


BENCHMARKS = {"unet": bench_unet, "vae": bench_vae, "pipeline": bench_pipeline, "compile": bench_compile}


def main(argv=None) -> None:
    parser = common_args(__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args(argv)
    quiet_environment(args.threads)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu needs a CUDA device (torch.cuda.is_available() is False)")
    report = Report(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}", args,
                    ["-m", "benchmarks.bench_gpu", *(argv if argv is not None else sys.argv[1:])])
    run_benchmarks(BENCHMARKS, report, args)


if __name__ == "__main__":
    main()
