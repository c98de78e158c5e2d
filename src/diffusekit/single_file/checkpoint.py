"""Reading and writing single-file checkpoints (``.safetensors``, ``.ckpt``) safely.

:class:`SingleFile` gives the keys and shapes of a file before any tensor is read (from the safetensors header), and
reads tensors on demand, so a 4 GB checkpoint with EMA copies is never held twice. ``.ckpt`` / ``.pt`` / ``.bin``
files are pickles: they load with ``torch.load(weights_only=True)`` (tensors and plain containers only; a file that
needs any other object is refused, never executed), and the ``state_dict`` they nest is unwrapped.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from .._io import atomic_path
from ..modeling import CheckpointError

Shape = tuple[int, ...]
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

_HUB_URL = re.compile(r"^(?:https?://)?(?:huggingface\.co|hf\.co)/(?P<repo>[^/]+/[^/]+)/(?:blob|resolve)/"
                      r"(?P<revision>[^/]+)/(?P<path>.+)$")


def resolve_single_file(path_or_url: str | os.PathLike, **hub: Any) -> Path:
    """A local file, or a Hub file URL (``https://huggingface.co/<repo>/blob/<revision>/<file>``) from the cache."""
    text = os.fspath(path_or_url)
    match = _HUB_URL.match(text)
    if match and not Path(text).exists():
        from ..hub import resolve_file

        hub = {**hub, "revision": hub.get("revision") or match["revision"]}
        folder, _, name = match["path"].rpartition("/")
        return resolve_file(match["repo"], name, folder or None, **hub)
    path = Path(text)
    if path.is_dir():
        raise IsADirectoryError(
            f"{path} is a folder: from_single_file reads one .safetensors / .ckpt file; load a diffusers folder with "
            "from_pretrained"
        )
    if not path.is_file():
        raise FileNotFoundError(f"single-file checkpoint {path} does not exist")
    return path


class SingleFile(Mapping):
    """A read-only mapping key -> tensor over one checkpoint file (or a dict already in memory).

    ``shapes`` holds every key's shape without reading data; ``extras`` the non-tensor top-level entries of a
    ``.ckpt`` (``global_step``, ``epoch`` ...); ``name`` is the path, for error messages.
    """

    def __init__(self, source: str | os.PathLike | Mapping[str, Any], **hub: Any):
        self.extras: dict[str, Any] = {}
        self.metadata: dict[str, str] = {}
        self._tensors: dict[str, torch.Tensor] | None = None
        self._handle = None
        if isinstance(source, Mapping):
            self.path = None
            self.name = "the state dict passed in"
            self._tensors = self._unwrap(source)
        else:
            self.path = resolve_single_file(source, **hub)
            self.name = os.fspath(self.path)
            if self.path.suffix.lower() in SAFETENSORS_SUFFIXES or _looks_like_safetensors(self.path):
                self._open_safetensors()
            else:
                self._tensors = self._unwrap(self._load_pickle())
        if self._tensors is not None:
            self.shapes: dict[str, Shape] = {k: tuple(v.shape) for k, v in self._tensors.items()}
        if not self.shapes:
            raise CheckpointError(f"{self.name} holds no tensors")

    # ------------------------------------------------------------------ reading

    def _open_safetensors(self) -> None:
        from safetensors import safe_open

        try:
            self._handle = safe_open(self.name, framework="pt", device="cpu")
            self.shapes = {k: tuple(self._handle.get_slice(k).get_shape()) for k in self._handle.keys()}
            self.metadata = self._handle.metadata() or {}
        except Exception as err:  # safetensors has one error type for every kind of damage
            raise CheckpointError(
                f"cannot read single-file checkpoint {self.name}: {err}. The file is truncated or not a safetensors "
                "file: re-download it"
            ) from None

    def _load_pickle(self) -> Any:
        def load(mmap: bool):
            return torch.load(self.name, map_location="cpu", weights_only=True, mmap=mmap)

        try:
            try:
                return load(mmap=True)
            except RuntimeError as err:  # old (non-zip) torch.save format cannot be memory-mapped
                if "mmap" not in str(err) and "zip" not in str(err):
                    raise
                return load(mmap=False)
        except pickle.UnpicklingError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(
                f"refusing to load {self.name}: the pickle needs objects other than tensors and plain containers "
                f"({first}). Loading it would run code from the file. Convert it to .safetensors with a tool you "
                "trust, or get a .safetensors copy of the model"
            ) from None
        except (RuntimeError, EOFError, OSError, ValueError) as err:
            raise CheckpointError(
                f"cannot read single-file checkpoint {self.name}: {err}. The file is truncated or corrupt: "
                "re-download it"
            ) from None

    def _unwrap(self, data: Any) -> dict[str, torch.Tensor]:
        # Lightning checkpoints nest the weights under "state_dict" (sometimes twice)
        while isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
            self.extras.update({k: v for k, v in data.items() if k != "state_dict" and not isinstance(v, Mapping)})
            data = data["state_dict"]
        if not isinstance(data, Mapping):
            raise CheckpointError(f"{self.name} does not hold a state dict (a mapping of names to tensors)")
        tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        self.extras.update({k: v for k, v in data.items() if not isinstance(v, (torch.Tensor, Mapping))})
        return tensors

    # ------------------------------------------------------------------ mapping

    def __getitem__(self, key: str) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[key]
        if key not in self.shapes:
            raise KeyError(key)
        try:
            return self._handle.get_tensor(key)
        except Exception as err:
            raise CheckpointError(f"cannot read tensor {key!r} of {self.name}: {err}. The file is truncated or "
                                  "corrupt: re-download it") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def __contains__(self, key: object) -> bool:
        return key in self.shapes

    def with_prefix(self, prefix: str) -> dict[str, Shape]:
        """Shapes of the keys under ``prefix``, relative to it."""
        n = len(prefix)
        return {k[n:]: s for k, s in self.shapes.items() if k.startswith(prefix)}


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte little-endian header size, then ``{``; a zip/pickle does not."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 30)


# ---------------------------------------------------------------------------------------------------- writing


def write_single_file(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``tensors`` atomically: ``.safetensors`` (recommended) or a weights-only ``.ckpt`` (``{"state_dict":
    ...}``, what older tools expect)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write single-file checkpoint {path}: it is a folder")
    suffix = path.suffix.lower()
    if suffix not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
        raise ValueError(f"{path}: a single-file checkpoint ends in .safetensors (recommended) or .ckpt")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        if suffix in SAFETENSORS_SUFFIXES:
            from safetensors.torch import save_file

            save_file(tensors, os.fspath(tmp), metadata={"format": "pt", **(metadata or {})})
        else:
            torch.save({"state_dict": tensors}, tmp)
    return path
