"""``diffusekit eval``: measure generated Fashion-MNIST images with a small classifier trained on the real ones.

* ``eval classifier`` trains the judge (a small CNN) on the 60k training images and reports its accuracy on the
  10k held-out test images. It is saved (safetensors) and reused by the other commands.
* ``eval unconditional MODEL`` samples ``--num-samples`` images and reports the Fréchet distance between their
  classifier features (the 128-d penultimate layer) and those of the real test set, next to the same distance for
  as many real *training* images (the floor: what a perfect generator would score with that many samples), and the
  spread of predicted classes.
* ``eval text-to-image MODEL`` prompts every (class, colour) pair ("a photo of a red sneaker") and reports the share
  of images whose predicted class is the prompt's, the share whose dominant hue is nearest the prompt's colour, and
  the Fréchet distance to the real test images tinted the same way.

The classifier sees one channel: grayscale images as they are, colour images as their per-pixel max over RGB (the
garment's shape whatever its tint), centre-cropped to 28x28 and divided by the image's maximum, so that a tinted
(darker) garment looks like the white one it was made from.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._io import atomic_write, atomic_write_text
from .data import CLASS_NAMES, COLORS, EpochSampler, load_images, prompt_for, tint

DEFAULT_CLASSIFIER = Path(os.environ.get("DIFFUSEKIT_CACHE", Path.home() / ".cache" / "diffusekit")) / "fashion-classifier.safetensors"


class FashionClassifier(nn.Module):
    """Two conv stages (16, 32 channels) -> 128-d features -> 10 classes. Input (B, 1, 28, 28) in [0, 1]."""

    def __init__(self, feature_dim: int = 128):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(32 * 7 * 7, feature_dim)
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv((x - 0.286) / 0.353).flatten(1))  # (B, feature_dim), before the ReLU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.features(x)))


def to_classifier_input(images: np.ndarray) -> torch.Tensor:
    """Images as (N, H, W), (N, H, W, C) or (N, C, H, W) floats in [0, 1] (or uint8) -> (N, 1, 28, 28) in [0, 1]."""
    x = np.asarray(images)
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    if x.ndim == 3:
        x = x[:, None]
    elif x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    x = x.max(axis=1, keepdims=True)  # colour -> the garment's shape
    h, w = x.shape[-2:]
    top, left = (h - 28) // 2, (w - 28) // 2
    x = x[..., top : top + 28, left : left + 28]
    x = x / np.maximum(x.max(axis=(1, 2, 3), keepdims=True), 0.05)  # brightness-free: tint and exposure drop out
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def train_classifier(epochs: int = 2, batch_size: int = 128, seed: int = 0, data_dir=None, dataset="fashion-mnist",
                     limit=None, progress: bool = True) -> tuple[FashionClassifier, float]:
    """Train on the training split; return the model and its accuracy on the test split."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    images, labels = load_images(dataset, "train", data_dir, limit, seed=seed)
    x, y = to_classifier_input(images), torch.from_numpy(labels)
    model = FashionClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sampler = EpochSampler(len(x), batch_size, seed)
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * sampler.per_epoch
    model.train()
    for step in tqdm(range(steps), desc="classifier", disable=not progress):
        for group in opt.param_groups:
            group["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.from_numpy(sampler.indices(step))
        shift = torch.randint(-1, 2, (2,), generator=gen).tolist()  # +-1 px: generated garments sit a little off
        batch = torch.roll(x[idx], shifts=shift, dims=(2, 3))
        loss = F.cross_entropy(model(batch), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    test_images, test_labels = load_images(dataset, "test", data_dir, limit, seed=seed)
    accuracy = float((predict(model, to_classifier_input(test_images))[0] == test_labels).mean())
    return model.eval(), accuracy


@torch.no_grad()
def predict(model: FashionClassifier, x: torch.Tensor, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """(predicted labels (N,), features (N, D)) for classifier inputs (N, 1, 28, 28)."""
    model.eval()
    labels, feats = [], []
    for chunk in x.split(batch_size):
        f = model.features(chunk)
        labels.append(model.head(F.relu(f)).argmax(1))
        feats.append(f)
    return torch.cat(labels).numpy(), torch.cat(feats).double().numpy()


def save_classifier(model: FashionClassifier, path: Path, accuracy: float) -> None:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={"test_accuracy": f"{accuracy:.4f}"}))


def load_or_train_classifier(path: Path, args) -> tuple[FashionClassifier, float]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    if path.is_file():
        model = FashionClassifier()
        model.load_state_dict(load_file(str(path)))
        with safe_open(str(path), "pt") as handle:
            accuracy = float(handle.metadata()["test_accuracy"])
        return model.eval(), accuracy
    print(f"no classifier at {path}; training one (diffusekit eval classifier)")
    model, accuracy = train_classifier(args.classifier_epochs, seed=0, data_dir=args.data_dir)
    save_classifier(model, path, accuracy)
    return model, accuracy


# ------------------------------------------------------------------------------------------------------- metrics


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2) between Gaussians fitted to feature sets (N, D).

    tr((S_a S_b)^1/2) = sum of sqrt(eigenvalues of S_a^1/2 S_b S_a^1/2), a symmetric PSD matrix: numpy only.
    """
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    vals, vecs = np.linalg.eigh(cov_a)
    sqrt_a = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    middle = sqrt_a @ cov_b @ sqrt_a
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_sqrt)


def dominant_hue(image: np.ndarray, threshold: float = 0.25) -> float | None:
    """Hue in [0, 1) of the brightness-weighted mean colour of the garment's pixels; None if nothing is bright."""
    rgb = np.asarray(image, np.float64)
    if rgb.shape[0] == 3:
        rgb = rgb.transpose(1, 2, 0)
    value = rgb.max(-1)
    mask = value > threshold
    if not mask.any():
        return None
    mean = (rgb[mask] * value[mask, None]).sum(0) / value[mask].sum()
    return colorsys.rgb_to_hsv(*mean)[0]


PALETTE_HUES = {name: colorsys.rgb_to_hsv(*rgb)[0] for name, rgb in COLORS.items()}


def nearest_color(hue: float | None) -> str | None:
    if hue is None:
        return None
    return min(PALETTE_HUES, key=lambda name: min(abs(hue - PALETTE_HUES[name]), 1 - abs(hue - PALETTE_HUES[name])))


# ------------------------------------------------------------------------------------------------------- commands


def add_arguments(parser: argparse.ArgumentParser) -> None:
    kinds = parser.add_subparsers(dest="kind", required=True)
    for name, text in (("classifier", "train the judge classifier and report its test accuracy"),
                       ("unconditional", "Fréchet distance of a DDPM pipeline's samples"),
                       ("text-to-image", "class accuracy, colour match and Fréchet distance of a text-to-image model")):
        p = kinds.add_parser(name, help=text)
        if name != "classifier":
            p.add_argument("model", help="pipeline folder, hub repo or bundled name (e.g. diffusekit-fashion-ddpm)")
            p.add_argument("--steps", type=int, default=50, help="sampling steps")
            p.add_argument("--batch-size", type=int, default=100)
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--grid", default=None, help="write a PNG grid of the first samples here")
            p.add_argument("--json", default=None, help="write the numbers here as JSON")
            p.add_argument("--device", default="cpu")
        if name == "unconditional":
            p.add_argument("--num-samples", type=int, default=1000)
        if name == "text-to-image":
            p.add_argument("--per-prompt", type=int, default=10, help="images per (class, colour) prompt")
            p.add_argument("--guidance-scale", type=float, default=4.0)
            p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                           help="guide only the steps LO <= i / n < HI (the pipelines' guidance_interval)")
            p.add_argument("--deep-cache", type=int, nargs="+", default=None, metavar=("N", "BRANCH"),
                           help="DeepCache feature reuse: a full UNet step every N steps, skip branch BRANCH "
                                "(default 0) on the others (the pipelines' deep_cache)")
            p.add_argument("--freeu", type=float, nargs=4, default=None, metavar=("S1", "S2", "B1", "B2"),
                           help="FreeU's factors (the pipelines' enable_freeu)")
        p.add_argument("--classifier", type=Path, default=DEFAULT_CLASSIFIER,
                       help=f"classifier weights (trained and saved here if missing; default {DEFAULT_CLASSIFIER})")
        p.add_argument("--classifier-epochs", type=int, default=4)
        p.add_argument("--data-dir", default=None)
        p.add_argument("--threads", type=int, default=None)


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.kind == "classifier":
        start = time.monotonic()
        model, accuracy = train_classifier(args.classifier_epochs, data_dir=args.data_dir)
        save_classifier(model, args.classifier, accuracy)
        result = {"classifier_test_accuracy": accuracy, "epochs": args.classifier_epochs,
                  "seconds": round(time.monotonic() - start, 1)}
        print(f"classifier: test accuracy {accuracy:.4f} on the 10k held-out images; saved {args.classifier}")
        return result
    classifier, accuracy = load_or_train_classifier(args.classifier, args)
    result = evaluate_unconditional(args, classifier) if args.kind == "unconditional" else \
        evaluate_text_to_image(args, classifier)
    result = {"model": args.model, "classifier_test_accuracy": accuracy, **result,
              "command": getattr(args, "command_line", None)}
    print(json.dumps(result, indent=2))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return result


def _grid(images: np.ndarray, path, columns: int) -> None:
    from ..utils import image_grid
    from ..pipelines.image_processor import numpy_to_pil

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image_grid(numpy_to_pil(images), columns=columns).save(path)


def _real_floor(classifier, test_feats: np.ndarray, n: int, data_dir, seed: int, colorize: bool) -> float:
    images, labels = load_images("fashion-mnist", "train", data_dir)
    pick = np.random.default_rng(seed + 1).permutation(len(images))[:n]
    real = images[pick]
    if colorize:
        real = _tinted(real, np.random.default_rng(seed + 2))
    return frechet_distance(predict(classifier, to_classifier_input(real))[1], test_feats)


def _tinted(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    palette = np.array(list(COLORS.values()), np.float32)
    return tint(images, palette[rng.integers(len(palette), size=len(images))])


def evaluate_unconditional(args, classifier) -> dict:
    from ..pipelines.base import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(args.model).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(args.seed)
    start, samples = time.monotonic(), []
    for i in range(0, args.num_samples, args.batch_size):
        n = min(args.batch_size, args.num_samples - i)
        samples.append(pipe(batch_size=n, num_inference_steps=args.steps, generator=generator, output_type="np").images)
        print(f"sampled {i + n}/{args.num_samples}", flush=True)
    samples = np.concatenate(samples)
    seconds = time.monotonic() - start
    if args.grid:
        _grid(samples[:64], args.grid, 8)
    test_images, _ = load_images("fashion-mnist", "test", args.data_dir)
    test_feats = predict(classifier, to_classifier_input(test_images))[1]
    labels, feats = predict(classifier, to_classifier_input(samples))
    counts = np.bincount(labels, minlength=10)
    return {
        "num_samples": int(len(samples)),
        "sampling_steps": args.steps,
        "sampling_seconds": round(seconds, 1),
        "fd_generated_vs_test": frechet_distance(feats, test_feats),
        "fd_real_train_vs_test_floor": _real_floor(classifier, test_feats, len(samples), args.data_dir, args.seed,
                                                   colorize=False),
        "predicted_class_share": {CLASS_NAMES[i]: round(c / len(samples), 3) for i, c in enumerate(counts)},
    }


def evaluate_text_to_image(args, classifier) -> dict:
    from ..pipelines.base import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(args.model).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    from ..generation import step_savings

    freeu = step_savings(freeu=getattr(args, "freeu", None))["freeu"]
    if freeu is not None:
        pipe.enable_freeu(*freeu)
    pairs = [(label, color) for label in range(10) for color in COLORS]
    prompts = [prompt_for(label, color) for label, color in pairs for _ in range(args.per_prompt)]
    want_labels = np.array([label for label, _ in pairs for _ in range(args.per_prompt)])
    want_colors = [color for _, color in pairs for _ in range(args.per_prompt)]
    generator = torch.Generator("cpu").manual_seed(args.seed)
    interval = tuple(args.guidance_interval) if getattr(args, "guidance_interval", None) else None
    deep_cache = tuple(args.deep_cache) if getattr(args, "deep_cache", None) else None
    if deep_cache is not None and len(deep_cache) == 1:
        deep_cache = deep_cache[0]
    start, samples = time.monotonic(), []
    for i in range(0, len(prompts), args.batch_size):
        chunk = prompts[i : i + args.batch_size]
        samples.append(pipe(chunk, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                            guidance_interval=interval, deep_cache=deep_cache, generator=generator,
                            output_type="np").images)
        print(f"sampled {i + len(chunk)}/{len(prompts)}", flush=True)
    samples = np.concatenate(samples)  # (N, H, W, 3)
    seconds = time.monotonic() - start
    if args.grid:  # one row per class, one column per colour, first image of each prompt
        _grid(samples[:: args.per_prompt], args.grid, len(COLORS))
    labels, feats = predict(classifier, to_classifier_input(samples))
    got_colors = [nearest_color(dominant_hue(image)) for image in samples]
    test_images, test_labels = load_images("fashion-mnist", "test", args.data_dir)
    rng = np.random.default_rng(args.seed)
    palette_names = list(COLORS)
    test_color_idx = rng.integers(len(palette_names), size=len(test_images))
    tinted = tint(test_images, np.array([COLORS[palette_names[i]] for i in test_color_idx], np.float32))
    test_pred, test_feats = predict(classifier, to_classifier_input(tinted))
    test_hue_match = np.mean([nearest_color(dominant_hue(im)) == palette_names[c]
                              for im, c in zip(tinted[:1000], test_color_idx[:1000])])
    per_class = {CLASS_NAMES[k]: round(float((labels[want_labels == k] == k).mean()), 3) for k in range(10)}
    per_color = {c: round(float(np.mean([g == c for g, w in zip(got_colors, want_colors) if w == c])), 3)
                 for c in COLORS}
    return {
        "num_samples": int(len(samples)),
        "sampling_steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "guidance_interval": list(interval) if interval else None,
        "deep_cache": list(args.deep_cache) if deep_cache is not None else None,
        "freeu": list(freeu) if freeu else None,
        "sampling_seconds": round(seconds, 1),
        "class_match": float((labels == want_labels).mean()),
        "color_match": float(np.mean([g == w for g, w in zip(got_colors, want_colors)])),
        "class_match_per_class": per_class,
        "color_match_per_color": per_color,
        "classifier_accuracy_on_tinted_test": float((test_pred == test_labels).mean()),
        "color_match_on_tinted_test": float(test_hue_match),
        "fd_generated_vs_tinted_test": frechet_distance(feats, test_feats),
        "fd_real_train_vs_tinted_test_floor": _real_floor(classifier, test_feats, len(samples), args.data_dir,
                                                          args.seed, colorize=True),
    }
