"""int8 quality on the bundled text-to-image model (diffusekit-fashion-sd): per-step UNet error and image difference.

For each configuration (observer, layers kept float) the UNet is quantized by ``pipe.quantize`` on calibration
prompts, then, on held-out prompts and seeds:

- per-step relative error ``||unet_int8(x_t) - unet_fp32(x_t)|| / ||unet_fp32(x_t)||`` on the fp32 trajectory's own
  inputs (every timestep, CFG batch): the quantization error of one step, without drift;
- end to end, same seed: the int8 pipeline's image vs the fp32 one (PSNR in dB on [0, 1] pixels, max abs difference
  in 0..255 levels).

Run ``python -m benchmarks.bench_int8_quality [--configs NAME ...] [--save DIR [--save-config NAME]]`` from the
repository root; ``--save`` writes the quantized pipeline of ``--save-config`` (default: ``default``), for
``diffusekit eval text-to-image DIR``.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

import diffusekit
from diffusekit.quantization import DEFAULT_MODULES_TO_NOT_CONVERT

MODEL = "diffusekit-fashion-sd"
COLORS = ["red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink"]
GARMENTS = ["t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
CALIBRATION = [f"a photo of a {c} {g}" for c, g in zip(COLORS, GARMENTS)]  # 8 prompts
HELD_OUT = [f"a {c} {g}, product shot" for c, g in zip(reversed(COLORS), GARMENTS[2:])]  # 8 other pairs

CONFIGS = {
    "default": dict(),
    "percentile": dict(observer="percentile"),
    "percentile-99.9": dict(observer="percentile", percentile=99.9),
    "average": dict(observer="average"),
    "unet+vae": dict(components=("unet", "vae")),
    "all-layers": dict(modules_to_not_convert=[]),
    "keep-attn2-kv": dict(modules_to_not_convert=[*DEFAULT_MODULES_TO_NOT_CONVERT, "*.attn2.to_k", "*.attn2.to_v"]),
    # attention through diffusekit's fused bf16 CPU kernel (what optimize() picks for an int8 UNet), eagerly: with
    # the default int8 UNet, and with the fp32 UNet (the kernel's own error)
    "fused-attention": dict(_fused_attention=True),
    "fp32+fused-attention": dict(_fused_attention=True, _quantize=False),
    # attention's two products in bf16 instead of int8 on the int8 route (Attention.cpu_int8_products; read with
    # --optimize, or with the fused kernel on): the int8 UNet, and the int8 UNet and VAE decoder under the kernel
    "bf16-attention-products": dict(_int8_products=False),
    "unet+vae+fused-attention": dict(components=("unet", "vae"), _fused_attention=True),
    "unet+vae+fused-attention-bf16-products": dict(components=("unet", "vae"), _fused_attention=True,
                                                   _int8_products=False),
}


def load():
    pipe = diffusekit.StableDiffusionPipeline.from_pretrained(MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def record_unet_calls(pipe, prompts, steps, guidance):
    calls = []

    def hook(module, args, kwargs, output):
        calls.append((args, kwargs, _sample(output)))

    handle = pipe.unet.register_forward_hook(hook, with_kwargs=True)
    images = []
    for i, prompt in enumerate(prompts):
        images.append(pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, output_type="pt",
                           generator=torch.Generator().manual_seed(1000 + i)).images)
    handle.remove()
    return calls, torch.cat(images)


def _sample(output):
    return output[0] if isinstance(output, tuple) else output.sample


def psnr(a, b):
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS))
    parser.add_argument("--save", default=None, help="save the quantized pipeline of --save-config here")
    parser.add_argument("--save-config", default="default", choices=list(CONFIGS), help="what --save saves")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--optimize", action="store_true", help="measure the int8 UNet compiled by optimize()")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ref = load()
    with torch.no_grad():
        calls, ref_images = record_unet_calls(ref, HELD_OUT, args.steps, args.guidance_scale)
    results = {}
    for name in args.configs:
        pipe = load()
        config = dict(CONFIGS[name])
        fused, quantize = config.pop("_fused_attention", False), config.pop("_quantize", True)
        int8_products = config.pop("_int8_products", True)
        start = time.monotonic()
        if quantize:
            pipe.quantize(CALIBRATION, num_inference_steps=args.steps, guidance_scale=args.guidance_scale, **config)
        seconds = time.monotonic() - start
        kernel_models = (pipe.unet, pipe.vae) if "vae" in config.get("components", ()) else (pipe.unet,)
        if fused and not all(model.enable_cpu_fused_attention() for model in kernel_models):
            continue
        for module in (*pipe.unet.modules(), *pipe.vae.modules()):
            if hasattr(module, "cpu_int8_products"):
                module.cpu_int8_products = int8_products
        if args.optimize:
            pipe.unet.optimize()
        with torch.no_grad():
            errors = [float((_sample(pipe.unet(*a, **k)) - out).norm() / out.norm()) for a, k, out in calls]
            _, images = record_unet_calls(pipe, HELD_OUT, args.steps, args.guidance_scale)
        steps = len(errors) // len(HELD_OUT)
        per_step = [sum(errors[p * steps + s] for p in range(len(HELD_OUT))) / len(HELD_OUT) for s in range(steps)]
        results[name] = {
            "unet_rel_err_mean": round(sum(errors) / len(errors), 5),
            "unet_rel_err_max": round(max(errors), 5),
            "unet_rel_err_first_mid_last_step": [round(per_step[i], 5) for i in (0, steps // 2, steps - 1)],
            "image_psnr_db": round(psnr(images, ref_images), 2),
            "image_psnr_db_worst": round(min(psnr(a, b) for a, b in zip(images, ref_images)), 2),
            "image_max_abs_255": round(float((images - ref_images).abs().max()) * 255, 1),
            "image_mean_abs_255": round(float((images - ref_images).abs().mean()) * 255, 2),
            "quantize_seconds": round(seconds, 1),
        }
        print(name, json.dumps(results[name]), flush=True)
        if args.save and name == args.save_config:
            pipe.save_pretrained(args.save)
    print(json.dumps({"steps": args.steps, "guidance_scale": args.guidance_scale, "results": results}, indent=2))


if __name__ == "__main__":
    main()
