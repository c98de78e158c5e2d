"""SDXL textual inversion (diffusers' two calls, and A1111 / kohya ``clip_l`` + ``clip_g`` files in one call) against
diffusers' SDXL pipeline, and A1111 prompt syntax on both SDXL text encoders against an independent computation with
transformers' encoders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import diffusekit
from diffusekit.generation import generate
from diffusekit.infotext import GenerationParameters
from diffusekit.loaders.textual_inversion import TextualInversionError
from diffusekit.prompts import a1111_prompt_kwargs, encode_prompt_a1111_xl, tokenize_weighted

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from sdxl_assets import WIDTH_1, WIDTH_2, build_tiny_sdxl  # noqa: E402

TOKEN = "unaestheticxl"
PROMPT = f"a red sneaker, {TOKEN}, studio light"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl-prompts"))


@pytest.fixture(scope="module")
def embedding(tmp_path_factory):
    """An SDXL embedding as A1111 / kohya / Civitai ship them: 3 vectors per encoder, different per encoder."""
    g = torch.Generator().manual_seed(7)
    path = tmp_path_factory.mktemp("sdxl-ti") / f"{TOKEN}.safetensors"
    save_file({"clip_l": torch.randn(3, WIDTH_1, generator=g) * 0.5,
               "clip_g": torch.randn(3, WIDTH_2, generator=g) * 0.5 + 1.0}, path)
    return path


@pytest.fixture(scope="module")
def pipe(folder):
    pipe = diffusekit.DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_as_diffusers_documents(pipe, path):
    """diffusers' documented SDXL recipe (docs/source/en/using-diffusers/textual_inversion_inference.md): one call
    per text encoder, clip_g first."""
    state_dict = load_file(path)
    pipe.load_textual_inversion(state_dict["clip_g"], token=TOKEN, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    pipe.load_textual_inversion(state_dict["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)


def encoded(pipe, **kwargs):
    return pipe.encode_prompt(PROMPT, device=torch.device("cpu"), negative_prompt=f"blurry, {TOKEN}", **kwargs)


def test_textual_inversion_matches_diffusers_both_ways(folder, embedding):
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    load_as_diffusers_documents(ref, embedding)
    expected = encoded(ref)
    for one_call in (False, True):
        ours = diffusekit.StableDiffusionXLPipeline.from_pretrained(folder)
        if one_call:
            ours.load_textual_inversion(embedding)  # token: the file's stem, as in A1111
        else:
            load_as_diffusers_documents(ours, embedding)
        for tok, ref_tok in ((ours.tokenizer, ref.tokenizer), (ours.tokenizer_2, ref.tokenizer_2)):
            assert tok.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1", f"{TOKEN}_2"]) == \
                ref_tok.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1", f"{TOKEN}_2"]) == [1000, 1001, 1002]
        for enc, ref_enc in ((ours.text_encoder, ref.text_encoder), (ours.text_encoder_2, ref.text_encoder_2)):
            torch.testing.assert_close(enc.get_input_embeddings().weight, ref_enc.get_input_embeddings().weight)
        got = encoded(ours)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        # the token changes the embeddings (the test can fail): without it, other numbers
        assert not torch.allclose(got[0], ours.encode_prompt("a red sneaker, studio light")[0])


def test_pipeline_with_an_embedding_matches_diffusers(folder, embedding, pipe):
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    load_as_diffusers_documents(ref, embedding)
    pipe.load_textual_inversion(embedding)
    try:
        kwargs = dict(prompt="a red sneaker", negative_prompt=TOKEN, num_inference_steps=2, output_type="np")
        a = pipe(generator=torch.manual_seed(0), **kwargs).images
        b = ref(generator=torch.manual_seed(0), **kwargs).images
    finally:
        pipe.unload_textual_inversion()
    assert np.abs(a - b).max() < 1e-4
    assert len(pipe.tokenizer) == len(pipe.tokenizer_2) == 1000  # unloaded from both encoders


def test_unload_as_diffusers_and_errors(folder, embedding, tmp_path):
    ours = diffusekit.StableDiffusionXLPipeline.from_pretrained(folder)
    load_as_diffusers_documents(ours, embedding)  # diffusers' two unload calls after its two load calls
    names = [TOKEN, f"{TOKEN}_1", f"{TOKEN}_2"]
    ours.unload_textual_inversion(names)
    assert len(ours.tokenizer) == 1000 and len(ours.tokenizer_2) == 1003
    ours.unload_textual_inversion(names, tokenizer=ours.tokenizer_2, text_encoder=ours.text_encoder_2)
    assert len(ours.tokenizer_2) == 1000 and ours.text_encoder_2.get_input_embeddings().weight.shape[0] == 1000
    # a one-call SDXL load is undone by one unload, from both encoders
    ours.load_textual_inversion(embedding, token="<x>")
    ours.unload_textual_inversion(["<x>", "<x>_1", "<x>_2"])
    assert len(ours.tokenizer) == len(ours.tokenizer_2) == 1000
    # a clip_g of the wrong width: refused, naming the file and key, and nothing stays loaded
    bad = tmp_path / "bad.safetensors"
    save_file({"clip_l": torch.zeros(2, WIDTH_1), "clip_g": torch.zeros(2, WIDTH_2 + 1)}, bad)
    with pytest.raises(TextualInversionError, match=r"bad.safetensors \['clip_g'\].*\(2, 33\).*\(n, 32\)"):
        ours.load_textual_inversion(bad)
    assert len(ours.tokenizer) == len(ours.tokenizer_2) == 1000
    with pytest.raises(TextualInversionError, match="pass the token"):
        ours.load_textual_inversion(load_file(embedding))
    # an SD 1.x pipeline names the way to load an SDXL file
    sd = diffusekit.StableDiffusionPipeline(vae=ours.vae, text_encoder=ours.text_encoder, tokenizer=ours.tokenizer,
                                            unet=ours.unet, scheduler=ours.scheduler, requires_safety_checker=False)
    with pytest.raises(TextualInversionError, match="an SDXL embedding: load it into an SDXL pipeline"):
        sd.load_textual_inversion(embedding)


# ------------------------------------------------------------------------------------------- A1111 prompt syntax


@pytest.fixture(scope="module")
def hf_encoders(folder):
    return (transformers.CLIPTextModel.from_pretrained(folder / "text_encoder").eval(),
            transformers.CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2").eval())


def reference_xl(pipe, hf_encoders, text, count=None, clip_skip=None):
    """A1111's SDXL conditioning written out: per encoder, each 77-token chunk through transformers' encoder, the
    penultimate layer (clip_skip more back) times the token weights, rescaled to the unweighted mean; chunks
    concatenated, padded with the empty prompt; the two encoders concatenated along the width; pooled: the second
    encoder's projected pool of the first chunk, unweighted."""
    states, pooled = [], None
    for tokenizer, encoder in zip((pipe.tokenizer, pipe.tokenizer_2), hf_encoders):
        chunks = tokenize_weighted(tokenizer, text)
        chunks += tokenize_weighted(tokenizer, "") * ((count or len(chunks)) - len(chunks))
        parts = []
        for i, chunk in enumerate(chunks):
            with torch.no_grad():
                out = encoder(torch.tensor([chunk.ids]), output_hidden_states=True)
            z = out.hidden_states[-2 - (clip_skip or 0)]
            w = torch.tensor([chunk.weights])[..., None]
            parts.append(z * w * (z.mean() / (z * w).mean()))
            if i == 0 and hasattr(out, "text_embeds"):
                pooled = out.text_embeds
        states.append(torch.cat(parts, dim=1))
    return torch.cat(states, dim=-1), pooled


def test_plain_prompt_equals_diffusers_encoding(folder, pipe):
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    prompts = ["a red sneaker", "a blue coat on a chair"]
    ours = encode_prompt_a1111_xl(pipe, prompts, "blurry")
    theirs = ref.encode_prompt(prompts, device="cpu", negative_prompt=["blurry"] * 2)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # an empty negative prompt is zeros (A1111, and diffusers' force_zeros_for_empty_prompt for a missing one)
    _, negative, _, negative_pooled = encode_prompt_a1111_xl(pipe, prompts, "")
    _, ref_negative, _, ref_negative_pooled = ref.encode_prompt(prompts, device="cpu")
    assert not negative.any() and not negative_pooled.any()
    assert not ref_negative.any() and not ref_negative_pooled.any()


def test_weighted_long_prompt_on_both_encoders(pipe, hf_encoders):
    prompt = "a (red:1.4) sneaker, " + " ".join(["[shoe]"] * 80) + " BREAK on (grass:0.8)"
    embeds, negative, pooled, negative_pooled = encode_prompt_a1111_xl(pipe, prompt, "(blurry:1.2)",
                                                                       num_images_per_prompt=2)
    count = len(tokenize_weighted(pipe.tokenizer, prompt))
    assert count >= 3 and embeds.shape == negative.shape == (2, count * 77, WIDTH_1 + WIDTH_2)
    expected, expected_pooled = reference_xl(pipe, hf_encoders, prompt)
    torch.testing.assert_close(embeds[:1], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(embeds[1], embeds[0])
    torch.testing.assert_close(pooled[:1], expected_pooled, rtol=1e-5, atol=1e-5)
    expected_neg, expected_neg_pooled = reference_xl(pipe, hf_encoders, "(blurry:1.2)", count=count)
    torch.testing.assert_close(negative[:1], expected_neg, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(negative_pooled[:1], expected_neg_pooled, rtol=1e-5, atol=1e-5)
    # clip_skip as diffusers' SDXL counts it (layers before the penultimate); prompt_2 goes to the second encoder
    embeds, _, _, _ = encode_prompt_a1111_xl(pipe, "a (cat:1.3)", clip_skip=1, do_classifier_free_guidance=False)
    torch.testing.assert_close(embeds, reference_xl(pipe, hf_encoders, "a (cat:1.3)", clip_skip=1)[0],
                               rtol=1e-5, atol=1e-5)
    one, _, one_pooled, _ = encode_prompt_a1111_xl(pipe, "a cat", prompt_2="a (dog:1.2)")
    cat, dog = reference_xl(pipe, hf_encoders, "a cat"), reference_xl(pipe, hf_encoders, "a (dog:1.2)")
    torch.testing.assert_close(one, torch.cat([cat[0][..., :WIDTH_1], dog[0][..., WIDTH_1:]], dim=-1),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one_pooled, dog[1], rtol=1e-5, atol=1e-5)


def test_prompt_syntax_option_generate_and_embedding_groups(pipe, embedding):
    prompt, negative = "a (red:1.3) shoe BREAK on grass", "[blurry]"
    kwargs = dict(num_inference_steps=2, output_type="np")
    expected_args = a1111_prompt_kwargs(pipe, prompt, negative)
    assert set(expected_args) == {"prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                                  "negative_pooled_prompt_embeds"}
    expected = pipe(generator=torch.manual_seed(0), **expected_args, **kwargs).images
    pipe.prompt_syntax = "a1111"
    try:
        got = pipe(prompt, negative_prompt=negative, generator=torch.manual_seed(0), **kwargs).images
    finally:
        pipe.prompt_syntax = "plain"
    np.testing.assert_array_equal(got, expected)
    result = generate(pipe, GenerationParameters(prompt=prompt, negative_prompt=negative, steps=2, seed=0,
                                                 cfg_scale=5.0, width=16, height=16),
                      output_type="np", prompt_syntax="a1111")
    np.testing.assert_array_equal(result.images[0], expected[0])
    # a multi-vector embedding stays in one chunk in both encoders, and is spelled out in both
    pipe.load_textual_inversion(embedding)
    try:
        text = " ".join(["red"] * 73) + f" {TOKEN}"
        embeds, _, _, _ = encode_prompt_a1111_xl(pipe, text, do_classifier_free_guidance=False)
        assert embeds.shape[1] == 2 * 77
        for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
            groups = pipe.textual_inversion_groups(tokenizer)
            first, second = tokenize_weighted(tokenizer, pipe.maybe_convert_prompt(text, tokenizer),
                                              multi_vector=groups)
            assert second.ids[1:4] == tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1", f"{TOKEN}_2"])
    finally:
        pipe.unload_textual_inversion()


def test_refiner_takes_clip_g_and_the_syntax(tmp_path, embedding):
    """The refiner has only the bigG encoder: an SDXL file loads its clip_g there, and the A1111 path reads the
    prompt with that encoder alone."""
    folder = build_tiny_sdxl(tmp_path / "refiner", pipeline="StableDiffusionXLImg2ImgPipeline", refiner=True)
    pipe = diffusekit.DiffusionPipeline.from_pretrained(folder)
    pipe.load_textual_inversion(embedding)
    names = [TOKEN, f"{TOKEN}_1", f"{TOKEN}_2"]
    assert pipe.tokenizer is None and pipe.tokenizer_2.convert_tokens_to_ids(names) == [1000, 1001, 1002]
    torch.testing.assert_close(pipe.text_encoder_2.get_input_embeddings().weight[1000:],
                               load_file(embedding)["clip_g"])
    embeds, _, pooled, _ = encode_prompt_a1111_xl(pipe, "a (dress:1.2)", do_classifier_free_guidance=False)
    reference = transformers.CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2").eval()
    [chunk] = tokenize_weighted(pipe.tokenizer_2, "a (dress:1.2)")
    with torch.no_grad():
        out = reference(torch.tensor([chunk.ids]), output_hidden_states=True)
    z, w = out.hidden_states[-2], torch.tensor([chunk.weights])[..., None]
    torch.testing.assert_close(embeds, z * w * (z.mean() / (z * w).mean()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, out.text_embeds, rtol=1e-5, atol=1e-5)
    pipe.unload_textual_inversion(names)
    assert len(pipe.tokenizer_2) == 1000
