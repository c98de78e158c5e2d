"""Test assets: CLIP tokenizer folders built from the real CLIP BPE vocabulary, offline.

The vocabulary ships in the ``open-clip-torch`` package (``open_clip/bpe_simple_vocab_16e6.txt.gz``, MIT licence);
install it with ``pip install --no-deps open-clip-torch`` (only the data file is used: the package is never imported,
its torchvision dependency does not load with the CPU torch here).

``write_clip_tokenizer(folder)`` writes the ``tokenizer/`` folder of a Stable Diffusion checkpoint as transformers
4.x's ``CLIPTokenizer.save_pretrained`` writes it: ``vocab.json``, ``merges.txt``, ``special_tokens_map.json`` and
``tokenizer_config.json``. With the full vocabulary the ids are those of ``openai/clip-vit-large-patch14``
(49408 tokens); ``num_merges`` keeps only the first merges, for tiny text encoders (``num_merges=486`` gives a
1000-token vocabulary, bos 998 and eos 999).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from diffusekit.training.tokenizer import BOS, EOS  # noqa: F401  (re-exported for the tests)
from diffusekit.training.tokenizer import clip_vocab_and_merges as _library_vocab_and_merges


@functools.lru_cache(maxsize=4)
def clip_vocab_and_merges(num_merges: int | None = None) -> tuple[dict[str, int], tuple[str, ...]]:
    """CLIP's vocabulary and merges, built by the library's own builder (cached: tests ask for it often)."""
    vocab, merges = _library_vocab_and_merges(num_merges=num_merges)
    return vocab, tuple(merges)


def _token_dict(content: str, normalized: bool) -> dict:
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False}


def write_clip_tokenizer(
    folder: str | Path,
    model_max_length: int = 77,
    pad_token: str = EOS,
    num_merges: int | None = None,
) -> Path:
    """Write a CLIP tokenizer folder (SD 1.x style; ``pad_token="!"`` for SD 2.x / SDXL's second tokenizer)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges(num_merges)
    if pad_token not in vocab:
        raise ValueError(f"pad_token {pad_token!r} is not in the vocabulary")
    (folder / "vocab.json").write_text(
        json.dumps(vocab, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")

    added = {
        str(vocab[BOS]): {**_token_dict(BOS, True), "special": True},
        str(vocab[EOS]): {**_token_dict(EOS, False), "special": True},
    }
    if pad_token not in (BOS, EOS):
        added[str(vocab[pad_token])] = {**_token_dict(pad_token, False), "special": True}
    added = dict(sorted(added.items(), key=lambda kv: int(kv[0])))
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": EOS,
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": EOS,
    }
    special = {
        "bos_token": _token_dict(BOS, True),
        "eos_token": _token_dict(EOS, False),
        "pad_token": pad_token if pad_token == EOS else _token_dict(pad_token, False),
        "unk_token": _token_dict(EOS, False),
    }
    for name, data in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        (folder / name).write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", "utf-8")
    return folder
