"""Tiny random Stable Diffusion pipelines built with diffusers + transformers (the reference), saved to a folder.

``build_tiny_sd(folder, ...)`` writes the exact SD folder layout (model_index.json, unet/, vae/, text_encoder/,
tokenizer/, scheduler/) as diffusers' ``save_pretrained`` does, with a small tokenizer built from the real CLIP
vocabulary (first ``num_merges`` merges). Reused by every SD-family pipeline test.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from clip_assets import write_clip_tokenizer

NUM_MERGES = 486  # a 1000-token vocabulary: bos 998, eos 999
CROSS_DIM = 32


def tiny_unet_kwargs(in_channels: int = 4, **overrides):
    kwargs = dict(
        sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_DIM, attention_head_dim=4, norm_num_groups=8,
    )
    kwargs.update(overrides)
    return kwargs


def tiny_vae_kwargs(**overrides):
    kwargs = dict(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1, sample_size=16,
    )
    kwargs.update(overrides)
    return kwargs


def build_tiny_sd(folder: str | Path, scheduler=None, unet_in_channels: int = 4, pipeline: str = "StableDiffusionPipeline",
                  seed: int = 0, legacy_tokenizer_files: bool = False, text_overrides: dict | None = None,
                  vae_overrides: dict | None = None, **unet_overrides) -> Path:
    """Save a tiny random SD pipeline of class ``pipeline`` with diffusers; return the folder.

    transformers 5 saves the tokenizer as ``tokenizer.json``; ``legacy_tokenizer_files`` also writes the
    ``vocab.json`` / ``merges.txt`` files that SD checkpoints on the Hub carry. ``text_overrides`` /
    ``vae_overrides`` change the text encoder's / VAE's config (e.g. ``hidden_act="gelu"`` for SD 2.x's OpenCLIP).
    """
    import diffusers
    import transformers

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**tiny_unet_kwargs(unet_in_channels, **unet_overrides))
    vae = diffusers.AutoencoderKL(**tiny_vae_kwargs(**(vae_overrides or {})))
    text_config = transformers.CLIPTextConfig(**{
        **dict(vocab_size=1000, hidden_size=CROSS_DIM, intermediate_size=37, num_hidden_layers=3,
               num_attention_heads=4, max_position_embeddings=77, bos_token_id=998, eos_token_id=999,
               pad_token_id=999, layer_norm_eps=1e-5, projection_dim=CROSS_DIM),
        **(text_overrides or {}),
    })
    text_encoder = transformers.CLIPTextModel(text_config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer(tmp, num_merges=NUM_MERGES)
        tokenizer = transformers.CLIPTokenizer.from_pretrained(tmp)
    scheduler = scheduler or diffusers.PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
        set_alpha_to_one=False, steps_offset=1,
    )
    cls = getattr(diffusers, pipeline)
    pipe = cls(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    if legacy_tokenizer_files:  # the vocab.json + merges.txt layout of SD checkpoints on the Hub
        write_clip_tokenizer(folder / "tokenizer", num_merges=NUM_MERGES)
    return folder


def load_both(folder: str | Path, pipeline: str = "StableDiffusionPipeline"):
    """``(ours, reference)``: the pipeline class ``pipeline`` of diffusekit and of diffusers loaded from ``folder``,
    progress bars off."""
    import diffusekit
    import diffusers

    pipes = getattr(diffusekit, pipeline).from_pretrained(folder), getattr(diffusers, pipeline).from_pretrained(folder)
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
    return pipes
