"""Guidance interval (``guidance_interval=(lo, hi)``) on the bundled ``diffusekit-fashion-sd``: time per image and
image difference against the default (guidance on every step), same seeds, same process, rounds interleaved.

    env PYTHONPATH=src .venv/bin/python benchmarks/bench_guidance_interval.py

Prints one Markdown table (BENCHMARKS.md, "Guidance interval"). Settings: 25 steps, the model's scheduler,
guidance scale 4, 8 class x colour prompts per batch, 1 thread.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

INTERVALS = [None, (0.0, 0.8), (0.2, 0.8), (0.0, 0.5), (0.3, 1.0)]
PROMPTS = ["a photo of a red sneaker", "a photo of a blue dress", "a photo of a green bag", "a photo of a yellow shirt",
           "a photo of a purple ankle boot", "a photo of an orange trouser", "a photo of a red coat",
           "a photo of a blue sandal"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from diffusekit import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained("diffusekit-fashion-sd")
    pipe.set_progress_bar_config(disable=True)
    calls: dict = {k: 0 for k in INTERVALS}
    counter = {"rows": 0}
    pipe.unet.register_forward_hook(lambda m, a, o: counter.__setitem__("rows", counter["rows"] + a[0].shape[0]))

    def run(interval):
        return pipe(PROMPTS, num_inference_steps=args.steps, guidance_scale=4.0, guidance_interval=interval,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    run(None)  # warm-up
    times: dict = {k: [] for k in INTERVALS}
    images: dict = {}
    for r in range(args.rounds):
        order = INTERVALS if r % 2 == 0 else INTERVALS[::-1]
        for interval in order:
            counter["rows"] = 0
            start = time.perf_counter()
            images[interval] = run(interval)
            times[interval].append((time.perf_counter() - start) / len(PROMPTS))
            calls[interval] = counter["rows"]
    base = statistics.median(times[None])
    print(f"| guidance_interval | UNet rows per image | ms / image (median of {args.rounds}) | time vs default "
          "| max abs vs default | PSNR vs default (dB) |")
    print("|---|---|---|---|---|---|")
    for interval in INTERVALS:
        t = statistics.median(times[interval])
        diff = np.abs(images[interval] - images[None]).max()
        name = "None (default)" if interval is None else f"({interval[0]}, {interval[1]})"
        print(f"| {name} | {calls[interval] / len(PROMPTS):.0f} | {t * 1000:.0f} | {t / base:.2f} | {diff:.3f} | "
              f"{psnr(images[interval], images[None]):.1f} |")


if __name__ == "__main__":
    main()
