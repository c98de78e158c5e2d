"""A ``CLIPTokenizer`` with the real CLIP vocabulary, built offline from the BPE table in ``open-clip-torch``.

The table ``open_clip/bpe_simple_vocab_16e6.txt.gz`` (MIT licence) is *located*, never imported (``pip install
--no-deps open-clip-torch``; ``bash scripts/setup.sh --train`` does it). The vocabulary is built the way CLIP's
original ``SimpleTokenizer`` builds it: the 256 byte symbols, the same with the end-of-word marker ``</w>``, one
token per merge (the first 48,894), then ``<|startoftext|>`` and ``<|endoftext|>``: 49,408 tokens with the ids of
``openai/clip-vit-large-patch14``.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
NUM_MERGES = 49152 - 256 - 2  # CLIP keeps this many merges of the table (the file holds more)


def clip_bpe_path(path: str | Path | None = None) -> Path:
    """``path`` if given, else the table inside the installed ``open_clip`` package (found without importing it)."""
    if path is not None:
        return Path(path)
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the CLIP vocabulary comes from the open-clip-torch package: `pip install --no-deps open-clip-torch` "
            "(or `bash scripts/setup.sh --train`), or pass --vocab PATH/bpe_simple_vocab_16e6.txt.gz"
        )
    found = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not found.is_file():
        raise RuntimeError(f"{found} is missing: reinstall open-clip-torch (`pip install --no-deps open-clip-torch`)")
    return found


def _byte_symbols() -> list[str]:
    """The reversible byte -> printable character table (GPT-2's), in CLIP's order: printable bytes first."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def clip_vocab_and_merges(
    path: str | Path | None = None, num_merges: int | None = None
) -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary (token -> id) and merges ("a b" lines); ``num_merges`` keeps only the first merges (a
    smaller vocabulary with the same ids for what it keeps, for tiny text encoders)."""
    count = NUM_MERGES if num_merges is None else num_merges
    if not 0 <= count <= NUM_MERGES:
        raise ValueError(f"num_merges must be in [0, {NUM_MERGES}], got {num_merges}")
    lines = gzip.open(clip_bpe_path(path)).read().decode("utf-8").split("\n")
    merges = lines[1 : 1 + count]  # line 0 is a "#version" header
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}, merges


def build_clip_tokenizer(model_max_length: int = 77, path: str | Path | None = None):
    """diffusekit's ``CLIPTokenizer`` over the full CLIP vocabulary (padding with ``<|endoftext|>``, as SD 1.x)."""
    from ..models.clip_tokenizer import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges(path)
    return CLIPTokenizer(vocab, merges, model_max_length=model_max_length, pad_token=EOS)
