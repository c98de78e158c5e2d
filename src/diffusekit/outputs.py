"""Output containers: ``@dataclass`` outputs that are also ordered dicts, as diffusers' ``BaseOutput`` is.

``out.sample``, ``out["sample"]``, ``out[0]``, ``out.keys()`` / ``values()`` / ``items()``, ``out.to_tuple()``;
``isinstance(out, dict)`` holds. Fields that are ``None`` are not keys: integer indexing, ``len`` and ``to_tuple``
skip them. Every subclass is registered as a torch pytree node, so ``torch.compile`` / ``torch.export`` /
``DistributedDataParallel(static_graph=True)`` see the tensors inside.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any


def _register_pytree(cls: type) -> None:
    try:
        from torch.utils import _pytree as pytree
    except ImportError:  # torch is optional for importing this module
        return

    def flatten(out):
        keys = list(out.keys())
        return [out[k] for k in keys], keys

    def unflatten(values, keys):
        return cls(**dict(zip(keys, values)))

    def flatten_with_keys(out):
        values, keys = flatten(out)
        return [(pytree.MappingKey(k), v) for k, v in zip(keys, values)], keys

    pytree.register_pytree_node(
        cls, flatten, unflatten, serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
        flatten_with_keys_fn=flatten_with_keys,
    )


class BaseOutput(OrderedDict):
    """Base of every output ``@dataclass``: an ordered dict of its fields that are not ``None``.

    A dataclass whose first field is a dict and whose other fields are all ``None`` is filled from that dict
    (``SomeOutput({"sample": x})``), as in diffusers. Keys cannot be removed (``del``, ``pop``, ``update`` and
    ``setdefault`` raise); setting a field keeps the attribute and the key in step. Iterating yields keys, as for any
    dict: use ``to_tuple()`` (or ``return_dict=False``) to unpack values.
    """

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        _register_pytree(cls)

    def __post_init__(self) -> None:
        fields = dataclasses.fields(self)
        if not fields:
            raise ValueError(f"{type(self).__name__} has no fields")
        first = getattr(self, fields[0].name)
        if isinstance(first, dict) and all(getattr(self, f.name) is None for f in fields[1:]):
            for key, value in first.items():
                self[key] = value
            return
        for f in fields:
            value = getattr(self, f.name)
            if value is not None:
                self[f.name] = value

    def _refuse(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} keys cannot be removed or bulk-updated; set a field instead")

    __delitem__ = pop = popitem = setdefault = update = _refuse  # type: ignore[assignment]

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return super().__getitem__(key)
        return self.to_tuple()[key]

    def __setattr__(self, name: str, value: Any) -> None:
        if value is not None and name in self.keys():
            super().__setitem__(name, value)
        super().__setattr__(name, value)

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        super().__setattr__(key, value)

    def __reduce__(self):
        if not dataclasses.is_dataclass(self):
            return super().__reduce__()
        # rebuild through the dataclass __init__, so attributes and keys both come back
        return type(self), tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def to_tuple(self) -> tuple[Any, ...]:
        """The values that are not ``None``, in field order."""
        return tuple(super(BaseOutput, self).__getitem__(k) for k in self.keys())
