"""Textual inversion: diffusers and A1111 embedding files (single and multi-vector) load into our pipeline as into
diffusers' (same token ids, same prompt embeddings), unload restores the tokenizer and text encoder, bad files
give errors naming the file."""

from __future__ import annotations

import fractions

import pytest
import torch
from safetensors.torch import save_file

import diffusekit
from diffusekit.loaders.textual_inversion import TextualInversionError
from diffusekit.prompts import encode_prompt_a1111

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from sd_assets import CROSS_DIM, build_tiny_sd  # noqa: E402


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("sd-ti"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("embeddings")
    g = torch.Generator().manual_seed(3)
    vec = lambda *shape: torch.randn(*shape, generator=g) * 0.02  # noqa: E731
    (folder / "diffusers-safe").mkdir()
    save_file({"<cat-toy>": vec(CROSS_DIM)}, folder / "diffusers-safe" / "learned_embeds.safetensors")
    torch.save({"<dog>": vec(1, CROSS_DIM)}, folder / "learned_embeds.bin")
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec(3, CROSS_DIM)}, "name": "mystyle",
                "step": 1500, "sd_checkpoint": "a9263745", "sd_checkpoint_name": "v1-5"}, folder / "mystyle.pt")
    save_file({"emb_params": vec(2, CROSS_DIM)}, folder / "badhands.safetensors")
    return folder


def load_all(pipe, files, diffusers_side: bool):
    pipe.load_textual_inversion(files / "diffusers-safe")
    pipe.load_textual_inversion(str(files / "learned_embeds.bin"))
    pipe.load_textual_inversion(files / "mystyle.pt")
    # A1111's .safetensors: the token is the file's stem for us; diffusers needs it given
    pipe.load_textual_inversion(files / "badhands.safetensors", **({"token": "badhands"} if diffusers_side else {}))


PROMPT = "a <cat-toy> and a <dog> in mystyle, badhands"


def test_same_tokens_and_embeddings_as_diffusers(sd_folder, files):
    ours = diffusekit.StableDiffusionPipeline.from_pretrained(sd_folder)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder)
    load_all(ours, files, False)
    load_all(ref, files, True)
    assert len(ours.tokenizer) == len(ref.tokenizer) == 1000 + 1 + 1 + 3 + 2
    assert ours.text_encoder.config.vocab_size == 1007
    assert ours.maybe_convert_prompt(PROMPT) == ref.maybe_convert_prompt(PROMPT, ref.tokenizer) == \
        "a <cat-toy> and a <dog> in mystyle mystyle_1 mystyle_2, badhands badhands_1"
    converted = ours.maybe_convert_prompt(PROMPT)
    assert ours.tokenizer(converted).input_ids == ref.tokenizer(converted).input_ids
    torch.testing.assert_close(ours.text_encoder.get_input_embeddings().weight,
                               ref.text_encoder.get_input_embeddings().weight)
    a, a_neg = ours.encode_prompt(PROMPT, negative_prompt="badhands")
    b, b_neg = ref.encode_prompt(PROMPT, "cpu", 1, True, "badhands")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a_neg, b_neg, rtol=1e-5, atol=1e-5)
    # the A1111 prompt path spells the vectors out too, and keeps a group in one chunk
    c, _ = encode_prompt_a1111(ours, PROMPT)
    torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-5)
    assert ours.textual_inversion_groups() == {ours.tokenizer.convert_tokens_to_ids("mystyle"): 3,
                                               ours.tokenizer.convert_tokens_to_ids("badhands"): 2}

    # unload one token group, then all: as diffusers
    ours.unload_textual_inversion(["mystyle", "mystyle_1", "mystyle_2"])
    ref.unload_textual_inversion(["mystyle", "mystyle_1", "mystyle_2"])
    assert len(ours.tokenizer) == len(ref.tokenizer) == 1004
    assert ours.tokenizer.convert_tokens_to_ids(["<dog>", "badhands_1"]) == \
        ref.tokenizer.convert_tokens_to_ids(["<dog>", "badhands_1"]) == [1001, 1003]
    torch.testing.assert_close(ours.text_encoder.get_input_embeddings().weight,
                               ref.text_encoder.get_input_embeddings().weight)
    ours.unload_textual_inversion()
    fresh = diffusekit.StableDiffusionPipeline.from_pretrained(sd_folder)
    assert len(ours.tokenizer) == 1000 and ours.tokenizer("a <dog>").input_ids == fresh.tokenizer("a <dog>").input_ids
    assert torch.equal(ours.text_encoder.get_input_embeddings().weight, fresh.text_encoder.get_input_embeddings().weight)


def test_tensor_and_token_override(sd_folder):
    pipe = diffusekit.StableDiffusionPipeline.from_pretrained(sd_folder)
    vectors = torch.randn(2, CROSS_DIM)
    pipe.load_textual_inversion(vectors, token=["<a>", "<b>"])  # one tensor row per token
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[1000:], vectors)
    pipe.load_textual_inversion({"<c>": vectors}, token="<renamed>")
    assert pipe.tokenizer.convert_tokens_to_ids(["<renamed>", "<renamed>_1"]) == [1002, 1003]
    with pytest.raises(TextualInversionError, match="bare tensor: pass the token"):
        pipe.load_textual_inversion(vectors[0])


def test_bad_files_name_the_file_and_what_is_wrong(sd_folder, files, tmp_path):
    pipe = diffusekit.StableDiffusionPipeline.from_pretrained(sd_folder)
    wrong_width = tmp_path / "sdxl-sized.safetensors"
    save_file({"emb_params": torch.zeros(2, 768)}, wrong_width)
    with pytest.raises(TextualInversionError, match=r"sdxl-sized.safetensors.*shape \(2, 768\).*\(n, 32\)"):
        pipe.load_textual_inversion(wrong_width)
    code = tmp_path / "code.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, CROSS_DIM)}, "name": fractions.Fraction(1, 3)}, code)
    with pytest.raises(TextualInversionError, match="refusing to load .*code.pt.*weights_only"):
        pipe.load_textual_inversion(code)
    other = tmp_path / "lora.safetensors"
    save_file({"lora_unet_a.lora_up.weight": torch.zeros(1), "lora_unet_a.lora_down.weight": torch.zeros(1)}, other)
    with pytest.raises(TextualInversionError, match="lora.safetensors: not a textual-inversion embedding"):
        pipe.load_textual_inversion(other)
    with pytest.raises(TextualInversionError, match="no textual-inversion weights in"):
        pipe.load_textual_inversion(tmp_path)
    pipe.load_textual_inversion(files / "mystyle.pt")
    with pytest.raises(TextualInversionError, match="'mystyle' is already in the tokenizer's vocabulary"):
        pipe.load_textual_inversion(files / "mystyle.pt")
    with pytest.raises(TextualInversionError, match="'red</w>' is already"):
        pipe.load_textual_inversion(torch.zeros(CROSS_DIM), token="red</w>")
    with pytest.raises(TextualInversionError, match="were added by a textual inversion"):
        pipe.unload_textual_inversion("nothing-like-this")


def test_a1111_pt_variants_under_weights_only(sd_folder, tmp_path):
    """A1111 saves the vectors as tensors that require grad (or Parameters): they load with weights_only. The
    original textual-inversion repo's ParameterDict is a module and needs full unpickling: refused, clearly."""
    pipe = diffusekit.StableDiffusionPipeline.from_pretrained(sd_folder)
    vectors = torch.randn(2, CROSS_DIM)
    torch.save({"string_to_param": {"*": vectors.clone().requires_grad_()}, "name": "<grad>"}, tmp_path / "g.pt")
    torch.save({"string_to_param": {"*": torch.nn.Parameter(vectors.clone())}, "name": "<par>"}, tmp_path / "p.pt")
    pipe.load_textual_inversion(tmp_path / "g.pt")
    pipe.load_textual_inversion(tmp_path / "p.pt")
    rows = pipe.text_encoder.get_input_embeddings().weight[1000:]
    assert torch.equal(rows.detach(), torch.cat([vectors, vectors]))
    legacy = {"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors)}), "name": "old"}
    torch.save(legacy, tmp_path / "legacy.pt")
    with pytest.raises(TextualInversionError, match="refusing to load .*legacy.pt"):
        pipe.load_textual_inversion(tmp_path / "legacy.pt")
