"""Step savings on the bundled ``diffusekit-fashion-sd``: guidance interval (``guidance_interval=(lo, hi)``) and
DeepCache feature reuse (``deep_cache=N`` / ``enable_deep_cache``), alone and combined. Time per image and image
difference against the default (guidance and the whole UNet on every step), same seeds, same process, rounds
interleaved.

    env PYTHONPATH=src .venv/bin/python benchmarks/bench_guidance_interval.py             # guidance interval table
    env PYTHONPATH=src .venv/bin/python benchmarks/bench_guidance_interval.py --deep-cache  # + DeepCache rows
    env PYTHONPATH=src .venv/bin/python benchmarks/bench_guidance_interval.py --sd15-step   # SD 1.5 UNet step

Prints Markdown tables (BENCHMARKS.md, "Guidance interval" and "DeepCache"). Settings: 25 steps, the model's
scheduler, guidance scale 4, 8 class x colour prompts per batch, 1 thread. ``--sd15-step``: one SD 1.5-shaped UNet
(random weights, the folder ``benchmarks.bench_sd`` builds in ``.bench/``) step, batch 2, full vs cached (branches 0
and 3) at 256² and 512².
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

INTERVALS = [None, (0.0, 0.8), (0.2, 0.8), (0.0, 0.5), (0.3, 1.0)]
#: (guidance_interval, deep_cache) rows of --deep-cache
DEEP_CACHE_ROWS = [(None, None), (None, 2), (None, 3), (None, 5), (None, (3, 1)), ((0.2, 0.8), None),
                   ((0.2, 0.8), 2), ((0.2, 0.8), 3)]
PROMPTS = ["a photo of a red sneaker", "a photo of a blue dress", "a photo of a green bag", "a photo of a yellow shirt",
           "a photo of a purple ankle boot", "a photo of an orange trouser", "a photo of a red coat",
           "a photo of a blue sandal"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def _name(value) -> str:
    if value is None:
        return "None"
    return f"({value[0]}, {value[1]})" if isinstance(value, tuple) else str(value)


def bundled_rows(args, rows: list[tuple]) -> None:
    """One table: per (guidance_interval, deep_cache) the UNet rows per image (all, and those through the mid block,
    i.e. full steps), ms per image, and the difference to the first row."""
    from diffusekit import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained("diffusekit-fashion-sd")
    pipe.set_progress_bar_config(disable=True)
    counter = {"rows": 0, "deep": 0}
    pipe.unet.register_forward_hook(lambda m, a, o: counter.__setitem__("rows", counter["rows"] + a[0].shape[0]))
    pipe.unet.mid_block.register_forward_hook(
        lambda m, a, o: counter.__setitem__("deep", counter["deep"] + a[0].shape[0]))

    def run(row):
        interval, deep_cache = row
        return pipe(PROMPTS, num_inference_steps=args.steps, guidance_scale=4.0, guidance_interval=interval,
                    deep_cache=deep_cache, generator=torch.Generator().manual_seed(0), output_type="np").images

    run(rows[0])  # warm-up
    times: dict = {row: [] for row in rows}
    images: dict = {}
    counts: dict = {}
    for r in range(args.rounds):
        for row in rows if r % 2 == 0 else rows[::-1]:
            counter.update(rows=0, deep=0)
            start = time.perf_counter()
            images[row] = run(row)
            times[row].append((time.perf_counter() - start) / len(PROMPTS))
            counts[row] = (counter["rows"], counter["deep"])
    base = statistics.median(times[rows[0]])
    reference = images[rows[0]]
    with_cache = any(row[1] is not None for row in rows)
    head = "| guidance_interval | " + ("deep_cache | " if with_cache else "") + "UNet rows per image | " + \
        ("of them full | " if with_cache else "")
    print(head + f"ms / image (median of {args.rounds}) | time vs default | max abs vs default | PSNR vs default (dB) |")
    print("|---" * (head.count("|") + 3) + "|")
    for row in rows:
        t = statistics.median(times[row])
        interval, deep_cache = row
        cells = [_name(interval) + (" (default)" if row == rows[0] else "")]
        if with_cache:
            cells.append(_name(deep_cache))
        cells.append(f"{counts[row][0] / len(PROMPTS):.0f}")
        if with_cache:
            cells.append(f"{counts[row][1] / len(PROMPTS):.0f}")
        diff = np.abs(images[row] - reference).max()
        cells += [f"{t * 1000:.0f}", f"{t / base:.2f}", f"{diff:.3f}", f"{psnr(images[row], reference):.1f}"]
        print("| " + " | ".join(cells) + " |")


def sd15_step(args) -> None:
    """A full UNet step vs cached steps (branches 0 and 3) of an SD 1.5-shaped UNet, batch 2, same process,
    interleaved; the cached steps reuse the feature of a full step on the same inputs."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.bench_sd import sd_folder
    from benchmarks.common import interleaved

    from diffusekit import UNet2DConditionModel
    from diffusekit.models.deep_cache import DeepCacheStep

    folder = Path(args.sd15_folder) if args.sd15_folder else sd_folder(argparse.Namespace(quick=False,
                                                                                           workdir=args.workdir))
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    context = torch.randn(2, 77, 768, generator=torch.Generator().manual_seed(1))
    print(f"| SD 1.5 UNet step, batch 2 | ms (median of {args.rounds}) | vs full step |")
    print("|---|---|---|")
    for side in (32, 64):
        sample = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(0))
        features = {}
        with torch.inference_mode():
            for branch in (0, 3):
                step = DeepCacheStep(branch)
                unet(sample, 500, context, deep_cache=step)
                features[branch] = step.feature

            def cached(branch):
                return lambda: unet(sample, 500, context, deep_cache=DeepCacheStep(branch, features[branch]))

            stats = interleaved({"full": lambda: unet(sample, 500, context), "branch 0": cached(0),
                                 "branch 3": cached(3)}, repeat=args.rounds, warmup=1)
        full = stats["full"].median
        for name, s in stats.items():
            print(f"| {side * 8}² ({side}x{side} latents), {name if name == 'full' else 'cached, ' + name} | "
                  f"{s.median * 1000:.0f} | {s.median / full:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--deep-cache", action="store_true", help="also the DeepCache rows (alone and combined)")
    parser.add_argument("--sd15-step", action="store_true", help="only the SD 1.5 UNet full vs cached step")
    parser.add_argument("--workdir", default=".bench", help="where benchmarks.bench_sd keeps its SD 1.5 folder")
    parser.add_argument("--sd15-folder", default=None, help="an SD 1.5-shaped pipeline folder to use as it is")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.sd15_step:
        sd15_step(args)
        return
    bundled_rows(args, [(interval, None) for interval in INTERVALS])
    if args.deep_cache:
        print()
        bundled_rows(args, DEEP_CACHE_ROWS)


if __name__ == "__main__":
    main()
