"""AUTOMATIC1111's prompt syntax: emphasis weights, ``BREAK`` and prompts longer than CLIP's 77 tokens.

Syntax (A1111's "Attention/emphasis" rules)::

    (word)        weight x 1.1          ((word))   x 1.21        (word:1.3)   x 1.3
    [word]        weight / 1.1          [[word]]   / 1.21        \\( \\) \\[ \\]   literal brackets, \\\\ a backslash
    a BREAK b     ``b`` starts a new 75-token chunk

Groups nest (weights multiply); an unclosed ``(`` or ``[`` applies to the rest of the prompt; a ``)`` or ``]`` with
nothing open, and ``:1.3)`` outside a round group, are plain text. A lone ``\\`` before any other character is
dropped, as in A1111.

Encoding (A1111's rules for SD 1.x / 2.x CLIP text encoders):

1. each parsed piece is tokenized on its own, tokens carry their piece's weight;
2. tokens are cut in chunks of 75 (``model_max_length - 2`` of the tokenizer). When a chunk fills up and the last comma is at most 20 tokens back
   (A1111's ``comma_padding_backtrack`` default), the tokens after that comma move to the next chunk. ``BREAK``
   closes the chunk; a textual-inversion vector group is never split across chunks;
3. each chunk becomes ``bos + 75 tokens (eos-padded) + eos`` (77), positions after the first eos hold the
   tokenizer's pad token (SD 2.x's ``!``), and is encoded on its own (``clip_skip`` as in the pipelines);
4. the chunk's hidden states are multiplied by the token weights, then rescaled so their mean equals the mean
   before weighting (A1111's "original" emphasis);
5. chunks are concatenated along the tokens: ``(B, 77 * n, D)``. Prompts of a batch and the negative prompt are
   padded to the same chunk count with the encoding of the empty prompt (A1111's empty chunk).

Differences from A1111, on purpose: ``BREAK`` inside brackets still starts a new chunk (A1111 scales its marker
with the group's weight and then encodes the word "BREAK" with a negative weight); the mean-restoring factor is computed per prompt and chunk, not over a whole
batch of prompts, so an image does not depend on what else was in its batch (identical when the batch repeats one
prompt, as A1111's batches do).

Use: ``prompt_embeds, negative_prompt_embeds = encode_prompt_a1111(pipe, prompt, negative_prompt)`` then
``pipe(prompt_embeds=..., negative_prompt_embeds=...)``; a plain prompt of up to 75 tokens gives exactly the
pipeline's own embeddings.
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch

__all__ = ["PromptChunk", "encode_prompt_a1111", "encode_weighted_chunks", "parse_prompt_attention",
           "tokenize_weighted"]

ROUND = 1.1  # "(word)"
SQUARE = 1 / 1.1  # "[word]"
CHUNK_LENGTH = 75  # tokens per chunk, without bos/eos
COMMA_BACKTRACK = 20  # A1111's default comma_padding_backtrack
BREAK = -1.0  # the weight marking a BREAK in parse_prompt_attention's output

# one lexical unit: an escape, a bracket, an explicit weight closing a round group, or a run of plain text
_UNIT = re.compile(
    r"(?P<escape>\\[()\[\]\\]?)"
    r"|(?P<weight>:\s*(?P<number>[+-]?[.\d]+)\s*\))"
    r"|(?P<bracket>[()\[\]])"
    r"|(?P<text>[^\\()\[\]:]+|:)"
)
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split ``text`` into ``(piece, weight)`` pairs; a ``BREAK`` is ``("BREAK", -1.0)``.

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    pieces: list[list] = []  # [text, weight], weights multiplied in place as groups close
    open_groups: list[tuple[str, int]] = []  # (bracket, index of the first piece inside it)

    def close(kind: str, factor: float) -> bool:
        for depth in range(len(open_groups) - 1, -1, -1):  # the innermost group of this kind
            if open_groups[depth][0] == kind:
                start = open_groups.pop(depth)[1]
                _scale(pieces[start:], factor)
                return True
        return False

    def add_text(run: str) -> None:
        for i, part in enumerate(_BREAK_WORD.split(run)):
            if i:
                pieces.append(["BREAK", BREAK])
            pieces.append([part, 1.0])

    for unit in _UNIT.finditer(text):
        if unit.group("escape") is not None:
            pieces.append([unit.group("escape")[1:], 1.0])
        elif unit.group("weight") is not None:
            factor = _float_or_none(unit.group("number"))
            if factor is None or not close("(", factor):
                add_text(unit.group("weight"))
        elif unit.group("bracket") in ("(", "["):
            open_groups.append((unit.group("bracket"), len(pieces)))
        elif unit.group("bracket") is not None:
            bracket = unit.group("bracket")
            if not close("(" if bracket == ")" else "[", ROUND if bracket == ")" else SQUARE):
                add_text(bracket)
        else:
            add_text(unit.group("text"))
    for kind, factor in (("(", ROUND), ("[", SQUARE)):  # unclosed groups apply to the rest (round ones first)
        for start in (start for bracket, start in open_groups if bracket == kind):
            _scale(pieces[start:], factor)
    merged: list[list] = []
    for piece in pieces or [["", 1.0]]:
        if merged and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(list(piece))
    return [(piece, weight) for piece, weight in merged]


def _scale(pieces: list[list], factor: float) -> None:
    for piece in pieces:
        if piece[1] != BREAK:  # a BREAK inside a group still breaks (A1111 would scale it into a word "BREAK")
            piece[1] *= factor


def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


@dataclasses.dataclass
class PromptChunk:
    """77 token ids (bos, 75 tokens, eos, padding after the first eos) and one weight per id."""

    ids: list[int]
    weights: list[float]


def _token_groups(ids: list[int], multi_vector: dict[int, int]) -> list[list[int]]:
    """Ids grouped into units that must stay in one chunk: a textual-inversion token with its extra vectors."""
    groups, i = [], 0
    while i < len(ids):
        size = multi_vector.get(ids[i], 1)
        groups.append(ids[i:i + size])
        i += size
    return groups


def chunk_length_of(tokenizer) -> int:
    """Tokens per chunk without bos/eos: ``model_max_length - 2`` (75 for CLIP's 77)."""
    limit = getattr(tokenizer, "model_max_length", None)
    return limit - 2 if isinstance(limit, int) and 2 < limit < 1_000_000 else CHUNK_LENGTH


def tokenize_weighted(tokenizer, text: str, *, chunk_length: int | None = None,
                      comma_backtrack: int = COMMA_BACKTRACK,
                      multi_vector: dict[int, int] | None = None) -> list[PromptChunk]:
    """``text`` in A1111 syntax -> chunks of ``chunk_length + 2`` ids with their weights (see the module doc).

    ``chunk_length`` defaults to the tokenizer's ``model_max_length - 2`` (75: A1111's).
    ``multi_vector`` maps the id of a textual-inversion token to its number of vectors (the token and
    ``token_1``... follow each other); such a group is never split across chunks.
    """
    chunk_length = chunk_length or chunk_length_of(tokenizer)
    parsed = parse_prompt_attention(text)
    texts = [piece for piece, weight in parsed if weight != BREAK]
    encoded = iter(tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else [])
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    comma = None if comma == tokenizer.unk_token_id else comma
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    chunks: list[PromptChunk] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def finish() -> None:
        nonlocal ids, weights, last_comma
        missing = chunk_length - len(ids)
        row = [bos] + ids + [eos] * missing + [eos]
        first_eos = len(ids) + 1
        row[first_eos + 1:] = [pad] * (len(row) - first_eos - 1)
        chunks.append(PromptChunk(row, [1.0] + weights + [1.0] * (missing + 1)))
        ids, weights, last_comma = [], [], -1

    for piece, weight in parsed:
        if weight == BREAK:
            finish()
            continue
        for group in _token_groups(next(encoded), multi_vector or {}):
            if group[0] == comma:
                last_comma = len(ids)
            elif (comma_backtrack and len(ids) == chunk_length and last_comma != -1
                  and len(ids) - last_comma <= comma_backtrack):
                moved_ids, moved_weights = ids[last_comma + 1:], weights[last_comma + 1:]
                ids, weights = ids[:last_comma + 1], weights[:last_comma + 1]
                finish()
                ids, weights = moved_ids, moved_weights
            if len(ids) + len(group) > chunk_length:
                finish()
            ids += group
            weights += [weight] * len(group)
    if ids or not chunks:
        finish()
    return chunks


def encode_weighted_chunks(text_encoder, chunks: Sequence[PromptChunk], clip_skip: int | None = None,
                           device=None) -> "torch.Tensor":
    """Chunks of one prompt -> ``(1, 77 * len(chunks), D)``: each chunk encoded alone, weighted, mean restored.

    ``clip_skip`` as in the pipelines: ``None`` takes the last layer, ``k`` the output ``k`` layers before it
    (through the final layer norm).
    """
    import torch

    device = device if device is not None else text_encoder.device
    ids = torch.tensor([chunk.ids for chunk in chunks], device=device)  # (n, 77)
    if clip_skip is None:
        hidden = text_encoder(ids)[0]
    else:
        states = text_encoder(ids, output_hidden_states=True)[-1][-(clip_skip + 1)]
        hidden = text_encoder.text_model.final_layer_norm(states)  # (n, 77, D)
    weights = torch.tensor([chunk.weights for chunk in chunks], device=device, dtype=hidden.dtype)  # (n, 77)
    if bool((weights != 1).any()):
        means = hidden.mean(dim=(1, 2), keepdim=True)  # (n, 1, 1)
        weighted = hidden * weights[..., None]
        hidden = weighted * (means / weighted.mean(dim=(1, 2), keepdim=True))
    return hidden.reshape(1, -1, hidden.shape[-1])  # (1, 77 n, D)


def _as_list(prompt: str | Sequence[str] | None, batch: int, name: str) -> list[str]:
    if prompt is None:
        return [""] * batch
    if isinstance(prompt, str):
        return [prompt] * batch
    prompts = list(prompt)
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"{name} must be a str or a list of str")
    if len(prompts) != batch:
        raise ValueError(f"{name} has {len(prompts)} entries but prompt has {batch}: give one per prompt")
    return prompts


def encode_prompt_a1111(pipe, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                        num_images_per_prompt: int = 1, do_classifier_free_guidance: bool = True,
                        clip_skip: int | None = None, device=None, lora_scale: float | None = None,
                        ) -> tuple["torch.Tensor", "torch.Tensor | None"]:
    """``(prompt_embeds, negative_prompt_embeds)`` for ``pipe(prompt_embeds=..., negative_prompt_embeds=...)``
    from prompts in A1111 syntax; each ``(B * num_images_per_prompt, 77 * n, D)`` with one ``n`` for all.

    ``pipe`` is any pipeline with ``tokenizer`` and ``text_encoder`` (the Stable Diffusion family).
    ``negative_prompt_embeds`` is ``None`` when ``do_classifier_free_guidance`` is false. ``lora_scale`` scales
    the text encoder's LoRA layers (as the pipelines' ``lora_scale``).
    """
    import torch

    from .loaders.lora import lora_scale_context as scaled_lora

    prompts = [prompt] if isinstance(prompt, str) else _as_list(prompt, len(prompt), "prompt")
    if not prompts:
        raise ValueError("prompt is an empty list")
    texts = [_expand_tokens(pipe, p) for p in prompts]
    if do_classifier_free_guidance:
        texts += [_expand_tokens(pipe, p) for p in _as_list(negative_prompt, len(prompts), "negative_prompt")]
    multi_vector = _multi_vector_ids(pipe)
    per_text = [tokenize_weighted(pipe.tokenizer, t, multi_vector=multi_vector) for t in texts]
    count = max(len(chunks) for chunks in per_text)
    empty = tokenize_weighted(pipe.tokenizer, "")[0]
    with torch.no_grad(), scaled_lora(lora_scale):
        rows = [encode_weighted_chunks(pipe.text_encoder, chunks + [empty] * (count - len(chunks)), clip_skip,
                                       device)
                for chunks in per_text]
    embeds = torch.cat(rows).to(device if device is not None else pipe.device)
    embeds = embeds.repeat_interleave(num_images_per_prompt, dim=0)
    if not do_classifier_free_guidance:
        return embeds, None
    return embeds.chunk(2)


def _expand_tokens(pipe, text: str) -> str:
    """Multi-vector textual-inversion tokens spelled out (``tok`` -> ``tok tok_1 tok_2``), as the pipelines do."""
    convert = getattr(pipe, "maybe_convert_prompt", None)
    return convert(text, pipe.tokenizer) if convert is not None else text


def _multi_vector_ids(pipe) -> dict[int, int]:
    groups = getattr(pipe, "textual_inversion_groups", None)
    return groups() if callable(groups) else {}
