"""``diffusekit train unconditional``: a ``UNet2DModel`` + ``DDPMScheduler`` (a ``DDPMPipeline``) on Fashion-MNIST.

The output folder holds ``checkpoint.pt`` (everything needed to resume), ``pipeline/`` (the EMA weights as a
diffusers-format ``DDPMPipeline``: ``model_index.json``, ``unet/``, ``scheduler/``), ``loss.png``, ``samples.png``
and ``train_log.json``. Rerunning the same command resumes from the checkpoint; a larger ``--steps`` trains on.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import EpochSampler, load_images, pad_to
from .loop import TrainLoop, replace_folder, seed_everything


def int_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    g = parser.add_argument_group("model")
    g.add_argument("--sample-size", type=int, default=28, help="image side: 28 (native) or 32 (padded with black)")
    g.add_argument("--channels", type=int, default=1, choices=(1, 3), help="1: grayscale, 3: gray copied to RGB")
    g.add_argument("--block-out-channels", type=int_tuple, default=(32, 64, 64), help="e.g. 32,64,64")
    g.add_argument("--layers-per-block", type=int, default=1)
    g.add_argument("--attention-levels", type=int_tuple, default=(0, 0, 1),
                   help="one 0/1 per level: 1 puts self-attention in that level's blocks (default 0,0,1)")
    g.add_argument("--attention-head-dim", type=int, default=32)
    g.add_argument("--norm-num-groups", type=int, default=8)
    g.add_argument("--num-train-timesteps", type=int, default=1000)
    g.add_argument("--beta-schedule", default="linear", choices=("linear", "scaled_linear", "squaredcos_cap_v2"))
    g.add_argument("--prediction-type", default="epsilon", choices=("epsilon", "v_prediction", "sample"))
    g.add_argument("--snr-gamma", type=float, default=None,
                   help="min-SNR loss weighting (Hang et al. 2023), e.g. 5; default: plain MSE")
    g.add_argument("--sample-steps", type=int, default=100, help="DDPM steps for the samples.png grid")
    g.add_argument("--num-samples", type=int, default=16, help="images in samples.png (0: skip)")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="fashion-mnist", choices=("fashion-mnist", "synthetic"),
                   help="fashion-mnist (idx files of the Debian package) or synthetic blobs (tests, smoke runs)")
    g.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST idx files")
    g.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    g = parser.add_argument_group("training")
    g.add_argument("--output-dir", required=True, help="checkpoint, exported pipeline, loss curve and samples")
    g.add_argument("--steps", type=int, default=3000, help="total optimizer steps (a resume trains up to this)")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--warmup-steps", type=int, default=100)
    g.add_argument("--lr-schedule", default="cosine", choices=("constant", "cosine"))
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    g.add_argument("--ema-decay", type=float, default=0.999)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--checkpoint-every", type=int, default=250, help="steps between checkpoints (0: only at the end)")
    g.add_argument("--no-resume", action="store_true", help="start over even if the output folder has a checkpoint")
    g.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                   help="stop (checkpoint + export) after this much training time; rerun to continue")
    g.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop (checkpoint + export) after N steps of this invocation; rerun to continue")
    g.add_argument("--device", default="cpu")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast (where the CPU/GPU supports it natively)")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute UNet/VAE block activations in the backward pass: less memory, more compute, "
                        "same gradients")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


RESULT_KEYS = (  # settings that change the trained weights: a resume must keep them
    "dataset", "limit", "batch_size", "lr", "warmup_steps", "lr_schedule", "weight_decay", "grad_clip", "ema_decay",
    "seed", "sample_size", "channels", "block_out_channels", "layers_per_block", "attention_levels",
    "attention_head_dim", "norm_num_groups", "num_train_timesteps", "beta_schedule", "prediction_type", "snr_gamma",
)


def result_config(args: argparse.Namespace, keys=RESULT_KEYS) -> dict:
    return {k: getattr(args, k) for k in keys}


def build_unet(args):
    from ..models.unet_2d import UNet2DModel

    levels = len(args.block_out_channels)
    attention = tuple(args.attention_levels) + (0,) * (levels - len(args.attention_levels))
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention[:levels])
    return UNet2DModel(
        sample_size=args.sample_size, in_channels=args.channels, out_channels=args.channels,
        block_out_channels=tuple(args.block_out_channels), layers_per_block=args.layers_per_block,
        down_block_types=down, up_block_types=tuple(d.replace("Down", "Up") for d in reversed(down)),
        attention_head_dim=args.attention_head_dim, norm_num_groups=args.norm_num_groups,
    )


def build_scheduler(args):
    from ..schedulers.ddpm import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=args.num_train_timesteps, beta_schedule=args.beta_schedule,
                         prediction_type=args.prediction_type, clip_sample=True, variance_type="fixed_small")


def to_model_range(images_uint8: np.ndarray, sample_size: int, channels: int) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, C, S, S) in [-1, 1]."""
    x = torch.from_numpy(pad_to(images_uint8, sample_size)).float().div_(127.5).sub_(1.0)[:, None]
    return x.expand(-1, channels, -1, -1).contiguous() if channels > 1 else x


def diffusion_loss(model_output, target, timesteps, alphas_cumprod, prediction_type, snr_gamma):
    """MSE, optionally weighted per sample by min-SNR-gamma (weights for eps / v / x0 targets)."""
    if snr_gamma is None:
        return F.mse_loss(model_output.float(), target.float())
    alpha = alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alpha / (1 - alpha)
    clipped = torch.clamp(snr, max=snr_gamma)
    weight = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}[prediction_type]
    per_sample = F.mse_loss(model_output.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weight).mean()


def noise_target(scheduler, x0, noise, timesteps, prediction_type):
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    return x0


def train(args: argparse.Namespace) -> Path:
    """Train (or resume), export the EMA pipeline, draw the loss curve and a sample grid. Returns the output dir."""
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    out = Path(args.output_dir)
    images, _ = load_images(args.dataset, "train", args.data_dir, args.limit, seed=args.seed)
    data = to_model_range(images, args.sample_size, args.channels)
    unet, scheduler = build_unet(args), build_scheduler(args)
    loop = TrainLoop(
        out, {"unet": unet}, config=result_config(args), lr=args.lr, total_steps=args.steps,
        warmup_steps=args.warmup_steps, lr_schedule=args.lr_schedule, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip or None, ema_decay=args.ema_decay, seed=args.seed, device=args.device,
        bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing, checkpoint_every=args.checkpoint_every,
        time_limit_minutes=args.time_limit, stop_after=args.stop_after,
        progress=not args.no_progress, description="unconditional",
    )
    if not args.no_resume and loop.resume():
        print(f"resuming {out / 'checkpoint.pt'} at step {loop.step}/{args.steps}")
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"UNet2DModel {n_params / 1e6:.2f}M parameters; {len(data)} training images; batch {args.batch_size}")
    sampler = EpochSampler(len(data), args.batch_size, args.seed)
    device, gen = loop.device, loop.generator
    alphas_cumprod = scheduler.alphas_cumprod

    def loss_fn(step: int) -> torch.Tensor:
        x0 = data[torch.from_numpy(sampler.indices(step))].to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, args.num_train_timesteps, (x0.shape[0],), generator=gen).to(device)
        noisy = scheduler.add_noise(x0, noise, t)
        pred = loop.modules["unet"](noisy, t).sample
        target = noise_target(scheduler, x0, noise, t, args.prediction_type)
        return diffusion_loss(pred, target, t, alphas_cumprod, args.prediction_type, args.snr_gamma)

    loop.run(loss_fn)
    pipeline_dir = export_pipeline(loop, args, scheduler)
    loop.write_report({"parameters": n_params, "command": getattr(args, "command_line", None)})
    print(f"step {loop.step}: exported the EMA pipeline to {pipeline_dir}; loss curve {out / 'loss.png'}")
    if args.num_samples:
        grid = sample_grid(pipeline_dir, args.num_samples, args.sample_steps, args.seed, args.device)
        grid.save(out / "samples.png")
        print(f"samples: {out / 'samples.png'}")
    return out


def export_pipeline(loop: TrainLoop, args, scheduler) -> Path:
    from ..pipelines.ddpm import DDPMPipeline

    unet = loop.ema_copy("unet", build_unet(args)).to("cpu")
    final = loop.output_dir / "pipeline"
    tmp = loop.output_dir / f".pipeline.{int(time.time() * 1000)}.tmp"
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp)
    replace_folder(tmp, final)
    return final


def sample_grid(pipeline_dir, num_images: int, steps: int, seed: int, device: str = "cpu"):
    from ..utils import image_grid
    from ..pipelines.ddpm import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(pipeline_dir).to(device)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=num_images, num_inference_steps=steps, generator=torch.manual_seed(seed)).images
    return image_grid(images)
