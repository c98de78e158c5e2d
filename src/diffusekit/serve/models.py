"""Which models the server may load, and the one it holds in memory.

Names come from a listing, never from joining a request's text onto a path: the bundled models
(``diffusekit-fashion-sd``, ...) and the direct subfolders of ``--models DIR`` that hold a ``model_index.json``.
A name that is not in the listing is refused, so no request can reach a file outside the models folder
(a subfolder that is a link to elsewhere is not listed either). LoRA files and embeddings are listed from
``DIR/Lora`` and ``DIR/embeddings`` (A1111's folder names).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import threading
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LORA_DIRS = ("Lora", "lora", "LoRA")
EMBEDDING_DIRS = ("embeddings",)
LORA_SUFFIXES = (".safetensors",)
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
WEIGHT_FILES = ("unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin",
                "transformer/diffusion_pytorch_model.safetensors")


class UnknownModel(LookupError):
    """A model name that is not among the served models."""


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    name: str
    folder: Path
    bundled: bool

    @property
    def weights(self) -> Path | None:
        for rel in WEIGHT_FILES:
            if (self.folder / rel).is_file():
                return self.folder / rel
        return None


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


class ModelRegistry:
    """The served models (listed fresh on every call, so folders added while running show up)."""

    def __init__(self, models_dir: Path | None = None):
        self.models_dir = Path(models_dir) if models_dir is not None else None
        self._hashes: dict[tuple[str, int, int], str] = {}

    def entries(self) -> dict[str, ModelEntry]:
        from ..hub import BUNDLED_DIR, bundled_models

        found: dict[str, ModelEntry] = {}
        if self.models_dir is not None and self.models_dir.is_dir():
            for sub in sorted(self.models_dir.iterdir()):
                if sub.is_dir() and (sub / "model_index.json").is_file() and _inside(sub, self.models_dir):
                    found[sub.name] = ModelEntry(sub.name, sub, bundled=False)
        for name in bundled_models():
            folder = BUNDLED_DIR / name
            if (folder / "model_index.json").is_file():
                found.setdefault(name, ModelEntry(name, folder, bundled=True))
        return found

    def names(self) -> list[str]:
        return list(self.entries())

    def resolve(self, name: str) -> ModelEntry:
        """The entry for ``name`` (also accepts A1111 titles ``"name [hash]"``); ``UnknownModel`` otherwise."""
        if not isinstance(name, str) or not name:
            raise UnknownModel(f"model name must be a non-empty string, got {name!r}")
        entries = self.entries()
        key = name.split(" [", 1)[0].strip()
        if key in entries:
            return entries[key]
        lowered = {k.lower(): v for k, v in entries.items()}
        if key.lower() in lowered:
            return lowered[key.lower()]
        raise UnknownModel(f"unknown model {name!r}; served models: {', '.join(entries) or 'none'}")

    def short_hash(self, entry: ModelEntry) -> str | None:
        """A1111's short hash of the UNet weights (computed once per file version)."""
        from ..infotext import model_hash

        weights = entry.weights
        if weights is None:
            return None
        stat = weights.stat()
        key = (str(weights), stat.st_size, int(stat.st_mtime))
        if key not in self._hashes:
            self._hashes[key] = model_hash(weights)
        return self._hashes[key]

    def _listing(self, folders: tuple[str, ...], suffixes: tuple[str, ...]) -> list[Path]:
        if self.models_dir is None:
            return []
        files: list[Path] = []
        for folder in folders:
            root = self.models_dir / folder
            if root.is_dir() and _inside(root, self.models_dir):
                files.extend(p for p in sorted(root.rglob("*"))
                             if p.is_file() and p.suffix.lower() in suffixes and _inside(p, self.models_dir))
        return files

    def loras(self) -> list[dict[str, Any]]:
        """A1111's ``/sdapi/v1/loras`` entries (path relative to the models folder, never the server's)."""
        return [{"name": p.stem, "alias": p.stem, "path": p.relative_to(self.models_dir).as_posix(), "metadata": {}}
                for p in self._listing(LORA_DIRS, LORA_SUFFIXES)]

    def embeddings(self) -> dict[str, Any]:
        """A1111's ``/sdapi/v1/embeddings`` answer: files found are listed as ``skipped`` (not loaded)."""
        skipped = {p.stem: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None,
                            "vectors": None} for p in self._listing(EMBEDDING_DIRS, EMBEDDING_SUFFIXES)}
        return {"loaded": {}, "skipped": skipped}


class LoadedModel:
    """One pipeline in memory, its name, hash and preview projection."""

    def __init__(self, entry: ModelEntry, pipe, short_hash: str | None, preview):
        self.entry = entry
        self.pipe = pipe
        self.hash = short_hash
        self.preview = preview

    @property
    def name(self) -> str:
        return self.entry.name


class ModelHolder:
    """Holds at most one loaded model; ``get(name)`` loads (and frees the previous one) when the name changes.

    Only the worker thread calls ``get``, between jobs, so a model is never swapped under a running job.
    """

    def __init__(self, registry: ModelRegistry, device: str = "cpu"):
        self.registry = registry
        self.device = device
        self.current: LoadedModel | None = None
        self._lock = threading.Lock()

    def get(self, name: str) -> LoadedModel:
        from ..pipelines.base import DiffusionPipeline
        from .previews import preview_for

        entry = self.registry.resolve(name)
        with self._lock:
            if self.current is not None and self.current.entry == entry:
                return self.current
            self.current = None  # drop the old pipeline before loading the next: one model in memory
            gc.collect()
            logger.info("loading model %s", entry.name)
            pipe = DiffusionPipeline.from_pretrained(entry.folder)
            pipe = pipe.to(self.device)
            pipe.set_progress_bar_config(disable=True)
            self.current = LoadedModel(entry, pipe, self.registry.short_hash(entry), preview_for(pipe, entry))
            return self.current
