"""Every name of the original single-file layout (CompVis ``ldm`` / Stability) and its diffusers counterpart, as data.

One table per component, read in both directions (``layout.py`` applies them): loading turns original keys into
diffusers keys, ``save_single_file`` turns them back. Each module entry is

    (diffusers module template, original module template, sub-table or None, value transform or None)

A template names a module (or one tensor) by a dotted path; ``{block}`` / ``{layer}`` are the diffusers indices, and
the other fields (``{input}``, ``{output}``, ``{middle}``, ``{slot}``, ``{rblock}``, ``{layer1}``) are derived from
them by the index rules at the end of this file. Entries are tried in order; the first whose template matches a
prefix of the key wins. A sub-table renames the rest of the key (its first dotted parts); its values are a name, or
``(name, transform)``. Transforms:

- ``"conv1x1"``: the original stores a linear weight as a 1x1 convolution, ``(out, in, 1, 1)`` vs ``(out, in)``
  (biases are unchanged);
- ``"transpose"``: the original stores ``x @ W`` where diffusers stores ``nn.Linear`` weights (``W.T``);
- ``("part", i, n)``: the original fuses ``n`` diffusers tensors along dim 0 (OpenCLIP's ``in_proj`` = q, k, v);
  this diffusers tensor is part ``i``.

Real key names, checked against the released files (``v1-5-pruned.safetensors``,
``v2-1_768-ema-pruned.safetensors``, ``sd-v1-5-inpainting.ckpt``): ``model.diffusion_model.input_blocks.1.1.
transformer_blocks.0.attn1.to_q.weight``, ``first_stage_model.decoder.up.3.block.0.nin_shortcut.weight``,
``cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.k_proj.bias``,
``cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight``.
"""

from __future__ import annotations

# ---------------------------------------------------------------------------------------------------- prefixes

#: where each component lives in a full checkpoint; when reading, the first prefix with the component's anchor key
#: wins ("" = a file holding only that component, e.g. the A1111 standalone VAE files ``vae-ft-mse-*.safetensors``)
UNET_PREFIXES = ("model.diffusion_model.", "")
VAE_PREFIXES = ("first_stage_model.", "vae.", "")
#: text encoder layouts: "clip" is transformers' CLIPTextModel (OpenAI CLIP ViT-L/14, SD 1.x, SDXL's first),
#: "open_clip" is open_clip's own module tree (OpenCLIP ViT-H/14 of SD 2.x, ViT-bigG/14 of SDXL)
#: where a pipeline's text encoder slot is found: (layout, prefix), first match wins ("" = a file with only it)
TEXT_ENCODER_SLOTS = {
    "text_encoder": (("clip", "cond_stage_model.transformer."), ("open_clip", "cond_stage_model.model."),
                     ("clip", "conditioner.embedders.0.transformer."), ("clip", ""), ("open_clip", "")),
    "text_encoder_2": (("open_clip", "conditioner.embedders.1.model."),  # SDXL base
                       ("open_clip", "conditioner.embedders.0.model."),  # SDXL refiner
                       ("open_clip", ""), ("clip", "")),
}
#: where a pipeline's text encoders are written: SD 1.x/2.x by layout (SAVE_PREFIXES); SDXL by slot (the refiner
#: has only bigG)
XL_TEXT_SAVE_PREFIXES = {"text_encoder": "conditioner.embedders.0.transformer.",
                         "text_encoder_2": "conditioner.embedders.1.model."}
XL_REFINER_TEXT_SAVE_PREFIX = "conditioner.embedders.0.model."
#: a key each component has whatever its size (relative to its prefix): how a component is found in a file
ANCHORS = {
    "unet": "input_blocks.0.0.weight",
    "vae": "encoder.conv_in.weight",
    "clip": "text_model.embeddings.token_embedding.weight",
    "open_clip": "token_embedding.weight",
}
#: prefixes that would be written when saving one component alone (A1111 keeps standalone VAEs unprefixed)
SAVE_PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
                 "clip": "cond_stage_model.transformer.", "open_clip": "cond_stage_model.model."}
STANDALONE_SAVE_PREFIXES = {"unet": "model.diffusion_model.", "vae": "",
                            "clip": "cond_stage_model.transformer.", "open_clip": "cond_stage_model.model."}

# ---------------------------------------------------------------------------------------------------- UNet

UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

UNET = (
    ("time_embedding.linear_1", "time_embed.0", None, None),
    ("time_embedding.linear_2", "time_embed.2", None, None),
    ("conv_in", "input_blocks.0.0", None, None),
    ("conv_norm_out", "out.0", None, None),
    ("conv_out", "out.2", None, None),
    ("down_blocks.{block}.resnets.{layer}", "input_blocks.{input}.0", UNET_RESNET, None),
    ("down_blocks.{block}.attentions.{layer}", "input_blocks.{input}.1", None, None),  # same names inside
    ("down_blocks.{block}.downsamplers.0.conv", "input_blocks.{input}.0.op", None, None),
    ("mid_block.resnets.{layer}", "middle_block.{middle}", UNET_RESNET, None),
    ("mid_block.attentions.0", "middle_block.1", None, None),
    ("up_blocks.{block}.resnets.{layer}", "output_blocks.{output}.0", UNET_RESNET, None),
    ("up_blocks.{block}.attentions.{layer}", "output_blocks.{output}.1", None, None),
    ("up_blocks.{block}.upsamplers.0.conv", "output_blocks.{output}.{slot}.conv", None, None),
    # SDXL: pooled text + size / crop time ids
    ("add_embedding.linear_1", "label_emb.0.0", None, None),
    ("add_embedding.linear_2", "label_emb.0.2", None, None),
)

# ---------------------------------------------------------------------------------------------------- VAE

VAE_RESNET = {"conv_shortcut": "nin_shortcut"}  # norm1, conv1, norm2, conv2 keep their names
VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": ("q", "conv1x1"),
    "to_k": ("k", "conv1x1"),
    "to_v": ("v", "conv1x1"),
    "to_out.0": ("proj_out", "conv1x1"),
}

VAE = (
    ("encoder.conv_in", "encoder.conv_in", None, None),
    ("encoder.down_blocks.{block}.resnets.{layer}", "encoder.down.{block}.block.{layer}", VAE_RESNET, None),
    ("encoder.down_blocks.{block}.downsamplers.0.conv", "encoder.down.{block}.downsample.conv", None, None),
    ("encoder.mid_block.resnets.{layer}", "encoder.mid.block_{layer1}", VAE_RESNET, None),
    ("encoder.mid_block.attentions.0", "encoder.mid.attn_1", VAE_ATTENTION, None),
    ("encoder.conv_norm_out", "encoder.norm_out", None, None),
    ("encoder.conv_out", "encoder.conv_out", None, None),
    ("quant_conv", "quant_conv", None, None),
    ("post_quant_conv", "post_quant_conv", None, None),
    ("decoder.conv_in", "decoder.conv_in", None, None),
    ("decoder.mid_block.resnets.{layer}", "decoder.mid.block_{layer1}", VAE_RESNET, None),
    ("decoder.mid_block.attentions.0", "decoder.mid.attn_1", VAE_ATTENTION, None),
    # the original decoder counts its up blocks from the lowest resolution's end: up.{n-1} runs first
    ("decoder.up_blocks.{block}.resnets.{layer}", "decoder.up.{rblock}.block.{layer}", VAE_RESNET, None),
    ("decoder.up_blocks.{block}.upsamplers.0.conv", "decoder.up.{rblock}.upsample.conv", None, None),
    ("decoder.conv_norm_out", "decoder.norm_out", None, None),
    ("decoder.conv_out", "decoder.conv_out", None, None),
)

# ---------------------------------------------------------------------------------------------------- text encoders

#: transformers' CLIPTextModel under ``cond_stage_model.transformer.``: the same names
CLIP = (("text_model", "text_model", None, None),)

OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.q_proj.weight": ("attn.in_proj_weight", ("part", 0, 3)),
    "self_attn.k_proj.weight": ("attn.in_proj_weight", ("part", 1, 3)),
    "self_attn.v_proj.weight": ("attn.in_proj_weight", ("part", 2, 3)),
    "self_attn.q_proj.bias": ("attn.in_proj_bias", ("part", 0, 3)),
    "self_attn.k_proj.bias": ("attn.in_proj_bias", ("part", 1, 3)),
    "self_attn.v_proj.bias": ("attn.in_proj_bias", ("part", 2, 3)),
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}

#: open_clip's text tower (``open_clip.CLIP``: token_embedding, positional_embedding, transformer.resblocks,
#: ln_final, text_projection) as a transformers CLIPTextModel(WithProjection)
OPEN_CLIP = (
    ("text_model.embeddings.token_embedding", "token_embedding", None, None),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding", None, None),
    ("text_model.encoder.layers.{layer}", "transformer.resblocks.{layer}", OPEN_CLIP_LAYER, None),
    ("text_model.final_layer_norm", "ln_final", None, None),
    ("text_projection.weight", "text_projection", None, "transpose"),
)

#: keys inside a component's prefix that carry no weights the diffusers model uses: dropped quietly (unless the
#: model has them, e.g. CLIPTextModelWithProjection's projection)
IGNORED = {
    "unet": (),
    "vae": (r"^loss\.",),  # the LPIPS / discriminator of the VAE's training loss
    "clip": (r"(^|\.)position_ids$", r"^text_projection\.", r"^logit_scale$"),
    # SD 2.x uses OpenCLIP's penultimate layer: the last resblock and the projection are unused (see layout.py)
    "open_clip": (r"^logit_scale$", r"^attn_mask$", r"^text_projection$"),
}

TABLES = {"unet": UNET, "vae": VAE, "clip": CLIP, "open_clip": OPEN_CLIP}

# ---------------------------------------------------------------------------------------------------- detection

#: keys that identify a model family (diffusers' ``CHECKPOINT_KEY_NAMES`` for these families)
KEY_V1 = "model.diffusion_model.output_blocks.11.0.skip_connection.weight"
KEY_V2 = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"  # (320, 1024) in SD 2.x
KEY_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"  # 9 input channels: an inpainting UNet
#: SDXL: diffusers tests resblocks.9 of these OpenCLIP towers; here any key under them counts (any size)
PREFIX_SDXL_BASE = "conditioner.embedders.1.model."
PREFIX_SDXL_REFINER = "conditioner.embedders.0.model."
KEY_EMA_COUNT = 100  # a file holds EMA weights when more than this many keys start with "model_ema." (diffusers)
EMA_PREFIX = "model_ema."
EMA_BOOKKEEPING = ("model_ema.decay", "model_ema.num_updates")

# ---------------------------------------------------------------------------------------------------- defaults

#: what the weights do not say, per model family: the values of the reference diffusers repos that diffusers'
#: ``from_single_file`` fetches for them (stable-diffusion-v1-5, stable-diffusion-2-1, the two inpainting repos)
SCHEDULER_BASE = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
}
_SD1 = {
    "image_size": 512, "unet_heads": ("count", 8), "upcast_attention": False, "prediction_type": "epsilon",
    "scheduler": ("PNDMScheduler", {"skip_prk_steps": True}), "pad_token": {"tokenizer": "<|endoftext|>"},
    "vae": {"scaling_factor": 0.18215}, "open_clip_penultimate": True, "options": {}, "xl": False,
}
_SDXL = {
    "image_size": 1024, "unet_heads": ("width", 64), "upcast_attention": False, "prediction_type": "epsilon",
    "scheduler": ("EulerDiscreteScheduler", {"timestep_spacing": "leading", "interpolation_type": "linear"}),
    "pad_token": {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"},
    "vae": {"scaling_factor": 0.13025, "force_upcast": True},
    "addition_time_embed_dim": 256,
    # SDXL uses bigG's penultimate hidden states *and* its final pooled, projected output: every layer is used
    "open_clip_penultimate": False, "options": {}, "xl": True,
}
FAMILIES = {
    "v1": _SD1,
    "inpainting": _SD1,
    "v2": {**_SD1, "image_size": 768, "unet_heads": ("width", 64), "upcast_attention": True,
           "prediction_type": "v_prediction", "scheduler": ("DDIMScheduler", {}), "pad_token": {"tokenizer": "!"}},
    "inpainting_v2": {**_SD1, "unet_heads": ("width", 64), "pad_token": {"tokenizer": "!"}},
    # stable-diffusion-xl-base-1.0, -refiner-1.0, and diffusers/stable-diffusion-xl-1.0-inpainting-0.1
    "xl_base": _SDXL,
    "xl_inpaint": _SDXL,
    "xl_refiner": {**_SDXL, "options": {"requires_aesthetics_score": True, "force_zeros_for_empty_prompt": False}},
}
#: SD 2.x 512-px base (``v2-1_512-ema-pruned``) predicts noise; diffusers tells it by this training step
V2_EPSILON_GLOBAL_STEP = 875000
NORM_NUM_GROUPS = 32  # every SD UNet and VAE; not visible in the weights
CLIP_HEAD_WIDTH = 64  # CLIP ViT-L/14 (768 / 12 heads) and OpenCLIP ViT-H/14 (1024 / 16): heads = width / 64
TEXT_ACTIVATION = {"clip": "quick_gelu", "open_clip": "gelu"}
CLIP_VOCAB_SIZE = 49408


# ---------------------------------------------------------------------------------------------------- index rules


def unet_indices(fields: dict, config) -> dict:
    """The original UNet's flat indices from diffusers' (block, layer): ``input_blocks`` counts conv_in, then per
    down block its resnets (+ attention in the same slot) and the downsampler; ``output_blocks`` per up block its
    ``layers + 1`` resnets, the upsampler sharing the last slot (after the attention, if any)."""
    layers = config["layers_per_block"]
    block = fields.get("block", 0)
    # a downsampler sits in the slot after a down block's ``layers`` resnets; an upsampler shares the up block's
    # last slot (index ``layers``: up blocks have ``layers + 1`` resnets)
    layer = fields.get("layer", layers)
    up_attention = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    return {
        "input": 1 + block * (layers + 1) + layer,
        "output": block * (layers + 1) + layer,
        "middle": 2 * fields.get("layer", 0),
        "slot": 2 if up_attention[block] else 1,
    }


def vae_indices(fields: dict, config) -> dict:
    """The original VAE numbers the decoder's up blocks in reverse and its mid resnets from 1."""
    n = len(config["up_block_types"])
    return {"rblock": n - 1 - fields.get("block", 0), "layer1": fields.get("layer", 0) + 1}


INDEX_RULES = {"unet": unet_indices, "vae": vae_indices}
