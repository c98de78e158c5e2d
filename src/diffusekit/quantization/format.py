"""The int8 checkpoint format: ``quantization_config`` in a model's ``config.json``, checked before anything loads.

A quantized model saves with ``save_pretrained`` as usual: the safetensors file holds, for each quantized layer, the
int8 weight under the float layer's key plus ``weight_scale`` / ``input_scale`` / ``input_zero_point`` (see
``modules``); every other tensor is unchanged. ``config.json`` gains::

    "quantization_config": {
        "quant_method": "diffusekit_int8",
        "format_version": 1,
        "weight_bits": 8, "weight_scheme": "int8_per_channel_symmetric",
        "activation_bits": 8, "activation_scheme": "uint8_per_tensor_affine",
        "modules_to_not_convert": ["conv_in", "conv_out", ...],   # Conv2d / Linear layers kept in float32
        "calibration": {"observer": "minmax", ...}                  # how it was calibrated (informational)
    }

Loading builds the model on the meta device, replaces every ``nn.Conv2d`` / ``nn.Linear`` not named in
``modules_to_not_convert`` by its int8 layer, and reads the file straight into it: no float32 weights are ever made.
Data only: numbers, strings and lists; nothing in the file is executed.
"""

from __future__ import annotations

import fnmatch
import math
import os
from typing import Any, Iterable, Mapping

from torch import nn

from .modules import INT8_LAYERS

QUANT_METHOD = "diffusekit_int8"
FORMAT_VERSION = 1
WEIGHT_SCHEME = "int8_per_channel_symmetric"
ACTIVATION_SCHEME = "uint8_per_tensor_affine"
MAX_NAMES = 100_000
MAX_NAME_LENGTH = 1_000

# key -> (type, check, what is expected) for the fixed keys of quantization_config
_FIXED: dict[str, tuple[Any, Any, str]] = {
    "quant_method": (str, lambda v: v == QUANT_METHOD, f"{QUANT_METHOD!r}"),
    "format_version": (int, lambda v: v == FORMAT_VERSION, f"{FORMAT_VERSION}"),
    "weight_bits": (int, lambda v: v == 8, "8"),
    "weight_scheme": (str, lambda v: v == WEIGHT_SCHEME, f"{WEIGHT_SCHEME!r}"),
    "activation_bits": (int, lambda v: v == 8, "8"),
    "activation_scheme": (str, lambda v: v == ACTIVATION_SCHEME, f"{ACTIVATION_SCHEME!r}"),
}
_OPTIONAL = {"modules_to_not_convert", "calibration"}


class QuantizationConfigError(ValueError):
    """A ``quantization_config`` that cannot be used: wrong method, version, missing or malformed keys."""


def make_quantization_config(modules_to_not_convert: Iterable[str], calibration: Mapping[str, Any]) -> dict:
    config = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "weight_bits": 8,
        "weight_scheme": WEIGHT_SCHEME,
        "activation_bits": 8,
        "activation_scheme": ACTIVATION_SCHEME,
        "modules_to_not_convert": sorted(modules_to_not_convert),
        "calibration": dict(calibration),
    }
    validate_quantization_config(config, "<new quantization_config>")
    return config


def _plain_json(value: Any, depth: int = 0) -> bool:
    if isinstance(value, (str, bool, int)) or value is None:
        return not isinstance(value, str) or len(value) <= MAX_NAME_LENGTH
    if isinstance(value, float):
        return math.isfinite(value)
    if depth < 3 and isinstance(value, list):
        return len(value) <= MAX_NAMES and all(_plain_json(v, depth + 1) for v in value)
    if depth < 3 and isinstance(value, dict):
        return len(value) <= 100 and all(isinstance(k, str) and _plain_json(v, depth + 1) for k, v in value.items())
    return False


def validate_quantization_config(config: Any, where: str | os.PathLike) -> dict:
    """Check ``quantization_config`` read from ``where`` (a config.json); raise naming the file and the key."""
    where = os.fspath(where)

    def fail(key: str | None, problem: str) -> None:
        place = f"quantization_config[{key!r}]" if key else "quantization_config"
        raise QuantizationConfigError(
            f"{where}: {place} {problem}. This file was not written by diffusekit's int8 quantization (or was edited "
            "or damaged): re-create it with pipe.quantize(...) / quantize_model(...) and save_pretrained"
        )

    if not isinstance(config, dict):
        fail(None, f"must be a JSON object, got {type(config).__name__}")
    method = config.get("quant_method")
    if method != QUANT_METHOD:
        fail("quant_method", f"is {str(method)[:80]!r}: diffusekit loads only {QUANT_METHOD!r} quantized checkpoints "
                             "(load the float checkpoint for other kinds)")
    version = config.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        fail("format_version", f"is {version}, newer than this diffusekit reads ({FORMAT_VERSION}); upgrade diffusekit")
    for key, (kind, check, expected) in _FIXED.items():
        if key not in config:
            fail(key, f"is missing (expected {expected})")
        value = config[key]
        if not isinstance(value, kind) or isinstance(value, bool) or not check(value):
            fail(key, f"must be {expected}, got {str(value)[:80]!r}")
    unknown = sorted(k for k in config if k not in _FIXED and k not in _OPTIONAL)
    if unknown:
        fail(None, f"has unknown keys {[str(k)[:80] for k in unknown[:10]]}; expected only "
                   f"{sorted([*_FIXED, *_OPTIONAL])}")
    names = config.get("modules_to_not_convert", [])
    if not isinstance(names, list) or len(names) > MAX_NAMES or not all(
            isinstance(n, str) and 0 < len(n) <= MAX_NAME_LENGTH for n in names):
        fail("modules_to_not_convert", "must be a list of module names (non-empty strings)")
    calibration = config.get("calibration", {})
    if not isinstance(calibration, dict) or not _plain_json(calibration):
        fail("calibration", "must be a small JSON object of plain values")
    return config


def eligible_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> layer for every layer of a type the int8 path converts (exact ``Conv2d`` / ``Linear``)."""
    return {name: m for name, m in model.named_modules() if type(m) in INT8_LAYERS and name}


def matches(name: str, patterns: Iterable[str]) -> bool:
    """``name`` equals a pattern, lies under it (``time_embedding`` covers ``time_embedding.linear_1``) or matches it
    as a glob (``*.time_emb_proj``)."""
    return any(name == p or name.startswith(p + ".") or fnmatch.fnmatchcase(name, p) for p in patterns)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def convert_for_loading(model: nn.Module, config: dict, where: str | os.PathLike) -> None:
    """Replace the float layers of a (meta-device) model by empty int8 layers, as ``config`` says, before loading."""
    layers = eligible_layers(model)
    keep = config.get("modules_to_not_convert", [])
    missing = sorted(set(keep) - set(layers))
    if missing:
        raise QuantizationConfigError(
            f"{os.fspath(where)}: quantization_config['modules_to_not_convert'] names {missing[:10]}, which are not "
            f"Conv2d/Linear layers of {type(model).__name__} built from this config; the config does not belong to "
            "this model"
        )
    keep = set(keep)
    for name, layer in layers.items():
        if name in keep:
            continue
        int8_cls = INT8_LAYERS[type(layer)]
        if isinstance(layer, nn.Conv2d):
            new = int8_cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                           layer.dilation, layer.groups, layer.bias is not None, device="meta")
        else:
            new = int8_cls(layer.in_features, layer.out_features, layer.bias is not None, device="meta")
        replace_module(model, name, new)
