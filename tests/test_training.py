"""Training tools: data parsing, EMA, loss plot, deterministic resume, and export loadable by diffusers.

Everything runs in seconds on synthetic data; the Fashion-MNIST check skips when the Debian package
``dataset-fashion-mnist`` is not installed (``bash scripts/setup.sh --train`` installs it).
"""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch

from diffusekit.training import data as fm
from diffusekit.training.cli import main as cli_main

TINY = [
    "--dataset", "synthetic", "--limit", "32", "--batch-size", "4", "--block-out-channels", "8,16",
    "--attention-levels", "0,1", "--norm-num-groups", "4", "--attention-head-dim", "8", "--num-train-timesteps",
    "100", "--warmup-steps", "2", "--num-samples", "0", "--no-progress", "--threads", "1", "--ema-decay", "0.9",
]


def train(out, *extra):
    cli_main(["train", "unconditional", "--output-dir", str(out), *TINY, *extra])
    return torch.load(out / "checkpoint.pt", weights_only=True)


def write_idx(path, array: np.ndarray, code: int) -> None:
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(array.dtype.newbyteorder(">")).tobytes())


def test_read_idx_roundtrip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28)).astype(np.uint8)
    labels = np.arange(5, dtype=np.uint8)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images, 0x08)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels, 0x08)
    got_images, got_labels = fm.load_fashion_mnist("test", tmp_path)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert got_labels.dtype == np.int64
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an idx file"):
        fm.read_idx(tmp_path / "bad")


def test_missing_dataset_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "DEFAULT_DIRS", (str(tmp_path / "nowhere"),))
    monkeypatch.delenv(fm.ENV_VAR, raising=False)
    with pytest.raises(fm.DatasetNotFound, match="apt-get install -y dataset-fashion-mnist"):
        fm.load_fashion_mnist("train")


@pytest.mark.skipif(not fm.dataset_available(), reason="Fashion-MNIST is not installed: "
                    "`apt-get install -y dataset-fashion-mnist` (or `bash scripts/setup.sh --train`)")
def test_fashion_mnist_from_the_debian_package():
    images, labels = fm.load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and np.bincount(labels).tolist() == [1000] * 10
    assert images.max() == 255 and images[:, 0, 0].mean() < 5  # white garments on black


def test_epoch_sampler_is_a_function_of_the_step():
    a = fm.EpochSampler(10, 3, seed=1)
    seq = [a.indices(s).tolist() for s in range(7)]
    b = fm.EpochSampler(10, 3, seed=1)
    assert [b.indices(s).tolist() for s in (6, 2, 5)] == [seq[6], seq[2], seq[5]]
    assert sorted(sum(seq[:3], [])) == sorted(set(sum(seq[:3], [])))  # no repeats inside an epoch


def test_captions_name_class_and_colour():
    rng = np.random.default_rng(0)
    for label in range(10):
        for color in fm.COLORS:
            caption = fm.make_caption(label, color, rng)
            assert color in caption and any(w in caption for w in fm.CLASS_WORDS[label])
    assert fm.prompt_for(9, "orange") == "a photo of an orange ankle boot"
    rgb = fm.tint(np.full((1, 2, 2), 255, np.uint8), np.array([[1.0, 0.5, 0.0]]))
    assert rgb.shape == (1, 3, 2, 2) and rgb[0, :, 0, 0].tolist() == [1.0, 0.5, 0.0]


def test_ema_follows_the_weights():
    from diffusekit.training.ema import EMA

    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(1.0)
    start = ema.shadow["weight"].clone()
    ema.update(model)  # first update: decay min(0.5, 1/10) = 0.1
    torch.testing.assert_close(ema.shadow["weight"], 0.1 * start + 0.9)
    other = torch.nn.Linear(2, 1)
    ema.copy_to(other)
    torch.testing.assert_close(other.weight, ema.shadow["weight"])


def test_resume_equals_uninterrupted_run(tmp_path):
    straight = train(tmp_path / "a", "--steps", "6", "--checkpoint-every", "0")
    train(tmp_path / "b", "--steps", "6", "--checkpoint-every", "0", "--stop-after", "3")
    first_half = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert first_half["step"] == 3
    resumed = train(tmp_path / "b", "--steps", "6", "--checkpoint-every", "0")
    assert resumed["step"] == straight["step"] == 6
    assert resumed["losses"] == straight["losses"]
    for group in ("modules", "ema", "optimizer", "rng"):
        _assert_same(resumed[group], straight[group], group)
    # a resume with other settings is refused
    with pytest.raises(ValueError, match="batch_size: 4 -> 2"):
        train(tmp_path / "b", "--steps", "7", "--batch-size", "2")


def _assert_same(a, b, where):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=where)
    else:
        assert a == b, where


def test_exported_pipeline_loads_in_diffusekit_and_diffusers(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from diffusekit import DDPMPipeline

    train(tmp_path / "run", "--steps", "3")
    folder = tmp_path / "run" / "pipeline"
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert log["steps"] == 3 and "train unconditional" in log["command"]

    ours = DDPMPipeline.from_pretrained(folder)
    theirs = diffusers.DDPMPipeline.from_pretrained(folder)
    theirs.set_progress_bar_config(disable=True)
    kwargs = dict(batch_size=2, num_inference_steps=4, output_type="np")
    a = ours(generator=torch.manual_seed(0), **kwargs).images
    b = theirs(generator=torch.manual_seed(0), **kwargs).images
    assert a.shape == (2, 28, 28, 1)
    np.testing.assert_allclose(a, b, atol=1e-5)
    # the exported weights are the EMA's, not the raw ones
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    torch.testing.assert_close(ours.unet.state_dict()["conv_out.weight"], ckpt["ema"]["unet"]["shadow"]["conv_out.weight"])


def test_loss_plot(tmp_path):
    from PIL import Image

    from diffusekit.training.plot import plot_losses

    path = plot_losses(tmp_path / "loss.png", np.exp(-np.linspace(0, 3, 300)) + 0.01)
    image = Image.open(path)
    assert image.size == (640, 400)
    assert len(set(image.getdata())) > 2  # something was drawn


def test_cli_help_lists_training_commands(capsys):
    from diffusekit.__main__ import main

    with pytest.raises(SystemExit):
        main(["train", "unconditional", "--help"])
    assert "--output-dir" in capsys.readouterr().out


def _has_open_clip() -> bool:
    import importlib.util

    return importlib.util.find_spec("open_clip") is not None


needs_clip_vocab = pytest.mark.skipif(not _has_open_clip(), reason="the CLIP vocabulary comes from open-clip-torch: "
                                      "`pip install --no-deps open-clip-torch` (setup.sh --test or --train)")


@needs_clip_vocab
def test_clip_tokenizer_from_the_open_clip_table_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from diffusekit.training.tokenizer import build_clip_tokenizer

    ours = build_clip_tokenizer(32)
    assert len(ours._vocab) == 49408
    ours.save_pretrained(tmp_path)
    theirs = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    prompts = ["a photo of a red ankle boot, product shot", "An ORANGE pair of trousers!", ""]
    kwargs = dict(padding="max_length", max_length=32, truncation=True)
    assert ours(prompts, **kwargs).input_ids == theirs(prompts, **kwargs).input_ids
    assert ours("a red sneaker").input_ids == [49406, 320, 736, 24781, 49407]


@needs_clip_vocab
def test_text_to_image_exports_an_sd_folder_that_diffusers_loads(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from diffusekit import DiffusionPipeline, StableDiffusionPipeline

    cli_main([
        "train", "text-to-image", "--output-dir", str(tmp_path), "--dataset", "synthetic", "--limit", "32",
        "--steps", "2", "--vae-steps", "2", "--batch-size", "4", "--vae-batch-size", "4", "--latent-images", "32",
        "--vae-block-out-channels", "16,16,16", "--unet-block-out-channels", "16,32", "--text-layers", "1",
        "--max-length", "16", "--num-samples", "0", "--no-progress", "--threads", "1",
    ])
    folder = tmp_path / "pipeline"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert {p.name for p in folder.iterdir()} >= {"model_index.json", "vae", "text_encoder", "tokenizer", "unet",
                                                  "scheduler"}
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] != 0.18215  # measured on the training latents

    ours = DiffusionPipeline.from_pretrained(folder)
    assert isinstance(ours, StableDiffusionPipeline)
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=3, guidance_scale=4.0, output_type="np")
    prompts = ["a photo of a red sneaker", "a blue bag"]
    a = ours(prompts, generator=torch.manual_seed(0), **kwargs).images
    b = theirs(prompts, generator=torch.manual_seed(0), **kwargs).images
    assert a.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(a, b, atol=1e-5)
