"""``manifest.jsonl``: one JSON line per finished job, appended atomically; what a re-run reads to skip done work.

A record is written after its PNG is in place (the PNG itself is written to a temporary file and renamed), as one
``write`` of a whole line to a file opened with ``O_APPEND``, then ``fsync``-ed. Killing the process at any moment
therefore leaves whole PNGs and whole manifest lines, except at worst one torn last line, which :func:`read_manifest`
reports and ignores (and :class:`ManifestWriter` ends with a newline before appending). Only one process (the
driver) writes: workers hand their images back instead of writing them, so no two writers ever race.

A job counts as done when its latest record says ``"status": "ok"`` and its file exists in the output folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["MANIFEST_NAME", "ManifestWriter", "done_ids", "read_manifest"]

MANIFEST_NAME = "manifest.jsonl"


def read_manifest(path: str | os.PathLike) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """``({id: latest record}, problems)``; a missing file is an empty manifest. Bad lines are reported, not fatal."""
    path = Path(path)
    records: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    if not path.is_file():
        return records, problems
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
                if not isinstance(record, dict) or not isinstance(record.get("id"), str):
                    raise ValueError("not a record with a string 'id'")
            except ValueError as error:  # a torn last line after a kill, or an edited file
                problems.append(f"{path}: line {number} ignored: {error}")
                continue
            records[record["id"]] = record
    return records, problems


def done_ids(folder: str | os.PathLike, records: dict[str, dict[str, Any]]) -> set[str]:
    """Ids whose latest record is ``ok`` and whose file is there (a file name only: never a path out of ``folder``)."""
    folder = Path(folder)
    done = set()
    for job_id, record in records.items():
        name = record.get("file")
        if record.get("status") != "ok" or not isinstance(name, str) or Path(name).name != name:
            continue
        if (folder / name).is_file():
            done.add(job_id)
    return done


class ManifestWriter:
    """Appends records to one manifest, each as a single ``O_APPEND`` write of a whole line, then ``fsync``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        size = os.fstat(self._fd).st_size
        if size:
            with open(self.path, "rb") as handle:
                handle.seek(size - 1)
                if handle.read(1) != b"\n":  # a torn line from a killed run: end it, so the next record stands alone
                    self._write(b"\n")

    def _write(self, data: bytes) -> None:
        written = os.write(self._fd, data)
        while written < len(data):  # a short write (full disk, signal): finish the line
            written += os.write(self._fd, data[written:])
        os.fsync(self._fd)

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
        if "\n" in line[:-1]:
            raise ValueError("a manifest record must serialise to one line")
        self._write(line.encode("utf-8"))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "ManifestWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
