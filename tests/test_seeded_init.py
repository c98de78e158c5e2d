"""Seeded initialisation equals diffusers': ``torch.manual_seed(s); Model(**cfg)`` gives every tensor bit-equal.

Modules draw random numbers in the order they are built, so this checks that every model and block builds its
submodules in diffusers' order and runs the same initialisers (and that the state dict lists keys in the same
order, so optimizer states, which are keyed by parameter position, carry over). The default suite runs the real
block structures at reduced widths; the real sizes are under ``-m slow`` (several GB of RAM).
"""

from __future__ import annotations

import pytest
import torch

import diffusekit
from sd_assets import tiny_unet_kwargs, tiny_vae_kwargs
from test_unet_2d import DDPM_256_CONFIG, TINY as UNET2D_TINY
from test_sdxl_models import REFINER_TINY, SDXL_TINY
from test_unet_2d_condition import SD15_CONFIG

diffusers = pytest.importorskip("diffusers")


def assert_same_init(name: str, config: dict, seed: int = 0) -> None:
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    torch.manual_seed(seed)
    ours = getattr(diffusekit, name)(**config).state_dict()
    torch.manual_seed(seed)
    ref = getattr(diffusers, name)(**config).state_dict()
    assert list(ours) == list(ref), "state dict keys differ (in names or order)"
    differing = [k for k in ref if not torch.equal(ours[k], ref[k])]
    assert not differing, f"{len(differing)} of {len(ref)} tensors differ after the same seed: {differing[:8]}"


# the SD 1.5 / ddpm-cat / SD 1.5 VAE block structures at reduced widths (same block types, layers and heads)
SD15_REDUCED = dict(SD15_CONFIG, block_out_channels=[32, 64, 64, 64], norm_num_groups=8, cross_attention_dim=24)
DDPM_CAT_REDUCED = dict(DDPM_256_CONFIG, block_out_channels=[8, 8, 16, 16, 32, 32], norm_num_groups=4, sample_size=64)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=512,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)
SD15_VAE_REDUCED = dict(SD15_VAE, block_out_channels=(8, 16, 32, 32), norm_num_groups=4)

CASES = {
    "unet2d-tiny": ("UNet2DModel", UNET2D_TINY),
    "unet2d-ddpm-cat-reduced": ("UNet2DModel", DDPM_CAT_REDUCED),
    "unet2d-fourier-resnet-resampling": (  # Fourier features (diffusers draws them twice) and resnet up/down samplers
        "UNet2DModel",
        dict(UNET2D_TINY, layers_per_block=2, time_embedding_type="fourier", downsample_type="resnet",
             upsample_type="resnet", class_embed_type="timestep"),
    ),
    "unet2d-class-table": ("UNet2DModel", dict(UNET2D_TINY, num_class_embeds=5, attention_head_dim=None)),
    "unet2dcondition-tiny": ("UNet2DConditionModel", tiny_unet_kwargs()),
    "unet2dcondition-sd15-reduced": ("UNet2DConditionModel", SD15_REDUCED),
    "unet2dcondition-sd2-style": (  # linear projections, two transformer layers, LCM guidance, projected classes
        "UNet2DConditionModel",
        tiny_unet_kwargs(layers_per_block=2, use_linear_projection=True, transformer_layers_per_block=2,
                         time_cond_proj_dim=8, class_embed_type="projection", projection_class_embeddings_input_dim=6),
    ),
    "unet2dcondition-fourier-plain-mid": (
        "UNet2DConditionModel",
        tiny_unet_kwargs(time_embedding_type="fourier", num_class_embeds=3, mid_block_type="UNetMidBlock2D"),
    ),
    "unet2dcondition-sdxl-tiny": ("UNet2DConditionModel", SDXL_TINY),  # text_time added embedding
    "unet2dcondition-sdxl-refiner-tiny": ("UNet2DConditionModel", REFINER_TINY),
    "vae-tiny": ("AutoencoderKL", tiny_vae_kwargs()),
    "vae-sd15-reduced": ("AutoencoderKL", SD15_VAE_REDUCED),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_seeded_init_equals_diffusers(case):
    name, config = CASES[case]
    assert_same_init(name, config)


def test_seeded_init_depends_on_the_seed():
    """The comparison can fail: other seeds give other weights."""
    torch.manual_seed(0)
    a = diffusekit.UNet2DConditionModel(**tiny_unet_kwargs()).state_dict()
    torch.manual_seed(1)
    b = diffusekit.UNet2DConditionModel(**tiny_unet_kwargs()).state_dict()
    assert not torch.equal(a["conv_in.weight"], b["conv_in.weight"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, config",
    [("UNet2DConditionModel", SD15_CONFIG), ("UNet2DModel", DDPM_256_CONFIG), ("AutoencoderKL", SD15_VAE)],
    ids=["sd15-unet", "ddpm-cat-256", "sd15-vae"],
)
def test_seeded_init_equals_diffusers_full_size(name, config):
    """Real sizes (SD 1.5 UNet: two 860M-parameter models, ~7 GB; run it with nothing else heavy on the machine)."""
    assert_same_init(name, config)


CLIP_CONFIGS = {
    "tiny": dict(vocab_size=100, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=10, projection_dim=8),
    "scaled-gelu": dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                        num_attention_heads=4, max_position_embeddings=77, projection_dim=24, hidden_act="gelu",
                        initializer_factor=0.5, initializer_range=0.05),
}


@pytest.mark.parametrize("projection", [False, True], ids=["CLIPTextModel", "CLIPTextModelWithProjection"])
@pytest.mark.parametrize("config", sorted(CLIP_CONFIGS))
def test_clip_text_seeded_init_equals_transformers(config, projection):
    """transformers 5 initialises twice (a generic pass, then CLIP's, children before parents) and builds the
    projection after initialising the text transformer: the same seed gives the same tensors here."""
    transformers = pytest.importorskip("transformers")
    name = "CLIPTextModelWithProjection" if projection else "CLIPTextModel"
    cfg = CLIP_CONFIGS[config]
    torch.manual_seed(0)
    ours = getattr(diffusekit, name)(**cfg).state_dict()
    torch.manual_seed(0)
    ref = getattr(transformers, name)(transformers.CLIPTextConfig(**cfg, bos_token_id=0, eos_token_id=1,
                                                                  pad_token_id=1)).state_dict()
    # transformers 5's CLIPTextModel is the text transformer itself: its keys lack the checkpoints' "text_model."
    ref = {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v for k, v in ref.items()}
    assert list(ours) == list(ref), "state dict keys differ (in names or order)"
    differing = [k for k in ref if not torch.equal(ours[k], ref[k])]
    assert not differing, f"{len(differing)} of {len(ref)} tensors differ after the same seed: {differing[:8]}"
    torch.manual_seed(1)
    assert not torch.equal(getattr(diffusekit, name)(**cfg).state_dict()["text_model.encoder.layers.0.mlp.fc1.weight"],
                           ours["text_model.encoder.layers.0.mlp.fc1.weight"])
