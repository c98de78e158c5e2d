"""The single-file tables at the real sizes, on the meta device (no memory, no data): SD 1.5 and SD 2.1.

For each full-size component, the original keys and shapes our writer would produce are checked three ways:
against diffusers' own converter (``convert_ldm_unet_checkpoint`` & co. turn them back into exactly the diffusers
model's keys and shapes), against key counts and names of the released files, and by inferring the architecture
back from them (which must give the reference repos' configs).
"""

from __future__ import annotations

import pytest
import torch

import diffusekit
from diffusekit.single_file import infer, keymaps, layout

diffusers = pytest.importorskip("diffusers")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")

SD15_UNET = dict(sample_size=64, cross_attention_dim=768)  # diffusers' defaults are SD 1.x's otherwise
SD21_UNET = dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                 use_linear_projection=True, upcast_attention=True)
SD_VAE = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
              up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4, sample_size=512)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, hidden_act="quick_gelu")
OPEN_CLIP_H = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                   num_attention_heads=16, hidden_act="gelu", projection_dim=512)


def _meta(cls, **config):
    with torch.device("meta"):
        return cls(**config)


def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


def _written(model, kind):
    """Our writer's output, on meta tensors."""
    from diffusekit.single_file.loading import component_state_dict

    return component_state_dict(model, kind)


@pytest.mark.parametrize("name,unet_config,family", [("sd15", SD15_UNET, "v1"), ("sd21", SD21_UNET, "v2")])
def test_full_size_unet_keys(name, unet_config, family):
    ours = _meta(diffusekit.UNet2DConditionModel, **unet_config)
    ref = _meta(diffusers.UNet2DConditionModel, **unet_config)
    original = _written(ours, "unet")
    assert len(original) == 686  # the released v1-5 / v2-1 files hold 686 model.diffusion_model.* tensors
    for key, shape in {
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1) if family == "v1" else (320, 320),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight":
            (1280, 768 if family == "v1" else 1024),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "model.diffusion_model.time_embed.2.weight": (1280, 1280),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    }.items():
        assert tuple(original[key].shape) == shape, key
    # diffusers' converter takes our keys back to exactly its model's keys and shapes
    converted = single_file_utils.convert_ldm_unet_checkpoint(original, dict(ref.config))
    assert _shapes(converted) == _shapes(ref.state_dict())
    # and the architecture inferred from the shapes is the reference repo's
    shapes = {k.removeprefix("model.diffusion_model."): tuple(v.shape) for k, v in original.items()}
    inferred = infer.unet_config(shapes, family)
    for key, value in inferred.items():
        want = ours.config[key]
        assert (list(value) if isinstance(value, (list, tuple)) else value) == \
            (list(want) if isinstance(want, (list, tuple)) else want), key


def test_full_size_vae_keys():
    ours = _meta(diffusekit.AutoencoderKL, **SD_VAE)
    ref = _meta(diffusers.AutoencoderKL, **SD_VAE)
    original = _written(ours, "vae")
    assert len(original) == 248  # first_stage_model.* of v1-5-pruned, less the training loss' keys
    assert tuple(original["first_stage_model.decoder.mid.attn_1.q.weight"].shape) == (512, 512, 1, 1)
    assert tuple(original["first_stage_model.decoder.up.0.block.0.nin_shortcut.weight"].shape) == (128, 256, 1, 1)
    assert tuple(original["first_stage_model.encoder.down.0.downsample.conv.weight"].shape) == (128, 128, 3, 3)
    bare = {k.removeprefix("first_stage_model."): v for k, v in original.items()}
    converted = single_file_utils.convert_ldm_vae_checkpoint(bare, dict(ref.config))
    assert _shapes(converted) == _shapes(ref.state_dict())
    inferred = infer.vae_config(_shapes(bare), "v1")
    assert inferred["block_out_channels"] == [128, 256, 512, 512] and inferred["layers_per_block"] == 2


def test_full_size_text_encoders():
    transformers = pytest.importorskip("transformers")
    clip = _meta(diffusekit.CLIPTextModel, **CLIP_L)
    original = _written(clip, "text_encoder")
    assert len(original) == 196  # v1-5's cond_stage_model.* less the position_ids buffer
    assert "cond_stage_model.transformer.text_model.encoder.layers.11.self_attn.out_proj.weight" in original

    open_clip = _meta(diffusekit.CLIPTextModel, **OPEN_CLIP_H)
    original = _written(open_clip, "text_encoder")
    assert tuple(original["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape) == (3072, 1024)
    assert tuple(original["cond_stage_model.model.positional_embedding"].shape) == (77, 1024)
    # the released v2-1 file: 24 resblocks and the projection; SD 2.x uses 23 of them
    released = _shapes(original)
    for key in [k for k in released if ".resblocks.22." in k]:
        released[key.replace(".resblocks.22.", ".resblocks.23.")] = released[key]
    released["cond_stage_model.model.text_projection"] = (1024, 1024)
    released["cond_stage_model.model.logit_scale"] = ()
    assert len(released) == 24 * 12 + 4 + 2  # resblocks, embeddings + ln_final, text_projection + logit_scale
    bare = {k.removeprefix("cond_stage_model.model."): s for k, s in released.items()}
    inferred = infer.text_encoder_config(bare, "open_clip")
    for key, value in OPEN_CLIP_H.items():
        if key != "projection_dim":
            assert inferred[key] == value, key
    # diffusers' OpenCLIP converter splits our fused in_proj back into q/k/v of transformers' model
    with torch.device("meta"):
        ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**OPEN_CLIP_H))
    converted = single_file_utils.convert_open_clip_checkpoint(ref, original, prefix="cond_stage_model.model.")
    converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    assert _shapes(converted) == {k: s for k, s in _shapes(ref.state_dict()).items() if "position_ids" not in k}


def test_tables_are_read_both_ways():
    """Every original key a table produces maps back to one diffusers key (or the q/k/v parts of one fused key)."""
    for kind, model in (("unet", _meta(diffusekit.UNet2DConditionModel, **SD21_UNET)),
                        ("vae", _meta(diffusekit.AutoencoderKL, **SD_VAE)),
                        ("open_clip", _meta(diffusekit.CLIPTextModel, **OPEN_CLIP_H))):
        kmap = layout.key_map(kind, model.state_dict(), model.config)
        owners: dict[str, list] = {}
        for key, ref in kmap.items():
            owners.setdefault(ref.key, []).append(ref.transform)
        for original, transforms in owners.items():
            assert len(transforms) == 1 or sorted(t[1] for t in transforms) == [0, 1, 2], original
    assert keymaps.TABLES.keys() == {"unet", "vae", "clip", "open_clip"}


SDXL_UNET = dict(sample_size=128, block_out_channels=[320, 640, 1280],
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
BIG_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
             num_attention_heads=20, hidden_act="gelu", projection_dim=1280)


def test_full_size_sdxl():
    transformers = pytest.importorskip("transformers")
    ours = _meta(diffusekit.UNet2DConditionModel, **SDXL_UNET)
    ref = _meta(diffusers.UNet2DConditionModel, **SDXL_UNET)
    original = _written(ours, "unet")
    assert tuple(original["model.diffusion_model.label_emb.0.0.weight"].shape) == (1280, 2816)
    assert "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight" in original
    converted = single_file_utils.convert_ldm_unet_checkpoint(original, dict(ref.config))
    assert _shapes(converted) == _shapes(ref.state_dict())
    shapes = {k.removeprefix("model.diffusion_model."): tuple(v.shape) for k, v in original.items()}
    inferred = infer.unet_config(shapes, "xl_base")
    for key, value in inferred.items():
        want = ours.config[key]
        assert (list(value) if isinstance(value, (list, tuple)) else value) == \
            (list(want) if isinstance(want, (list, tuple)) else want), key
    # bigG with its projection: every layer is used, the projection is transposed
    big = _meta(diffusekit.CLIPTextModelWithProjection, **BIG_G)
    from diffusekit.single_file.loading import component_state_dict

    written = component_state_dict(big, "text_encoder", "conditioner.embedders.1.model.")
    assert tuple(written["conditioner.embedders.1.model.text_projection"].shape) == (1280, 1280)
    bare = {k.removeprefix("conditioner.embedders.1.model."): tuple(v.shape) for k, v in written.items()}
    inferred = infer.text_encoder_config(bare, "open_clip", "xl_base")
    assert inferred["num_hidden_layers"] == 32 and inferred["num_attention_heads"] == 20
    with torch.device("meta"):
        ref_big = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**BIG_G))
    converted = single_file_utils.convert_open_clip_checkpoint(ref_big, written, prefix="conditioner.embedders.1.model.")
    assert _shapes(converted) == {k: s for k, s in _shapes(ref_big.state_dict()).items() if "position_ids" not in k}
