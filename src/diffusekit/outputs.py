"""Output containers: dataclasses that also index like tuples, as diffusers' outputs do."""

from __future__ import annotations

import dataclasses
from typing import Any


class BaseOutput:
    """Mixin for ``@dataclass`` outputs: ``out.sample``, ``out[0]``, ``out["sample"]`` and ``out.to_tuple()``.

    Fields that are ``None`` are skipped by integer indexing and ``to_tuple``, as in diffusers.
    """

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(v for v in (getattr(self, f.name) for f in dataclasses.fields(self)) if v is not None)

    def keys(self):
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, key):
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self):
        return iter(self.to_tuple())

    def __len__(self) -> int:
        return len(self.to_tuple())
