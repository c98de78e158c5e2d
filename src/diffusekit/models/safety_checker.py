"""Stable Diffusion's safety checker: flags generated images close to a fixed set of CLIP concept embeddings.

The checkpoint (``safety_checker/`` of SD 1.x folders) is transformers-format: ``config.json`` is a ``CLIPConfig``
(only ``vision_config`` and ``projection_dim`` are used), the weights hold a CLIP vision tower, its projection and
the concepts: ``vision_model.vision_model.*`` (the Hub's spelling; transformers 5 writes ``vision_model.*``, which
loads too), ``visual_projection.weight``, ``concept_embeds`` (17, P), ``special_care_embeds`` (3, P) and their
thresholds ``concept_embeds_weights`` / ``special_care_embeds_weights``.

The rule, as diffusers applies it per image: with ``s_i`` the cosine similarity to special-care concept ``i`` and
``c_j`` to concept ``j``, scores are rounded to 3 decimals; once a special-care score ``s_i - w_i`` is positive, 0.01
is added to every later score (the filter gets stricter); the image is flagged when some ``c_j - w_j (+ 0.01)`` is
positive. Flagged images are replaced by black ones.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._io import atomic_write_text
from ..configuration import register_to_config
from ..modeling import ModelMixin, StateDict
from .clip_vision import VISION_DEFAULTS, CLIPVisionModel, vision_config_from_file

logger = logging.getLogger(__name__)

NUM_CONCEPTS, NUM_SPECIAL = 17, 3
_STRICTER = np.float32(0.01)  # added to the scores once a special-care concept fires


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, P) x (M, P) -> (N, M) cosine similarities."""
    return nn.functional.normalize(a) @ nn.functional.normalize(b).T


class StableDiffusionSafetyChecker(ModelMixin):
    """``checker(clip_input, images) -> (images with flagged ones blacked out, [flag per image])``.

    ``clip_input``: (B, 3, S, S) pixels from the pipeline's ``feature_extractor`` (a :class:`CLIPImageProcessor`);
    ``images``: the decoded images, a (B, C, H, W) tensor or a (B, H, W, C) array.
    """

    _library_name = "stable_diffusion"  # model_index.json entry: ["stable_diffusion", "StableDiffusionSafetyChecker"]
    safetensors_name = "model.safetensors"
    bin_name = "pytorch_model.bin"
    _ignore_unexpected_keys = (r"(^|\.)position_ids$",)

    @register_to_config
    def __init__(self, projection_dim: int = 768, vision_config: dict[str, Any] | None = None,
                 text_config: dict[str, Any] | None = None):
        super().__init__()
        vision = {**VISION_DEFAULTS, **(vision_config or {})}
        self.vision_model = CLIPVisionModel(**vision)
        self.visual_projection = nn.Linear(vision["hidden_size"], projection_dim, bias=False)
        # not trained here; loaded from the checkpoint (ones until then, as in diffusers)
        self.concept_embeds = nn.Parameter(torch.ones(NUM_CONCEPTS, projection_dim), requires_grad=False)
        self.special_care_embeds = nn.Parameter(torch.ones(NUM_SPECIAL, projection_dim), requires_grad=False)
        self.concept_embeds_weights = nn.Parameter(torch.ones(NUM_CONCEPTS), requires_grad=False)
        self.special_care_embeds_weights = nn.Parameter(torch.ones(NUM_SPECIAL), requires_grad=False)

    # ------------------------------------------------------------------ file format

    _keep_unknown_config_keys = False  # transformers' configs: metadata keys are not carried along

    @classmethod
    def _config_kwargs_from_file(cls, data: dict[str, Any]) -> dict[str, Any]:
        model_type = data.get("model_type")
        if model_type is not None and model_type != "clip":
            raise ValueError(f"{cls.__name__} reads a CLIPConfig (model_type 'clip'), got {model_type!r}")
        text = data.get("text_config") or data.get("text_config_dict")
        return {"projection_dim": data.get("projection_dim", 768), "vision_config": vision_config_from_file(data),
                "text_config": dict(text) if isinstance(text, dict) else None}

    @classmethod
    def _adapt_state_dict(cls, state_dict: StateDict) -> StateDict:
        # transformers 5 writes the vision tower as "vision_model.embeddings..." (the Hub: "vision_model.vision_model.")
        return {(f"vision_model.{k}" if k.startswith("vision_model.") and not k.startswith("vision_model.vision_model.")
                 else k): v for k, v in state_dict.items()}

    def save_config(self, save_directory: str | os.PathLike) -> Path:
        """Write ``config.json`` as transformers' ``CLIPConfig``, so diffusers loads the folder."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        data = {
            "architectures": [type(self).__name__], "model_type": "clip", "projection_dim": self.config.projection_dim,
            "vision_config": {**self.vision_model.config, "model_type": "clip_vision_model"},
            "text_config": {**(self.config.text_config or {}), "model_type": "clip_text_model"},
            "torch_dtype": str(self.dtype).removeprefix("torch."),
        }
        path = folder / self.config_name
        atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
        return path

    # ------------------------------------------------------------------ forward

    def image_embeds(self, clip_input: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, P): the projected CLIP image embedding."""
        return self.visual_projection(self.vision_model(clip_input).pooler_output)

    def flags(self, clip_input: torch.Tensor) -> list[bool]:
        """One flag per image: True when it is close to one of the concepts (see the module docstring)."""
        embeds = self.image_embeds(clip_input)
        # scores in float32 on the CPU, whatever the model's dtype, with diffusers' rounding to 3 decimals
        special = _cosine(embeds, self.special_care_embeds).cpu().float().numpy()
        concepts = _cosine(embeds, self.concept_embeds).cpu().float().numpy()
        special_w = self.special_care_embeds_weights.detach().cpu().float().numpy()
        concept_w = self.concept_embeds_weights.detach().cpu().float().numpy()
        # the first special-care concept to fire does so unadjusted; only then does the adjustment start, so "some
        # special-care concept fires" is decided by the unadjusted scores
        stricter = (np.round(special - special_w, 3) > 0).any(axis=1)  # (B,)
        adjustment = np.where(stricter, _STRICTER, np.float32(0))[:, None]  # (B, 1)
        return (np.round(concepts - concept_w + adjustment, 3) > 0).any(axis=1).tolist()

    @torch.no_grad()
    def forward(self, clip_input: torch.Tensor, images):
        flagged = self.flags(clip_input)
        if any(flagged):
            images = images.clone() if isinstance(images, torch.Tensor) else np.array(images, copy=True)
            for index, flag in enumerate(flagged):
                if flag:
                    images[index] = 0  # black
            logger.warning("Potential NSFW content was detected in one or more images; black images are returned "
                           "instead. Try again with a different prompt and/or seed.")
        return images, flagged
