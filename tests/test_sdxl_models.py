"""SDXL models: UNet2DConditionModel with ``addition_embed_type="text_time"`` (base, refiner and inpainting configs)
and OpenCLIP bigG as CLIPTextModelWithProjection; parity on tiny versions, every key and shape of the real ones on
the meta device."""

from __future__ import annotations

import pytest
import torch

from diffusekit import CLIPTextModelWithProjection, UNet2DConditionModel

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

TOL = dict(rtol=1e-5, atol=1e-5)

# unet/config.json of stabilityai/stable-diffusion-xl-base-1.0 (keys with diffusers' defaults left out)
SDXL_BASE = {
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "in_channels": 4,
    "layers_per_block": 2, "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10], "upcast_attention": None, "use_linear_projection": True,
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}
# ... of stabilityai/stable-diffusion-xl-refiner-1.0: 1280-wide context (bigG only), 5 time ids (aesthetic score)
SDXL_REFINER = dict(
    SDXL_BASE, attention_head_dim=[6, 12, 24, 24], block_out_channels=[384, 768, 1536, 1536], cross_attention_dim=1280,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    projection_class_embeddings_input_dim=2560, transformer_layers_per_block=4,
)
# ... of diffusers/stable-diffusion-xl-1.0-inpainting-0.1: the base with latents + mask + masked image latents
SDXL_INPAINT = dict(SDXL_BASE, in_channels=9)
# text_encoder_2/config.json of the base (OpenCLIP ViT-bigG/14; ids as the hub file has them)
BIGG = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=1280, bos_token_id=0, eos_token_id=2,
    pad_token_id=1, layer_norm_eps=1e-5,
)

# tiny versions: same block pattern, per-block transformer depths, linear projections, text_time embedding
SDXL_TINY = dict(
    sample_size=8, block_out_channels=(16, 32, 32), layers_per_block=1, attention_head_dim=[2, 4, 4],
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=[1, 2, 3],
    cross_attention_dim=24, use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
    projection_class_embeddings_input_dim=16 + 6 * 4, norm_num_groups=8,
)
REFINER_TINY = dict(SDXL_TINY, cross_attention_dim=16, projection_class_embeddings_input_dim=16 + 5 * 4,
                    transformer_layers_per_block=2)


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("config", [SDXL_BASE, SDXL_REFINER, SDXL_INPAINT], ids=["base", "refiner", "inpaint"])
def test_full_size_sdxl_unets_have_diffusers_keys_and_shapes(config):
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**config)
        ours = UNet2DConditionModel(**config)
    assert _shapes(ours) == _shapes(ref)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())  # base: 2.57 G


def test_full_size_bigg_text_encoder_has_transformers_keys_and_shapes():
    config = transformers.CLIPTextConfig(**BIGG)
    with torch.device("meta"):
        ref = transformers.CLIPTextModelWithProjection(config)
        ours = CLIPTextModelWithProjection(**BIGG)
    assert _shapes(ours) == _shapes(ref)


@pytest.mark.parametrize("config, ids", [(SDXL_TINY, 6), (REFINER_TINY, 5)], ids=["base", "refiner"])
def test_text_time_unet_matches_diffusers(tmp_path, config, ids):
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**config).eval()
    torch.manual_seed(0)
    seeded = UNet2DConditionModel(**config)
    for key, value in ref.state_dict().items():  # seeded init builds the same weights
        torch.testing.assert_close(seeded.state_dict()[key], value, rtol=0, atol=0, msg=key)
    ref.save_pretrained(tmp_path)
    ours = UNet2DConditionModel.from_pretrained(tmp_path)
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 7, config["cross_attention_dim"], generator=g)
    added = {"text_embeds": torch.randn(2, 16, generator=g),
             "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64][:ids], [48.0, 40, 8, 0, 64, 64][:ids]])}
    with torch.no_grad():
        expected = ref(sample, 321, context, added_cond_kwargs=added).sample
        got = ours(sample, 321, context, added_cond_kwargs=added).sample
        other = ours(sample, 321, context, added_cond_kwargs={**added, "time_ids": added["time_ids"] + 8}).sample
    torch.testing.assert_close(got, expected, **TOL)
    assert not torch.allclose(got, other)  # the size conditioning matters
    with pytest.raises(ValueError, match="time_ids"):
        ours(sample, 321, context, added_cond_kwargs={"text_embeds": added["text_embeds"]})


def test_text_time_needs_its_dimensions():
    with pytest.raises(ValueError, match="addition_time_embed_dim"):
        UNet2DConditionModel(**dict(SDXL_TINY, addition_time_embed_dim=None))
