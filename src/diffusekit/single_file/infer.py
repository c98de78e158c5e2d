"""What model a single file holds: the family (SD 1.x, 2.x, inpainting) and each component's diffusers config.

Sizes come from the tensors' shapes (channels, levels, layers per block, attention placement, text width and
depth); what the weights cannot show (attention heads, group-norm groups, upcasting, image size, scheduler) comes
from the family's defaults in ``keymaps.FAMILIES``, which are the values of the reference repos diffusers fetches.
``original_config`` (the ``v1-inference.yaml`` style file of the original code) overrides the inferred values.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

from . import keymaps

Shape = tuple[int, ...]


class SingleFileError(ValueError):
    """A single file that does not hold what the caller asked for (wrong model, component missing)."""


# ---------------------------------------------------------------------------------------------------- detection


def text_encoder_layout(shapes: Mapping[str, Shape], slot: str = "text_encoder") -> tuple[str, str] | None:
    """("clip" | "open_clip", prefix) of a pipeline's text encoder slot ("text_encoder", "text_encoder_2") in the
    file, or None if the file has none there."""
    for layout, prefix in keymaps.TEXT_ENCODER_SLOTS[slot]:
        if prefix + keymaps.ANCHORS[layout] in shapes:
            return layout, prefix
    return None


def component_prefix(kind: str, shapes: Mapping[str, Shape]) -> str | None:
    """The prefix under which ``kind`` ("unet", "vae") lives in the file, or None if it is not there."""
    prefixes = keymaps.UNET_PREFIXES if kind == "unet" else keymaps.VAE_PREFIXES
    for prefix in prefixes:
        if prefix + keymaps.ANCHORS[kind] in shapes:
            return prefix
    return None


def detect_family(shapes: Mapping[str, Shape], extras: Mapping[str, Any] | None = None) -> str:
    """"v1", "v2", "inpainting", "inpainting_v2", "xl_base", "xl_refiner", "xl_inpaint" (diffusers' rules).

    SD 2.x is told by the UNet's 1024-wide cross-attention (diffusers' rule) or, for UNets of other sizes, by an
    OpenCLIP text encoder in the file; SDXL by its ``conditioner.embedders`` text encoders.
    """
    inpainting = keymaps.KEY_CONV_IN in shapes and len(shapes[keymaps.KEY_CONV_IN]) == 4 and \
        shapes[keymaps.KEY_CONV_IN][1] == 9
    if any(key.startswith(keymaps.PREFIX_SDXL_BASE) for key in shapes):
        return "xl_inpaint" if inpainting else "xl_base"
    if any(key.startswith(keymaps.PREFIX_SDXL_REFINER) for key in shapes):
        return "xl_refiner"
    layout = text_encoder_layout(shapes)
    v2 = (keymaps.KEY_V2 in shapes and shapes[keymaps.KEY_V2][-1] == 1024) or (layout and layout[0] == "open_clip")
    if inpainting:
        return "inpainting_v2" if v2 else "inpainting"
    return "v2" if v2 else "v1"


def prediction_type(family: str, extras: Mapping[str, Any] | None = None) -> str:
    """The family's prediction type; SD 2.x 512-px base checkpoints (``global_step`` 875000) predict noise."""
    default = keymaps.FAMILIES[family]["prediction_type"]
    if family == "v2" and extras and extras.get("global_step") == keymaps.V2_EPSILON_GLOBAL_STEP:
        return "epsilon"
    return default


def family_defaults(family: str) -> dict[str, Any]:
    return keymaps.FAMILIES[family]


# ---------------------------------------------------------------------------------------------------- from shapes


def _indices(shapes: Mapping[str, Shape], pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for key in shapes for m in [regex.match(key)] if m})


def unet_config(shapes: Mapping[str, Shape], family: str, vae_scale: int = 8) -> dict[str, Any]:
    """A diffusers ``UNet2DConditionModel`` config from the original UNet's shapes (keys relative to its prefix)."""
    defaults = family_defaults(family)
    conv_in = shapes["input_blocks.0.0.weight"]  # (C0, in, 3, 3)
    levels: list[list[int]] = [[]]  # input_blocks indices of each level's resnets
    for index in _indices(shapes, r"^input_blocks\.(\d+)\.")[1:]:
        if f"input_blocks.{index}.0.op.weight" in shapes:
            levels.append([])
        else:
            levels[-1].append(index)
    counts = {len(level) for level in levels}
    if len(counts) != 1 or not levels[0]:
        raise SingleFileError(f"the UNet's levels have different numbers of resnets ({sorted(counts)}): "
                              "not an SD 1.x / 2.x UNet")
    layers = counts.pop()
    channels = [shapes[f"input_blocks.{level[0]}.0.out_layers.3.weight"][0] for level in levels]
    down_attention = [f"input_blocks.{level[0]}.1.proj_in.weight" in shapes for level in levels]
    up_attention = [f"output_blocks.{b * (layers + 1)}.1.proj_in.weight" in shapes for b in range(len(levels))]

    attention_keys = [k for k in shapes if k.endswith(".attn2.to_k.weight")]
    proj_in = [k for k in shapes if k.endswith(".proj_in.weight")]
    # transformer depth per level (1 where a level has no attention, as diffusers' configs say)
    depth = [len(_indices(shapes, rf"^input_blocks\.{level[0]}\.1\.transformer_blocks\.(\d+)\.")) if attn else 1
             for level, attn in zip(levels, down_attention)]
    kind, value = defaults["unet_heads"]
    heads = value if kind == "count" else [c // value for c in channels]
    config = {
        "sample_size": defaults["image_size"] // vae_scale,
        "in_channels": conv_in[1],
        "out_channels": shapes["out.2.weight"][0],
        "block_out_channels": channels,
        "layers_per_block": layers,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attention],
        "mid_block_type": "UNetMidBlock2DCrossAttn" if "middle_block.1.proj_in.weight" in shapes else "UNetMidBlock2D",
        "cross_attention_dim": shapes[attention_keys[0]][1] if attention_keys else 1280,
        "attention_head_dim": heads,
        "use_linear_projection": bool(proj_in) and len(shapes[proj_in[0]]) == 2,
        "transformer_layers_per_block": depth[0] if len(set(depth)) == 1 else depth,
        "upcast_attention": defaults["upcast_attention"],
        "norm_num_groups": keymaps.NORM_NUM_GROUPS,
    }
    if "label_emb.0.0.weight" in shapes:  # SDXL: pooled text + size / crop time ids
        config.update(addition_embed_type="text_time", addition_time_embed_dim=defaults["addition_time_embed_dim"],
                      projection_class_embeddings_input_dim=shapes["label_emb.0.0.weight"][1])
    return config


def vae_config(shapes: Mapping[str, Shape], family: str) -> dict[str, Any]:
    """A diffusers ``AutoencoderKL`` config from the original VAE's shapes (keys relative to its prefix)."""
    defaults = family_defaults(family)
    levels = _indices(shapes, r"^encoder\.down\.(\d+)\.")
    channels = [shapes[f"encoder.down.{i}.block.0.conv2.weight"][0] for i in levels]
    latent = shapes["post_quant_conv.weight"][0] if "post_quant_conv.weight" in shapes else \
        shapes["decoder.conv_in.weight"][1]
    return {
        "in_channels": shapes["encoder.conv_in.weight"][1],
        "out_channels": shapes["decoder.conv_out.weight"][0],
        "block_out_channels": channels,
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "layers_per_block": len(_indices(shapes, r"^encoder\.down\.0\.block\.(\d+)\.")),
        "latent_channels": latent,
        "norm_num_groups": keymaps.NORM_NUM_GROUPS,
        "sample_size": defaults["image_size"],
        **defaults["vae"],
    }


def text_encoder_config(shapes: Mapping[str, Shape], layout: str, family: str = "v1") -> dict[str, Any]:
    """A transformers ``CLIPTextConfig`` from a text encoder's shapes (keys relative to its prefix).

    OpenCLIP: SD 2.x conditions on the penultimate layer, so a file with the full tower (the released files carry
    ``text_projection``) gives one layer less; a file without the projection (written from a diffusers model, whose
    unused last layer is gone) gives all its layers. SDXL uses every layer of its bigG tower.
    """
    if layout == "clip":
        vocab, width = shapes["text_model.embeddings.token_embedding.weight"]
        positions = shapes["text_model.embeddings.position_embedding.weight"][0]
        layers = len(_indices(shapes, r"^text_model\.encoder\.layers\.(\d+)\."))
        inner = shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0]
        projection = width
    else:
        vocab, width = shapes["token_embedding.weight"]
        positions = shapes["positional_embedding"][0]
        layers = len(_indices(shapes, r"^transformer\.resblocks\.(\d+)\."))
        inner = shapes["transformer.resblocks.0.mlp.c_fc.weight"][0]
        projection = shapes["text_projection"][1] if "text_projection" in shapes else width
        if "text_projection" in shapes and family_defaults(family)["open_clip_penultimate"]:
            layers -= 1
    return {
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": inner,
        "projection_dim": projection,
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, width // keymaps.CLIP_HEAD_WIDTH),
        "max_position_embeddings": positions,
        "hidden_act": keymaps.TEXT_ACTIVATION[layout],
        "layer_norm_eps": 1e-5,
        # CLIP's vocabulary ends with <|startoftext|>, <|endoftext|>
        "bos_token_id": vocab - 2,
        "eos_token_id": vocab - 1,
        "pad_token_id": 1,
    }


def scheduler_spec(family: str, extras: Mapping[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """(scheduler class name, config) of the family's reference repo."""
    name, specific = family_defaults(family)["scheduler"]
    return name, {**keymaps.SCHEDULER_BASE, **specific, "prediction_type": prediction_type(family, extras)}


# ---------------------------------------------------------------------------------------------------- original config


def read_original_config(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """Parse a ``v1-inference.yaml`` style file safely (``yaml.safe_load``: data only, no tags that build objects)."""
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"original_config {path} does not exist (a local .yaml file is expected; "
                                "URLs are not fetched)")
    try:
        import yaml
    except ImportError:  # pragma: no cover - PyYAML comes with huggingface_hub
        raise ImportError("reading original_config needs PyYAML: pip install pyyaml") from None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"original_config {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model", {}).get("params"), dict):
        raise ValueError(f"original_config {path} has no model.params section: not an ldm inference config")
    return data


def _params(original: Mapping[str, Any], *path: str) -> dict[str, Any]:
    node: Any = original["model"]["params"]
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            raise ValueError(f"original_config has no model.params.{'.'.join(path)}")
        node = node[part]
    return node


def unet_config_from_original(original: Mapping[str, Any], family: str, vae_scale: int = 8) -> dict[str, Any]:
    """diffusers' reading of ``unet_config.params`` (model_channels, channel_mult, attention_resolutions, ...)."""
    p = _params(original, "unet_config", "params")
    channels = [p["model_channels"] * m for m in p["channel_mult"]]
    resolutions = p.get("attention_resolutions") or []
    down, resolution = [], 1
    for i in range(len(channels)):
        down.append("CrossAttnDownBlock2D" if resolution in resolutions else "DownBlock2D")
        if i != len(channels) - 1:
            resolution *= 2
    up = []
    for _ in channels:
        up.append("CrossAttnUpBlock2D" if resolution in resolutions else "UpBlock2D")
        resolution //= 2
    linear = bool(p.get("use_linear_in_transformer", False))
    heads = p.get("num_heads")
    if heads is None or heads == -1:
        heads = [p["model_channels"] // p["num_head_channels"] * m for m in p["channel_mult"]]
    context = p.get("context_dim")
    depth = p.get("transformer_depth", 1)
    return {
        "sample_size": family_defaults(family)["image_size"] // vae_scale,
        "in_channels": p["in_channels"],
        "out_channels": p["out_channels"],
        "block_out_channels": channels,
        "layers_per_block": p["num_res_blocks"],
        "down_block_types": down,
        "up_block_types": up,
        "cross_attention_dim": context[0] if isinstance(context, list) else context,
        "attention_head_dim": heads,
        "use_linear_projection": linear,
        "transformer_layers_per_block": depth if isinstance(depth, int) else list(depth),
        "norm_num_groups": keymaps.NORM_NUM_GROUPS,
    }


def vae_config_from_original(original: Mapping[str, Any], family: str) -> dict[str, Any]:
    dd = _params(original, "first_stage_config", "params", "ddconfig")
    channels = [dd["ch"] * m for m in dd["ch_mult"]]
    return {
        "in_channels": dd["in_channels"],
        "out_channels": dd["out_ch"],
        "block_out_channels": channels,
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "layers_per_block": dd["num_res_blocks"],
        "latent_channels": dd["z_channels"],
        "norm_num_groups": keymaps.NORM_NUM_GROUPS,
        "sample_size": family_defaults(family)["image_size"],
        "scaling_factor": original["model"]["params"].get("scale_factor",
                                                          family_defaults(family)["vae"]["scaling_factor"]),
    }


def text_layers_from_original(original: Mapping[str, Any], file_layers: int) -> int:
    """OpenCLIP's ``layer: penultimate`` drops the last layer of the tower in the file."""
    cond = original["model"]["params"].get("cond_stage_config") or {}
    layer = (cond.get("params") or {}).get("layer", "last")
    return file_layers - 1 if layer == "penultimate" else file_layers


def scheduler_spec_from_original(original: Mapping[str, Any], family: str) -> tuple[str, dict[str, Any]]:
    """Betas, timesteps and parameterization ("v" -> v_prediction) from ``model.params``."""
    name, config = scheduler_spec(family)
    params = original["model"]["params"]
    config = dict(config)
    config["beta_start"] = params.get("linear_start", config["beta_start"])
    config["beta_end"] = params.get("linear_end", config["beta_end"])
    config["num_train_timesteps"] = params.get("timesteps", config["num_train_timesteps"])
    config["prediction_type"] = "v_prediction" if params.get("parameterization") == "v" else "epsilon"
    return name, config
