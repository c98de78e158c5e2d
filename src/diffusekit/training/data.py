"""Fashion-MNIST from the idx files of the Debian package ``dataset-fashion-mnist``, plus a synthetic stand-in.

``apt-get install -y dataset-fashion-mnist`` puts ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` in
``/usr/share/datasets/fashion-mnist`` (``bash scripts/setup.sh --train`` does it). Another folder holding the same
files (gzipped or not) can be named with ``$DIFFUSEKIT_FASHION_MNIST`` or ``--data-dir``.

Images come back as uint8 arrays ``(N, 28, 28)`` (white garment on black) and labels as int64 ``(N,)``. The
text-to-image data tints each garment with a named colour and writes a caption from the class name and a template.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_DIRS = ("/usr/share/datasets/fashion-mnist",)
ENV_VAR = "DIFFUSEKIT_FASHION_MNIST"

#: Fashion-MNIST label -> class name, as the dataset's README names them
CLASS_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
#: how captions name each class (several wordings per class; the first is the canonical one)
CLASS_WORDS = (
    ("t-shirt", "tee", "top"),
    ("pair of trousers", "pair of pants", "trousers"),
    ("pullover", "sweater", "jumper"),
    ("dress", "summer dress"),
    ("coat", "jacket"),
    ("sandal", "summer sandal"),
    ("shirt", "button-up shirt"),
    ("sneaker", "running shoe", "trainer"),
    ("bag", "handbag"),
    ("ankle boot", "boot"),
)
#: named tint colours (linear RGB in [0, 1]); chromatic, with well separated hues, so a hue test can tell them apart
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.12, 0.1),
    "orange": (1.0, 0.55, 0.05),
    "yellow": (1.0, 0.92, 0.1),
    "green": (0.15, 0.85, 0.2),
    "cyan": (0.1, 0.85, 0.95),
    "blue": (0.15, 0.3, 1.0),
    "purple": (0.6, 0.2, 0.95),
    "pink": (1.0, 0.4, 0.75),
}
#: caption templates: {a} is the article for the next word, {color} the colour, {item} a class wording
TEMPLATES = (
    "a photo of {a} {color} {item}",
    "{a} {color} {item}",
    "{a} {color} {item}, product shot",
    "a {color} {item} on a black background",
    "product photo of {a} {color} {item}",
    "{color} {item}",
    "a picture of {a} {color} {item}",
    "studio shot of {a} {color} {item}",
)

SPLITS = {"train": "train", "test": "t10k"}


class DatasetNotFound(FileNotFoundError):
    """The Fashion-MNIST idx files are not on this machine."""


def find_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the idx files: ``data_dir``, ``$DIFFUSEKIT_FASHION_MNIST`` or the Debian package's."""
    candidates = [Path(data_dir)] if data_dir else []
    if os.environ.get(ENV_VAR):
        candidates.append(Path(os.environ[ENV_VAR]))
    candidates += [Path(d) for d in DEFAULT_DIRS]
    for folder in candidates:
        if _idx_file(folder, "train-labels-idx1-ubyte") is not None:
            return folder
    raise DatasetNotFound(
        "Fashion-MNIST not found (looked in " + ", ".join(map(str, candidates)) + "). Install it with "
        "`apt-get install -y dataset-fashion-mnist` (or `bash scripts/setup.sh --train`), or point "
        f"${ENV_VAR} / --data-dir at a folder with the four idx files."
    )


def dataset_available(data_dir: str | os.PathLike | None = None) -> bool:
    try:
        find_data_dir(data_dir)
    except DatasetNotFound:
        return False
    return True


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an idx file (gzipped or plain): magic 0x0000 <dtype code> <ndim>, big-endian int32 dims, then data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an idx file (bad magic {data[:4]!r})")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise ValueError(f"{path}: unknown idx element type 0x{data[2]:02x}")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, ">i4", count=ndim, offset=4))
    body = np.frombuffer(data, dtypes[data[2]], offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} ({int(np.prod(shape))} values) but holds {body.size}")
    return body.reshape(shape).astype(body.dtype.newbyteorder("="))


def load_fashion_mnist(split: str = "train", data_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 28, 28), labels int64 (N,))`` of the ``"train"`` (60k) or ``"test"`` (10k) split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    folder = find_data_dir(data_dir)
    prefix = SPLITS[split]
    images = read_idx(_idx_file(folder, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_idx_file(folder, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{folder}: {images.shape[0]} images but {labels.shape[0]} labels in the {split} split")
    return images, labels


def synthetic_fashion(n: int = 512, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A tiny stand-in with the same shapes and label range: a bright blob whose shape depends on the label.

    For tests and smoke runs on machines without the dataset; nothing here resembles clothes.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n).astype(np.int64)
    yy, xx = np.mgrid[0:28, 0:28].astype(np.float32)
    images = np.zeros((n, 28, 28), np.float32)
    for i, label in enumerate(labels):
        cy, cx = 14 + rng.normal(0, 1.5, 2)
        ry, rx = 4 + (label % 5) * 1.6, 4 + (label // 5) * 4
        images[i] = np.exp(-(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) ** 2)
    return (images * 255).round().astype(np.uint8), labels


def load_images(dataset: str, split: str = "train", data_dir=None, limit: int | None = None, seed: int = 0):
    """``dataset`` is ``"fashion-mnist"`` or ``"synthetic"``; ``limit`` keeps the first ``limit`` images."""
    if dataset == "fashion-mnist":
        images, labels = load_fashion_mnist(split, data_dir)
    elif dataset == "synthetic":
        images, labels = synthetic_fashion(limit or 512, seed=seed + (split == "test"))
    else:
        raise ValueError(f"dataset must be 'fashion-mnist' or 'synthetic', got {dataset!r}")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, labels


# ---------------------------------------------------------------------------------------------- colour and captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_caption(label: int, color: str, rng: np.random.Generator) -> str:
    """A caption naming the class (one of its wordings) and the colour, from a random template."""
    item = CLASS_WORDS[label][rng.integers(len(CLASS_WORDS[label]))]
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    article = _article(color)
    return template.format(a=article, color=color, item=item)


def prompt_for(label: int, color: str) -> str:
    """The canonical evaluation prompt for a class and a colour."""
    return f"a photo of {_article(color)} {color} {CLASS_WORDS[label][0]}"


def tint(images: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """Gray uint8 images (N, H, W) times per-image RGB colours (N, 3) -> float32 RGB (N, 3, H, W) in [0, 1]."""
    gray = images.astype(np.float32)[:, None] / 255.0
    return gray * colors.astype(np.float32)[:, :, None, None]


def pad_to(images: np.ndarray, size: int) -> np.ndarray:
    """Pad (N, [C,] H, W) arrays with zeros (black) on all sides to ``size`` x ``size``."""
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    top, left = (size - h) // 2, (size - w) // 2
    pad = [(0, 0)] * (images.ndim - 2) + [(top, size - h - top), (left, size - w - left)]
    return np.pad(images, pad)


@dataclass
class EpochSampler:
    """Deterministic batches: a fresh permutation per epoch from ``(seed, epoch)``; the batch at ``step`` is a pure
    function of ``(seed, step)``, so a resumed run sees exactly the batches an uninterrupted one would."""

    size: int
    batch_size: int
    seed: int

    def __post_init__(self):
        if self.batch_size > self.size:
            raise ValueError(f"batch size {self.batch_size} is larger than the dataset ({self.size} images)")
        self._cache: tuple[int, np.ndarray] | None = None
        self.per_epoch = self.size // self.batch_size  # drop the ragged tail

    def indices(self, step: int) -> np.ndarray:
        epoch, position = divmod(step, self.per_epoch)
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.size))
        return self._cache[1][position * self.batch_size : (position + 1) * self.batch_size]
