"""CLIPTextModel / CLIPTextModelWithProjection: transformers' files load here and ours load there, same outputs."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from clip_assets import write_clip_tokenizer
from diffusekit import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from diffusekit.hub import EntryNotFound
from diffusekit.modeling import CheckpointError

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4, vocab_size=49408,
            max_position_embeddings=77, projection_dim=16)
PROMPTS = ["a photo of an astronaut riding a horse on mars", "a cat", "", "東京 😀 wow!!!"]


def reference(cls_name: str = "CLIPTextModel", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(**{**TINY, **overrides})
    model = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():  # transformers zero-initialises biases: make them random so they are checked too
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
    return model


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def batch(tokenizer):
    """Real token ids, padded to 77 (SD-style) and a padding mask."""
    enc = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


def assert_close(a, b, tol=1e-5):
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def compare(theirs, ours, input_ids, **kwargs):
    with torch.no_grad():
        a = theirs(input_ids, output_hidden_states=True, **kwargs)
        b = ours(input_ids, output_hidden_states=True, **kwargs)
    assert len(a.hidden_states) == len(b.hidden_states) == ours.config.num_hidden_layers + 1
    for x, y in zip(a.hidden_states, b.hidden_states):
        assert_close(x, y)
    assert_close(a.last_hidden_state, b.last_hidden_state)
    if hasattr(a, "text_embeds"):
        assert_close(a.text_embeds, b.text_embeds)
    else:
        assert_close(a.pooler_output, b.pooler_output)
    return a, b


# ---------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("eos_token_id", [49407, 2])  # 2: SD 1.x configs (pool at the highest id)
def test_transformers_checkpoint_loads_and_matches(tmp_path, batch, hidden_act, eos_token_id):
    theirs = reference(hidden_act=hidden_act, eos_token_id=eos_token_id, bos_token_id=0 if eos_token_id == 2 else 49406)
    theirs.save_pretrained(tmp_path)
    ours = CLIPTextModel.from_pretrained(tmp_path)
    assert ours.config.hidden_act == hidden_act and ours.config.eos_token_id == eos_token_id
    assert not ours.training and ours.dtype == torch.float32 and ours.device.type == "cpu"
    ids, mask = batch
    compare(theirs, ours, ids)
    compare(theirs, ours, ids, attention_mask=mask)
    compare(theirs, ours, ids[:, :20], position_ids=torch.arange(20).flip(0)[None])


def test_pooling_picks_the_eos_token(batch):
    ours = CLIPTextModel.from_config(TINY).eval()
    ids, _ = batch
    out = ours(ids)
    for row in range(len(ids)):
        first_eos = ids[row].tolist().index(49407)  # SD 1.x padding repeats the eos: the first one counts
        assert torch.equal(out.pooler_output[row], out.last_hidden_state[row, first_eos])
    # configs with eos_token_id 2 (SD 1.x's) pool at the highest id, even with a token 2 ("#") earlier
    legacy = CLIPTextModel.from_config(ours.config, eos_token_id=2).eval()
    legacy.load_state_dict(ours.state_dict())
    row = torch.tensor([[49406, 2, 320, 49407, 0, 0]])
    out = legacy(row)
    assert torch.equal(out.pooler_output[0], out.last_hidden_state[0, 3])


def test_our_checkpoint_loads_in_transformers(tmp_path, batch):
    ours = CLIPTextModel.from_config(TINY, hidden_act="gelu").eval()
    ours.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["CLIPTextModel"] and config["model_type"] == "clip_text_model"
    assert config["hidden_act"] == "gelu" and config["torch_dtype"] == "float32"
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "text_model.embeddings.token_embedding.weight" in keys  # the Hub's (transformers 4.x) key names
    assert "text_model.encoder.layers.2.self_attn.q_proj.weight" in keys
    assert "text_model.final_layer_norm.weight" in keys and not any("position_ids" in k for k in keys)
    theirs = transformers.CLIPTextModel.from_pretrained(tmp_path).eval()
    ids, mask = batch
    compare(theirs, ours, ids, attention_mask=mask)
    again = CLIPTextModel.from_pretrained(tmp_path)
    assert again.config == ours.config
    compare(theirs, again, ids)


def test_with_projection_both_ways(tmp_path, batch):
    ids, mask = batch
    theirs = reference("CLIPTextModelWithProjection", seed=1)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = CLIPTextModelWithProjection.from_pretrained(tmp_path / "theirs")
    a, b = compare(theirs, ours, ids, attention_mask=mask)
    assert b.text_embeds.shape == (len(PROMPTS), 16)
    assert b[0] is b.text_embeds and b[1] is b.last_hidden_state
    ours.save_pretrained(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["architectures"] == ["CLIPTextModelWithProjection"]
    back = transformers.CLIPTextModelWithProjection.from_pretrained(tmp_path / "ours").eval()
    compare(back, ours, ids)
    # the plain model reads a projection checkpoint and drops the projection (as transformers does)
    plain = CLIPTextModel.from_pretrained(tmp_path / "ours")
    assert not hasattr(plain, "text_projection")
    assert_close(plain(ids, attention_mask=mask).last_hidden_state, b.last_hidden_state)


def test_clip_skip_pattern(tmp_path, batch):
    # pipelines take hidden_states[-(clip_skip + 1)] and apply the final layer norm
    theirs = reference(seed=2)
    theirs.save_pretrained(tmp_path)
    ours = CLIPTextModel.from_pretrained(tmp_path)
    ids, _ = batch
    with torch.no_grad():
        a = theirs(ids, output_hidden_states=True)
        b = ours(ids, output_hidden_states=True)
        assert b[-1] is b.hidden_states  # pipelines index the output from the end
        assert_close(theirs.text_model.final_layer_norm(a.hidden_states[-2]) if hasattr(theirs, "text_model")
                     else theirs.final_layer_norm(a.hidden_states[-2]),
                     ours.text_model.final_layer_norm(b.hidden_states[-2]))
    plain = ours(ids, return_dict=False)
    assert isinstance(plain, tuple) and len(plain) == 2 and plain[0].shape == (len(PROMPTS), 77, 32)


def test_full_clip_config_checkpoint(tmp_path, batch):
    torch.manual_seed(3)
    config = transformers.CLIPConfig(
        text_config={**TINY, "projection_dim": 16},
        vision_config=dict(hidden_size=16, intermediate_size=20, num_hidden_layers=1, num_attention_heads=2,
                           image_size=8, patch_size=4, projection_dim=16),
        projection_dim=16,
    )
    full = transformers.CLIPModel(config).eval()
    full.save_pretrained(tmp_path)
    assert "text_config" in json.loads((tmp_path / "config.json").read_text())
    ids, mask = batch
    with torch.no_grad():
        pooled = full.text_model(ids, attention_mask=mask).pooler_output
        expected = full.text_projection(pooled)
    ours = CLIPTextModelWithProjection.from_pretrained(tmp_path)  # vision tower and logit_scale skipped
    assert ours.config.projection_dim == 16
    assert_close(ours(ids, attention_mask=mask).text_embeds, expected)
    plain = CLIPTextModel.from_pretrained(tmp_path)
    assert_close(plain(ids, attention_mask=mask).pooler_output, pooled)
    assert CLIPTextConfig.from_pretrained(tmp_path).hidden_size == 32


# ---------------------------------------------------------------------------------------------------- formats


def test_legacy_checkpoint_with_position_ids_and_metadata(tmp_path, batch, caplog):
    """SD 1.x text encoders: transformers 4.x config (many metadata keys), keys with text_model. and position_ids."""
    theirs = reference(seed=4, eos_token_id=2, bos_token_id=0)
    state = {f"text_model.{k}": v.contiguous() for k, v in theirs.state_dict().items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = {
        "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"], "attention_dropout": 0.0,
        "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu", "initializer_factor": 1.0,
        "initializer_range": 0.02, "layer_norm_eps": 1e-05, "model_type": "clip_text_model", "pad_token_id": 1,
        "torch_dtype": "float16", "transformers_version": "4.22.0.dev0", "output_attentions": False,
        "id2label": {"0": "LABEL_0"}, "chunk_size_feed_forward": 0, "dtype": "float16", "use_bfloat16": False,
        **{k: v for k, v in TINY.items()},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING):
        ours = CLIPTextModel.from_pretrained(tmp_path)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert ours.dtype == torch.float32  # the file's torch_dtype is metadata; torch_dtype= decides
    compare(theirs, ours, batch[0])
    reference_load = transformers.CLIPTextModel.from_pretrained(tmp_path, dtype=torch.float32).eval()
    compare(reference_load, ours, batch[0])


def test_bin_checkpoint(tmp_path, batch):
    theirs = reference(seed=5)
    theirs.save_pretrained(tmp_path)  # transformers 5 writes safetensors only: make the .bin as 4.x did
    state = {f"text_model.{k}": v for k, v in load_file(tmp_path / "model.safetensors").items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(EntryNotFound, match="use_safetensors=False"):
        CLIPTextModel.from_pretrained(tmp_path, use_safetensors=True)
    ours = CLIPTextModel.from_pretrained(tmp_path)
    compare(theirs, ours, batch[0])
    ours.save_pretrained(tmp_path / "ours", safe_serialization=False)
    assert (tmp_path / "ours" / "pytorch_model.bin").is_file()
    compare(theirs, transformers.CLIPTextModel.from_pretrained(tmp_path / "ours").eval(), batch[0])


def test_fp16_loading(tmp_path, batch):
    theirs = reference(seed=6)
    theirs.save_pretrained(tmp_path)
    ours = CLIPTextModel.from_pretrained(tmp_path, torch_dtype=torch.float16)
    assert ours.dtype == torch.float16 and all(p.dtype == torch.float16 for p in ours.parameters())
    ids, mask = batch
    out = ours(ids, attention_mask=mask).last_hidden_state
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), theirs(ids, attention_mask=mask).last_hidden_state, atol=2e-2, rtol=2e-2)
    ours.save_pretrained(tmp_path / "fp16")
    assert json.loads((tmp_path / "fp16" / "config.json").read_text())["torch_dtype"] == "float16"
    assert load_file(tmp_path / "fp16" / "model.safetensors")["text_model.final_layer_norm.weight"].dtype == torch.float16
    back = transformers.CLIPTextModel.from_pretrained(tmp_path / "fp16")
    assert back.dtype == torch.float16
    assert CLIPTextModel.from_pretrained(tmp_path / "fp16").dtype == torch.float32  # default dtype unless asked


def test_sharded_save_loads_in_both(tmp_path, batch):
    ours = CLIPTextModel.from_config(TINY).eval()
    ours.save_pretrained(tmp_path, max_shard_size="1MB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    compare(transformers.CLIPTextModel.from_pretrained(tmp_path).eval(), CLIPTextModel.from_pretrained(tmp_path),
            batch[0])


def test_construction_from_config_objects():
    cfg = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=1000)
    assert cfg.hidden_act == "quick_gelu" and cfg["max_position_embeddings"] == 77
    model = CLIPTextModel(cfg)
    assert dict(model.config) == dict(cfg) and len(model.text_model.encoder.layers) == 2
    override = CLIPTextModelWithProjection(cfg, projection_dim=8)
    assert override.text_projection.weight.shape == (8, 32)
    from_transformers = CLIPTextModel(transformers.CLIPTextConfig(**TINY))
    assert from_transformers.config.hidden_size == 32 and from_transformers.config.vocab_size == 49408
    assert CLIPTextModel(hidden_size=16, num_attention_heads=2, num_hidden_layers=1).config.hidden_size == 16
    assert model.get_input_embeddings() is model.text_model.embeddings.token_embedding
    with pytest.raises(TypeError, match="unknown key"):
        CLIPTextConfig(hiden_size=3)
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextModel(cfg, hidden_act="swishy")
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        CLIPTextModel(cfg, num_attention_heads=5)


def test_random_init_is_sane():
    model = CLIPTextModel.from_config(TINY).eval()
    ids = torch.tensor([[49406, 320, 2368, 49407]])
    out = model(ids)
    assert torch.isfinite(out.last_hidden_state).all()
    assert model.text_model.embeddings.token_embedding.weight.std() < 0.05  # transformers-style init, not N(0, 1)


# ---------------------------------------------------------------------------------------------------- errors


def test_errors(tmp_path, batch):
    theirs = reference(seed=7)
    theirs.save_pretrained(tmp_path / "good")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_bytes((tmp_path / "good" / "config.json").read_bytes())
    with pytest.raises(EntryNotFound, match=r"model\.safetensors.*pytorch_model\.bin"):
        CLIPTextModel.from_pretrained(tmp_path / "noweights")

    (tmp_path / "noweights" / "model.safetensors").write_bytes(
        (tmp_path / "good" / "model.safetensors").read_bytes()[:500]
    )
    with pytest.raises(CheckpointError, match="corrupt"):
        CLIPTextModel.from_pretrained(tmp_path / "noweights")

    with pytest.raises(CheckpointError, match="shape mismatches"):
        CLIPTextModel.from_pretrained(tmp_path / "good", intermediate_size=40)
    with pytest.raises(CheckpointError, match="missing from the checkpoint"):
        CLIPTextModelWithProjection.from_pretrained(tmp_path / "good")  # no text_projection.weight

    (tmp_path / "noconfig").mkdir()
    with pytest.raises(EntryNotFound, match="config.json"):
        CLIPTextModel.from_pretrained(tmp_path / "noconfig")
    (tmp_path / "noconfig" / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 8}))
    with pytest.raises(ValueError, match="model_type='t5'"):
        CLIPTextModel.from_pretrained(tmp_path / "noconfig")

    ours = CLIPTextModel.from_pretrained(tmp_path / "good")
    with pytest.raises(ValueError, match="at most 77"):
        ours(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="output_attentions"):
        ours(batch[0], output_attentions=True)


def test_works_without_transformers(tmp_path):
    CLIPTextModelWithProjection.from_config(TINY).save_pretrained(tmp_path)
    code = (
        "import sys, torch; sys.modules['transformers'] = None\n"
        "from diffusekit import CLIPTextModelWithProjection\n"
        f"m = CLIPTextModelWithProjection.from_pretrained({str(tmp_path)!r})\n"
        "assert m(torch.tensor([[49406, 320, 49407]])).text_embeds.shape == (1, 16)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
