"""Jobs file (JSON lines) -> validated jobs -> batches whose composition depends only on the job list.

One job per line::

    {"id": "dress-1", "prompt": "a photo of a red dress", "seed": 7, "steps": 20, "sampler": "DPM++ 2M Karras"}

Keys (:data:`JOB_KEYS`): ``id``, ``prompt``, ``negative_prompt``, ``seed``, ``steps``, ``guidance_scale``,
``width``, ``height``, ``sampler``, ``image`` / ``mask`` (paths, relative to the jobs file's folder) and
``strength`` for image-to-image / inpainting, the opt-in step savings ``guidance_interval`` (``[lo, hi]``) and
``deep_cache`` (an int interval or ``[interval, branch]``; docs/STEP_SAVINGS.md), and ``freeu`` (``[s1, s2, b1,
b2]``, diffusers' ``enable_freeu``). A missing key takes the command-line default (:class:`JobDefaults`).
A job without ``id`` is named by its line number (``line-000012``); a job without ``seed`` takes ``--seed`` when
given, else a seed derived from its id, so every job has a fixed seed and a re-run remakes the same image. A bad
line (not JSON, unknown key, wrong type, missing file, repeated id) becomes an :class:`InvalidLine` naming the line
and the problem; the caller skips it or refuses the file.

Batches (:func:`plan_batches`) are formed from the whole job list in file order: jobs that share task, size, steps,
sampler, CFG scale and strength, in chunks of ``batch_size``. They depend on nothing else (not the number of
workers, not which jobs are already done), so every run of the same job list pushes every job through the model
with the same companions: the files are identical locally and on a cluster with any number of workers.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from ..infotext import GenerationParameters

__all__ = ["JOB_KEYS", "InvalidLine", "Job", "JobDefaults", "load_jobs", "plan_batches"]

JOB_KEYS = ("id", "prompt", "negative_prompt", "seed", "steps", "guidance_scale", "width", "height", "sampler",
            "image", "mask", "strength", "guidance_interval", "deep_cache", "freeu")
ID_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")  # a file name: no separators, no leading dot
SEED_LIMIT = 2**32


@dataclasses.dataclass(frozen=True)
class JobDefaults:
    """Values for keys a job leaves out (the command line's flags). ``None``: the pipeline's own default."""

    negative_prompt: str = ""
    seed: int | None = None
    steps: int | None = 25
    guidance_scale: float | None = 7.5
    width: int | None = None
    height: int | None = None
    sampler: str | None = None
    strength: float | None = 0.75
    guidance_interval: tuple[float, float] | None = None
    deep_cache: int | tuple[int, int] | None = None
    freeu: tuple[float, float, float, float] | None = None
    model: str | None = None  # written into each image's parameters ("Model: ...")


@dataclasses.dataclass(frozen=True)
class Job:
    """One validated line: the parameters that make its image (seed included) and its input images, if any."""

    id: str
    line: int
    params: GenerationParameters
    image: str | None = None  # absolute path
    mask: str | None = None
    image_size: tuple[int, int] | None = None  # (width, height) of ``image``: jobs batch only with equal sizes

    @property
    def file(self) -> str:
        return f"{self.id}.png"

    @property
    def task(self) -> str:
        return "inpainting" if self.mask else "image-to-image" if self.image else "text-to-image"

    def batch_key(self) -> tuple:
        """Jobs with equal keys can run through the model together."""
        from ..generation import SHARED_FIELDS

        return (self.task, self.image_size, *(getattr(self.params, name) for name in SHARED_FIELDS))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form, to ship a job to another process or machine."""
        data = dataclasses.asdict(self)
        data["image_size"] = list(self.image_size) if self.image_size else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Job":
        data = dict(data)
        data["params"] = GenerationParameters(**data["params"])
        data["image_size"] = tuple(data["image_size"]) if data.get("image_size") else None
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class InvalidLine:
    line: int
    error: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.error}"


class _Bad(ValueError):
    pass


def _integer(job: dict, key: str, low: int, high: int | None = None) -> int | None:
    value = job.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad(f"{key!r} must be an integer, got {value!r} ({type(value).__name__})")
    if value < low or (high is not None and value > high):
        raise _Bad(f"{key!r} must be in [{low}, {high if high is not None else 'inf'}], got {value}")
    return value


def _number(job: dict, key: str, low: float, high: float) -> float | None:
    value = job.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Bad(f"{key!r} must be a number, got {value!r}")
    if not low <= value <= high:
        raise _Bad(f"{key!r} must be in [{low}, {high}], got {value}")
    return float(value)


def _text(job: dict, key: str) -> str | None:
    value = job.get(key)
    if value is not None and not isinstance(value, str):
        raise _Bad(f"{key!r} must be a string, got {value!r} ({type(value).__name__})")
    return value


def _size(job: dict, key: str) -> int | None:
    value = _integer(job, key, 8, 8192)
    if value is not None and value % 8:
        raise _Bad(f"{key!r} must be a multiple of 8, got {value}")
    return value


def _input_image(job: dict, key: str, folder: Path) -> tuple[str | None, tuple[int, int] | None]:
    name = _text(job, key)
    if not name:
        return None, None
    path = (folder / name).resolve()
    if not path.is_file():
        raise _Bad(f"{key!r} file {str(path)!r} does not exist (relative paths start at the jobs file's folder)")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:  # reads the header only
            return str(path), image.size
    except (UnidentifiedImageError, OSError) as error:
        raise _Bad(f"{key!r} file {str(path)!r} is not an image PIL can read: {error}") from None


def derived_seed(job_id: str) -> int:
    """The seed of a job that names none: fixed by its id, so re-runs and other machines draw the same noise."""
    return int.from_bytes(hashlib.sha256(job_id.encode("utf-8")).digest()[:4], "big")


def _job(raw: Any, line: int, folder: Path, defaults: JobDefaults) -> Job:
    from ..generation import random_seed, step_savings
    from ..schedulers.names import resolve_sampler

    if not isinstance(raw, dict):
        raise _Bad(f"a job must be a JSON object, got {type(raw).__name__}")
    unknown = [key for key in raw if key not in JOB_KEYS]
    if unknown:
        hint = difflib.get_close_matches(unknown[0], JOB_KEYS, n=1)
        raise _Bad(f"unknown key {unknown[0]!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                   + f"; a job has the keys {', '.join(JOB_KEYS)}")
    job_id = raw.get("id", f"line-{line:06d}")
    if isinstance(job_id, int) and not isinstance(job_id, bool):
        job_id = str(job_id)
    if not isinstance(job_id, str) or not ID_PATTERN.match(job_id):
        raise _Bad(f"'id' must be a string of letters, digits, '_', '-' or '.' (not first), at most 128 characters "
                   f"(it names the output file), got {job_id!r}")
    prompt = _text(raw, "prompt")
    negative = _text(raw, "negative_prompt")
    seed = _integer(raw, "seed", -1, SEED_LIMIT - 1)
    if seed is None:
        seed = defaults.seed if defaults.seed is not None else derived_seed(job_id)
    if seed == -1:
        seed = random_seed()  # recorded in the manifest and the PNG
    steps = _integer(raw, "steps", 1, 1000)
    guidance = _number(raw, "guidance_scale", 0.0, 100.0)
    width, height = _size(raw, "width"), _size(raw, "height")
    sampler = _text(raw, "sampler") or defaults.sampler
    if sampler:
        try:
            resolve_sampler(sampler)
        except ValueError as error:
            raise _Bad(f"'sampler': {error}") from None
    image, image_size = _input_image(raw, "image", folder)
    mask, mask_size = _input_image(raw, "mask", folder)
    if mask and not image:
        raise _Bad("'mask' needs an 'image' to inpaint")
    if mask and mask_size != image_size:
        raise _Bad(f"'mask' is {mask_size[0]}x{mask_size[1]} but 'image' is {image_size[0]}x{image_size[1]}: "
                   "they must have the same size")
    strength = _number(raw, "strength", 0.0, 1.0)
    if strength is not None and not image:
        raise _Bad("'strength' applies to image-to-image and inpainting: give an 'image' too, or drop it")
    if image and strength is None:
        strength = defaults.strength
    try:
        savings = step_savings(raw.get("guidance_interval", defaults.guidance_interval),
                               raw.get("deep_cache", defaults.deep_cache), raw.get("freeu", defaults.freeu))
    except ValueError as error:
        raise _Bad(str(error)) from None
    params = GenerationParameters(
        prompt=prompt or "", negative_prompt=negative if negative is not None else defaults.negative_prompt,
        steps=steps if steps is not None else defaults.steps, sampler=sampler or None,
        cfg_scale=guidance if guidance is not None else defaults.guidance_scale, seed=seed,
        width=width if width is not None else defaults.width,
        height=height if height is not None else defaults.height,
        denoising_strength=strength if image else None, model=defaults.model, **savings)
    return Job(job_id, line, params, image, mask, image_size)


def load_jobs(path: str | os.PathLike, defaults: JobDefaults | None = None) -> tuple[list[Job], list[InvalidLine]]:
    """Read a jobs file: the valid jobs in file order, and every invalid line with its number and problem.

    Blank lines are skipped. A repeated ``id`` is an invalid line (the first one wins): ids name the output files.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"jobs file {str(path)!r} does not exist: pass a JSON-lines file, one job per line")
    defaults = defaults or JobDefaults()
    folder = path.resolve().parent
    jobs: list[Job] = []
    invalid: list[InvalidLine] = []
    seen: dict[str, int] = {}
    with open(path, "rb") as handle:
        for number, raw_line in enumerate(handle, 1):
            try:
                text = raw_line.decode("utf-8").strip()
                if not text:
                    continue
                try:
                    raw = json.loads(text)
                except ValueError as error:
                    raise _Bad(f"not valid JSON ({error})") from None
                job = _job(raw, number, folder, defaults)
                if job.id in seen:
                    raise _Bad(f"id {job.id!r} is already used on line {seen[job.id]}: ids name the output files, "
                               "give each job its own")
            except UnicodeDecodeError as error:
                invalid.append(InvalidLine(number, f"not UTF-8 text ({error})"))
                continue
            except _Bad as error:
                invalid.append(InvalidLine(number, str(error)))
                continue
            seen[job.id] = number
            jobs.append(job)
    return jobs, invalid


def plan_batches(jobs: list[Job], batch_size: int) -> list[list[Job]]:
    """Jobs that can run together, in chunks of ``batch_size``, groups in order of first appearance.

    The result depends only on ``jobs`` and ``batch_size``: the same batches are formed on every run and every
    machine, which is what makes the output independent of the number of workers.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.batch_key(), []).append(job)
    return [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]
