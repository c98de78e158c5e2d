"""Atomic writes: single files (temp file + ``os.replace``) and whole checkpoints (staging folder + commit journal)."""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp_path, 0o644)  # mkstemp creates 0600; checkpoints are ordinary readable files
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` and move the result into place atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)


# ------------------------------------------------------------------------------------------ whole-checkpoint saves
#
# A checkpoint save writes every file into a hidden staging folder inside the target folder, fsyncs it, then writes a
# commit journal (the list of files to move in and of superseded files to delete) atomically, and only then moves the
# files into place and deletes the superseded ones. A save killed before the journal exists leaves the old
# checkpoint (plus a staging folder that the next save removes); one killed after it is finished ("rolled forward")
# by the next load or save, which replays the journal. Saves hold an exclusive flock on the target folder (and on its
# parent when that is a pipeline folder); loads hold a shared one, so a load never sees half a commit.

JOURNAL_NAME = ".diffusekit-commit.json"
STAGE_PREFIX = ".diffusekit-staging-"
_TEMP_FILE = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp")  # what atomic_path's mkstemp names look like

_active_stages: contextvars.ContextVar[tuple["CheckpointWriter", ...]] = contextvars.ContextVar(
    "diffusekit_active_stages", default=()
)
_read_locked: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("diffusekit_read_locked",
                                                                                default=frozenset())


def replace_folder(save: Callable[[Path], None], destination: str | os.PathLike) -> Path:
    """Write a whole folder with ``save(staging)`` into a staging folder beside ``destination``, then put it in
    place: a new ``destination`` by one rename, an existing one swapped out whole (nothing of the old folder stays,
    unlike ``save_pretrained``'s checkpoint commit, which leaves files outside the checkpoint alone) and deleted. A
    failure leaves ``destination`` as it was. ``destination`` must not be a file."""
    destination = Path(destination)
    if destination.exists() and not destination.is_dir():
        raise NotADirectoryError(f"{destination} is a file; a folder is written to a folder path")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent))
    os.chmod(staging, 0o755)  # mkdtemp makes it private; a model folder is an ordinary readable folder
    try:
        save(staging)
        if destination.exists():  # swap, then drop the old folder
            old = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".old", dir=destination.parent))
            os.replace(destination, old / "previous")
            os.replace(staging, destination)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return destination


class InterruptedSaveError(OSError):
    """A killed save left a commit journal that cannot be finished (e.g. the folder is read-only)."""


def inside(root: Path, rel: str | os.PathLike, what: str = "path") -> Path:
    """``root / rel`` if it stays inside ``root`` (after resolving ``..`` and symlinks); raise ``ValueError`` if not.

    The error names ``rel`` and ``root`` only, never what lies outside.
    """
    text = os.fspath(rel)
    if "\x00" in text:
        raise ValueError(f"{what} {text!r} contains a NUL byte")
    if os.path.isabs(text) or text.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", text):
        raise ValueError(f"{what} {text!r} is an absolute path; it must name something inside {root}")
    candidate = root / text
    real_root = os.path.realpath(root)
    real = os.path.realpath(candidate)
    if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise ValueError(f"{what} {text!r} leaves the folder {root} (through '..' or a symlink); refusing it")
    return candidate


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)


@contextlib.contextmanager
def _flock(folder: Path, exclusive: bool) -> Iterator[None]:
    """An advisory lock on the folder itself (no lock file); a no-op where flock is unavailable."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory directory locks; saves are still whole through the journal
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read_journal(folder: Path) -> dict | None:
    path = folder / JOURNAL_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        journal = json.loads(text)
        stage, files, delete = journal["stage"], journal["files"], journal["delete"]
        ok = (isinstance(stage, str) and stage.startswith(STAGE_PREFIX) and "/" not in stage and "\\" not in stage
              and all(isinstance(f, str) for f in [*files, *delete]))
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise InterruptedSaveError(
            f"{path} is not a diffusekit commit journal; delete it if you did not put it there on purpose"
        )
    # a journal from a downloaded folder could name anything: every entry must stay inside the folder
    for rel in [*files, *delete]:
        inside(folder, rel, f"commit journal {path} entry")
    return journal


def _apply_journal(folder: Path, journal: dict) -> None:
    """Move the staged files in and delete the superseded ones; idempotent, so a replay finishes a killed commit."""
    stage = folder / journal["stage"]
    touched = {folder}
    for rel in journal["files"]:
        source, target = stage / rel, folder / rel
        if source.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
            touched.add(target.parent)
    for rel in journal["delete"]:
        (folder / rel).unlink(missing_ok=True)
        touched.add((folder / rel).parent)
    for directory in touched:
        _fsync_dir(directory)
    (folder / JOURNAL_NAME).unlink()
    _fsync_dir(folder)
    shutil.rmtree(stage, ignore_errors=True)


def _roll_forward(folder: Path) -> None:
    """Finish a commit a killed save left behind (caller holds the exclusive lock)."""
    journal = _read_journal(folder)
    if journal is not None:
        logger.warning("%s: finishing a save that was interrupted after it was complete", folder)
        _apply_journal(folder, journal)


def _sweep(folder: Path) -> None:
    """Remove staging folders and temp files that killed saves left in ``folder`` (caller holds the lock)."""
    for entry in folder.iterdir():
        if entry.name.startswith(STAGE_PREFIX) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        elif _TEMP_FILE.fullmatch(entry.name) and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)


def finish_interrupted_save(folder: Path) -> None:
    """Called before reading a local folder: if a killed save left a complete commit, finish it."""
    if not (folder / JOURNAL_NAME).exists():
        return
    try:
        with _flock(folder, exclusive=True):
            _roll_forward(folder)
    except PermissionError as err:
        raise InterruptedSaveError(
            f"{folder}: a save into this folder was interrupted after it was complete, and finishing it needs write "
            f"permission ({err.strerror}); run once with write access, or re-save the checkpoint"
        ) from None


@contextlib.contextmanager
def reading_checkpoint(*folders: Path) -> Iterator[None]:
    """Hold shared locks on local checkpoint folders while they are read (a save cannot commit meanwhile)."""
    held = _read_locked.get()
    with contextlib.ExitStack() as stack:
        new = set()
        for folder in folders:
            key = os.path.realpath(folder)
            if key in held or key in new or not folder.is_dir():
                continue
            finish_interrupted_save(folder)
            stack.enter_context(_flock(folder, exclusive=False))
            new.add(key)
        token = _read_locked.set(held | new)
        try:
            yield
        finally:
            _read_locked.reset(token)


class CheckpointWriter:
    """Where a save writes (``stage``) and what it replaces; see :func:`atomic_checkpoint`."""

    def __init__(self, target: Path, stage: Path, parent: "CheckpointWriter | None" = None, prefix: str = ""):
        self.target, self.stage, self._parent, self._prefix = target, stage, parent, prefix
        self._supersede: list[tuple[str, Callable[[str], bool]]] = []

    def supersede(self, subfolder: str, match: Callable[[str], bool]) -> None:
        """Files of ``target/subfolder`` whose names ``match`` are replaced by this save: deleted unless rewritten."""
        if self._parent is not None:
            self._parent.supersede(os.path.join(self._prefix, subfolder) if subfolder else self._prefix, match)
        else:
            self._supersede.append((subfolder, match))

    def _commit(self) -> None:
        files = sorted(os.fspath(p.relative_to(self.stage)) for p in self.stage.rglob("*") if p.is_file())
        for directory in {self.stage, *(p for p in self.stage.rglob("*") if p.is_dir())}:
            for entry in directory.iterdir():
                if entry.is_file():
                    with open(entry, "rb") as handle:
                        os.fsync(handle.fileno())
            _fsync_dir(directory)
        new = set(files)
        delete = []
        for subfolder, match in self._supersede:
            folder = self.target / subfolder if subfolder else self.target
            if folder.is_dir():
                for entry in folder.iterdir():
                    rel = os.path.join(subfolder, entry.name) if subfolder else entry.name
                    if rel not in new and match(entry.name) and entry.is_file():
                        delete.append(rel)
        journal = {"stage": self.stage.name, "files": files, "delete": sorted(delete)}
        atomic_write_text(self.target / JOURNAL_NAME, json.dumps(journal, indent=1) + "\n")
        _fsync_dir(self.target)
        _apply_journal(self.target, journal)


def _enclosing_writer(target: Path) -> CheckpointWriter | None:
    real = os.path.realpath(target)
    for writer in reversed(_active_stages.get()):
        stage = os.path.realpath(writer.stage)
        if real == stage or real.startswith(stage + os.sep):
            return writer
    return None


@contextlib.contextmanager
def atomic_checkpoint(save_directory: str | os.PathLike) -> Iterator[CheckpointWriter]:
    """Save a whole checkpoint atomically: write into ``writer.stage``; on success it replaces the old files at once.

    Nested inside another checkpoint save (a pipeline saving its components), it writes straight into the enclosing
    stage and the enclosing save commits everything together. Files of the folder that the save neither writes nor
    ``supersede``\\ s (a README, other variants) are left alone.
    """
    target = Path(save_directory)
    if target.is_file():
        raise NotADirectoryError(f"cannot save into {target}: it is a file")
    outer = _enclosing_writer(target)
    if outer is not None:  # a component of a pipeline being saved: part of the pipeline's commit
        target.mkdir(parents=True, exist_ok=True)
        prefix = os.path.relpath(os.path.realpath(target), os.path.realpath(outer.stage))
        yield CheckpointWriter(target, target, parent=outer, prefix="" if prefix == "." else prefix)
        return
    target.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        parent = target.resolve().parent
        if (parent / "model_index.json").is_file():  # a component folder of a pipeline: exclude pipeline saves too
            stack.enter_context(_flock(parent, exclusive=True))
            _roll_forward(parent)
        stack.enter_context(_flock(target, exclusive=True))
        for folder in [*(p for p in target.iterdir() if p.is_dir() and not p.is_symlink()
                         and not p.name.startswith(STAGE_PREFIX)), target]:
            _roll_forward(folder)
            _sweep(folder)
        stage = Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=target))
        writer = CheckpointWriter(target, stage)
        token = _active_stages.set((*_active_stages.get(), writer))
        try:
            yield writer
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        finally:
            _active_stages.reset(token)
        try:
            writer._commit()
        except BaseException:
            if not (target / JOURNAL_NAME).exists():  # not committed: the old checkpoint stands
                shutil.rmtree(stage, ignore_errors=True)
            raise
