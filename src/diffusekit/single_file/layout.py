"""Applies the tables of ``keymaps.py``: diffusers keys <-> original keys, and the tensors' reshapes, both ways.

``key_map(kind, diffusers_shapes, config)`` lists, for every tensor of a diffusers model, where it lives in the
original layout (key relative to the component's prefix, and the transform). The same map converts a checkpoint to
diffusers (``to_diffusers``) and a model's state dict back (``to_original``), and predicts the original shapes so a
file is checked against the model from its header, before any tensor is read.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from . import keymaps

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Ref:
    """Where a diffusers tensor lives in the original layout: ``key`` (relative to the component's prefix) and how
    the value differs (``None``, ``"conv1x1"``, ``"transpose"`` or ``("part", i, n)``)."""

    key: str
    transform: Any = None


@functools.lru_cache(maxsize=None)
def _compiled(kind: str) -> list[tuple[re.Pattern, str, Mapping | None, Any]]:
    entries = []
    for diffusers_template, original_template, table, transform in keymaps.TABLES[kind]:
        pattern = re.escape(diffusers_template).replace(r"\{block\}", r"(?P<block>\d+)")
        pattern = pattern.replace(r"\{layer\}", r"(?P<layer>\d+)")
        entries.append((re.compile(f"^{pattern}(?:\\.(?P<rest>.+))?$"), original_template, table, transform))
    return entries


def original_ref(kind: str, key: str, config: Mapping[str, Any]) -> Ref:
    """The original location of the diffusers key ``key`` of a ``kind`` component ("unet", "vae", "clip",
    "open_clip") built from ``config``."""
    rules: Callable | None = keymaps.INDEX_RULES.get(kind)
    for pattern, original_template, table, transform in _compiled(kind):
        match = pattern.match(key)
        if not match:
            continue
        fields = {name: int(value) for name, value in match.groupdict().items() if name != "rest" and value}
        derived = rules(fields, config) if rules else {}
        module = original_template.format(**fields, **derived)
        rest = match.group("rest")
        if rest and table:
            for diffusers_name, original in table.items():
                if rest == diffusers_name or rest.startswith(diffusers_name + "."):
                    name, transform = (original, None) if isinstance(original, str) else original
                    rest = name + rest[len(diffusers_name):]
                    break
        return Ref(f"{module}.{rest}" if rest else module, transform)
    raise NotImplementedError(
        f"{key!r} has no place in the original single-file layout of a {kind}: this model configuration cannot be "
        "written to (or read from) a single file"
    )


def key_map(kind: str, diffusers_keys, config: Mapping[str, Any]) -> dict[str, Ref]:
    """diffusers key -> :class:`Ref` for every tensor of the model."""
    return {key: original_ref(kind, key, config) for key in diffusers_keys}


# ---------------------------------------------------------------------------------------------------- values


def original_shape(shape: Shape, transform: Any) -> Shape:
    if transform == "conv1x1" and len(shape) == 2:
        return (*shape, 1, 1)
    if transform == "transpose":
        return tuple(reversed(shape))
    if isinstance(transform, tuple) and transform[0] == "part":
        return (shape[0] * transform[2], *shape[1:])
    return tuple(shape)


def original_shapes(diffusers_shapes: Mapping[str, Shape], kmap: Mapping[str, Ref]) -> dict[str, Shape]:
    """The shapes the original file must have for a model whose tensors have ``diffusers_shapes``."""
    return {ref.key: original_shape(diffusers_shapes[key], ref.transform) for key, ref in kmap.items()}


def from_original(value: torch.Tensor, transform: Any) -> torch.Tensor:
    if transform == "conv1x1" and value.ndim == 4:
        return value[:, :, 0, 0]
    if transform == "transpose":
        return value.T.contiguous()
    if isinstance(transform, tuple) and transform[0] == "part":
        _, index, count = transform
        return value.chunk(count, dim=0)[index].clone()  # a copy: views of one tensor cannot be saved apart
    return value


def to_diffusers(get: Callable[[str], torch.Tensor], kmap: Mapping[str, Ref]) -> dict[str, torch.Tensor]:
    """A diffusers state dict from original tensors, ``get(original_key)`` (each read once)."""
    cache: dict[str, torch.Tensor] = {}
    out = {}
    for key, ref in kmap.items():
        if ref.key not in cache:
            cache[ref.key] = get(ref.key)
        out[key] = from_original(cache[ref.key], ref.transform)
    return out


def to_original(state_dict: Mapping[str, torch.Tensor], kmap: Mapping[str, Ref], prefix: str = "") -> dict:
    """The original-layout tensors (keys with ``prefix``) of a diffusers state dict."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    for key, ref in kmap.items():
        value = state_dict[key].detach()
        transform = ref.transform
        if isinstance(transform, tuple) and transform[0] == "part":
            parts.setdefault(ref.key, {})[transform[1]] = value
            continue
        if transform == "conv1x1" and value.ndim == 2:
            value = value[:, :, None, None]
        elif transform == "transpose":
            value = value.T
        out[prefix + ref.key] = value.contiguous()
    for key, pieces in parts.items():
        out[prefix + key] = torch.cat([pieces[i] for i in sorted(pieces)], dim=0).contiguous()
    return out
