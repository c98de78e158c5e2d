"""A1111 infotext ("parameters" PNG chunk): format, parse, PNG round trip, model hash."""

from __future__ import annotations

import hashlib

import pytest
from PIL import Image

from diffusekit.infotext import GenerationParameters, model_hash, parse_infotext, read_parameters, save_png

# as A1111 writes it (multi-line prompt, quoted value, extra keys after the known ones)
A1111_TEXT = (
    "masterpiece, (a cat:1.2),\nsitting on a mat\n"
    "Negative prompt: blurry, (worst quality:1.4)\n"
    "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 2179987202, Size: 768x512, Model hash: 93b79e09ed, "
    'Model: anything-v4.5, Clip skip: 2, Lora hashes: "add_detail: 7c6bad76eb54, more: abc", Version: v1.9.4'
)


def test_parse_matches_a1111_fields():
    fields = parse_infotext(A1111_TEXT)
    assert fields["Prompt"] == "masterpiece, (a cat:1.2),\nsitting on a mat"
    assert fields["Negative prompt"] == "blurry, (worst quality:1.4)"
    assert fields["Steps"] == "20" and fields["Sampler"] == "DPM++ 2M Karras" and fields["CFG scale"] == "7"
    assert (fields["Size-1"], fields["Size-2"]) == ("768", "512")
    assert fields["Lora hashes"] == "add_detail: 7c6bad76eb54, more: abc"
    assert fields["Version"] == "v1.9.4"


def test_typed_round_trip():
    params = GenerationParameters.from_infotext(A1111_TEXT)
    assert params.steps == 20 and params.cfg_scale == 7.0 and params.seed == 2179987202
    assert (params.width, params.height) == (768, 512) and params.clip_skip == 2
    assert params.extra == {"Lora hashes": "add_detail: 7c6bad76eb54, more: abc", "Version": "v1.9.4"}
    assert params.to_infotext() == A1111_TEXT
    assert GenerationParameters.from_infotext(str(params)) == params


def test_prompt_only_and_short_last_line_stay_prompt():
    assert parse_infotext("a cat")["Prompt"] == "a cat"
    # fewer than three pairs on the last line: A1111 keeps it in the prompt
    text = "a cat\nstyle: oil, mood: calm"
    assert parse_infotext(text)["Prompt"] == text
    assert GenerationParameters(prompt="a: b, c", steps=5, seed=1, cfg_scale=7.5).to_infotext() == \
        "a: b, c\nSteps: 5, CFG scale: 7.5, Seed: 1"


def test_png_round_trip_unicode(tmp_path):
    params = GenerationParameters(prompt="ein Bär, 猫", negative_prompt="x", steps=3, sampler="Euler a",
                                  cfg_scale=4.5, seed=7, width=8, height=8, model="m")
    path = save_png(Image.new("RGB", (8, 8), "red"), tmp_path / "a.png", params)
    assert read_parameters(path) == params.to_infotext()
    assert GenerationParameters.from_infotext(read_parameters(path)) == params
    assert not [p for p in tmp_path.iterdir() if p.name != "a.png"]  # no temp file left behind
    save_png(Image.new("RGB", (8, 8)), tmp_path / "b.png")
    assert read_parameters(tmp_path / "b.png") is None


def test_bad_typed_value_names_the_key():
    with pytest.raises(ValueError, match="Steps"):
        GenerationParameters.from_infotext("p\nSteps: many, Seed: 1, CFG scale: 7")


def test_model_hash_is_sha256_prefix(tmp_path):
    data = b"weights" * 100_000
    (tmp_path / "m.safetensors").write_bytes(data)
    assert model_hash(tmp_path / "m.safetensors", chunk_size=4096) == hashlib.sha256(data).hexdigest()[:10]
