"""Which models the server may load, and the one it holds in memory.

Names come from a listing, never from joining a request's text onto a path: the bundled models
(``diffusekit-fashion-sd``, ...), the direct subfolders of ``--models DIR`` that hold a ``model_index.json``, and
the single-file SD 1.x/2.x checkpoints directly in ``DIR`` (``name.safetensors`` / ``name.ckpt``, listed under
their file name as A1111 does; a ``name.yaml`` beside one is used as its original config).
A name that is not in the listing is refused, so no request can reach a file outside the models folder
(a subfolder that is a link to elsewhere is not listed either). LoRA files and embeddings are listed from
``DIR/Lora`` and ``DIR/embeddings`` (A1111's folder names).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import re
import threading
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LORA_DIRS = ("Lora", "lora", "LoRA")
EMBEDDING_DIRS = ("embeddings",)
LORA_SUFFIXES = (".safetensors",)
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
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
    def single_file(self) -> bool:
        return self.folder.is_file()

    @property
    def weights(self) -> Path | None:
        if self.single_file:
            return self.folder
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
                if not _inside(sub, self.models_dir):
                    continue
                if sub.is_dir() and (sub / "model_index.json").is_file():
                    found[sub.name] = ModelEntry(sub.name, sub, bundled=False)
                elif sub.is_file() and sub.suffix.lower() in SINGLE_FILE_SUFFIXES:
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
        """A1111's ``/sdapi/v1/loras`` entries (path relative to the models folder, never the server's), with the
        file's training metadata (kohya's ``ss_*`` keys) and its ``ss_output_name`` as the alias, as A1111."""
        entries = []
        for path in self._listing(LORA_DIRS, LORA_SUFFIXES):
            metadata = lora_metadata(path)
            alias = metadata.get("ss_output_name")
            entries.append({"name": path.stem, "alias": alias if isinstance(alias, str) and alias else path.stem,
                            "path": path.relative_to(self.models_dir).as_posix(), "metadata": metadata})
        return entries

    def lora_file(self, name: str) -> Path:
        """The LoRA file a ``<lora:name:w>`` prompt tag names: by file name without suffix, or by the alias its
        metadata gives (``ss_output_name``), as A1111 (``extensions-builtin/Lora/networks.py``). An alias that
        several files give (or that is an earlier file's name) is ambiguous: A1111 then takes that name as a file
        name only, never as the alias (``forbidden_network_aliases``), and so does this (with an error naming the
        files when no file has that name). "none" is never an alias, as in A1111."""
        entries = self.loras()
        files = {entry["name"]: self.models_dir / entry["path"] for entry in entries}
        by_name: dict[str, Path] = {}
        forbidden = {"none"}
        for entry in entries:  # A1111's order: a file's name, then its alias, each over what came before
            path = files[entry["name"]]
            if entry["alias"] in by_name:
                forbidden.add(entry["alias"].lower())
            by_name[entry["name"]] = by_name[entry["alias"]] = path
        if name.lower() in forbidden:
            if name in files:
                return files[name]
            clash = [entry["path"] for entry in entries if entry["alias"].lower() == name.lower()
                     or entry["name"].lower() == name.lower()]
            raise UnknownModel(f"LoRA {name!r} in the prompt is not taken as an alias (A1111 refuses 'none' and "
                               f"aliases that more than one file answers to: {', '.join(clash) or 'none'}): name "
                               "the file by its file name, without the suffix")
        if name in by_name:
            return by_name[name]
        raise UnknownModel(f"unknown LoRA {name!r} in the prompt; LoRA files in the models folder's Lora/: "
                           f"{', '.join(files) or 'none'}")

    def embedding_files(self) -> list[Path]:
        return self._listing(EMBEDDING_DIRS, EMBEDDING_SUFFIXES)


class LoadedModel:
    """One pipeline in memory, its name, hash and preview projection, the LoRAs and embeddings loaded into it."""

    def __init__(self, entry: ModelEntry, pipe, short_hash: str | None, preview):
        self.entry = entry
        self.pipe = pipe
        self.hash = short_hash
        self.preview = preview
        self.loras: dict[str, str] = {}  # adapter name -> short file hash
        self.embeddings: dict[str, dict[str, Any]] = {}  # A1111's /embeddings "loaded"
        self.embedding_hashes: dict[str, str] = {}  # name -> A1111's short hash ("TI hashes")
        self.skipped_embeddings: dict[str, dict[str, Any]] = {}
        self.optimized = False  # pipe.optimize() ran (serve --optimize)

    def load_embeddings(self, files: list[Path]) -> None:
        """Load every textual-inversion file of the models folder, as A1111 does at start; one that does not fit
        this model (another text encoder width, a bad file) is listed as skipped, with the reason logged."""
        from ..infotext import embedding_hash
        from ..loaders.textual_inversion import embedding_summary, read_embedding_file

        if not hasattr(self.pipe, "load_textual_inversion"):
            return
        for path in files:
            data = None
            try:  # each file read once: its hash, its /embeddings numbers and its vectors come from these bytes
                raw = path.read_bytes()
                data = read_embedding_file(path, raw)
                self.pipe.load_textual_inversion(data, token=path.stem)
            except Exception as exc:  # noqa: BLE001 - any bad file is skipped, as in A1111
                logger.warning("embedding %s skipped for %s: %s", path.name, self.name, exc)
                self.skipped_embeddings[path.stem] = embedding_summary(path, {} if data is None else data)
                continue
            self.embeddings[path.stem] = embedding_summary(path, data)
            self.embedding_hashes[path.stem] = embedding_hash(raw)

    def embeddings_used(self, *prompts: str) -> dict[str, str]:
        """``{name: short hash}`` of the loaded embeddings the prompts name (as a whole word), for "TI hashes"."""
        text = " ".join(p for p in prompts if p)
        return {name: digest for name, digest in self.embedding_hashes.items()
                if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text)}

    def apply_loras(self, prompt: str, registry: "ModelRegistry") -> tuple[str, dict[str, str]]:
        """Activate the LoRAs ``<lora:name:weight>`` tags in ``prompt`` name (loading them on first use) and
        deactivate the rest; returns the prompt without the tags and ``{name: short file hash}``. On an optimized
        model a request without tags unloads them instead: their hooks would keep every later request off the
        compiled packages (a later tag loads its file again)."""
        from ..cli.generate import LORA_TAG
        from ..infotext import lora_hash

        tags = parse_lora_tags(prompt)
        if not tags:
            if self.loras and self.optimized:  # no hook left: the compiled packages serve the request again
                self.pipe.unload_lora_weights()
                self.loras.clear()
            elif self.loras:
                self.pipe.disable_lora()
            return prompt, {}
        if not hasattr(self.pipe, "load_lora_weights"):
            raise ValueError(f"model {self.name} ({type(self.pipe).__name__}) cannot load LoRA weights")
        for name in tags:
            if name not in self.loras:
                path = registry.lora_file(name)
                self.pipe.load_lora_weights(str(path), adapter_name=name)
                self.loras[name] = lora_hash(path)
        self.pipe.enable_lora()
        self.pipe.set_adapters(list(tags), list(tags.values()))
        return LORA_TAG.sub("", prompt).strip(), {name: self.loras[name] for name in tags}

    @property
    def name(self) -> str:
        return self.entry.name


class ModelHolder:
    """Holds at most one loaded model; ``get(name)`` loads (and frees the previous one) when the name changes.

    Only the worker thread calls ``get``, between jobs, so a model is never swapped under a running job.
    """

    def __init__(self, registry: ModelRegistry, device: str = "cpu", optimize: bool = False):
        self.registry = registry
        self.device = device
        self.optimize = optimize
        self.current: LoadedModel | None = None
        self._lock = threading.Lock()

    def get(self, name: str) -> LoadedModel:
        from ..generation import fast_path
        from .previews import preview_for

        entry = self.registry.resolve(name)
        with self._lock:
            if self.current is not None and self.current.entry == entry:
                return self.current
            self.current = None  # drop the old pipeline before loading the next: one model in memory
            gc.collect()
            logger.info("loading model %s", entry.name)
            pipe = _load(entry).to(self.device)
            pipe.set_progress_bar_config(disable=True)
            loaded = LoadedModel(entry, pipe, self.registry.short_hash(entry), preview_for(pipe, entry))
            loaded.load_embeddings(self.registry.embedding_files())
            # after the preview fit (its VAE calls at a size no request uses) and the embeddings, as generate does
            note = fast_path(pipe, self.optimize)
            loaded.optimized = self.optimize
            if note:
                logger.warning("model %s: %s", entry.name, note)
            self.current = loaded
            return loaded


def parse_lora_tags(prompt: str) -> dict[str, float]:
    """``{name: weight}`` of A1111's ``<lora:name:weight>`` prompt tags (weight 1 when left out)."""
    from ..cli.generate import LORA_TAG

    tags: dict[str, float] = {}
    for name, weight in LORA_TAG.findall(prompt or ""):
        try:
            tags[name] = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"prompt tag <lora:{name}:{weight}>: the weight is not a number") from None
    return tags


#: A1111's display order of kohya metadata keys (``network.py``); the others follow in file order
METADATA_ORDER = {"ss_sd_model_name": 1, "ss_resolution": 2, "ss_clip_skip": 3, "ss_num_train_images": 10,
                  "ss_tag_frequency": 20}


def lora_metadata(path: Path) -> dict[str, Any]:
    """A LoRA file's safetensors metadata as A1111's ``read_metadata_from_safetensors`` gives it: values that look
    like JSON objects (``ss_network_args``, ``ss_tag_frequency``) parsed, in A1111's order; ``{}`` for a file
    without any (or one whose header cannot be read). Only the header is read."""
    import json

    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            raw = handle.metadata() or {}
    except Exception:  # noqa: BLE001 - a damaged file just shows no metadata; loading it reports the error
        return {}
    metadata: dict[str, Any] = {}
    for key, value in raw.items():
        metadata[key] = value
        if isinstance(value, str) and value[:1] == "{":
            try:
                metadata[key] = json.loads(value)
            except ValueError:
                pass
    return dict(sorted(metadata.items(), key=lambda item: METADATA_ORDER.get(item[0], 999)))


def _load(entry: ModelEntry):
    from ..pipelines.base import DiffusionPipeline

    if not entry.single_file:
        return DiffusionPipeline.from_pretrained(entry.folder)
    from ..pipelines.stable_diffusion import StableDiffusionPipeline

    original = entry.folder.with_suffix(".yaml")
    return StableDiffusionPipeline.from_single_file(
        entry.folder, original_config=original if original.is_file() else None, requires_safety_checker=False)
