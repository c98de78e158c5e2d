"""Textual inversion: ``pipe.load_textual_inversion(path, token=)`` adds learned token embeddings to the tokenizer
and the text encoder, as diffusers' ``TextualInversionLoaderMixin`` does.

Files (all read without running code: safetensors, or ``torch.load(weights_only=True)``):

=====================================  ==================================================  =====================
format                                 content                                             token (without token=)
=====================================  ==================================================  =====================
diffusers ``learned_embeds.bin`` /     ``{token: (D,) or (n, D)}``                          the key
``.safetensors`` (folder or file)
A1111 ``.pt``                          ``{"string_to_param": {"*": (n, D)}, "name": ...}``  ``name`` (else stem)
A1111 ``.safetensors``                 ``{"emb_params": (n, D)}``                           the file's stem
A1111 / kohya SDXL ``.safetensors``    ``{"clip_l": (n, 768), "clip_g": (n, 1280)}``        the file's stem
a tensor / a dict passed directly      as above                                            token= (tensor)
=====================================  ==================================================  =====================

An ``n``-vector embedding adds the tokens ``token, token_1, ..., token_{n-1}``; prompts name only ``token`` and the
pipelines spell the rest out (:meth:`maybe_convert_prompt`). Deliberate difference from diffusers: an A1111
``.safetensors`` embedding is named after its file, as A1111 names it (diffusers would call the token
``"emb_params"``).

SDXL pipelines (which have two text encoders) load an SDXL file in one call into both encoders (diffusers needs
two calls, ``load_textual_inversion(state_dict["clip_l"], token=..., tokenizer=pipe.tokenizer,
text_encoder=pipe.text_encoder)`` and the same with ``"clip_g"`` / ``tokenizer_2`` / ``text_encoder_2``, which work
here too, exactly as in diffusers).
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

TEXT_INVERSION_NAME = "learned_embeds.bin"
TEXT_INVERSION_NAME_SAFE = "learned_embeds.safetensors"
A1111_SAFETENSORS_KEY = "emb_params"


class TextualInversionError(ValueError):
    """A textual-inversion file or argument that cannot be used (the message names the file and what is wrong)."""


def read_embedding_file(path: str | os.PathLike, raw: bytes | None = None) -> Any:
    """What an embedding file holds, read as :meth:`TextualInversionLoaderMixin.load_textual_inversion` reads it
    (safetensors, or ``torch.load(weights_only=True)``), from ``raw`` (the file's bytes) when given, so that a
    caller that also hashes the file reads it once; pass the result to ``load_textual_inversion`` (with ``token=``)
    and :func:`embedding_summary`. :class:`TextualInversionError` names the file when it cannot be read."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if raw is None:
            from ..modeling import read_safetensors

            return read_safetensors(path)
        from safetensors.torch import load as load_safetensors

        try:
            return load_safetensors(raw)
        except Exception as err:  # safetensors raises its own error type for every kind of damage
            raise TextualInversionError(f"cannot read embedding file {path}: {err}") from None
    try:
        source = os.fspath(path) if raw is None else io.BytesIO(raw)
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise TextualInversionError(
            f"refusing to load {path}: it holds objects other than tensors and plain containers "
            f"({str(err).splitlines()[0]}). Only files that load with weights_only=True are read; convert the "
            "embedding to .safetensors with a trusted tool"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise TextualInversionError(f"cannot read embedding file {path}: {err}") from None


def _resolve(source, weight_name: str | None, hub_kwargs: dict[str, Any]) -> Path:
    from ..hub import resolve_weights_file

    names = [weight_name] if weight_name else [TEXT_INVERSION_NAME_SAFE, TEXT_INVERSION_NAME]
    try:
        return resolve_weights_file(source, names, hub_kwargs, "textual-inversion weights")
    except FileNotFoundError as err:
        raise TextualInversionError(str(err)) from None


def _token_and_vectors(data: Any, token: str | None, origin: str, stem: str | None) -> tuple[str, torch.Tensor]:
    """``(token, (n, D) vectors)`` from what a file holds."""
    if isinstance(data, torch.Tensor):
        if token is None:
            raise TextualInversionError(f"{origin} holds a bare tensor: pass the token to use, token=...")
        return token, data
    if not isinstance(data, Mapping):
        raise TextualInversionError(f"{origin}: expected a dict of embeddings, got {type(data).__name__}")
    if "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        if not isinstance(params, Mapping) or "*" not in params or not isinstance(params["*"], torch.Tensor):
            raise TextualInversionError(f"{origin}: 'string_to_param' must map '*' to a tensor (A1111 embedding)")
        name = data.get("name") if isinstance(data.get("name"), str) else stem
        return token or name, params["*"]
    if set(data) == {A1111_SAFETENSORS_KEY}:  # A1111 .safetensors
        return token or stem or A1111_SAFETENSORS_KEY, data[A1111_SAFETENSORS_KEY]
    if len(data) == 1:  # diffusers: {token: vectors}
        (name, vectors), = data.items()
        if not isinstance(vectors, torch.Tensor):
            raise TextualInversionError(f"{origin}: the value of {name!r} is not a tensor")
        return token or name, vectors
    hint = " (an SDXL embedding: load it into an SDXL pipeline, or state_dict['clip_l'] / ['clip_g'] with " \
        "text_encoder= and tokenizer=)" \
        if {"clip_l", "clip_g"} <= set(data) else ""
    raise TextualInversionError(
        f"{origin}: not a textual-inversion embedding: expected one key {{token: tensor}} (diffusers), "
        f"'string_to_param' (A1111 .pt) or '{A1111_SAFETENSORS_KEY}' (A1111 .safetensors); got keys "
        f"{sorted(map(str, data))[:6]}{hint}"
    )


class TextualInversionLoaderMixin:
    """``load_textual_inversion`` / ``unload_textual_inversion`` / ``maybe_convert_prompt`` for pipelines with a
    ``tokenizer`` and a ``text_encoder``."""

    def load_textual_inversion(self, pretrained_model_name_or_path, token: str | Sequence[str] | None = None,
                               tokenizer=None, text_encoder=None, *, weight_name: str | None = None,
                               **hub_kwargs) -> None:
        """Add the embedding(s) in a file, folder, hub repo, dict or tensor (or a list of them) as new tokens.

        ``token`` overrides the file's token name (a list: one per source). ``weight_name`` picks a file in a folder
        or repo (default ``learned_embeds.safetensors``, then ``learned_embeds.bin``). A token already in the
        vocabulary is refused, as in diffusers.

        SDXL: diffusers' way, one call per text encoder with ``state_dict["clip_l"]`` / ``state_dict["clip_g"]`` and
        ``tokenizer=`` / ``text_encoder=`` the pair, works as in diffusers. Extension: without ``tokenizer`` /
        ``text_encoder``, an SDXL pipeline also takes an A1111 / kohya SDXL embedding (``clip_l`` and ``clip_g``
        tensors) in one call, loading each into its encoder under one token (the file's stem unless ``token=``);
        :meth:`unload_textual_inversion` then removes it from both.
        """
        sources = list(pretrained_model_name_or_path) if isinstance(pretrained_model_name_or_path, list) \
            else [pretrained_model_name_or_path]
        tokens = list(token) if isinstance(token, (list, tuple)) else [token] * len(sources)
        if tokenizer is None and text_encoder is None and getattr(self, "text_encoder_2", None) is not None \
                and len(tokens) == len(sources):
            read = [self._read_source(source, weight_name, hub_kwargs) for source in sources]
            if any(_is_sdxl(data) for data, _, _ in read):
                for source, (data, origin, stem), wanted in zip(sources, read, tokens):
                    if _is_sdxl(data):
                        self._load_sdxl_embedding(data, origin, wanted or stem)
                    else:
                        self._load_vectors([source], [wanted], None, None, None, weight_name, hub_kwargs)
                return
        self._load_vectors(sources, tokens, tokenizer, text_encoder, None, weight_name, hub_kwargs)

    def _read_source(self, source, weight_name: str | None,
                     hub_kwargs: dict[str, Any]) -> tuple[Any, str, str | None]:
        """``(what the source holds, where it came from, the file's stem)``."""
        if isinstance(source, (str, os.PathLike)):
            path = _resolve(source, weight_name, dict(hub_kwargs))
            return read_embedding_file(path), str(path), path.stem
        return source, "the embedding passed", None

    def _load_sdxl_embedding(self, data: Mapping, origin: str, name: str | None) -> None:
        """An A1111 / kohya SDXL embedding into both encoders, under one token; undone if the second fails."""
        if name is None:
            raise TextualInversionError(f"{origin} is an SDXL embedding passed directly: pass the token, token=...")
        for key in ("clip_l", "clip_g"):
            if not isinstance(data[key], torch.Tensor):
                raise TextualInversionError(f"{origin}: {key!r} is not a tensor")
        if self.text_encoder is None:  # the refiner: only the bigG encoder
            self._load_vectors([data["clip_g"]], [name], self.tokenizer_2, self.text_encoder_2, origin)
        else:
            self._load_vectors([data["clip_l"]], [name], self.tokenizer, self.text_encoder, f"{origin} ['clip_l']")
            try:
                self._load_vectors([data["clip_g"]], [name], self.tokenizer_2, self.text_encoder_2,
                                   f"{origin} ['clip_g']")
            except TextualInversionError:
                self.unload_textual_inversion(_group_names(self.tokenizer, name), self.tokenizer, self.text_encoder)
                raise
        self.__dict__.setdefault("_sdxl_embedding_tokens", set()).update(_group_names(self.tokenizer_2, name))

    def _load_vectors(self, sources: list, tokens: list, tokenizer, text_encoder, origin: str | None,
                      weight_name: str | None = None, hub_kwargs: dict[str, Any] | None = None) -> None:
        tokenizer = tokenizer or getattr(self, "tokenizer", None)
        text_encoder = text_encoder or getattr(self, "text_encoder", None)
        if tokenizer is None or text_encoder is None:
            raise TextualInversionError(f"{type(self).__name__}.load_textual_inversion needs a tokenizer and a "
                                        "text_encoder (pass tokenizer= and text_encoder=)")
        if len(sources) == 1 and len(tokens) > 1 and isinstance(sources[0], torch.Tensor):
            sources = list(sources[0])  # one (n, D) tensor for n single-vector tokens
        if len(tokens) != len(sources):
            raise TextualInversionError(f"got {len(sources)} embeddings but {len(tokens)} tokens: give one per "
                                        "embedding")
        named = [t for t in tokens if t is not None]
        if len(set(named)) != len(named):
            raise TextualInversionError(f"duplicate tokens in {tokens}")

        width = text_encoder.get_input_embeddings().weight.shape[-1]
        vocab = tokenizer.get_vocab()
        new_tokens: list[str] = []
        new_vectors: list[torch.Tensor] = []
        for source, wanted in zip(sources, tokens):
            if isinstance(source, (str, os.PathLike)):
                path = _resolve(source, weight_name, dict(hub_kwargs or {}))
                name, vectors = _token_and_vectors(read_embedding_file(path), wanted, str(path), path.stem)
                where = str(path)
            else:
                where = origin or "the embedding passed"
                name, vectors = _token_and_vectors(source, wanted, where, None)
            vectors = vectors.detach().reshape(-1, vectors.shape[-1]) if vectors.ndim else vectors
            if vectors.ndim != 2 or vectors.shape[-1] != width or vectors.shape[0] == 0:
                raise TextualInversionError(
                    f"{where}: embedding for {name!r} has shape {tuple(vectors.shape)}; this text encoder needs "
                    f"(n, {width}) (an embedding trained for another model?)"
                )
            names = [name] + [f"{name}_{i}" for i in range(1, vectors.shape[0])]
            taken = [n for n in names if n in vocab or n in new_tokens]
            if taken or f"{name}_1" in vocab:
                raise TextualInversionError(
                    f"{where}: token {(taken or [name])[0]!r} is already in the tokenizer's vocabulary: pick another "
                    "token=, or unload_textual_inversion() it first"
                )
            new_tokens += names
            new_vectors += list(vectors)

        embedding = text_encoder.get_input_embeddings()
        tokenizer.add_tokens(new_tokens)
        ids = tokenizer.convert_tokens_to_ids(new_tokens)
        weight = embedding.weight.detach()
        grown = torch.empty(len(tokenizer), weight.shape[1], dtype=weight.dtype, device=weight.device)
        grown[: weight.shape[0]] = weight[: len(tokenizer)]
        for token_id, vector in zip(ids, new_vectors):
            grown[token_id] = vector.to(weight.dtype)
        text_encoder.set_input_embeddings(torch.nn.Embedding.from_pretrained(grown, freeze=False))

    def unload_textual_inversion(self, tokens: str | Sequence[str] | None = None, tokenizer=None,
                                 text_encoder=None) -> None:
        """Remove added tokens (default: every non-special added token) and their embedding rows; the tokens
        added after them move down to keep the ids contiguous, as in diffusers. Without ``tokenizer`` /
        ``text_encoder`` this acts on the first pair, as in diffusers, and also removes from the second encoder the
        tokens of SDXL embeddings loaded in one call (see :meth:`load_textual_inversion`)."""
        wanted = None if tokens is None else [tokens] if isinstance(tokens, str) else list(tokens)
        paired: set[str] = set()
        if tokenizer is None and text_encoder is None:
            paired = self.__dict__.get("_sdxl_embedding_tokens", set())
        second = [t for t in sorted(paired) if wanted is None or t in wanted]
        tokenizer = tokenizer or getattr(self, "tokenizer", None)
        text_encoder = text_encoder or getattr(self, "text_encoder", None)
        if tokenizer is not None and text_encoder is not None:
            _remove_tokens(wanted, tokenizer, text_encoder, required=not second)
        elif not second:
            raise TextualInversionError(f"{type(self).__name__} has no tokenizer / text_encoder: pass tokenizer= and "
                                        "text_encoder=")
        if second:
            _remove_tokens(second, self.tokenizer_2, self.text_encoder_2, required=True)
            paired.difference_update(second)

    def maybe_convert_prompt(self, prompt: str | list[str], tokenizer=None) -> str | list[str]:
        """Spell out multi-vector tokens: ``"a <cat> toy"`` -> ``"a <cat> <cat>_1 <cat>_2 toy"`` (as diffusers)."""
        tokenizer = tokenizer or self.tokenizer
        if isinstance(prompt, list):
            return [self.maybe_convert_prompt(p, tokenizer) for p in prompt]
        added = tokenizer.added_tokens_encoder
        if not any(f"{t}_1" in added for t in added):
            return prompt
        for token in set(tokenizer.tokenize(prompt)):
            if token in added and f"{token}_1" in added:
                i, replacement = 1, token
                while f"{token}_{i}" in added:
                    replacement += f" {token}_{i}"
                    i += 1
                prompt = prompt.replace(token, replacement)
        return prompt

    def textual_inversion_groups(self, tokenizer=None) -> dict[int, int]:
        """Id of each multi-vector token -> its number of vectors (A1111 never splits one across prompt chunks)."""
        tokenizer = tokenizer or self.tokenizer
        added = tokenizer.added_tokens_encoder
        groups = {}
        for token, token_id in added.items():
            count = 1
            while f"{token}_{count}" in added:
                count += 1
            if count > 1:
                groups[token_id] = count
        return groups


def embedding_summary(path: str | os.PathLike, data: Any = None) -> dict[str, Any]:
    """A1111's ``/sdapi/v1/embeddings`` entry for an embedding file, as its ``create_embedding_from_data`` reads it:
    ``shape`` (the vector width; for SDXL ``clip_l`` + ``clip_g`` widths), ``vectors`` (how many), and the ``step``,
    ``sd_checkpoint``, ``sd_checkpoint_name`` an A1111 ``.pt`` file records (None otherwise). ``data``: what the file
    holds (:func:`read_embedding_file`), if already read; otherwise the file is read. A file that cannot be read
    gives None everywhere."""
    summary: dict[str, Any] = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None,
                               "vectors": None}
    if data is None:
        try:
            data = read_embedding_file(path)
        except Exception:  # noqa: BLE001 - the loader reports why; here the entry just has no numbers
            return summary
    vectors = None
    if _is_sdxl(data) and all(isinstance(data[k], torch.Tensor) for k in ("clip_l", "clip_g")):
        summary["shape"] = int(data["clip_g"].shape[-1] + data["clip_l"].shape[-1])
        summary["vectors"] = int(data["clip_g"].shape[0]) if data["clip_g"].ndim > 1 else 1
        return summary
    try:
        _, vectors = _token_and_vectors(data, "embedding", str(path), Path(path).stem)
    except TextualInversionError:
        return summary
    if isinstance(data, Mapping):
        for key in ("step", "sd_checkpoint", "sd_checkpoint_name"):
            value = data.get(key)
            summary[key] = value if isinstance(value, (int, str)) else None
    if isinstance(vectors, torch.Tensor) and vectors.ndim >= 1:
        summary["shape"] = int(vectors.shape[-1])
        summary["vectors"] = int(vectors.shape[0]) if vectors.ndim > 1 else 1
    return summary


def _is_sdxl(data: Any) -> bool:
    """An A1111 / kohya SDXL embedding: one tensor per text encoder."""
    return isinstance(data, Mapping) and {"clip_l", "clip_g"} <= set(data)


def _group_names(tokenizer, name: str) -> list[str]:
    """``name`` and its extra vectors' tokens (``name_1``, ...) in ``tokenizer``."""
    added = tokenizer.added_tokens_encoder
    names, i = [name], 1
    while f"{name}_{i}" in added:
        names.append(f"{name}_{i}")
        i += 1
    return names


def _remove_tokens(tokens: list[str] | None, tokenizer, text_encoder, required: bool) -> None:
    """Remove ``tokens`` (None: every added non-special token) and their embedding rows, keeping ids contiguous."""
    added = {t: i for t, i in tokenizer.added_tokens_encoder.items() if i >= tokenizer.vocab_size}
    remove = list(added) if tokens is None else [t for t in tokens if t in added]
    if not remove:
        if tokens is not None and required:
            raise TextualInversionError(f"none of the tokens {tokens} were added by a textual inversion")
        return
    removed_ids = {added[t] for t in remove}
    weight = text_encoder.get_input_embeddings().weight.detach()
    keep = [i for i in range(weight.shape[0]) if i not in removed_ids]
    tokenizer._remove_added_tokens(remove)
    text_encoder.set_input_embeddings(torch.nn.Embedding.from_pretrained(weight[keep].clone(), freeze=False))
