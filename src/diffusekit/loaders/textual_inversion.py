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
a tensor / a dict passed directly      as above                                            token= (tensor)
=====================================  ==================================================  =====================

An ``n``-vector embedding adds the tokens ``token, token_1, ..., token_{n-1}``; prompts name only ``token`` and the
pipelines spell the rest out (:meth:`maybe_convert_prompt`). Deliberate difference from diffusers: an A1111
``.safetensors`` embedding is named after its file, as A1111 names it (diffusers would call the token
``"emb_params"``).
"""

from __future__ import annotations

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


def _read_file(path: Path) -> Any:
    if path.suffix == ".safetensors":
        from ..modeling import read_safetensors

        return read_safetensors(path)
    try:
        return torch.load(os.fspath(path), map_location="cpu", weights_only=True)
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
    hint = " (an SDXL embedding: load state_dict['clip_l'] / ['clip_g'] with text_encoder= and tokenizer=)" \
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
        """
        tokenizer = tokenizer or getattr(self, "tokenizer", None)
        text_encoder = text_encoder or getattr(self, "text_encoder", None)
        if tokenizer is None or text_encoder is None:
            raise TextualInversionError(f"{type(self).__name__}.load_textual_inversion needs a tokenizer and a "
                                        "text_encoder (pass tokenizer= and text_encoder=)")
        sources = list(pretrained_model_name_or_path) if isinstance(pretrained_model_name_or_path, list) \
            else [pretrained_model_name_or_path]
        tokens = list(token) if isinstance(token, (list, tuple)) else [token] * len(sources)
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
                path = _resolve(source, weight_name, dict(hub_kwargs))
                name, vectors = _token_and_vectors(_read_file(path), wanted, str(path), path.stem)
                origin = str(path)
            else:
                origin = "the embedding passed"
                name, vectors = _token_and_vectors(source, wanted, origin, None)
            vectors = vectors.detach().reshape(-1, vectors.shape[-1]) if vectors.ndim else vectors
            if vectors.ndim != 2 or vectors.shape[-1] != width or vectors.shape[0] == 0:
                raise TextualInversionError(
                    f"{origin}: embedding for {name!r} has shape {tuple(vectors.shape)}; this text encoder needs "
                    f"(n, {width}) (an embedding trained for another model?)"
                )
            names = [name] + [f"{name}_{i}" for i in range(1, vectors.shape[0])]
            taken = [n for n in names if n in vocab or n in new_tokens]
            if taken or f"{name}_1" in vocab:
                raise TextualInversionError(
                    f"{origin}: token {(taken or [name])[0]!r} is already in the tokenizer's vocabulary: pick another "
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
        added after them move down to keep the ids contiguous, as in diffusers."""
        tokenizer = tokenizer or getattr(self, "tokenizer", None)
        text_encoder = text_encoder or getattr(self, "text_encoder", None)
        added = {t: i for t, i in tokenizer.added_tokens_encoder.items() if i >= tokenizer.vocab_size}
        if tokens is None:
            remove = list(added)
        else:
            wanted = [tokens] if isinstance(tokens, str) else list(tokens)
            remove = [t for t in wanted if t in added]
            if not remove:
                raise TextualInversionError(f"none of the tokens {wanted} were added by a textual inversion")
        removed_ids = {added[t] for t in remove}
        weight = text_encoder.get_input_embeddings().weight.detach()
        keep = [i for i in range(weight.shape[0]) if i not in removed_ids]
        tokenizer._remove_added_tokens(remove)
        text_encoder.set_input_embeddings(torch.nn.Embedding.from_pretrained(weight[keep].clone(), freeze=False))

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
