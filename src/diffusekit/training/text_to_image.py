"""``diffusekit train text-to-image``: a tiny Stable Diffusion on Fashion-MNIST garments tinted with named colours.

Every training image is a garment tinted with one of :data:`~.data.COLORS` and padded to 32x32; its caption names the
colour and the class through varied templates ("a photo of a red sneaker", "an ankle boot, product shot" ...), so
the prompt controls both. Two stages, each a resumable :class:`~.loop.TrainLoop` in its own folder:

1. ``vae``: an ``AutoencoderKL`` (32x32x3 <-> 8x8x4, factor 4) trained on L1 + MSE reconstruction with a small KL
   term; its ``scaling_factor`` is set to 1 / std of the latents, as SD's was.
2. ``unet``: the latents of ``--latent-images`` tinted images are computed once (posterior means, cached in
   ``latents.pt``), then a ``CLIPTextModel`` (the real CLIP vocabulary, :mod:`.tokenizer`) and a
   ``UNet2DConditionModel`` are trained together on noise prediction (``DDPMScheduler`` with SD's betas), with
   ``--caption-dropout`` empty captions for classifier-free guidance.

The result is ``<output-dir>/pipeline``: the layout of an SD 1.x checkpoint (``model_index.json``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``unet/``, ``scheduler/``), loadable by diffusekit and by diffusers.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .._io import atomic_write
from .data import COLORS, EpochSampler, load_images, make_caption, pad_to, prompt_for, tint
from .loop import TrainLoop, replace_folder, seed_everything
from .unconditional import add_common_arguments, diffusion_loss, int_tuple, noise_target

logger = logging.getLogger(__name__)

COLOR_NAMES = tuple(COLORS)
PALETTE = np.array([COLORS[c] for c in COLOR_NAMES], np.float32)
IMAGE_SIZE = 32

VAE_KEYS = ("dataset", "limit", "seed", "vae_batch_size", "vae_lr", "vae_block_out_channels", "kl_weight",
            "grad_clip", "ema_decay")
UNET_KEYS = ("dataset", "limit", "seed", "batch_size", "lr", "warmup_steps", "lr_schedule", "weight_decay",
             "grad_clip", "ema_decay", "latent_images", "unet_block_out_channels", "text_hidden_size",
             "text_layers", "text_heads", "max_length", "caption_dropout", "snr_gamma", "prediction_type")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)  # --steps / --batch-size / --lr ... are the UNet stage's
    parser.set_defaults(steps=4000, batch_size=64, lr=1e-3)
    g = parser.add_argument_group("text-to-image")
    g.add_argument("--stage", default="all", choices=("vae", "unet", "all"),
                   help="vae: train the autoencoder; unet: text encoder + UNet (needs the vae stage); all: both")
    g.add_argument("--vae-steps", type=int, default=1500)
    g.add_argument("--vae-batch-size", type=int, default=32)
    g.add_argument("--vae-lr", type=float, default=1e-3)
    g.add_argument("--vae-block-out-channels", type=int_tuple, default=(32, 64, 64))
    g.add_argument("--kl-weight", type=float, default=1e-4, help="weight of the per-pixel KL term")
    g.add_argument("--latent-images", type=int, default=20000, help="tinted training images encoded for stage 2")
    g.add_argument("--unet-block-out-channels", type=int_tuple, default=(48, 96))
    g.add_argument("--text-hidden-size", type=int, default=32)
    g.add_argument("--text-layers", type=int, default=2)
    g.add_argument("--text-heads", type=int, default=4)
    g.add_argument("--max-length", type=int, default=32, help="tokenizer model_max_length = text positions")
    g.add_argument("--caption-dropout", type=float, default=0.1, help="share of empty captions (for CFG)")
    g.add_argument("--snr-gamma", type=float, default=5.0)
    g.add_argument("--prediction-type", default="epsilon", choices=("epsilon", "v_prediction"))
    g.add_argument("--vocab", default=None, help="CLIP bpe_simple_vocab_16e6.txt.gz (default: open-clip-torch's)")
    g.add_argument("--sample-steps", type=int, default=25)
    g.add_argument("--guidance-scale", type=float, default=4.0)
    g.add_argument("--num-samples", type=int, default=1,
                   help="0: no samples.png; else write it (one row per class, one column per colour)")


# ------------------------------------------------------------------------------------------------------ models


def build_vae(args, scaling_factor: float = 1.0):
    from ..models.autoencoder_kl import AutoencoderKL

    n = len(args.vae_block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=tuple(args.vae_block_out_channels),
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=1, latent_channels=4, norm_num_groups=16, sample_size=IMAGE_SIZE,
        scaling_factor=scaling_factor,
    )


def build_text_encoder(args):
    from ..models.clip import CLIPTextModel

    return CLIPTextModel(
        vocab_size=49408, hidden_size=args.text_hidden_size, intermediate_size=4 * args.text_hidden_size,
        projection_dim=args.text_hidden_size, num_hidden_layers=args.text_layers,
        num_attention_heads=args.text_heads, max_position_embeddings=args.max_length, pad_token_id=49407,
        bos_token_id=49406, eos_token_id=49407,
    )


def build_unet(args, latent_size: int):
    from ..models.unet_2d_condition import UNet2DConditionModel

    n = len(args.unet_block_out_channels)
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, block_out_channels=tuple(args.unet_block_out_channels),
        down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
        layers_per_block=1, cross_attention_dim=args.text_hidden_size, attention_head_dim=8, norm_num_groups=16,
    )


def train_scheduler(args):
    """SD 1.x's training noise schedule."""
    from ..schedulers.ddpm import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type=args.prediction_type, clip_sample=False, steps_offset=1)


def inference_scheduler(args):
    """The scheduler shipped in the pipeline: DPM-Solver++ (2M), good at 20-25 steps, same betas."""
    from ..schedulers.dpmsolver_multistep import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", prediction_type=args.prediction_type,
                                       steps_offset=1)


# ------------------------------------------------------------------------------------------------------ data


def tinted_batch(images_uint8: np.ndarray, color_idx: np.ndarray) -> torch.Tensor:
    """uint8 garments (B, 28, 28) + palette indices (B,) -> tinted (B, 3, 32, 32) in [-1, 1]."""
    rgb = pad_to(tint(images_uint8, PALETTE[color_idx]), IMAGE_SIZE)
    return torch.from_numpy(rgb).mul_(2.0).sub_(1.0)


def _loop_kwargs(args, keys, steps, lr, warmup, description):
    return dict(config={k: getattr(args, k) for k in keys}, lr=lr, total_steps=steps, warmup_steps=warmup,
                lr_schedule=args.lr_schedule, weight_decay=args.weight_decay, grad_clip=args.grad_clip or None,
                ema_decay=args.ema_decay, seed=args.seed, device=args.device, bf16=args.bf16,
                gradient_checkpointing=args.gradient_checkpointing,
                checkpoint_every=args.checkpoint_every, time_limit_minutes=args.time_limit,
                stop_after=args.stop_after, progress=not args.no_progress, description=description)


# ------------------------------------------------------------------------------------------------------ stage 1


def train_vae(args, images: np.ndarray) -> Path:
    """Train the autoencoder; export it (EMA weights, scaling factor measured) to ``<out>/vae/model``."""
    out = Path(args.output_dir) / "vae"
    vae = build_vae(args)
    loop = TrainLoop(out, {"vae": vae}, **_loop_kwargs(args, VAE_KEYS, args.vae_steps, args.vae_lr, 100, "vae"))
    if not args.no_resume and loop.resume():
        print(f"resuming the VAE at step {loop.step}/{args.vae_steps}")
    print(f"AutoencoderKL {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters")
    sampler = EpochSampler(len(images), args.vae_batch_size, args.seed)

    def loss_fn(step: int) -> torch.Tensor:
        idx = sampler.indices(step)
        colors = np.random.default_rng([args.seed, step, 1]).integers(len(PALETTE), size=len(idx))
        x = tinted_batch(images[idx], colors).to(loop.device)
        posterior = loop.modules["vae"].encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=loop.generator).to(x.device)
        recon = loop.modules["vae"].decode(z).sample.float()
        kl = posterior.kl().mean() / x[0].numel()
        return F.l1_loss(recon, x) + F.mse_loss(recon, x) + args.kl_weight * kl

    loop.run(loss_fn)
    vae_ema = loop.ema_copy("vae", build_vae(args)).cpu()
    # scaling factor: unit variance latents for the diffusion model, measured on 2000 tinted training images
    rng = np.random.default_rng([args.seed, 2])
    pick = rng.permutation(len(images))[:2000]
    with torch.no_grad():
        latents = torch.cat([vae_ema.encode(tinted_batch(images[chunk], rng.integers(len(PALETTE), size=len(chunk))))
                             .latent_dist.mean for chunk in np.array_split(pick, 10)])
    scaling_factor = float(1.0 / latents.std())
    final = build_vae(args, scaling_factor=round(scaling_factor, 5))
    final.load_state_dict(vae_ema.state_dict())
    tmp = out / f".model.{int(time.time() * 1000)}.tmp"
    final.save_pretrained(tmp)
    replace_folder(tmp, out / "model")
    with torch.no_grad():  # reconstruction error of the exported VAE on held-in images, for the log
        held = pick[:500]
        x = tinted_batch(images[held], rng.integers(len(PALETTE), size=len(held)))
        recon = final.decode(final.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        mae = float((recon - x).abs().mean() / 2)  # in [0, 1] pixel units
    loop.write_report({"scaling_factor": scaling_factor, "reconstruction_mae_01": mae,
                       "command": getattr(args, "command_line", None)})
    _save_reconstructions(x[:16], recon[:16], out / "reconstructions.png")
    print(f"VAE: step {loop.step}, scaling_factor {scaling_factor:.4f}, reconstruction MAE {mae:.4f}; "
          f"exported {out / 'model'}")
    return out / "model"


def _save_reconstructions(x: torch.Tensor, recon: torch.Tensor, path: Path) -> None:
    from ..utils import image_grid
    from ..pipelines.image_processor import postprocess

    image_grid(postprocess(torch.cat([x, recon]), "pil"), columns=len(x)).save(path)


# ------------------------------------------------------------------------------------------------------ stage 2


def encode_latents(args, vae, images: np.ndarray, labels: np.ndarray) -> dict:
    """Posterior means x scaling factor of ``--latent-images`` tinted training images (cached in latents.pt)."""
    path = Path(args.output_dir) / "latents.pt"
    key = {"n": args.latent_images, "seed": args.seed, "vae": vae.config.scaling_factor}
    if path.is_file():
        try:  # tensors and plain values only: never unpickle objects
            cached = torch.load(path, weights_only=True)
        except Exception as err:  # an unreadable or foreign cache is rebuilt, not trusted
            logger.warning("ignoring latent cache %s (%s); encoding again", path, str(err).splitlines()[0])
            cached = {"key": None}
        if cached.get("key") == key:
            return cached
    from tqdm.auto import tqdm

    rng = np.random.default_rng([args.seed, 3])
    pick = rng.permutation(len(images))[: args.latent_images]
    colors = rng.integers(len(PALETTE), size=len(pick))
    chunks = []
    with torch.no_grad():
        for part in tqdm(np.array_split(np.arange(len(pick)), max(1, len(pick) // 250)), desc="encode latents",
                         disable=args.no_progress):
            x = tinted_batch(images[pick[part]], colors[part])
            chunks.append(vae.encode(x).latent_dist.mean * vae.config.scaling_factor)
    cached = {"key": key, "latents": torch.cat(chunks), "labels": torch.from_numpy(labels[pick]),
              "colors": torch.from_numpy(colors)}
    atomic_write(path, lambda tmp: torch.save(cached, tmp))
    return cached


def train_unet(args, images: np.ndarray, labels: np.ndarray) -> Path:
    from ..models.autoencoder_kl import AutoencoderKL
    from .tokenizer import build_clip_tokenizer

    vae_dir = Path(args.output_dir) / "vae" / "model"
    if not (vae_dir / "config.json").is_file():
        raise FileNotFoundError(f"{vae_dir} does not exist: run --stage vae first (or --stage all)")
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    data = encode_latents(args, vae, images, labels)
    latents, lat_labels, lat_colors = data["latents"], data["labels"].numpy(), data["colors"].numpy()
    tokenizer = build_clip_tokenizer(args.max_length, args.vocab)
    text_encoder, unet = build_text_encoder(args), build_unet(args, latents.shape[-1])
    out = Path(args.output_dir) / "unet"
    loop = TrainLoop(out, {"unet": unet, "text_encoder": text_encoder},
                     **_loop_kwargs(args, UNET_KEYS, args.steps, args.lr, args.warmup_steps, "text-to-image"))
    if not args.no_resume and loop.resume():
        print(f"resuming the UNet at step {loop.step}/{args.steps}")
    count = {n: sum(p.numel() for p in m.parameters()) / 1e6 for n, m in loop.modules.items()}
    print(f"UNet2DConditionModel {count['unet']:.2f}M, CLIPTextModel {count['text_encoder']:.2f}M parameters; "
          f"{len(latents)} latents {tuple(latents.shape[1:])}")
    scheduler = train_scheduler(args)
    sampler = EpochSampler(len(latents), args.batch_size, args.seed)
    device, gen = loop.device, loop.generator

    def loss_fn(step: int) -> torch.Tensor:
        idx = sampler.indices(step)
        rng = np.random.default_rng([args.seed, step, 4])
        captions = ["" if rng.random() < args.caption_dropout else
                    make_caption(int(lat_labels[i]), COLOR_NAMES[lat_colors[i]], rng) for i in idx]
        ids = tokenizer(captions, padding="max_length", max_length=args.max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        states = loop.modules["text_encoder"](ids)[0]
        x0 = latents[torch.from_numpy(idx)].to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, 1000, (x0.shape[0],), generator=gen).to(device)
        pred = loop.modules["unet"](scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=states).sample
        target = noise_target(scheduler, x0, noise, t, args.prediction_type)
        return diffusion_loss(pred, target, t, scheduler.alphas_cumprod, args.prediction_type, args.snr_gamma)

    loop.run(loss_fn)
    pipeline_dir = export_pipeline(loop, args, vae, tokenizer, latents.shape[-1])
    loop.write_report({"parameters_millions": count, "command": getattr(args, "command_line", None)})
    print(f"step {loop.step}: exported {pipeline_dir}")
    return pipeline_dir


def export_pipeline(loop: TrainLoop, args, vae, tokenizer, latent_size: int) -> Path:
    from ..pipelines.stable_diffusion import StableDiffusionPipeline

    unet = loop.ema_copy("unet", build_unet(args, latent_size)).cpu()
    text_encoder = loop.ema_copy("text_encoder", build_text_encoder(args)).cpu()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=inference_scheduler(args), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    final = Path(args.output_dir) / "pipeline"
    tmp = Path(args.output_dir) / f".pipeline.{int(time.time() * 1000)}.tmp"
    pipe.save_pretrained(tmp)  # CLIP classes record themselves as ["transformers", ...] entries, as diffusers expects
    replace_folder(tmp, final)
    return final


def sample_grid(pipeline_dir, steps: int, guidance_scale: float, seed: int, device: str = "cpu", rows: int = 10):
    """One row per class (the first ``rows``), one column per colour: "a photo of a <colour> <class>"."""
    from ..utils import image_grid
    from ..pipelines.base import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(pipeline_dir).to(device)
    pipe.set_progress_bar_config(disable=True)
    prompts = [prompt_for(label, color) for label in range(rows) for color in COLOR_NAMES]
    images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale,
                  generator=torch.Generator("cpu").manual_seed(seed)).images
    return image_grid(images, columns=len(COLOR_NAMES))


def train(args: argparse.Namespace) -> Path:
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    images, labels = load_images(args.dataset, "train", args.data_dir, args.limit, seed=args.seed)
    if args.stage in ("vae", "all"):
        train_vae(args, images)
    if args.stage == "vae":
        return Path(args.output_dir) / "vae" / "model"
    pipeline_dir = train_unet(args, images, labels)
    if args.num_samples:
        grid = sample_grid(pipeline_dir, args.sample_steps, args.guidance_scale, args.seed, args.device)
        grid.save(Path(args.output_dir) / "samples.png")
        print(f"samples: {Path(args.output_dir) / 'samples.png'}")
    return pipeline_dir
