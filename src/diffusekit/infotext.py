"""Generation parameters as AUTOMATIC1111 writes them: the "parameters" text chunk of a PNG ("infotext").

The text is what A1111 shows under an image and what its "PNG Info" tab, Civitai and most tools read back::

    a photo of a cat, (fluffy:1.2)
    Negative prompt: blurry
    Steps: 25, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: 6ce0161689, Model: v1-5

The prompt may span lines; the negative prompt starts at a line beginning with ``Negative prompt:``; the last line
holds ``Key: value`` pairs separated by commas (a value containing ``,``, ``:`` or a newline is written as a JSON
string). :class:`GenerationParameters` is the typed form, with the fields every tool uses and the rest kept, in
order, in ``extra``.

``save_png(image, path, params)`` writes a PNG carrying the chunk (atomically), ``read_parameters(png)`` returns the
text back, and ``model_hash(path)`` is A1111's short model hash (first 10 hex digits of the file's SHA-256);
``lora_hash`` / ``embedding_hash`` the 12-digit ones A1111 writes in "Lora hashes" / "TI hashes".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

__all__ = ["GenerationParameters", "format_value", "model_hash", "parse_infotext", "png_bytes", "read_parameters",
           "save_png"]

PNG_KEY = "parameters"  # the tEXt/iTXt keyword A1111 writes and reads

# one ``Key: value`` pair of the last line: a JSON-quoted value or anything up to the next comma
_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_NEGATIVE = "Negative prompt:"

def _interval(text: str) -> tuple[float, float]:
    """``"0.2-0.8"`` -> ``(0.2, 0.8)`` (diffusekit's "Guidance interval" value)."""
    lo, sep, hi = text.partition("-")
    if not sep:
        raise ValueError(text)
    return float(lo), float(hi)


def _format_interval(value: tuple[float, float]) -> str:
    return "-".join(format_value(float(v)) for v in value)


FREEU_KEY = "FreeU"  # the key of GenerationParameters.freeu; other tools write other shapes under it
_FREEU_NAMES = ("s1", "s2", "b1", "b2")  # diffusers' enable_freeu order: the tuple's
_FREEU_WRITTEN = ("b1", "b2", "s1", "s2")  # the order SD.Next writes its "FreeU" value in (diffusers' FreeU too)


def _freeu(text: str) -> tuple[float, float, float, float]:
    """``"b1=1.5 b2=1.6 s1=0.9 s2=0.2"`` (any order) -> ``(s1, s2, b1, b2)`` = ``(0.9, 0.2, 1.5, 1.6)``."""
    pairs = dict(part.partition("=")[::2] for part in text.split())
    if sorted(pairs) != sorted(_FREEU_NAMES) or len(text.split()) != len(_FREEU_NAMES):
        raise ValueError(text)
    factors = tuple(float(pairs[name]) for name in _FREEU_NAMES)
    if not all(math.isfinite(f) for f in factors):
        raise ValueError(text)
    return factors  # type: ignore[return-value]


def _format_freeu(value: tuple[float, float, float, float]) -> str:
    named = dict(zip(_FREEU_NAMES, value))
    return " ".join(f"{name}={format_value(float(named[name]))}" for name in _FREEU_WRITTEN)


# typed fields: dataclass field -> (A1111 key, type or parser). The order is A1111's order on the parameter line;
# the last four are diffusekit's own, written only when used: the step savings (docs/STEP_SAVINGS.md) and FreeU.
_FIELDS: dict[str, tuple[str, Any]] = {
    "steps": ("Steps", int),
    "sampler": ("Sampler", str),
    "schedule_type": ("Schedule type", str),
    "cfg_scale": ("CFG scale", float),
    "seed": ("Seed", int),
    "size": ("Size", str),  # written from width/height, never stored under this name
    "model_hash": ("Model hash", str),
    "model": ("Model", str),
    "denoising_strength": ("Denoising strength", float),
    "clip_skip": ("Clip skip", int),
    "guidance_interval": ("Guidance interval", _interval),
    "deep_cache_interval": ("Deep cache interval", int),
    "deep_cache_branch": ("Deep cache branch", int),
    "freeu": (FREEU_KEY, _freeu),
}
_FORMATTERS = {"guidance_interval": _format_interval, "freeu": _format_freeu}
# keys other tools write in other shapes: a value of another shape is kept as text in ``extra`` (the sd-webui-freeu
# extension writes "FreeU" as JSON of its own settings), not refused
_SHARED_KEYS = {"freeu"}
_BY_KEY = {key: (name, kind) for name, (key, kind) in _FIELDS.items()}


def format_value(value: Any) -> str:
    """A value as A1111 writes it on the parameter line (quoted as JSON when it holds ``,``, ``:`` or a newline)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        text = str(int(value))  # A1111 writes "CFG scale: 7", not "7.0"
    else:
        text = str(value)
    if any(ch in text for ch in ",:\n"):
        return json.dumps(text, ensure_ascii=False)
    return text


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            return json.loads(value)
        except ValueError:
            return value[1:-1]
    return value


def parse_infotext(text: str) -> dict[str, str]:
    """Parse infotext into ``{"Prompt": ..., "Negative prompt": ..., "Steps": "25", "Size-1": "512", ...}``.

    Keys and string values as A1111's own parser gives them (``Size`` split into ``Size-1`` (width) and ``Size-2``
    (height)). A last line with fewer than three ``Key: value`` pairs is part of the prompt, as in A1111.
    """
    if not isinstance(text, str):
        raise TypeError(f"infotext must be a str, got {type(text).__name__}")
    *lines, last = text.strip().split("\n")
    if len(_PAIR.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    target = prompt
    for line in lines:
        line = line.strip()
        if line.startswith(_NEGATIVE):
            target = negative
            line = line[len(_NEGATIVE):].strip()
        target.append(line)
    result = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PAIR.findall(last):
        value = _unquote(value)
        size = _SIZE.match(value)
        if size:
            result[f"{key}-1"], result[f"{key}-2"] = size.group(1), size.group(2)
        else:
            result[key] = value
    return result


@dataclasses.dataclass
class GenerationParameters:
    """How an image was made, in A1111's vocabulary. ``str(params)`` / ``to_infotext()`` gives the PNG text."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int | None = None
    sampler: str | None = None
    schedule_type: str | None = None
    cfg_scale: float | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    model_hash: str | None = None
    model: str | None = None
    denoising_strength: float | None = None
    clip_skip: int | None = None
    guidance_interval: tuple[float, float] | None = None  # guidance only on the steps lo <= i / n < hi
    deep_cache_interval: int | None = None  # DeepCache: a full UNet step every N steps
    deep_cache_branch: int | None = None  # DeepCache: the skip branch of the cached steps
    freeu: tuple[float, float, float, float] | None = None  # FreeU's (s1, s2, b1, b2), diffusers' enable_freeu
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # other "Key: value" pairs, in order

    def __post_init__(self):
        if isinstance(self.guidance_interval, list):  # from JSON
            self.guidance_interval = tuple(self.guidance_interval)
        if isinstance(self.freeu, list):
            self.freeu = tuple(self.freeu)

    def to_infotext(self) -> str:
        pairs: list[tuple[str, Any]] = []
        for name, (key, _) in _FIELDS.items():
            value = (f"{self.width}x{self.height}" if self.width is not None and self.height is not None else None) \
                if name == "size" else getattr(self, name)
            if value is not None:
                pairs.append((key, _FORMATTERS[name](value) if name in _FORMATTERS else value))
        written = {key for key, _ in pairs}  # a typed value wins over text kept under its key (--from-png + a flag)
        pairs.extend((key, value) for key, value in self.extra.items() if key not in written)
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"{_NEGATIVE} {self.negative_prompt}")
        if pairs:
            lines.append(", ".join(f"{key}: {format_value(value)}" for key, value in pairs))
        return "\n".join(lines)

    __str__ = to_infotext

    @classmethod
    def from_infotext(cls, text: str) -> "GenerationParameters":
        """The inverse of :meth:`to_infotext`; unknown keys go to ``extra`` (as strings), typed keys are converted."""
        fields = parse_infotext(text)
        params = cls(prompt=fields.pop("Prompt"), negative_prompt=fields.pop("Negative prompt"))
        if "Size-1" in fields and "Size-2" in fields:
            params.width, params.height = int(fields.pop("Size-1")), int(fields.pop("Size-2"))
        for key, value in fields.items():
            name, kind = _BY_KEY.get(key, (None, None))
            if name is None or name == "size":
                params.extra[key] = value
                continue
            try:
                setattr(params, name, kind(value))
            except ValueError:
                if name in _SHARED_KEYS:
                    params.extra[key] = value
                    continue
                what = "lo-hi" if kind is _interval else kind.__name__
                raise ValueError(f"infotext: {key!r} should be {what}, got {value!r}") from None
        return params

    def replace(self, **changes) -> "GenerationParameters":
        return dataclasses.replace(self, **changes)


def _png_info(parameters: GenerationParameters | str | None):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if parameters is not None:
        info.add_text(PNG_KEY, str(parameters))  # tEXt when Latin-1, else iTXt (UTF-8), as A1111
    return info


def save_png(image, path: str | os.PathLike, parameters: GenerationParameters | str | None = None) -> Path:
    """Write ``image`` (a PIL image) as a PNG carrying the A1111 "parameters" chunk, atomically."""
    from ._io import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=_png_info(parameters))
    return path


def png_bytes(image, parameters: GenerationParameters | str | None = None) -> bytes:
    """The bytes :func:`save_png` would write: encode where the image is made, write them where the files live."""
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=_png_info(parameters))
    return buffer.getvalue()


def read_parameters(image_or_path) -> str | None:
    """The "parameters" text of a PNG (a path or an open PIL image), or ``None`` when it has none."""
    from PIL import Image

    if isinstance(image_or_path, (str, os.PathLike)):
        with Image.open(image_or_path) as image:
            image.load()
            return image.info.get(PNG_KEY)
    return getattr(image_or_path, "info", {}).get(PNG_KEY)


def model_hash(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """A1111's model hash of a checkpoint file: the first 10 hex digits of its SHA-256."""
    return _sha256(path, 0, chunk_size)[:10]


def lora_hash(path: str | os.PathLike) -> str:
    """A1111's short hash of a LoRA file in "Lora hashes": the first 12 hex digits of the SHA-256 of a
    ``.safetensors`` file's tensor data, after its JSON header (kohya's "addnet" hash, which A1111 computes for
    safetensors LoRAs), or of the whole file for other formats."""
    path = Path(path)
    offset = 0
    if path.suffix == ".safetensors":
        with open(path, "rb") as handle:
            offset = 8 + int.from_bytes(handle.read(8), "little")  # u64 header length, then the header
    return _sha256(path, offset)[:12]


def embedding_hash(path: str | os.PathLike | bytes) -> str:
    """A1111's short hash of a textual-inversion file in "TI hashes": the first 12 hex digits of its SHA-256 (of
    the file at ``path``, or of its bytes already read)."""
    if isinstance(path, (bytes, bytearray, memoryview)):
        return hashlib.sha256(path).hexdigest()[:12]
    return _sha256(path, 0)[:12]


def _sha256(path: str | os.PathLike, offset: int, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        handle.seek(offset)
        for block in iter(lambda: handle.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()
