"""Memory saved by gradient checkpointing (one training step) and by attention slicing (one UNet call).

Each measurement runs in a fresh child process (so no allocator cache carries over from another mode); a child builds
the model with random weights, then reports the peak resident memory the measured call adds above the memory held
just before it (``VmHWM`` reset with ``/proc/self/clear_refs``, minus ``VmRSS`` before the call). Peak RSS is what
matters on a CPU machine; numbers are MiB.

Benchmarks (names for ``--only``):

- ``checkpointing``  one training step (forward, MSE loss, backward; no optimizer) with and without
                     ``enable_gradient_checkpointing()``: the SD 1.5 UNet (860M parameters) at 256² (32² latents),
                     batch 1, and the ``diffusekit train unconditional`` default UNet at batch 64. Also reports the
                     bytes of tensors autograd saved for backward (exact, from ``saved_tensors_hooks``).
- ``slicing``        one SD 1.5 UNet call (no grad) at 512² (64² latents), batch 2 (classifier-free guidance), for
                     ``set_attention_slice(None / "auto")``; diffusekit (SDPA, sliced or not) and, for
                     reference, diffusers (its default SDPA processor / its sliced processor).

- ``layer``          (only when named) one SD 1.5 first-stage self-attention layer, 4096 tokens, batch 2, sliced or not.

Run ``python -m benchmarks.bench_memory`` from the repository root, with nothing else heavy running (a few GB per child):
``.venv/bin/python -m benchmarks.bench_memory``. ``--quick`` uses tiny configs.
"""

from __future__ import annotations

import json
import sys

from .common import common_args, emit, quiet_environment, reset_peak_rss, rss_kb, peak_rss_kb, run_child, set_threads

SD15_UNET = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=64,
)
# `diffusekit train unconditional` defaults (the bundled diffusekit-fashion-ddpm architecture)
TRAIN_UNET = dict(
    sample_size=28, in_channels=1, out_channels=1, block_out_channels=[32, 64, 64], layers_per_block=1,
    down_block_types=["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
    up_block_types=["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"], attention_head_dim=32, norm_num_groups=8,
)
TINY_COND = dict(SD15_UNET, block_out_channels=[32, 64, 64, 64], cross_attention_dim=32, norm_num_groups=8)


def _measure(call) -> int:
    """Peak RSS the call adds above the RSS before it, in kB."""
    import ctypes
    import gc

    gc.collect()
    try:  # hand freed heap memory back to the OS, so the RSS before the call holds no allocator cache
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    if not reset_peak_rss():
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs); Linux >= 4.0 needed")
    before = rss_kb()
    call()
    return peak_rss_kb() - before


def child_checkpointing(model_name: str, ckpt: bool, quick: bool) -> dict:
    import torch

    import diffusekit

    torch.manual_seed(0)
    if model_name == "sd15":
        model = diffusekit.UNet2DConditionModel(**(TINY_COND if quick else SD15_UNET))
        side = 8 if quick else 32
        inputs = (torch.randn(1, 4, side, side), torch.tensor([500]),
                  torch.randn(1, 77, 32 if quick else 768))
    else:
        model = diffusekit.UNet2DModel(**TRAIN_UNET)
        inputs = (torch.randn(8 if quick else 64, 1, 28, 28), torch.randint(0, 1000, (8 if quick else 64,)))
    model.train()
    if ckpt:
        model.enable_gradient_checkpointing()
    saved = []
    weights = {p.data_ptr() for p in model.parameters()}

    def pack(t):  # (bytes, is a parameter): saved weights are resident anyway, activations are what checkpointing drops
        saved.append((t.numel() * t.element_size(), t.data_ptr() in weights))
        return t

    def step(inputs):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(*inputs).sample
            loss = torch.nn.functional.mse_loss(out, torch.zeros_like(out))
        loss.backward()

    # a first step on a small input warms up imports (torch.utils.checkpoint's first use imports modules) without
    # leaving big freed blocks in the allocator; the measured step allocates the parameters' .grad again (set to
    # None), in both modes alike
    step(tuple(x[:1, ..., :8, :8] if x.ndim == 4 else x[:1] for x in inputs))
    model.zero_grad(set_to_none=True)
    saved.clear()
    added = _measure(lambda: step(inputs))
    grads = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"peak_added_kb": added, "saved_for_backward_bytes": sum(n for n, _ in saved),
            "saved_activation_bytes": sum(n for n, is_weight in saved if not is_weight), "grad_bytes": grads}


def child_slicing(library: str, slice_size, quick: bool) -> dict:
    import torch

    lib = __import__(library)
    torch.manual_seed(0)
    model = lib.UNet2DConditionModel(**(TINY_COND if quick else SD15_UNET)).eval()
    if slice_size is not None:
        model.set_attention_slice(slice_size)
    side = 16 if quick else 64
    inputs = (torch.randn(2, 4, side, side), torch.tensor([500]), torch.randn(2, 77, 32 if quick else 768))
    with torch.no_grad():
        model(*(x[:1, ..., :8, :8] if x.ndim == 4 else x[:1] for x in inputs))  # warm-up on a small input
        added = _measure(lambda: model(*inputs))
    return {"peak_added_kb": added}


def child_layer(slice_size, quick: bool) -> dict:
    """One self-attention layer of SD 1.5's first stage (320 channels, 8 heads of 40) on 4096 tokens, batch 2."""
    import torch

    from diffusekit.models.attention import Attention

    torch.manual_seed(0)
    layer = Attention(320, heads=8, dim_head=40)
    if slice_size is not None:
        layer.set_attention_slice(slice_size)
    x = torch.randn(2, 256 if quick else 4096, 320)
    with torch.no_grad():
        layer(x[:, :64])  # warm-up on a small input
        added = _measure(lambda: layer(x))
    return {"peak_added_kb": added}


def main() -> None:
    parser = common_args(__doc__.splitlines()[0])
    parser.add_argument("--child", default=None, help=argparse_hidden())
    parser.add_argument("--checkpointing-models", default="sd15,train-default",
                        help="which models the checkpointing benchmark trains one step of (sd15, train-default)")
    parser.add_argument("--slicing-libraries", default="diffusekit,diffusers",
                        help="libraries whose UNet the slicing benchmark runs (diffusekit, diffusers)")
    args = parser.parse_args()
    quiet_environment(args.threads)
    if args.child:
        set_threads(args.threads)
        spec = json.loads(args.child)
        if spec["kind"] == "layer":
            emit(child_layer(spec["slice"], args.quick))
        elif spec["kind"] == "checkpointing":
            emit(child_checkpointing(spec["model"], spec["ckpt"], args.quick))
        else:
            emit(child_slicing(spec["library"], spec["slice"], args.quick))
        return

    def child(spec: dict) -> dict:
        argv = ["-m", "benchmarks.bench_memory", "--threads", str(args.threads), "--child", json.dumps(spec)]
        return run_child(argv + (["--quick"] if args.quick else []), timeout=3600)

    mib = 1024
    results = {}
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    if not wanted or "checkpointing" in wanted:
        models = [m.strip() for m in args.checkpointing_models.split(",") if m.strip()]
        for model in models:
            rows = {ckpt: child({"kind": "checkpointing", "model": model, "ckpt": ckpt}) for ckpt in (False, True)}
            off, on = rows[False], rows[True]
            print(f"checkpointing {model}: peak added {off['peak_added_kb'] / mib:.0f} -> "
                  f"{on['peak_added_kb'] / mib:.0f} MiB (grads {off['grad_bytes'] / 2**20:.0f} MiB of it); "
                  f"saved for backward {off['saved_for_backward_bytes'] / 2**20:.0f} -> "
                  f"{on['saved_for_backward_bytes'] / 2**20:.0f} MiB, of which activations (not weights) "
                  f"{off['saved_activation_bytes'] / 2**20:.0f} -> {on['saved_activation_bytes'] / 2**20:.0f} MiB",
                  flush=True)
            results[f"checkpointing/{model}"] = rows
    if not wanted or "slicing" in wanted:
        for library in [lib.strip() for lib in args.slicing_libraries.split(",") if lib.strip()]:
            for slice_size in (None, "auto"):  # "max" (one head at a time) takes ~7 min per child here
                row = child({"kind": "slicing", "library": library, "slice": slice_size})
                print(f"slicing {library} {slice_size}: peak added {row['peak_added_kb'] / mib:.0f} MiB", flush=True)
                results[f"slicing/{library}/{slice_size}"] = row
    if wanted and "layer" in wanted:  # light: not part of the default run
        for slice_size in (None, "auto", 1):
            size = 4 if slice_size == "auto" else slice_size
            row = child({"kind": "layer", "slice": size})
            print(f"layer slice {slice_size}: peak added {row['peak_added_kb'] / mib:.0f} MiB", flush=True)
            results[f"layer/{slice_size}"] = row
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    sys.exit(main())
