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


def test_lora_and_embedding_hashes_are_a1111s(tmp_path):
    """A1111 writes 12 hex digits in "Lora hashes" / "TI hashes"; for a .safetensors LoRA it hashes the tensor data
    only (kohya's "addnet" hash), so the same weights with other metadata keep their hash."""
    import hashlib
    import json

    import torch
    from safetensors.torch import save_file

    from diffusekit.infotext import embedding_hash, lora_hash

    tensors = {"lora_unet_a.lora_down.weight": torch.arange(6.0).reshape(2, 3),
               "lora_unet_a.lora_up.weight": torch.ones(3, 2), "lora_unet_a.alpha": torch.tensor(2.0)}
    save_file(tensors, tmp_path / "a.safetensors", metadata={"ss_network_dim": "2"})
    save_file(tensors, tmp_path / "b.safetensors", metadata={"ss_network_dim": "2", "ss_output_name": "renamed"})
    raw = (tmp_path / "a.safetensors").read_bytes()
    header_length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_length])
    data = raw[8 + header_length:]
    spans = sorted(v["data_offsets"] for k, v in header.items() if k != "__metadata__")
    expected = hashlib.sha256(b"".join(data[a:b] for a, b in spans)).hexdigest()[:12]
    assert lora_hash(tmp_path / "a.safetensors") == lora_hash(tmp_path / "b.safetensors") == expected
    assert model_hash(tmp_path / "a.safetensors") != model_hash(tmp_path / "b.safetensors")
    (tmp_path / "c.pt").write_bytes(b"not a safetensors file")
    whole = hashlib.sha256(b"not a safetensors file").hexdigest()
    assert lora_hash(tmp_path / "c.pt") == embedding_hash(tmp_path / "c.pt") == whole[:12]
