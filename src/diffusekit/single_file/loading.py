"""``from_single_file`` / ``save_single_file`` for models (:class:`FromOriginalModelMixin`) and Stable Diffusion
pipelines (:class:`FromSingleFileMixin`).

Loading: find the component in the file (its key prefix), take its diffusers config (``config=`` folder or hub id,
``original_config=`` YAML, or inferred from the shapes), build the model on the meta device, check every expected
tensor's original key and shape against the file's header (a readable diff naming the file and keys), then read
and convert the tensors with the tables of ``keymaps.py`` and move them in with ``assign=True``.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from ..configuration import read_json
from ..hub import EntryNotFound, resolve_file, split_hub_kwargs
from ..modeling import CheckpointError, _SkipInit, state_dict_diff
from . import infer, keymaps, layout
from .checkpoint import SingleFile, write_single_file
from .infer import SingleFileError

logger = logging.getLogger(__name__)

#: the full CLIP BPE vocabulary (MIT licence) ships with the bundled model diffusekit-fashion-sd; single files carry
#: no tokenizer, so SD 1.x / 2.x files (49408-token text encoders) get theirs from it
CLIP_VOCAB_FOLDER = Path(__file__).resolve().parents[1] / "bundled" / "diffusekit-fashion-sd" / "tokenizer"
#: diffusers' subfolder of each kind of component, tried when ``config=`` names a whole pipeline folder
DEFAULT_SUBFOLDER = {"unet": "unet", "vae": "vae", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"}
_LEGACY_MODEL_KWARGS = ("low_cpu_mem_usage", "device_map", "disable_mmap", "proxies", "resume_download",
                        "config_revision", "device", "user_agent")
_NAMES = {"unet": "UNet", "vae": "VAE", "text_encoder": "text encoder", "text_encoder_2": "second text encoder"}


def _as_checkpoint(source, hub) -> SingleFile:
    return source if isinstance(source, SingleFile) else SingleFile(source, **hub)


def _what_it_holds(ckpt: SingleFile) -> str:
    found = []
    if infer.component_prefix("unet", ckpt.shapes) is not None:
        found.append("a UNet")
    if infer.component_prefix("vae", ckpt.shapes) is not None:
        found.append("a VAE")
    if infer.text_encoder_layout(ckpt.shapes) or infer.text_encoder_layout(ckpt.shapes, "text_encoder_2"):
        found.append("a text encoder")
    if any(k.startswith(("lora_unet_", "lora_te", "lora_")) or ".lora_" in k for k in list(ckpt.shapes)[:200]):
        return "it looks like a LoRA file (load it with pipe.load_lora_weights)"
    return f"it holds {', '.join(found)}" if found else \
        f"its keys start like {sorted(ckpt.shapes)[:3]}: not a Stable Diffusion checkpoint"


def locate(kind: str, ckpt: SingleFile, slot: str | None = None) -> tuple[str, str]:
    """(layout, prefix) of a component ("unet", "vae", "text_encoder" in pipeline slot ``slot``) in the file, or a
    clear error."""
    if kind == "text_encoder":
        slot = slot or "text_encoder"
        found = infer.text_encoder_layout(ckpt.shapes, slot)
        if found:
            return found
        expected = [p + keymaps.ANCHORS[layout] for layout, p in keymaps.TEXT_ENCODER_SLOTS[slot] if p]
        kind = slot
    else:
        prefix = infer.component_prefix(kind, ckpt.shapes)
        if prefix is not None:
            return kind, prefix
        prefixes = keymaps.UNET_PREFIXES if kind == "unet" else keymaps.VAE_PREFIXES
        expected = [p + keymaps.ANCHORS[kind] for p in prefixes if p]
    raise SingleFileError(
        f"{ckpt.name} holds no {_NAMES[kind]} (looked for {' or '.join(expected)}); {_what_it_holds(ckpt)}. "
        f"Pass the {kind} yourself ({kind}=...from_pretrained(...) or ...from_single_file(...))"
    )


# ---------------------------------------------------------------------------------------------------- configs


def _config_from_folder(cls, kind: str, config, subfolder: str | None, hub: dict) -> dict[str, Any]:
    tries = [subfolder] if subfolder is not None else [None, DEFAULT_SUBFOLDER[kind]]
    for i, sub in enumerate(tries):
        try:
            path = resolve_file(config, cls.config_name, sub, **hub)
        except EntryNotFound:
            if i == len(tries) - 1:
                raise
            continue
        return cls._config_kwargs_from_file(read_json(path, what="config"))
    raise AssertionError("unreachable")


def _vae_scale(ckpt: SingleFile) -> int:
    prefix = infer.component_prefix("vae", ckpt.shapes)
    if prefix is None:
        return 8
    return 2 ** (len(infer._indices(ckpt.with_prefix(prefix), r"^encoder\.down\.(\d+)\.")) - 1)


def _inferred_config(kind: str, table: str, shapes, ckpt: SingleFile, family: str, original) -> dict:
    if kind == "unet":
        if original is not None:
            return infer.unet_config_from_original(original, family, _vae_scale(ckpt))
        return infer.unet_config(shapes, family, _vae_scale(ckpt))
    if kind == "vae":
        return infer.vae_config_from_original(original, family) if original is not None else \
            infer.vae_config(shapes, family)
    config = infer.text_encoder_config(shapes, table, family)
    if original is not None and table == "open_clip":
        file_layers = len(infer._indices(shapes, r"^transformer\.resblocks\.(\d+)\."))
        config["num_hidden_layers"] = infer.text_layers_from_original(original, file_layers)
    return config


# ---------------------------------------------------------------------------------------------------- models


def _ema_getter(ckpt: SingleFile, prefix: str):
    """``model_ema.diffusion_modelinput_blocks00weight``: Lightning's EMA keeps the UNet's keys with the dots
    removed (and ``model.`` dropped)."""
    if prefix != keymaps.UNET_PREFIXES[0]:
        raise SingleFileError(f"{ckpt.name}: extract_ema=True needs a full checkpoint (model.diffusion_model.* keys)")

    def ema_key(key: str) -> str:
        return keymaps.EMA_PREFIX + (prefix + key).split(".", 1)[1].replace(".", "")

    return ema_key


def default_slot(cls) -> str:
    """The pipeline slot a text-encoder class is read from by default: the projected one is SDXL's second."""
    return "text_encoder_2" if getattr(cls, "_with_projection", False) else "text_encoder"


def load_component(cls, kind: str, ckpt: SingleFile, *, config=None, original_config=None, subfolder=None,
                   torch_dtype: torch.dtype | None = None, extract_ema: bool = False, overrides=None, hub=None,
                   slot: str | None = None):
    """Build ``cls`` (a diffusekit model) from the ``kind`` component of ``ckpt`` (text encoders: from pipeline slot
    ``slot``, default by class)."""
    hub = hub or {}
    overrides = dict(overrides or {})
    if kind == "text_encoder":
        slot = slot or default_slot(cls)
    table, prefix = locate(kind, ckpt, slot)
    shapes = ckpt.with_prefix(prefix) if prefix else dict(ckpt.shapes)
    family = infer.detect_family(ckpt.shapes, ckpt.extras)
    if config is not None:
        init = _config_from_folder(cls, slot or kind, config, subfolder, hub)
        source = f"the config in {config}"
    else:
        original = infer.read_original_config(original_config) if original_config is not None else None
        init = cls.extract_init_kwargs(_inferred_config(kind, table, shapes, ckpt, family, original))
        source = "the config inferred from the file" if original is None else f"original_config {original_config}"
    unknown = sorted(k for k in overrides if k not in cls._config_params())
    if unknown:
        raise TypeError(f"{cls.__name__}.from_single_file got unexpected keyword argument(s) {unknown}")
    init.update(overrides)
    with torch.device("meta"), _SkipInit():
        model = cls(**init)
    model_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    kmap = layout.key_map(table, model_shapes, model.config)

    # where each original tensor is read: the UNet's EMA copy, or the key itself
    ema_count = sum(k.startswith(keymaps.EMA_PREFIX) for k in ckpt.shapes) if kind == "unet" else 0
    if extract_ema and ema_count <= keymaps.KEY_EMA_COUNT:
        raise SingleFileError(f"{ckpt.name} holds no EMA weights (model_ema.* keys): load it without "
                              "extract_ema=True (its model.diffusion_model.* weights are the ones to use)")
    if kind == "unet" and ema_count > keymaps.KEY_EMA_COUNT and not extract_ema:
        logger.info("%s holds EMA and non-EMA UNet weights: using the non-EMA ones (as diffusers does); pass "
                    "extract_ema=True for the EMA weights (usually better for inference)", ckpt.name)
    file_key = _ema_getter(ckpt, prefix) if extract_ema else (lambda key: prefix + key)

    expected = {file_key(k): s for k, s in layout.original_shapes(model_shapes, kmap).items()}
    found = _relevant_shapes(ckpt, prefix, table, model, extract_ema, set(kmap_original_keys(kmap)))
    diff = state_dict_diff(expected, found)
    if diff:
        raise CheckpointError(
            f"{ckpt.name}: the {_NAMES[kind]} under {prefix or '(no prefix)'!r} does not match {cls.__name__} built "
            f"from {source}:\n{diff}\nPass config= (a diffusers folder of this model) or original_config= (its "
            ".yaml) if the architecture was guessed wrong, or use the class that matches the file"
        )
    state_dict = layout.to_diffusers(lambda key: ckpt[file_key(key)], kmap)
    target = torch_dtype or torch.get_default_dtype()
    for key, value in state_dict.items():
        if value.is_floating_point() and value.dtype != target:
            state_dict[key] = value.to(target)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


def kmap_original_keys(kmap) -> list[str]:
    return [ref.key for ref in kmap.values()]


def _relevant_shapes(ckpt, prefix, table, model, extract_ema, wanted: set[str]) -> dict:
    """The file's tensors that must match the model: the component's keys less the ones known to be unused."""
    if extract_ema:  # every EMA tensor but the EMA's own bookkeeping
        return {k: s for k, s in ckpt.shapes.items()
                if k.startswith(keymaps.EMA_PREFIX) and k not in keymaps.EMA_BOOKKEEPING}
    ignore = [re.compile(p) for p in keymaps.IGNORED[table]]
    found = {}
    for key, shape in ckpt.with_prefix(prefix).items():
        if key not in wanted and any(p.search(key) for p in ignore):
            continue
        found[key] = shape
    if table == "open_clip":
        # SD 2.x conditions on the penultimate layer: the tower's last resblock is unused (diffusers drops it)
        used = model.config.num_hidden_layers
        found = {k: s for k, s in found.items() if not k.startswith(f"transformer.resblocks.{used}.")}
    if prefix == "":  # a bare file: keys of other components are not this one's business
        anchors = {"unet": ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "out.", "label_emb."),
                   "vae": ("encoder.", "decoder.", "quant_conv.", "post_quant_conv."),
                   "clip": ("text_model.",),
                   "open_clip": ("token_embedding.", "positional_embedding", "transformer.", "ln_final.")}
        found = {k: s for k, s in found.items() if k.startswith(anchors[table])}
    return {prefix + k: s for k, s in found.items()}


def component_state_dict(model, kind: str, prefix: str | None = None, torch_dtype=None) -> dict[str, torch.Tensor]:
    """A diffusekit model's tensors in the original layout, keys with the component's prefix."""
    table = kind
    if kind == "text_encoder":
        table = "open_clip" if model.config.get("hidden_act") == "gelu" else "clip"
    if prefix is None:
        prefix = keymaps.SAVE_PREFIXES[table]
    state = model.state_dict()
    kmap = layout.key_map(table, state, model.config)
    tensors = layout.to_original(state, kmap, prefix)
    if torch_dtype is not None:
        tensors = {k: (v.to(torch_dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
    return tensors


class FromOriginalModelMixin:
    """``Model.from_single_file(path)`` and ``model.save_single_file(path)`` in the original (CompVis) layout.

    A class sets ``_single_file_kind`` ("unet", "vae", "text_encoder").
    """

    _single_file_kind: str = ""

    @classmethod
    def from_single_file(cls, pretrained_model_link_or_path_or_dict=None, *, config=None, original_config=None,
                         subfolder: str | None = None, torch_dtype: torch.dtype | None = None,
                         extract_ema: bool = False, **kwargs):
        """Load this component from a single-file checkpoint (``.safetensors``, ``.ckpt``), a state dict, or a Hub
        file URL in the local cache.

        ``config``: a diffusers folder or Hub id (in the cache) whose ``config.json`` (at ``subfolder``, or at the
        root, or in the component's usual subfolder) gives the architecture; ``original_config``: the original
        ``.yaml``; neither: inferred from the shapes (see docs/SINGLE_FILE.md). ``extract_ema`` (UNet): read the
        ``model_ema.*`` copy. Other keyword arguments override config values.
        """
        hub = split_hub_kwargs(kwargs)
        for legacy in _LEGACY_MODEL_KWARGS:
            kwargs.pop(legacy, None)
        if pretrained_model_link_or_path_or_dict is None:
            pretrained_model_link_or_path_or_dict = kwargs.pop("pretrained_model_link_or_path", None)
        if pretrained_model_link_or_path_or_dict is None:
            raise TypeError(f"{cls.__name__}.from_single_file needs the checkpoint path (or a state dict)")
        if "original_config_file" in kwargs:
            original_config = kwargs.pop("original_config_file")
        if config is not None and original_config is not None:
            raise ValueError("from_single_file takes config= or original_config=, not both")
        if torch_dtype is not None and not isinstance(torch_dtype, torch.dtype):
            raise TypeError(f"torch_dtype must be a torch.dtype such as torch.float16, got {torch_dtype!r}")
        ckpt = _as_checkpoint(pretrained_model_link_or_path_or_dict, hub)
        return load_component(cls, cls._single_file_kind, ckpt, config=config, original_config=original_config,
                              subfolder=subfolder, torch_dtype=torch_dtype, extract_ema=extract_ema,
                              overrides=kwargs, hub=hub)

    def save_single_file(self, path: str | os.PathLike, *, prefix: str | None = None,
                         torch_dtype: torch.dtype | None = None) -> Path:
        """Write this component alone in the original layout (atomically). ``prefix`` defaults to its place in a
        full checkpoint (``model.diffusion_model.``, ``cond_stage_model.*``), except the VAE, written unprefixed as
        A1111's standalone VAE files are."""
        kind = self._single_file_kind
        if prefix is None:
            key = kind
            if kind == "text_encoder":
                key = "open_clip" if self.config.get("hidden_act") == "gelu" else "clip"
            prefix = keymaps.STANDALONE_SAVE_PREFIXES[key]
            if kind == "text_encoder" and default_slot(type(self)) == "text_encoder_2":
                prefix = keymaps.XL_TEXT_SAVE_PREFIXES["text_encoder_2"]
        return write_single_file(path, component_state_dict(self, kind, prefix, torch_dtype))
