"""CLIP's vision tower in transformers' checkpoint format: ``CLIPVisionModel`` (the safety checker's image encoder).

The network: the image cut into ``patch_size`` patches by a strided convolution, a learned class token in front,
learned position embeddings, a layer norm (``pre_layrnorm``, transformers' spelling), the same pre-norm transformer
layers as the text encoder (:class:`diffusekit.models.clip.CLIPEncoderLayer`, attending to every token: no causal
mask), and ``post_layernorm`` of the class token as the pooled output.

Files are transformers': ``config.json`` (flat ``CLIPVisionConfig`` keys, or a full ``CLIPConfig`` with a nested
``vision_config``), weights with keys ``vision_model.embeddings.patch_embedding.weight``,
``vision_model.encoder.layers.N.self_attn.q_proj.weight`` ... transformers 5 writes them without the
``vision_model.`` prefix; both load. The ``position_ids`` buffer older files carry is ignored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .._io import atomic_write_text
from ..configuration import register_to_config
from ..modeling import ModelMixin, StateDict
from .clip import BaseModelOutputWithPooling, CLIPEncoder

MODEL_TYPE = "clip_vision_model"

#: config keys of the vision tower (transformers' CLIPVisionConfig) with their defaults (ViT-B/32)
VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "projection_dim": 512, "num_hidden_layers": 12,
    "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "attention_dropout": 0.0, "initializer_range": 0.02, "initializer_factor": 1.0,
}


def vision_config_from_file(data: Mapping[str, Any]) -> dict[str, Any]:
    """The vision settings of a flat ``CLIPVisionConfig`` or of a full ``CLIPConfig`` (``vision_config``, or
    ``vision_config_dict`` in old files), defaults filled in."""
    nested = data.get("vision_config") or data.get("vision_config_dict")
    source = dict(nested) if isinstance(nested, Mapping) else dict(data)
    model_type = source.get("model_type")
    if model_type is not None and model_type not in (MODEL_TYPE, "clip"):
        raise ValueError(f"expected a CLIP vision config, got model_type={model_type!r}")
    return {key: source.get(key, default) for key, default in VISION_DEFAULTS.items()}


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, hidden_size: int, num_channels: int, image_size: int, patch_size: int):
        super().__init__()
        self.image_size, self.patch_size = image_size, patch_size
        self.class_embedding = nn.Parameter(torch.empty(hidden_size))
        self.patch_embedding = nn.Conv2d(num_channels, hidden_size, kernel_size=patch_size, stride=patch_size,
                                         bias=False)
        self.position_embedding = nn.Embedding((image_size // patch_size) ** 2 + 1, hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = pixel_values.shape  # (B, C, H, W)
        if (height, width) != (self.image_size, self.image_size):
            raise ValueError(f"the vision tower takes {self.image_size}x{self.image_size} images, got "
                             f"{height}x{width}: preprocess with the model's CLIPImageProcessor")
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(weight.dtype))  # (B, D, H/p, W/p)
        patches = patches.flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.class_embedding.expand(batch, 1, -1)  # (B, 1, D)
        # positions 0..N computed here, not kept as a buffer (models are built on the meta device)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight[None]  # (B, N + 1, D)


class CLIPVisionTransformer(nn.Module):
    """Patch embeddings -> pre-norm -> transformer layers (full attention) -> pooled class token."""

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        width = config["hidden_size"]
        self.embeddings = CLIPVisionEmbeddings(width, config["num_channels"], config["image_size"],
                                               config["patch_size"])
        self.pre_layrnorm = nn.LayerNorm(width, eps=config["layer_norm_eps"])
        self.encoder = CLIPEncoder(
            config["num_hidden_layers"],
            hidden_size=width,
            intermediate_size=config["intermediate_size"],
            num_heads=config["num_attention_heads"],
            activation=config["hidden_act"],
            eps=config["layer_norm_eps"],
            dropout=config["attention_dropout"],
        )
        self.post_layernorm = nn.LayerNorm(width, eps=config["layer_norm_eps"])

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False):
        x = self.pre_layrnorm(self.embeddings(pixel_values))  # (B, L, D)
        # CLIPEncoderLayer attends causally without a mask: an all-true mask lets every token see every other
        full = torch.ones(1, 1, x.shape[1], x.shape[1], dtype=torch.bool, device=x.device)  # (1, 1, L, L)
        hidden_states = [x]
        for layer in self.encoder.layers:
            x = layer(x, full)
            hidden_states.append(x)
        pooled = self.post_layernorm(x[:, 0])  # (B, D): the class token
        return x, pooled, (tuple(hidden_states) if output_hidden_states else None)


class CLIPVisionModel(ModelMixin):
    """CLIP's image encoder: ``pixel_values`` (B, 3, S, S) -> ``last_hidden_state`` (B, 1 + (S/p)^2, D) and
    ``pooler_output`` (B, D)."""

    _library_name = "transformers"
    safetensors_name = "model.safetensors"
    bin_name = "pytorch_model.bin"
    # older writers kept the position_ids buffer; a full CLIPModel checkpoint also holds the text tower
    _ignore_unexpected_keys = (r"(^|\.)position_ids$", r"^text_model\.", r"^text_projection\.", r"^logit_scale$",
                               r"^visual_projection\.")

    @register_to_config
    def __init__(
        self,
        hidden_size: int = 768,
        intermediate_size: int = 3072,
        projection_dim: int = 512,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        num_channels: int = 3,
        image_size: int = 224,
        patch_size: int = 32,
        hidden_act: str = "quick_gelu",
        layer_norm_eps: float = 1e-5,
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
        initializer_factor: float = 1.0,
    ):
        super().__init__()
        self.vision_model = CLIPVisionTransformer(self.config)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """transformers' CLIP initialisation (normal, scaled by depth and width); a no-op on the meta device."""
        cfg = self.config
        factor, width, depth = cfg.initializer_factor, cfg.hidden_size, cfg.num_hidden_layers
        in_std = width**-0.5 * (2 * depth) ** -0.5 * factor
        embeddings = self.vision_model.embeddings
        nn.init.normal_(embeddings.class_embedding, std=width**-0.5 * factor)
        nn.init.normal_(embeddings.patch_embedding.weight, std=cfg.initializer_range * factor)
        nn.init.normal_(embeddings.position_embedding.weight, std=cfg.initializer_range * factor)
        for layer in self.vision_model.encoder.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                nn.init.normal_(proj.weight, std=in_std)
            nn.init.normal_(layer.self_attn.out_proj.weight, std=width**-0.5 * factor)
            nn.init.normal_(layer.mlp.fc1.weight, std=(2 * width) ** -0.5 * factor)
            nn.init.normal_(layer.mlp.fc2.weight, std=in_std)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ file format

    _keep_unknown_config_keys = False  # transformers' configs: metadata keys are not carried along

    @classmethod
    def _config_kwargs_from_file(cls, data: dict[str, Any]) -> dict[str, Any]:
        return vision_config_from_file(data)

    @classmethod
    def _adapt_state_dict(cls, state_dict: StateDict) -> StateDict:
        # transformers 5 writes CLIPVisionModel without the "vision_model." prefix
        parts = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")
        return {(f"vision_model.{k}" if k.startswith(parts) else k): v for k, v in state_dict.items()}

    def save_config(self, save_directory: str | os.PathLike) -> Path:
        """Write ``config.json`` as transformers' ``CLIPVisionConfig`` does, so transformers loads the folder."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        data = {"architectures": [type(self).__name__], "model_type": MODEL_TYPE, **self.config}
        data["torch_dtype"] = str(self.dtype).removeprefix("torch.")
        path = folder / self.config_name
        atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
        return path

    # ------------------------------------------------------------------ forward

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False, return_dict: bool = True):
        last, pooled, hidden = self.vision_model(pixel_values, output_hidden_states)
        out = BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled, hidden_states=hidden)
        return out if return_dict else out.to_tuple()
