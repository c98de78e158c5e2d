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
pipeline's own embeddings. SDXL: :func:`encode_prompt_a1111_xl` (both text encoders, pooled embeddings as A1111's);
:func:`a1111_prompt_kwargs` gives either family's pipeline-call arguments.
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch

__all__ = ["PromptChunk", "a1111_prompt_kwargs", "encode_prompt_a1111", "encode_prompt_a1111_xl",
           "encode_weighted_chunks", "parse_prompt_attention", "tokenize_weighted"]

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
    return _encode_chunks(text_encoder, chunks, clip_skip, device, sdxl=False)[0]


def _encode_chunks(text_encoder, chunks: Sequence[PromptChunk], clip_skip: int | None, device, *,
                   sdxl: bool) -> tuple["torch.Tensor", "torch.Tensor | None"]:
    """``(weighted hidden states (1, 77 n, D), pooled (1, P) of the first chunk or None)``.

    SD 1.x / 2.x (``sdxl=False``): the last layer, or ``clip_skip`` layers before it through the final layer norm.
    SDXL: the penultimate layer's output without the norm (``clip_skip`` more layers back), as diffusers' SDXL and
    A1111's ``sd_models_xl``; the pooled output is the projected pool of the first chunk, before any weighting
    (A1111 takes ``zs[0].pooled``), or ``None`` for an encoder without a projection.
    """
    import torch

    device = device if device is not None else text_encoder.device
    ids = torch.tensor([chunk.ids for chunk in chunks], device=device)  # (n, 77)
    pooled = None
    if sdxl:
        out = text_encoder(ids, output_hidden_states=True)
        hidden = out.hidden_states[-(2 + (clip_skip or 0))]  # (n, 77, D)
        text_embeds = getattr(out, "text_embeds", None)
        pooled = None if text_embeds is None else text_embeds[:1]  # (1, P)
    elif clip_skip is None:
        hidden = text_encoder(ids)[0]
    else:
        states = text_encoder(ids, output_hidden_states=True)[-1][-(clip_skip + 1)]
        hidden = text_encoder.text_model.final_layer_norm(states)  # (n, 77, D)
    weights = torch.tensor([chunk.weights for chunk in chunks], device=device, dtype=hidden.dtype)  # (n, 77)
    if bool((weights != 1).any()):
        means = hidden.mean(dim=(1, 2), keepdim=True)  # (n, 1, 1)
        weighted = hidden * weights[..., None]
        hidden = weighted * (means / weighted.mean(dim=(1, 2), keepdim=True))
    return hidden.reshape(1, -1, hidden.shape[-1]), pooled  # (1, 77 n, D), (1, P) or None


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


def encode_prompt_a1111_xl(pipe, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                           prompt_2: str | Sequence[str] | None = None,
                           negative_prompt_2: str | Sequence[str] | None = None, num_images_per_prompt: int = 1,
                           do_classifier_free_guidance: bool = True, clip_skip: int | None = None, device=None,
                           lora_scale: float | None = None) -> tuple:
    """SDXL: ``(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds)`` for
    ``pipe(...)`` from prompts in A1111 syntax (negatives ``None`` without guidance).

    Each text encoder reads its prompt with A1111's rules on its own tokenizer (``prompt`` for the first,
    ``prompt_2`` for the second, default ``prompt``; the refiner's only encoder gets ``prompt``), as A1111's SDXL
    conditioner runs both: chunks of 75 tokens encoded alone, the penultimate layer weighted and mean-restored per
    encoder, then the encoders' states concatenated along the width ``(B, 77 n, D1 + D2)``. The pooled embedding
    is the second encoder's projected pool of the *first* chunk, unweighted (A1111's ``zs[0].pooled``). All
    prompts, the negatives and both encoders are padded to one chunk count with the empty prompt's encoding.
    An empty negative prompt (and empty ``negative_prompt_2``) gives zeros, hidden states and pooled, when the
    pipeline's ``force_zeros_for_empty_prompt`` says so (the base model: A1111 zeros an empty negative prompt for
    every SDXL model; diffusers only a missing one); zero rows are padded with zeros, which is what A1111's separate
    unconditional pass computes when the lengths differ.
    """
    import torch

    from .loaders.lora import lora_scale_context as scaled_lora

    prompts = [prompt] if isinstance(prompt, str) else _as_list(prompt, len(prompt), "prompt")
    if not prompts:
        raise ValueError("prompt is an empty list")
    batch = len(prompts)
    prompts_2 = prompts if prompt_2 is None else _as_list(prompt_2, batch, "prompt_2")
    negatives = _as_list(negative_prompt, batch, "negative_prompt")
    negatives_2 = negatives if negative_prompt_2 is None else _as_list(negative_prompt_2, batch, "negative_prompt_2")
    zeros = [pipe._options.get("force_zeros_for_empty_prompt", False) and not n and not n2
             for n, n2 in zip(negatives, negatives_2)]
    encoders = pipe._encoders()
    text_lists = [prompts + negatives, prompts_2 + negatives_2][:len(encoders)]
    if not do_classifier_free_guidance:
        text_lists = [texts[:batch] for texts in text_lists]
    per_encoder = []
    for texts, (tokenizer, _) in zip(text_lists, encoders):
        multi_vector = _multi_vector_ids(pipe, tokenizer)
        per_encoder.append([tokenize_weighted(tokenizer, _expand_tokens(pipe, t, tokenizer),
                                              multi_vector=multi_vector) for t in texts])
    count = max(len(chunks) for per_text in per_encoder for chunks in per_text)
    states, pooled = [], None
    with torch.no_grad(), scaled_lora(lora_scale):
        for per_text, (tokenizer, encoder) in zip(per_encoder, encoders):
            empty = tokenize_weighted(tokenizer, "")[0]
            rows = [_encode_chunks(encoder, chunks + [empty] * (count - len(chunks)), clip_skip, device, sdxl=True)
                    for chunks in per_text]
            states.append(torch.cat([hidden for hidden, _ in rows]))  # (texts, 77 n, D_i)
            if pooled is None and rows[0][1] is not None:
                pooled = torch.cat([p for _, p in rows])  # (texts, P)
    if pooled is None:
        raise ValueError(f"{type(pipe).__name__}: no text encoder with a projection (text_encoder_2) for the pooled "
                         "embeddings")
    embeds = torch.cat(states, dim=-1)  # (texts, 77 n, D1 + D2)
    target = pipe.text_encoder_2.dtype if pipe.text_encoder_2 is not None else pipe.unet.dtype
    device = device if device is not None else pipe.device

    def finish(x):
        return x.to(device=device, dtype=target).repeat_interleave(num_images_per_prompt, dim=0)

    if not do_classifier_free_guidance:
        return finish(embeds), None, finish(pooled), None
    keep = torch.tensor([0.0 if z else 1.0 for z in zeros], dtype=embeds.dtype, device=embeds.device)
    negative, negative_pooled = embeds[batch:] * keep[:, None, None], pooled[batch:] * keep[:, None]
    return finish(embeds[:batch]), finish(negative), finish(pooled[:batch]), finish(negative_pooled)


def a1111_prompt_kwargs(pipe, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                        clip_skip: int | None = None, lora_scale: float | None = None) -> dict[str, "torch.Tensor"]:
    """The pipeline call's embedding arguments for prompts in A1111 syntax, for any prompt-conditioned family:
    ``prompt_embeds`` / ``negative_prompt_embeds``, plus ``pooled_prompt_embeds`` /
    ``negative_pooled_prompt_embeds`` for SDXL (a pipeline with ``text_encoder_2``)."""
    if hasattr(pipe, "text_encoder_2"):
        embeds, negative, pooled, negative_pooled = encode_prompt_a1111_xl(
            pipe, prompt, negative_prompt, clip_skip=clip_skip, lora_scale=lora_scale)
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative, "pooled_prompt_embeds": pooled,
                "negative_pooled_prompt_embeds": negative_pooled}
    embeds, negative = encode_prompt_a1111(pipe, prompt, negative_prompt, clip_skip=clip_skip, lora_scale=lora_scale)
    return {"prompt_embeds": embeds, "negative_prompt_embeds": negative}


def _expand_tokens(pipe, text: str, tokenizer=None) -> str:
    """Multi-vector textual-inversion tokens spelled out (``tok`` -> ``tok tok_1 tok_2``), as the pipelines do."""
    convert = getattr(pipe, "maybe_convert_prompt", None)
    return convert(text, tokenizer or pipe.tokenizer) if convert is not None else text


def _multi_vector_ids(pipe, tokenizer=None) -> dict[int, int]:
    groups = getattr(pipe, "textual_inversion_groups", None)
    return groups(tokenizer) if callable(groups) else {}
