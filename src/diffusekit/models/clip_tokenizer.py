"""``CLIPTokenizer``: CLIP's byte-level BPE, reading and writing the ``tokenizer/`` folder of SD checkpoints.

The ids equal those of transformers' ``CLIPTokenizer`` (the ``tokenizers``-backed one, which diffusers pipelines
load). The text pipeline, run by the ``tokenizers`` library:

1. special tokens (bos, eos, unk, pad and any added tokens) are cut out of the text first, each with the matching
   flags its files give (``normalized`` ...). SD 2.x pads with ``"!"``, so there every ``"!"`` in a prompt becomes
   the special token id 0 instead of a BPE piece: that is what the reference does, so we do it too;
2. normalisation: Unicode NFC, every whitespace run -> one space, lowercase (no ftfy, no HTML unescaping: the
   original OpenAI tokenizer did those, transformers' fast tokenizer does not);
3. pre-tokenisation with CLIP's split pattern (contractions, letter runs, single digits, runs of other symbols;
   whitespace dropped), then each piece is mapped to GPT-2's printable byte alphabet;
4. BPE with the end-of-word suffix ``</w>`` on the last symbol of each piece.

Bos/eos, truncation and padding are applied here in Python, per call (nothing is stored on the shared backend).
Files: ``vocab.json`` + ``merges.txt`` (or a ``tokenizer.json``), ``tokenizer_config.json`` and
``special_tokens_map.json`` for the special tokens and ``model_max_length``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .._io import atomic_checkpoint
from ..configuration import read_json
from ..hub import EntryNotFound, resolve_file, split_hub_kwargs

logger = logging.getLogger(__name__)

VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"

#: ``model_max_length`` of a tokenizer whose files name none (transformers' value: "no limit")
NO_MAX_LENGTH = int(1e30)
_LIMIT = int(1e20)  # a model_max_length above this means "no limit" for padding and truncation

# CLIP's pre-tokenisation pattern (the original OpenAI tokenizer's regex, lowercase contractions as it has them)
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_END_OF_WORD = "</w>"
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
_TOKEN_FLAGS = ("lstrip", "rstrip", "single_word", "normalized")


class BatchEncoding(dict):
    """The tokenizer's output: a dict (``enc["input_ids"]``) that also answers ``enc.input_ids``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchEncoding has no field {name!r}; it holds {sorted(self)}") from None

    def to(self, device) -> "BatchEncoding":
        """Move torch tensors to ``device`` (other values are kept as they are)."""
        return BatchEncoding({k: v.to(device) if hasattr(v, "to") else v for k, v in self.items()})


def _token_spec(value: Any) -> tuple[str, dict[str, bool]] | None:
    """A special token as the files write it (a string or an AddedToken dict) -> (content, flags)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value, {}
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"], {k: bool(value[k]) for k in _TOKEN_FLAGS if k in value}
    raise ValueError(f"cannot read special token {value!r}: expected a string or an object with 'content'")


class CLIPTokenizer:
    """CLIP's BPE tokenizer with transformers' ``CLIPTokenizer`` interface and ids.

    ``CLIPTokenizer.from_pretrained(path_or_repo, subfolder="tokenizer")``; ``tok(prompts, padding="max_length",
    max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids``.
    """

    _pipeline_component = True  # model_index.json may name it (pipelines/base.py: _resolve_class)

    _library_name = "transformers"  # model_index.json entry: ["transformers", "CLIPTokenizer"]

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Sequence[str] | Sequence[tuple[str, str]],
        *,
        bos_token: str = "<|startoftext|>",
        eos_token: str = "<|endoftext|>",
        unk_token: str = "<|endoftext|>",
        pad_token: str | None = "<|endoftext|>",
        model_max_length: int = NO_MAX_LENGTH,
        added_tokens: Iterable[tuple[int, str, dict[str, bool]]] = (),
        special_token_flags: Mapping[str, Mapping[str, bool]] | None = None,
    ):
        """``vocab``: token -> id; ``merges``: ``"a b"`` strings or pairs, highest priority first.

        ``added_tokens``: ``(id, content, flags)`` of tokens outside the BPE (``flags`` holds ``special`` and the
        matching flags); ``special_token_flags``: content -> flags for the special tokens (default: matched exactly,
        before normalisation).
        """
        from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
        from tokenizers.models import BPE

        self._vocab = {str(k): int(v) for k, v in vocab.items()}
        self._merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
        bad = [m for m in self._merges if len(m) != 2]
        if bad:
            raise ValueError(f"merges must be pairs of symbols; bad entries such as {bad[0]!r}")
        for name, token in (("bos_token", bos_token), ("eos_token", eos_token), ("unk_token", unk_token)):
            if token not in self._vocab:
                raise ValueError(f"{name} {token!r} is not in the vocabulary")
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
        self.model_max_length = int(model_max_length)
        self._warned_long = False

        backend = Tokenizer(
            BPE(vocab=self._vocab, merges=self._merges, end_of_word_suffix=_END_OF_WORD, unk_token=unk_token,
                continuing_subword_prefix="", fuse_unk=False)
        )
        backend.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                # keep the pattern's matches, drop what lies between them (whitespace)
                pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
                # bytes -> printable alphabet; its own GPT-2 split cannot cut the whitespace-free pieces further
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        backend.decoder = decoders.ByteLevel()
        self._backend = backend

        # tokens cut out of the text before the BPE: the files' added tokens, then the named special tokens
        self._added: dict[str, dict[str, Any]] = {}  # content -> {"id": ..., flags...}
        entries = {content: (token_id, dict(flags)) for token_id, content, flags in added_tokens}
        for content in (bos_token, eos_token, unk_token, pad_token):
            if content is not None:
                default = (self._vocab.get(content, -1), dict((special_token_flags or {}).get(content, {})))
                token_id, flags = entries.get(content, default)
                entries[content] = (token_id, {**flags, "special": True})
        # known ids first, in id order (new tokens get the next free ids, so files' ids must come out again)
        for content, (token_id, flags) in sorted(entries.items(), key=lambda kv: (kv[1][0] < 0, kv[1][0])):
            self._register(content, flags, expected_id=token_id)

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None,
                        **kwargs) -> "CLIPTokenizer":
        """Load from a folder or hub repo holding ``vocab.json`` + ``merges.txt`` (or ``tokenizer.json``).

        Hub options: ``revision``, ``cache_dir``, ``local_files_only``, ``token``, ``force_download``. Keyword
        arguments ``model_max_length``, ``bos_token``, ``eos_token``, ``unk_token``, ``pad_token`` override the files.
        """
        hub = split_hub_kwargs(kwargs)
        for legacy in ("use_fast", "trust_remote_code", "torch_dtype", "low_cpu_mem_usage"):
            kwargs.pop(legacy, None)
        allowed = set(_SPECIAL_NAMES) | {"model_max_length"}
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise TypeError(f"CLIPTokenizer.from_pretrained got unexpected keyword argument(s) {unknown}")
        source = pretrained_model_name_or_path

        def optional(name: str) -> Path | None:
            try:
                return resolve_file(source, name, subfolder, **hub)
            except EntryNotFound:
                return None

        config_path = optional(CONFIG_FILE)
        config = read_json(config_path, what="tokenizer config") if config_path else {}
        vocab, merges, added = cls._read_model_files(source, subfolder, hub)

        # special tokens: tokenizer_config.json, then special_tokens_map.json over it (older files keep the
        # SD 2.x pad token "!" only there), then the caller's arguments
        tokens: dict[str, tuple[str, dict[str, bool]]] = {}
        for name in _SPECIAL_NAMES:
            spec = _token_spec(config.get(name))
            if spec:
                tokens[name] = spec
        if not config.get("added_tokens_decoder"):
            map_path = optional(SPECIAL_TOKENS_FILE)
            if map_path:
                special_map = read_json(map_path, what="special tokens map")
                for name in _SPECIAL_NAMES:
                    spec = _token_spec(special_map.get(name))
                    if spec:
                        tokens[name] = spec
        for name in _SPECIAL_NAMES:
            if name in kwargs:
                tokens[name] = (kwargs[name], {}) if kwargs[name] is not None else None

        # matching flags of special tokens: added_tokens_decoder > the object form above > exact match
        flags: dict[str, dict[str, bool]] = {}
        for spec in tokens.values():
            if spec:
                flags.setdefault(spec[0], {}).update(spec[1])
        for token_id, data in (config.get("added_tokens_decoder") or {}).items():
            content, token_flags = _token_spec(data)
            token_flags["special"] = bool(data.get("special", False)) if isinstance(data, Mapping) else False
            added.append((int(token_id), content, token_flags))

        defaults = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                    "pad_token": "<|endoftext|>"}
        chosen = {name: tokens[name][0] if tokens.get(name) else None for name in _SPECIAL_NAMES}
        for name in _SPECIAL_NAMES:
            if name not in tokens:
                chosen[name] = defaults[name]
        max_length = kwargs.get("model_max_length", config.get("model_max_length"))
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, (int, float))
                                       or max_length != max_length or max_length < 1
                                       or (isinstance(max_length, float) and not max_length.is_integer())):
            where = "model_max_length=" if "model_max_length" in kwargs else f"{config_path}: key 'model_max_length'"
            raise ValueError(f"{where} must be a positive whole number of tokens (77 for CLIP), got "
                             f"{str(max_length)[:80]!r}")
        return cls(
            vocab,
            merges,
            bos_token=chosen["bos_token"],
            eos_token=chosen["eos_token"],
            unk_token=chosen["unk_token"],
            pad_token=chosen["pad_token"],
            model_max_length=NO_MAX_LENGTH if max_length is None else int(max_length),
            added_tokens=added,
            special_token_flags=flags,
        )

    @staticmethod
    def _read_model_files(source, subfolder, hub) -> tuple[dict[str, int], list, list]:
        """vocab, merges and added tokens from vocab.json + merges.txt, or else from tokenizer.json."""
        missing = []
        paths = {}
        for name in (VOCAB_FILE, MERGES_FILE):
            try:
                paths[name] = resolve_file(source, name, subfolder, **hub)
            except EntryNotFound as err:
                missing.append((name, err))
        if not missing:
            vocab = read_json(paths[VOCAB_FILE], what="vocabulary")
            try:
                lines = paths[MERGES_FILE].read_text(encoding="utf-8").split("\n")
            except (OSError, UnicodeDecodeError) as err:
                raise OSError(f"cannot read merges file {paths[MERGES_FILE]}: {err}") from None
            merges = [line for line in lines if line and not line.startswith("#version")]
            return vocab, merges, []
        try:
            path = resolve_file(source, TOKENIZER_FILE, subfolder, **hub)
        except EntryNotFound:
            names = " and ".join(name for name, _ in missing)
            raise EntryNotFound(
                f"cannot load a CLIP tokenizer: {missing[0][1]}. It needs {VOCAB_FILE} and {MERGES_FILE} "
                f"(missing: {names}) or a {TOKENIZER_FILE}"
            ) from None
        data = read_json(path, what="tokenizer")
        model = data.get("model") or {}
        if model.get("type", "BPE") != "BPE" or not isinstance(model.get("vocab"), dict):
            raise ValueError(f"{path} does not hold a BPE tokenizer with a vocabulary; CLIP's tokenizer is BPE")
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
        added = []
        for item in data.get("added_tokens") or []:
            content, token_flags = _token_spec(item)
            token_flags["special"] = bool(item.get("special", False))
            added.append((int(item["id"]), content, token_flags))
        return model["vocab"], merges, added

    def save_pretrained(self, save_directory: str | os.PathLike) -> tuple[str, ...]:
        """Write vocab.json, merges.txt, special_tokens_map.json and tokenizer_config.json (atomically, together).

        The layout of SD checkpoints' ``tokenizer/`` folders, which transformers 4.x and 5.x both load.
        """
        folder = Path(save_directory)
        if folder.is_file():
            raise NotADirectoryError(f"cannot save into {folder}: it is a file")
        folder.mkdir(parents=True, exist_ok=True)

        def dump(data) -> str:
            return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"

        def token_object(content: str) -> dict[str, Any]:
            return {"content": content, **{k: self._added[content][k] for k in _TOKEN_FLAGS}}

        added_decoder = {
            str(f["id"]): {**token_object(c), "special": f["special"]}
            for c, f in sorted(self._added.items(), key=lambda kv: kv[1]["id"])
        }
        config = {
            "add_prefix_space": False,
            "added_tokens_decoder": added_decoder,
            "bos_token": self.bos_token,
            "clean_up_tokenization_spaces": True,
            "do_lower_case": True,
            "eos_token": self.eos_token,
            "errors": "replace",
            "model_max_length": self.model_max_length,
            "pad_token": self.pad_token,
            "tokenizer_class": "CLIPTokenizer",
            "unk_token": self.unk_token,
        }
        special_map = {name: token_object(getattr(self, name)) for name in _SPECIAL_NAMES if getattr(self, name)}
        if self.pad_token is not None and self.pad_token == self.eos_token:
            special_map["pad_token"] = self.pad_token  # as transformers writes it
        files = {
            VOCAB_FILE: dump(dict(sorted(self._vocab.items(), key=lambda kv: kv[1]))),
            MERGES_FILE: "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self._merges),
            SPECIAL_TOKENS_FILE: dump(special_map),
            CONFIG_FILE: dump(config),
        }
        # one commit for the four files; a tokenizer.json of an earlier save is superseded (transformers would
        # prefer it over the files written here)
        with atomic_checkpoint(folder) as checkpoint:
            for name, text in files.items():
                (checkpoint.stage / name).write_text(text, encoding="utf-8")
            checkpoint.supersede("", {"tokenizer.json"}.__contains__)
        return tuple(os.fspath(folder / name) for name in files)

    # ------------------------------------------------------------------ vocabulary

    def _register(self, content: str, flags: Mapping[str, bool], expected_id: int = -1) -> int:
        from tokenizers import AddedToken

        special = bool(flags.get("special", False))
        resolved = {
            "lstrip": bool(flags.get("lstrip", False)),
            "rstrip": bool(flags.get("rstrip", False)),
            "single_word": bool(flags.get("single_word", False)),
            "normalized": bool(flags.get("normalized", not special)),  # the tokenizers library's default
        }
        token = AddedToken(content, special=special, **resolved)
        if special:
            self._backend.add_special_tokens([token])
        else:
            self._backend.add_tokens([token])
        token_id = self._backend.token_to_id(content)
        if expected_id >= 0 and token_id != expected_id:
            raise ValueError(
                f"added token {content!r} has id {expected_id} in the files but would get id {token_id}: "
                "the added tokens do not follow the vocabulary contiguously"
            )
        self._added[content] = {"id": token_id, **resolved, "special": special}
        return token_id

    def add_tokens(self, tokens: str | Sequence[str], special_tokens: bool = False) -> int:
        """Add tokens matched whole before the BPE (e.g. textual-inversion placeholders); returns how many ids are
        new. As in transformers, a token already in the vocabulary keeps its id but is then also cut out whole."""
        tokens = [tokens] if isinstance(tokens, str) else list(tokens)
        before = len(self)
        for content in tokens:
            if content not in self._added:
                self._register(content, {"special": special_tokens})
        return len(self) - before

    @property
    def added_tokens_encoder(self) -> dict[str, int]:
        """Tokens matched whole before the BPE (special ones and those from ``add_tokens``) -> id, as transformers."""
        return {content: entry["id"] for content, entry in sorted(self._added.items(), key=lambda kv: kv[1]["id"])}

    def _remove_added_tokens(self, tokens: Iterable[str]) -> None:
        """Drop non-special added tokens (``unload_textual_inversion``); later added tokens move down so the ids
        stay contiguous. The backend cannot forget a token, so it is rebuilt from the vocabulary."""
        drop = set(tokens)
        special = [c for c, e in self._added.items() if e["special"] or c in self._vocab]
        kept = [(e["id"] if (e["special"] or c in self._vocab) else -1, c, {k: v for k, v in e.items() if k != "id"})
                for c, e in sorted(self._added.items(), key=lambda kv: kv[1]["id"])
                if c not in drop or c in special]
        flags = {c: {k: v for k, v in self._added[c].items() if k != "id"} for c in special}
        fresh = type(self)(self._vocab, self._merges, bos_token=self.bos_token, eos_token=self.eos_token,
                           unk_token=self.unk_token, pad_token=self.pad_token, model_max_length=self.model_max_length,
                           added_tokens=kept, special_token_flags=flags)
        self._backend, self._added = fresh._backend, fresh._added

    def get_vocab(self) -> dict[str, int]:
        return self._backend.get_vocab(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary (without tokens added later), as transformers reports it."""
        return self._backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]):
        def one(token: str) -> int:
            token_id = self._backend.token_to_id(token)
            return self.unk_token_id if token_id is None else token_id

        return one(tokens) if isinstance(tokens, str) else [one(t) for t in tokens]

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        if _is_int(ids):
            return self._backend.id_to_token(int(ids))
        specials = self.all_special_ids if skip_special_tokens else ()
        return [self._backend.id_to_token(int(i)) for i in _as_list(ids) if int(i) not in specials]

    @property
    def bos_token_id(self) -> int:
        return self._backend.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int:
        return self._backend.token_to_id(self.eos_token)

    @property
    def unk_token_id(self) -> int:
        return self._backend.token_to_id(self.unk_token)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self._backend.token_to_id(self.pad_token)

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys(t for t in (self.bos_token, self.eos_token, self.unk_token, self.pad_token) if t))

    @property
    def all_special_ids(self) -> list[int]:
        return [self._backend.token_to_id(t) for t in self.all_special_tokens]

    # ------------------------------------------------------------------ encoding

    def tokenize(self, text: str) -> list[str]:
        """The BPE tokens of ``text``, without bos/eos: ``"a photo"`` -> ``["a</w>", "photo</w>"]``."""
        return self._backend.encode(text, add_special_tokens=False).tokens

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs) -> list[int]:
        """The ids of one text (a plain list); keyword arguments as for calling the tokenizer."""
        return self(text, add_special_tokens=add_special_tokens, return_attention_mask=False, **kwargs)["input_ids"]

    def __call__(
        self,
        text: str | Sequence[str],
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        return_tensors: str | None = None,
        return_attention_mask: bool | None = True,
        return_length: bool = False,
        verbose: bool = True,
    ) -> BatchEncoding:
        """Tokenize one text or a batch, as transformers' tokenizers do.

        ``padding``: False/"do_not_pad", True/"longest" (to the longest in the batch) or "max_length".
        ``truncation``: None/False, or True/"longest_first"/"only_first" (keep bos/eos, cut the text). A
        ``max_length`` (default ``model_max_length`` where padding or truncation needs one) given without padding
        or truncation turns truncation on. ``return_tensors``: None (lists), "pt" or "np".
        """
        single = isinstance(text, str)
        batch = [text] if single else list(text) if isinstance(text, (list, tuple)) else None
        if batch is None or not all(isinstance(t, str) for t in batch):
            raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}")
        if not batch:
            raise ValueError("text is an empty list: nothing to tokenize")
        pad_to, limit = self._lengths(padding, truncation, max_length, verbose)

        bos = [self.bos_token_id] if add_special_tokens else []
        eos = [self.eos_token_id] if add_special_tokens else []
        rows = []
        for encoding in self._backend.encode_batch(batch, add_special_tokens=False):
            ids = encoding.ids
            if limit is not None:
                room = limit - len(bos) - len(eos)
                if room >= 0:
                    ids = ids[:room]
                elif verbose:  # transformers leaves such a sequence whole too
                    logger.warning("max_length=%d leaves no room for the text besides bos/eos: not truncating", limit)
            rows.append(bos + ids + eos)
        if limit is None and verbose and not self._warned_long and max(map(len, rows)) > self.model_max_length:
            self._warned_long = True  # once per tokenizer, as transformers does
            logger.warning(
                "a sequence of %d tokens is longer than model_max_length=%d; the text encoder cannot take it "
                "(pass truncation=True)", max(map(len, rows)), self.model_max_length,
            )

        target = max(map(len, rows)) if pad_to == "longest" else pad_to
        masks = [[1] * len(r) for r in rows]
        if target is not None:
            pad_id = self.pad_token_id
            for row, mask in zip(rows, masks):
                missing = target - len(row)
                row += [pad_id] * max(missing, 0)
                mask += [0] * max(missing, 0)

        out: dict[str, Any] = {"input_ids": rows}
        if return_attention_mask or return_attention_mask is None:
            out["attention_mask"] = masks
        if return_tensors is None:
            if single:
                out = {k: v[0] for k, v in out.items()}
        else:
            out = {k: _to_tensor(v, return_tensors, k) for k, v in out.items()}
        if return_length:  # a list even for one text, as transformers gives it
            lengths = [len(r) for r in rows]
            out["length"] = lengths if return_tensors is None else _to_tensor([lengths], return_tensors, "length")[0]
        return BatchEncoding(out)

    def _lengths(self, padding, truncation, max_length, verbose) -> tuple[int | str | None, int | None]:
        """Resolve padding/truncation arguments (transformers' rules) to (pad target or "longest", cut length)."""
        if max_length is not None and padding is False and truncation is None:
            truncation = True  # transformers: a bare max_length means truncation
        if padding is True or padding == "longest":
            pad: int | str | None = "longest"
            if verbose and max_length is not None and truncation in (None, False, "do_not_truncate"):
                logger.warning("max_length is ignored with padding=True and no truncation; use padding='max_length'")
        elif padding is False or padding is None or padding == "do_not_pad":
            pad = None
        elif padding == "max_length":
            pad = "max_length"
        else:
            raise ValueError(f"padding={padding!r}: use False, True, 'longest', 'max_length' or 'do_not_pad'")
        if truncation is None or truncation is False or truncation == "do_not_truncate":
            cut = False
        elif truncation is True or truncation in ("longest_first", "only_first"):
            cut = True
        else:
            raise ValueError(
                f"truncation={truncation!r}: use None, False, True, 'longest_first', 'only_first' or 'do_not_truncate'"
            )
        if max_length is None and (pad == "max_length" or cut):
            if self.model_max_length > _LIMIT:  # no model limit: nothing to pad or cut to
                pad = None if pad == "max_length" else pad
                cut = False
            else:
                max_length = self.model_max_length
        if pad == "max_length":
            pad = max_length
        if pad is not None and self.pad_token_id is None:
            raise ValueError("asked to pad, but this tokenizer has no pad token")
        return pad, (max_length if cut else None)

    # ------------------------------------------------------------------ decoding

    def decode(self, token_ids, skip_special_tokens: bool = False, **_ignored) -> str:
        """Ids -> text: bytes restored, ``</w>`` word ends turned into spaces."""
        ids = [int(token_ids)] if _is_int(token_ids) else [int(i) for i in _as_list(token_ids)]
        text = self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return text.replace(_END_OF_WORD, " ").strip()

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **kwargs) -> list[str]:
        return [self.decode(seq, skip_special_tokens=skip_special_tokens, **kwargs) for seq in _as_list(sequences)]

    def __repr__(self) -> str:
        return (
            f"CLIPTokenizer(vocab_size={self.vocab_size}, model_max_length={self.model_max_length}, "
            f"bos={self.bos_token!r}, eos={self.eos_token!r}, pad={self.pad_token!r})"
        )


# ---------------------------------------------------------------------------------------------------- helpers


def _is_int(value) -> bool:
    if isinstance(value, int):
        return True
    return getattr(value, "ndim", None) == 0  # a 0-d tensor or numpy scalar


def _as_list(values) -> list:
    return values.tolist() if hasattr(values, "tolist") else list(values)


def _to_tensor(rows: list, kind: str, name: str):
    if len({len(r) for r in rows}) > 1:
        raise ValueError(
            f"cannot make one tensor of {name}: the sequences have different lengths; pass padding=True "
            "(or padding='max_length') and truncation=True"
        )
    if kind == "pt":
        import torch

        return torch.tensor(rows, dtype=torch.long)
    if kind == "np":
        import numpy as np

        return np.asarray(rows, dtype=np.int64)
    raise ValueError(f"return_tensors={kind!r}: use None, 'pt' or 'np'")
