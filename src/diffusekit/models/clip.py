"""CLIP's text encoder in transformers' checkpoint format: ``CLIPTextModel`` and ``CLIPTextModelWithProjection``.

Files are transformers': ``config.json`` with flat keys (``hidden_size``, ``num_hidden_layers`` ...; a full
``CLIPConfig`` with a nested ``text_config`` also loads), weights ``model.safetensors`` / ``pytorch_model.bin`` with
keys ``text_model.embeddings.token_embedding.weight``, ``text_model.encoder.layers.N.self_attn.q_proj.weight``,
``text_model.final_layer_norm.*`` and ``text_projection.weight``. transformers 5 writes ``CLIPTextModel`` keys
without the ``text_model.`` prefix; both spellings load, and saving writes the prefixed one (the Hub's).

The network: token + position embeddings, pre-norm transformer layers with causal self-attention, a final layer
norm. ``pooler_output`` is the final state at the end-of-text token; ``text_embeds`` its projection.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .._io import atomic_write_text
from ..configuration import FrozenConfig, read_json, register_to_config
from ..hub import resolve_file, split_hub_kwargs
from ..modeling import ModelMixin, StateDict
from ..outputs import BaseOutput
from ..single_file.loading import FromOriginalModelMixin

MODEL_TYPE = "clip_text_model"
_LEGACY_EOS_ID = 2  # configs written before transformers fixed CLIP's eos id: pool at the highest id instead


# ---------------------------------------------------------------------------------------------------- outputs


@dataclass
class BaseModelOutputWithPooling(BaseOutput):
    """``CLIPTextModel``'s output (transformers' name): ``out[0]`` is ``last_hidden_state``."""

    last_hidden_state: torch.Tensor  # (B, L, D), after the final layer norm
    pooler_output: torch.Tensor  # (B, D), the final state at each row's end-of-text token
    hidden_states: tuple[torch.Tensor, ...] | None = None  # embeddings + each layer's output, before the final norm


@dataclass
class CLIPTextModelOutput(BaseOutput):
    """``CLIPTextModelWithProjection``'s output: ``out[0]`` is ``text_embeds``."""

    text_embeds: torch.Tensor  # (B, P), the projected pooled state
    last_hidden_state: torch.Tensor  # (B, L, D)
    hidden_states: tuple[torch.Tensor, ...] | None = None


# ---------------------------------------------------------------------------------------------------- layers


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {
    "quick_gelu": _quick_gelu,
    "gelu": F.gelu,
    "gelu_new": functools.partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, max_positions: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, hidden_size)
        self.position_embedding = nn.Embedding(max_positions, hidden_size)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        length = input_ids.shape[-1]
        limit = self.position_embedding.num_embeddings
        if length > limit:
            raise ValueError(
                f"input_ids has {length} tokens but the text encoder takes at most {limit} "
                "(max_position_embeddings): truncate with the tokenizer (truncation=True)"
            )
        if position_ids is None:  # computed here, not kept as a buffer (models are built on the meta device)
            position_ids = torch.arange(length, device=input_ids.device)[None]  # (1, L)
        return self.token_embedding(input_ids) + self.position_embedding(position_ids)  # (B, L, D)


class CLIPAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, dropout: float):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} is not a multiple of num_attention_heads={num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        # built in transformers' order (k, v, q): seeded initialisation draws in the same order
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, width = x.shape  # (B, L, D)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.num_heads, -1).transpose(1, 2)  # (B, H, L, D/H)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        out = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,  # (B, 1, L, L) bool, True = may attend; None = causal only
            is_causal=mask is None,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, H, L, D/H)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))  # (B, L, D)


class CLIPMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, activation: str):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"hidden_act={activation!r} is not supported; use one of {sorted(_ACTIVATIONS)}")
        self.activation = _ACTIVATIONS[activation]
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))  # (B, L, D) -> (B, L, I) -> (B, L, D)


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, hidden_size, intermediate_size, num_heads, activation, eps, dropout):
        super().__init__()
        self.self_attn = CLIPAttention(hidden_size, num_heads, dropout)
        self.layer_norm1 = nn.LayerNorm(hidden_size, eps=eps)
        self.mlp = CLIPMLP(hidden_size, intermediate_size, activation)
        self.layer_norm2 = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))  # (B, L, D)


class CLIPEncoder(nn.Module):
    def __init__(self, num_layers: int, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(**layer_kwargs) for _ in range(num_layers)])


class CLIPTextTransformer(nn.Module):
    """Embeddings -> causal transformer layers -> final layer norm; pools at the end-of-text token."""

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        width = config["hidden_size"]
        self.embeddings = CLIPTextEmbeddings(config["vocab_size"], width, config["max_position_embeddings"])
        self.encoder = CLIPEncoder(
            config["num_hidden_layers"],
            hidden_size=width,
            intermediate_size=config["intermediate_size"],
            num_heads=config["num_attention_heads"],
            activation=config["hidden_act"],
            eps=config["layer_norm_eps"],
            dropout=config["attention_dropout"],
        )
        self.final_layer_norm = nn.LayerNorm(width, eps=config["layer_norm_eps"])
        self.eos_token_id = config["eos_token_id"]

    def forward(self, input_ids, attention_mask=None, position_ids=None, output_hidden_states=False):
        input_ids = input_ids.reshape(-1, input_ids.shape[-1])  # (B, L)
        batch, length = input_ids.shape
        x = self.embeddings(input_ids, position_ids)  # (B, L, D)

        mask = None  # causal only: SDPA's is_causal
        if attention_mask is not None:  # padding mask (B, L), 1 = real token: hide padded keys as well
            causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()  # (L, L)
            keep = attention_mask.to(device=x.device, dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, L)
            mask = causal & keep  # (B, 1, L, L)

        hidden_states = [x]
        for layer in self.encoder.layers:
            x = layer(x, mask)
            hidden_states.append(x)
        last = self.final_layer_norm(x)  # (B, L, D)

        rows = torch.arange(batch, device=last.device)
        ids = input_ids.to(device=last.device, dtype=torch.int)
        if self.eos_token_id == _LEGACY_EOS_ID:
            # old configs carry eos id 2; CLIP's eos is the highest id of the vocabulary, so take the argmax
            eos_at = ids.argmax(dim=-1)
        else:
            eos = torch.as_tensor(self.eos_token_id, device=ids.device, dtype=torch.int)
            eos_at = torch.isin(ids, eos).int().argmax(dim=-1)  # first end-of-text token of each row (0 if none)
        pooled = last[rows, eos_at]  # (B, D)
        return last, pooled, (tuple(hidden_states) if output_hidden_states else None)


# ---------------------------------------------------------------------------------------------------- models


def _accepts_config_object(init):
    """Let ``Model(config)`` work as in transformers: a mapping or config object first, keyword overrides after."""

    @functools.wraps(init)  # keeps the registered signature (_config_params)
    def wrapper(self, config=None, /, **kwargs):
        if config is not None:
            if hasattr(config, "to_dict") and not isinstance(config, Mapping):  # a transformers CLIPTextConfig
                config = config.to_dict()
            if not isinstance(config, Mapping):
                raise TypeError(f"{type(self).__name__}(config): expected a config mapping, got {type(config)}")
            kwargs = {**type(self)._config_kwargs_from_file(dict(config)), **kwargs}
        init(self, **kwargs)

    return wrapper


class _CLIPTextBase(ModelMixin, FromOriginalModelMixin):
    """Shared by both classes: config, file format and the transformer in ``self.text_model``."""

    _single_file_kind = "text_encoder"  # from_single_file / save_single_file: docs/SINGLE_FILE.md

    _library_name = "transformers"  # model_index.json entry: ["transformers", "CLIPTextModel"]

    safetensors_name = "model.safetensors"
    bin_name = "pytorch_model.bin"
    # older writers kept the position_ids buffer; a full CLIPModel checkpoint also holds the vision tower
    _ignore_unexpected_keys: tuple[str, ...] = (
        r"(^|\.)position_ids$",
        r"^vision_model\.",
        r"^visual_projection\.",
        r"^logit_scale$",
    )
    _with_projection = False

    @_accepts_config_object
    @register_to_config
    def __init__(
        self,
        vocab_size: int = 49408,
        hidden_size: int = 512,
        intermediate_size: int = 2048,
        projection_dim: int = 512,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 8,
        max_position_embeddings: int = 77,
        hidden_act: str = "quick_gelu",
        layer_norm_eps: float = 1e-5,
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
        initializer_factor: float = 1.0,
        pad_token_id: int | None = 1,
        bos_token_id: int | None = 49406,
        eos_token_id: int | list[int] | None = 49407,
    ):
        super().__init__()
        # transformers 5 builds and initialises the text transformer first (a sub-model), then the projection
        self.text_model = CLIPTextTransformer(self.config)
        self._init_weights()
        if self._with_projection:
            self.text_projection = nn.Linear(hidden_size, projection_dim, bias=False)
            self._init_projection()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """transformers 5's CLIP initialisation, draw for draw, so ``torch.manual_seed(s); CLIPTextModel(config)``
        equals transformers': every module, children before parents, first gets the generic pass (``Linear`` /
        ``Embedding`` weights normal with ``initializer_range``, biases zero, layer norms one / zero), then CLIP's
        own (normal, scaled by depth and width) redraws the weights of its children. A no-op on the meta device."""
        cfg = self.config
        factor, width, depth = cfg.initializer_factor, cfg.hidden_size, cfg.num_hidden_layers
        std = cfg.initializer_range or 0.02
        in_std = width**-0.5 * (2 * depth) ** -0.5 * factor

        def generic(*modules: nn.Module) -> None:
            for module in modules:
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(module.weight, std=std)
                    if getattr(module, "bias", None) is not None:
                        nn.init.zeros_(module.bias)
                elif isinstance(module, nn.LayerNorm):
                    nn.init.ones_(module.weight)
                    nn.init.zeros_(module.bias)

        embeddings = self.text_model.embeddings
        generic(embeddings.token_embedding, embeddings.position_embedding)
        nn.init.normal_(embeddings.token_embedding.weight, std=0.02 * factor)
        nn.init.normal_(embeddings.position_embedding.weight, std=0.02 * factor)
        for layer in self.text_model.encoder.layers:
            attn, mlp = layer.self_attn, layer.mlp
            generic(attn.k_proj, attn.v_proj, attn.q_proj, attn.out_proj)
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                nn.init.normal_(proj.weight, std=in_std)
            nn.init.normal_(attn.out_proj.weight, std=width**-0.5 * factor)
            generic(layer.layer_norm1, mlp.fc1, mlp.fc2)
            nn.init.normal_(mlp.fc1.weight, std=(2 * width) ** -0.5 * factor)
            nn.init.normal_(mlp.fc2.weight, std=in_std)
            generic(layer.layer_norm2)
        generic(self.text_model.final_layer_norm)

    @torch.no_grad()
    def _init_projection(self) -> None:
        """The projection's generic draw, then CLIP's (transformers 5, after the text transformer's)."""
        cfg = self.config
        nn.init.normal_(self.text_projection.weight, std=cfg.initializer_range or 0.02)
        nn.init.normal_(self.text_projection.weight, std=cfg.hidden_size**-0.5 * cfg.initializer_factor)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_model.embeddings.token_embedding

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        """Replace the token embedding (textual inversion grows it); ``config.vocab_size`` follows, as in
        transformers."""
        self.text_model.embeddings.token_embedding = value
        self._config = FrozenConfig({**self._config, "vocab_size": value.num_embeddings}, self._config.defaults_used)

    # ------------------------------------------------------------------ file format

    _keep_unknown_config_keys = False  # transformers' configs: metadata keys are not carried along

    @classmethod
    def _config_kwargs_from_file(cls, data: dict[str, Any]) -> dict[str, Any]:
        model_type = data.get("model_type")
        if model_type is not None and model_type not in (MODEL_TYPE, "clip"):
            raise ValueError(f"{cls.__name__} reads CLIP text configs, got model_type={model_type!r}")
        text = data.get("text_config") or data.get("text_config_dict")
        if isinstance(text, Mapping):  # a full CLIPConfig: the text tower's settings
            text = dict(text)
            if "projection_dim" not in text and "projection_dim" in data:
                text["projection_dim"] = data["projection_dim"]
            data = text
        # transformers' configs carry metadata (architectures, dtype, transformers_version, generation defaults
        # ...): ignored quietly
        return cls.extract_init_kwargs(data)

    @classmethod
    def _adapt_state_dict(cls, state_dict: StateDict) -> StateDict:
        # transformers 5 saves CLIPTextModel without the "text_model." prefix
        parts = ("embeddings.", "encoder.", "final_layer_norm.")
        return {(f"text_model.{k}" if k.startswith(parts) else k): v for k, v in state_dict.items()}

    def save_config(self, save_directory: str | os.PathLike) -> Path:
        """Write ``config.json`` as transformers' ``CLIPTextConfig`` does, so transformers loads the folder."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        data = {"architectures": [type(self).__name__], "model_type": MODEL_TYPE, **self.config}
        data["torch_dtype"] = str(self.dtype).removeprefix("torch.")
        path = folder / self.config_name
        atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
        return path

    # ------------------------------------------------------------------ forward

    def _encode(self, input_ids, attention_mask, position_ids, output_hidden_states, output_attentions):
        if input_ids is None:
            raise ValueError("input_ids is required")
        if output_attentions:
            raise ValueError("output_attentions is not available: attention runs through scaled_dot_product_attention")
        return self.text_model(input_ids, attention_mask, position_ids, output_hidden_states)


class CLIPTextModel(_CLIPTextBase):
    """CLIP's text encoder (Stable Diffusion's ``text_encoder``)."""

    # a projection in the file (a CLIPTextModelWithProjection or CLIPModel checkpoint) is dropped, as transformers does
    _ignore_unexpected_keys = _CLIPTextBase._ignore_unexpected_keys + (r"^text_projection\.",)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        output_attentions: bool = False,
    ):
        """``input_ids`` (B, L) -> ``last_hidden_state`` (B, L, D), ``pooler_output`` (B, D), ``hidden_states``
        (embeddings + one per layer, each (B, L, D), with ``output_hidden_states=True``)."""
        last, pooled, hidden = self._encode(input_ids, attention_mask, position_ids, output_hidden_states,
                                            output_attentions)
        out = BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled, hidden_states=hidden)
        return out if return_dict else out.to_tuple()


class CLIPTextModelWithProjection(_CLIPTextBase):
    """CLIP's text encoder with its projection (SDXL's ``text_encoder_2``): ``text_embeds`` = projected pool."""

    _with_projection = True

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        output_attentions: bool = False,
    ):
        """``input_ids`` (B, L) -> ``text_embeds`` (B, P), ``last_hidden_state`` (B, L, D), ``hidden_states``."""
        last, pooled, hidden = self._encode(input_ids, attention_mask, position_ids, output_hidden_states,
                                            output_attentions)
        out = CLIPTextModelOutput(text_embeds=self.text_projection(pooled), last_hidden_state=last,
                                  hidden_states=hidden)
        return out if return_dict else out.to_tuple()


# ---------------------------------------------------------------------------------------------------- config


class CLIPTextConfig(FrozenConfig):
    """A text-encoder config (defaults filled in) for ``CLIPTextModel(CLIPTextConfig(hidden_size=32, ...))``.

    A read-only dict with attribute access, with the keys of transformers' ``CLIPTextConfig``.
    """

    model_type = MODEL_TYPE

    def __init__(self, **kwargs):
        params = _CLIPTextBase._config_params()
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise TypeError(f"CLIPTextConfig got unknown key(s) {unknown}; it takes {sorted(params)}")
        defaults = {
            name: p.default
            for name, p in inspect.signature(inspect.unwrap(_CLIPTextBase.__init__)).parameters.items()
            if name in params
        }
        dict.__init__(self, {**defaults, **kwargs})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None, **hub_kwargs):
        """Read a text encoder's ``config.json`` (flat, or a full CLIPConfig's ``text_config``)."""
        hub = split_hub_kwargs(hub_kwargs)
        if hub_kwargs:
            raise TypeError(f"CLIPTextConfig.from_pretrained got unexpected keyword argument(s) {sorted(hub_kwargs)}")
        path = resolve_file(pretrained_model_name_or_path, "config.json", subfolder, **hub)
        return cls(**_CLIPTextBase._config_kwargs_from_file(read_json(path, what="config")))

    def to_dict(self) -> dict[str, Any]:
        return dict(self)

