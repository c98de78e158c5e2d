"""A1111 prompt syntax (diffusekit.prompts): the parse examples of A1111's documentation, a small reference parser
written from that documentation (fuzzed against the library), the chunking rules, and embeddings checked against
transformers' CLIP text encoder with the weighting computed here."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch

import diffusekit
from diffusekit.prompts import encode_prompt_a1111, parse_prompt_attention, tokenize_weighted

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from sd_assets import build_tiny_sd  # noqa: E402

# ---------------------------------------------------------------------------------------------------- parsing

# A1111's documented examples (modules/prompt_parser.py docstring, wiki "Attention/emphasis")
DOCUMENTED = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("((word))", [("word", 1.1 * 1.1)]),
    ("[word]", [("word", 1 / 1.1)]),
    ("[[word]]", [("word", 1 / 1.1 / 1.1)]),
    ("(word:1.3)", [("word", 1.3)]),
    ("(word: 0.8 )", [("word", 0.8)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("", [("", 1.0)]),
    ("stray) and ]", [("stray) and ]", 1.0)]),
    ("no group:1.2) here", [("no group:1.2) here", 1.0)]),
]


@pytest.mark.parametrize("text, expected", DOCUMENTED)
def test_documented_parse_examples(text, expected):
    assert parse_prompt_attention(text) == expected


_WEIGHT_CLOSE = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def reference_parse(text: str) -> list[tuple[str, float]]:
    """Written from the documentation, for balanced prompts: ``(x)`` multiplies the attention to x by 1.1, ``[x]``
    divides it by 1.1, ``(x:w)`` multiplies it by w; groups nest; ``\\(`` etc. are literal; BREAK separates; pieces
    of equal weight that touch are one piece. A recursive descent over a tree; weights multiply innermost first."""
    leaves: list[tuple[str, list[float]]] = []  # (text, factors from outermost to innermost)

    def group(i: int, factors: list[float], closer: str | None) -> tuple[int, float | None]:
        buf = ""
        start = len(leaves)

        def flush():
            nonlocal buf
            if buf:
                leaves.append((buf, factors))
            buf = ""

        while i < len(text):
            c = text[i]
            if c == "\\" and i + 1 < len(text) and text[i + 1] in "()[]\\":
                flush()
                leaves.append((text[i + 1], factors))
                i += 2
            elif c in "([":
                flush()
                i = group(i + 1, factors, ")" if c == "(" else "]")
            elif closer == ")" and c == ":" and _WEIGHT_CLOSE.match(text, i):
                flush()
                m = _WEIGHT_CLOSE.match(text, i)
                _apply(start, float(m.group(1)))
                return m.end()
            elif c == closer:
                flush()
                _apply(start, 1.1 if c == ")" else 1 / 1.1)
                return i + 1
            else:
                buf += c
                i += 1
        flush()
        return i

    def _apply(start, factor):
        for k in range(start, len(leaves)):
            leaves[k] = (leaves[k][0], leaves[k][1] + [factor])

    group(0, [], None)
    pieces: list[tuple[str, float]] = []
    for leaf, factors in leaves:
        weight = 1.0
        for f in factors:  # appended innermost first
            weight *= f
        for k, part in enumerate(_BREAK.split(leaf)):
            if k:
                pieces.append(("BREAK", -1.0))
            pieces.append((part, weight))
    merged: list[list] = []
    for piece, weight in pieces or [("", 1.0)]:
        if merged and merged[-1][1] == weight:
            merged[-1][0] += piece
        else:
            merged.append([piece, weight])
    return [(p, w) for p, w in merged]


def random_prompt(rng: random.Random, depth: int = 0) -> str:
    items = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.random()
        if kind < 0.45 or depth > 3:
            items.append(rng.choice(["cat", " ", "red hat", ", ", "BREAK", " BREAK ", "x:y", "\\(", "\\]", "\\\\"]))
        elif kind < 0.65:
            items.append("(" + random_prompt(rng, depth + 1) + ")")
        elif kind < 0.85:
            items.append("[" + random_prompt(rng, depth + 1) + "]")
        else:
            items.append("(" + random_prompt(rng, depth + 1) + f":{rng.choice(['1.3', '0.5', ' 2 ', '.7'])})")
    return "".join(items)


def test_matches_the_reference_parser_on_random_balanced_prompts():
    rng = random.Random(12)
    for _ in range(400):
        text = random_prompt(rng)
        assert parse_prompt_attention(text) == reference_parse(text), text


# ---------------------------------------------------------------------------------------------------- chunking


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("sd-prompts"))


@pytest.fixture(scope="module")
def pipe(sd_folder):
    pipe = diffusekit.DiffusionPipeline.from_pretrained(sd_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def hf_text_encoder(sd_folder):
    return transformers.CLIPTextModel.from_pretrained(sd_folder / "text_encoder").eval()


def test_short_prompt_is_one_chunk_as_the_pipeline_tokenizes_it(pipe):
    tok = pipe.tokenizer
    [chunk] = tokenize_weighted(tok, "a red sneaker, product shot")
    assert chunk.ids == tok("a red sneaker, product shot", padding="max_length", max_length=77).input_ids
    assert chunk.weights == [1.0] * 77
    [empty] = tokenize_weighted(tok, "")
    assert empty.ids == [tok.bos_token_id] + [tok.eos_token_id] * 76


def test_weights_follow_the_tokens(pipe):
    tok = pipe.tokenizer
    [chunk] = tokenize_weighted(tok, "a (red:1.5) [shoe]")
    n_red = len(tok("red", add_special_tokens=False).input_ids)
    n_shoe = len(tok("shoe", add_special_tokens=False).input_ids)
    body = chunk.weights[1:]
    assert body[:1] == [1.0] and body[1:1 + n_red] == [1.5] * n_red
    assert body[1 + n_red:1 + n_red + n_shoe] == [pytest.approx(1 / 1.1)] * n_shoe
    assert set(body[1 + n_red + n_shoe:]) == {1.0}


def test_long_prompt_splits_in_75_token_chunks_each_with_bos_and_eos(pipe):
    tok = pipe.tokenizer
    words = " ".join(["red"] * 100)  # 100 tokens, no comma
    chunks = tokenize_weighted(tok, words)
    red = tok("red", add_special_tokens=False).input_ids[0]
    assert len(chunks) == 2 and all(len(c.ids) == 77 for c in chunks)
    assert chunks[0].ids == [tok.bos_token_id] + [red] * 75 + [tok.eos_token_id]
    assert chunks[1].ids == [tok.bos_token_id] + [red] * 25 + [tok.eos_token_id] * 51


def test_break_and_comma_back_off(pipe):
    tok = pipe.tokenizer
    a, b = tokenize_weighted(tok, "red BREAK shoe")
    assert a.ids[:3] == [tok.bos_token_id, tok("red", add_special_tokens=False).input_ids[0], tok.eos_token_id]
    assert b.ids[1] == tok("shoe", add_special_tokens=False).input_ids[0]
    red = tok("red", add_special_tokens=False).input_ids[0]
    comma = tok.convert_tokens_to_ids(",</w>")
    # comma at position 70 of the first chunk; the 5 tokens after it move to the second chunk when it fills up
    text = " ".join(["red"] * 70) + ", " + " ".join(["red"] * 10)
    first, second = tokenize_weighted(tok, text)
    assert first.ids[1:72] == [red] * 70 + [comma] and first.ids[72:] == [tok.eos_token_id] * 5
    assert second.ids[1:11] == [red] * 10 and second.ids[11] == tok.eos_token_id
    # more than 20 tokens back: no back-off
    text = " ".join(["red"] * 50) + ", " + " ".join(["red"] * 30)
    first, second = tokenize_weighted(tok, text)
    assert first.ids[1:77] == [red] * 50 + [comma] + [red] * 24 + [tok.eos_token_id]
    # turned off
    first, _ = tokenize_weighted(tok, " ".join(["red"] * 70) + ", " + " ".join(["red"] * 10), comma_backtrack=0)
    assert first.ids[72:76] == [red] * 4


def test_multi_vector_group_is_not_split(pipe):
    tok = pipe.tokenizer
    red = tok("red", add_special_tokens=False).input_ids[0]
    tail = tok("shoe red", add_special_tokens=False).input_ids
    text = " ".join(["red"] * 74) + " shoe red"
    first, second = tokenize_weighted(tok, text, multi_vector={tail[0]: 2})  # a 2-vector group at position 75
    assert first.ids[1:76] == [red] * 74 + [tok.eos_token_id] and second.ids[1:3] == tail[:2]
    first, _ = tokenize_weighted(tok, text)  # without the group the first id fills the chunk
    assert first.ids[75] == tail[0]


def test_pad_token_after_the_first_eos():
    from clip_assets import write_clip_tokenizer
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tok = diffusekit.CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp, pad_token="!", num_merges=486))
    [chunk] = tokenize_weighted(tok, "red")
    assert chunk.ids[:4] == [tok.bos_token_id, chunk.ids[1], tok.eos_token_id, tok.pad_token_id]
    assert set(chunk.ids[3:]) == {tok.pad_token_id} and tok.pad_token_id != tok.eos_token_id


# ---------------------------------------------------------------------------------------------------- embeddings


def reference_chunk_embedding(hf_text_encoder, ids, weights, clip_skip=None):
    with torch.no_grad():
        out = hf_text_encoder(torch.tensor([ids]), output_hidden_states=True)
    norm = getattr(hf_text_encoder, "text_model", hf_text_encoder).final_layer_norm  # transformers 5 drops text_model
    z = out.last_hidden_state if clip_skip is None else norm(out.hidden_states[-(clip_skip + 1)])
    w = torch.tensor([weights])[..., None]
    return z * w * (z.mean() / (z * w).mean())


def test_plain_prompt_equals_the_pipelines_embeddings(pipe, sd_folder, hf_text_encoder):
    ref = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder)
    prompts = ["a red sneaker", "a blue coat"]
    ours, ours_neg = encode_prompt_a1111(pipe, prompts, "blurry")
    theirs, theirs_neg = ref.encode_prompt(prompts, "cpu", 1, True, ["blurry"] * 2)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_neg, theirs_neg, rtol=1e-5, atol=1e-5)
    # clip_skip (diffusers 0.42's own clip_skip path cannot run with transformers 5: reference built here)
    ours, ours_neg = encode_prompt_a1111(pipe, prompts, "blurry", clip_skip=1)
    for row, prompt in zip(ours, prompts):
        [chunk] = tokenize_weighted(pipe.tokenizer, prompt)
        expected = reference_chunk_embedding(hf_text_encoder, chunk.ids, chunk.weights, clip_skip=1)
        torch.testing.assert_close(row[None], expected, rtol=1e-5, atol=1e-5)
    plain, plain_neg = pipe.encode_prompt(prompts, negative_prompt="blurry", clip_skip=1)
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_neg, plain_neg, rtol=1e-5, atol=1e-5)


def test_weighted_long_prompt_and_negative_padding(pipe, hf_text_encoder):
    prompt = "a (red:1.4) sneaker, " + " ".join(["[red]"] * 90)
    embeds, negative = encode_prompt_a1111(pipe, prompt, "blurry", num_images_per_prompt=2)
    assert embeds.shape == negative.shape == (2, 154, 32)
    chunks = tokenize_weighted(pipe.tokenizer, prompt)
    expected = torch.cat([reference_chunk_embedding(hf_text_encoder, c.ids, c.weights) for c in chunks], dim=1)
    torch.testing.assert_close(embeds[:1], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(embeds[1], embeds[0])
    [neg_chunk] = tokenize_weighted(pipe.tokenizer, "blurry")
    [empty] = tokenize_weighted(pipe.tokenizer, "")
    expected_neg = torch.cat([reference_chunk_embedding(hf_text_encoder, neg_chunk.ids, neg_chunk.weights),
                              reference_chunk_embedding(hf_text_encoder, empty.ids, empty.weights)], dim=1)
    torch.testing.assert_close(negative[:1], expected_neg, rtol=1e-5, atol=1e-5)


def test_weighting_with_clip_skip_and_batches_of_different_lengths(pipe, hf_text_encoder):
    prompts = ["(a cat:1.3) on a mat", " ".join(["red"] * 80)]
    embeds, negative = encode_prompt_a1111(pipe, prompts, clip_skip=1)
    assert embeds.shape == negative.shape == (2, 154, 32)
    [chunk] = tokenize_weighted(pipe.tokenizer, prompts[0])
    torch.testing.assert_close(embeds[:1, :77], reference_chunk_embedding(hf_text_encoder, chunk.ids, chunk.weights, 1),
                               rtol=1e-5, atol=1e-5)
    none, uncond = encode_prompt_a1111(pipe, prompts[0], do_classifier_free_guidance=False)
    assert uncond is None and none.shape == (1, 77, 32)
    with pytest.raises(ValueError, match="negative_prompt has 1 entries"):
        encode_prompt_a1111(pipe, prompts, ["x"])


def test_pipeline_runs_on_the_embeddings_like_diffusers(pipe, sd_folder):
    ref = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder)
    ref.set_progress_bar_config(disable=True)
    embeds, negative = encode_prompt_a1111(pipe, "a (red:1.3) shoe BREAK on grass", "[blurry]")
    kwargs = dict(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=3, output_type="np")
    a = pipe(generator=torch.manual_seed(0), **kwargs).images
    b = ref(generator=torch.manual_seed(0), **kwargs).images
    assert np.abs(a - b).max() < 1 / 255


def test_prompt_syntax_option_on_the_pipeline(pipe):
    kwargs = dict(num_inference_steps=2, output_type="np")
    prompt, negative = "a (red:1.3) shoe BREAK on grass", "[blurry]"
    embeds, neg = encode_prompt_a1111(pipe, prompt, negative)
    expected = pipe(prompt_embeds=embeds, negative_prompt_embeds=neg, generator=torch.manual_seed(0), **kwargs).images
    pipe.prompt_syntax = "a1111"
    try:
        got = pipe(prompt, negative_prompt=negative, generator=torch.manual_seed(0), **kwargs).images
        pipe.prompt_syntax = "markdown"
        with pytest.raises(ValueError, match="prompt_syntax must be 'plain' or 'a1111'"):
            pipe("x", **kwargs)
    finally:
        pipe.prompt_syntax = "plain"
    np.testing.assert_array_equal(got, expected)
