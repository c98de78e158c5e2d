"""Tiny random Stable Diffusion XL pipelines built with diffusers + transformers (the reference), saved to a folder.

``build_tiny_sdxl(folder, ...)`` writes the folder layout of ``stable-diffusion-xl-base-1.0`` (model_index.json,
unet/, vae/, text_encoder/ (CLIP ViT-L-like), text_encoder_2/ (OpenCLIP bigG-like: gelu, projection), tokenizer/,
tokenizer_2/ (pads with "!"), scheduler/) or, with ``refiner=True``, of the refiner (no text_encoder / tokenizer,
aesthetic-score time ids). Both tokenizers use the real CLIP vocabulary (its first merges).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from clip_assets import write_clip_tokenizer
from sd_assets import NUM_MERGES, tiny_vae_kwargs

WIDTH_1, WIDTH_2 = 32, 32  # hidden widths of the two text encoders (the UNet context is their sum)
TIME_DIM = 8  # addition_time_embed_dim


def tiny_sdxl_unet_kwargs(in_channels: int = 4, refiner: bool = False, **overrides):
    ids = 5 if refiner else 6
    kwargs = dict(
        sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
        cross_attention_dim=WIDTH_2 if refiner else WIDTH_1 + WIDTH_2, addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM, projection_class_embeddings_input_dim=WIDTH_2 + ids * TIME_DIM,
        norm_num_groups=8,
    )
    kwargs.update(overrides)
    return kwargs


def _text_config(transformers, width: int, **extra):
    return transformers.CLIPTextConfig(
        vocab_size=1000, hidden_size=width, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=998, eos_token_id=999, pad_token_id=999, layer_norm_eps=1e-5,
        projection_dim=width, **extra,
    )


def build_tiny_sdxl(folder: str | Path, pipeline: str = "StableDiffusionXLPipeline", refiner: bool = False,
                    unet_in_channels: int = 4, scheduler=None, seed: int = 0) -> Path:
    """Save a tiny random SDXL pipeline of class ``pipeline`` with diffusers; return the folder."""
    import diffusers
    import transformers

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**tiny_sdxl_unet_kwargs(unet_in_channels, refiner))
    vae = diffusers.AutoencoderKL(**tiny_vae_kwargs(scaling_factor=0.13025, force_upcast=True))
    text_encoder = None if refiner else transformers.CLIPTextModel(_text_config(transformers, WIDTH_1)).eval()
    text_encoder_2 = transformers.CLIPTextModelWithProjection(
        _text_config(transformers, WIDTH_2, hidden_act="gelu")).eval()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = None
        if not refiner:
            write_clip_tokenizer(Path(tmp) / "1", num_merges=NUM_MERGES)
            tokenizer = transformers.CLIPTokenizer.from_pretrained(Path(tmp) / "1")
        write_clip_tokenizer(Path(tmp) / "2", pad_token="!", num_merges=NUM_MERGES)
        tokenizer_2 = transformers.CLIPTokenizer.from_pretrained(Path(tmp) / "2")
    scheduler = scheduler or diffusers.EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading", interpolation_type="linear", prediction_type="epsilon",
    )
    options = {"requires_aesthetics_score": True, "force_zeros_for_empty_prompt": False} if refiner else {}
    cls = getattr(diffusers, pipeline)
    pipe = cls(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
               tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, **options)
    pipe.save_pretrained(folder)
    return folder
