"""Finding files: a local folder, or a Hugging Face Hub repo id resolved through ``huggingface_hub`` and its cache.

``HF_HUB_OFFLINE=1``, ``local_files_only``, ``cache_dir``, ``revision`` and ``token`` behave as in diffusers. A file
that cannot be found raises :class:`EntryNotFound` (a ``FileNotFoundError``) with the repo, subfolder and file named;
a cache miss without network raises one ``OSError`` that says what to do.
"""

from __future__ import annotations

import functools
import os
import socket
import urllib.parse
from pathlib import Path
from typing import Any

from ._io import finish_interrupted_save, inside

HUB_KWARGS = ("revision", "cache_dir", "local_files_only", "token", "force_download")


class EntryNotFound(FileNotFoundError):
    """The folder or repo exists but holds no such file."""


def split_hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pop the hub options out of ``kwargs`` (in place) and return them."""
    return {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}


BUNDLED_DIR = Path(__file__).parent / "bundled"


def bundled_models() -> list[str]:
    """Names of the models that ship inside the package (usable as ``from_pretrained("<name>")``)."""
    if not BUNDLED_DIR.is_dir():
        return []
    return sorted(p.name for p in BUNDLED_DIR.iterdir() if (p / "model_index.json").is_file() or (p / "config.json").is_file())


def local_folder(name_or_path: str | os.PathLike) -> Path | None:
    """The folder that ``name_or_path`` names on this machine, else None.

    An existing local folder wins (``"."``, a relative path, a folder named like a bundled model); then a bundled
    model's plain name; anything else is a hub repo id.
    """
    if is_local(name_or_path):
        return Path(name_or_path).expanduser()
    name = os.fspath(name_or_path)
    if name in bundled_models():
        return BUNDLED_DIR / name
    return None


def is_local(name_or_path: str | os.PathLike) -> bool:
    """True for an existing folder; raise for something that is plainly a path but does not exist."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return True
    text = os.fspath(name_or_path)
    if path.exists():
        raise NotADirectoryError(f"{text} is a file; pass the folder that holds the model (its config and weights)")
    if text.startswith((".", "/", "~", "\\")) or os.path.isabs(text) or text.count("/") > 1:
        raise FileNotFoundError(f"model folder {text} does not exist (no such directory)")
    return False


def check_relative(rel: str, what: str) -> None:
    """Refuse a name that is not a plain relative path inside a folder or repo (absolute, ``..``, NUL, backslash)."""
    if not isinstance(rel, str) or not rel:
        raise ValueError(f"{what} must be a non-empty string, got {rel!r}")
    parts = rel.replace("\\", "/").split("/")
    if "\x00" in rel or os.path.isabs(rel) or rel.startswith(("/", "\\", "~")) or ".." in parts \
            or (len(rel) > 1 and rel[1] == ":"):
        raise ValueError(
            f"{what} {rel!r} must be a relative path inside the model folder or repo (no '..', no absolute path)"
        )


def _hub_cache_blobs(folder: Path) -> Path | None:
    """For a Hugging Face cache snapshot folder (``<repo>/snapshots/<rev>/...``), the repo's ``blobs`` folder: the
    files there are symlinks into it."""
    real = Path(os.path.realpath(folder))
    for parent in [real, *real.parents]:
        if parent.parent.name == "snapshots" and (parent.parent.parent / "blobs").is_dir():
            return parent.parent.parent / "blobs"
    return None


def contained_file(folder: Path, rel: str, what: str = "file") -> Path:
    """``folder / rel``, refused if it resolves outside ``folder`` (a symlink into a hub cache's blobs is allowed)."""
    try:
        return inside(folder, rel, what)
    except ValueError:
        blobs = _hub_cache_blobs(folder)
        candidate = folder / rel
        if blobs is not None and os.path.realpath(os.path.dirname(candidate)).startswith(os.path.realpath(folder)):
            inside(blobs, os.path.relpath(os.path.realpath(candidate), blobs), what)  # raises if not in blobs
            return candidate
        raise


def local_checkpoint_folders(name_or_path: str | os.PathLike, subfolder: str | None = None) -> list[Path]:
    """The local folders a load reads (the model folder and its subfolder), to hold read locks on; [] for the hub."""
    folder = local_folder(name_or_path)
    if folder is None:
        return []
    if subfolder:
        check_relative(subfolder, "subfolder")
        return [folder, inside(folder, subfolder, "subfolder")]
    return [folder]


def _location(name_or_path, subfolder: str | None) -> str:
    return f"{name_or_path}/{subfolder}" if subfolder else os.fspath(name_or_path)


def resolve_file(
    name_or_path: str | os.PathLike,
    filename: str,
    subfolder: str | None = None,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
    force_download: bool = False,
) -> Path:
    """Return the local path of ``filename`` in a folder or hub repo (downloading it into the hub cache if needed)."""
    check_relative(filename, "file name")
    if subfolder:
        check_relative(subfolder, "subfolder")
    folder = local_folder(name_or_path)
    if folder is not None:
        model_folder = inside(folder, subfolder, "subfolder") if subfolder else folder
        finish_interrupted_save(folder)
        if subfolder and model_folder.is_dir():
            finish_interrupted_save(model_folder)
        path = contained_file(model_folder, filename, "file")
        if not path.is_file():
            present = sorted(p.name for p in model_folder.iterdir() if not p.name.startswith(".diffusekit-")) \
                if model_folder.is_dir() else None
            hint = f"it holds: {present}" if present is not None else "that folder does not exist"
            raise EntryNotFound(f"{_location(name_or_path, subfolder)}: no file {filename} ({hint})")
        return path
    return _hub_download(os.fspath(name_or_path), filename, subfolder, revision, cache_dir, local_files_only, token,
                         force_download)


def resolve_weights_file(source: str | os.PathLike, names: list[str], hub_kwargs: dict[str, Any],
                         what: str) -> Path:
    """``source`` itself when it is a file, else the first of ``names`` in that folder / hub repo.

    ``hub_kwargs`` as :func:`resolve_file` takes them (``subfolder`` included). Raises ``FileNotFoundError``
    naming ``what`` and every place looked at (used by the LoRA and textual-inversion loaders).
    """
    path = Path(source)
    if path.is_file():
        return path
    hub_kwargs = dict(hub_kwargs)
    subfolder = hub_kwargs.pop("subfolder", None)
    errors = []
    for name in names:
        try:
            return resolve_file(source, name, subfolder, **hub_kwargs)
        except (OSError, ValueError) as err:
            errors.append(str(err))
    raise FileNotFoundError(f"no {what} in {source}: looked for {', '.join(names)} ({'; '.join(errors)})")


def _hub_download(repo_id, filename, subfolder, revision, cache_dir, local_files_only, token, force_download) -> Path:
    # imported here: huggingface_hub costs import time and most uses are local folders
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub import errors as hf_errors

    offline = bool(local_files_only) or constants.HF_HUB_OFFLINE
    unreachable = not offline and not _hub_reachable(constants.ENDPOINT)
    where = _location(repo_id, subfolder)
    try:
        return Path(
            hf_hub_download(
                repo_id,
                filename,
                subfolder=subfolder or None,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=offline or unreachable,
                token=token,
                force_download=force_download,
                library_name="diffusekit",
            )
        )
    except hf_errors.HFValidationError as err:
        raise ValueError(
            f"{repo_id!r} is neither an existing local folder nor a valid hub repo id ('org/name'): {err}"
        ) from None
    except hf_errors.RepositoryNotFoundError:
        raise OSError(
            f"{repo_id} is not a local folder nor a repo on the Hub (or it is private: pass token=)"
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise OSError(f"{repo_id}: revision {revision!r} does not exist") from None
    except hf_errors.EntryNotFoundError as err:
        # LocalEntryNotFoundError is a subclass in some versions: a cache miss is not proof of absence
        if isinstance(err, hf_errors.LocalEntryNotFoundError):
            raise _cache_miss(where, filename, repo_id, offline) from None
        raise EntryNotFound(f"{where}: the repo has no file {filename}") from None
    except hf_errors.LocalEntryNotFoundError:
        raise _cache_miss(where, filename, repo_id, offline) from None


@functools.lru_cache(maxsize=8)
def _hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """One quick TCP connect per process and endpoint.

    Without it, a cache miss with no network makes huggingface_hub retry with back-off for ~20 s before failing; we
    go straight to the cache instead and say that the Hub is unreachable.
    """
    parsed = urllib.parse.urlparse(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _cache_miss(where: str, filename: str, repo_id: str, offline: bool) -> OSError:
    reason = "offline mode (HF_HUB_OFFLINE=1 or local_files_only=True)" if offline else "the Hub cannot be reached"
    return EntryNotFound(
        f"{where}: {filename} is not in the local Hugging Face cache and {reason}. "
        f"Download it where there is network (`hf download {repo_id}`), pass cache_dir= to the cache that holds it, "
        "or pass the path of a local folder instead of a repo id."
    )
