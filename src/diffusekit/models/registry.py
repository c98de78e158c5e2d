"""Block registry: config strings such as ``"AttnDownBlock2D"`` map to classes here, not through if-chains."""

from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T")

_BLOCKS: dict[str, dict[str, type]] = {"down": {}, "mid": {}, "up": {}}


def register_block(kind: str, name: str | None = None) -> Callable[[T], T]:
    """Class decorator: ``@register_block("down")`` registers the class under its own name (or ``name``)."""
    if kind not in _BLOCKS:
        raise ValueError(f"unknown block kind {kind!r}; expected one of {sorted(_BLOCKS)}")

    def decorate(cls: T) -> T:
        _BLOCKS[kind][name or cls.__name__] = cls  # type: ignore[attr-defined]
        return cls

    return decorate


def get_block(kind: str, name: str, config_key: str = "") -> type:
    """The class registered as ``name``; a clear error naming the config key and the known names otherwise."""
    try:
        return _BLOCKS[kind][name]
    except KeyError:
        where = f" in {config_key}" if config_key else ""
        known = ", ".join(sorted(_BLOCKS.get(kind, {}))) or "none"
        raise ValueError(f"unknown {kind} block type {name!r}{where}; supported: {known}") from None
