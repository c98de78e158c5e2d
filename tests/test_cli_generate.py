"""``diffusekit generate``: per-image PNGs with A1111 parameters, --from-png regenerates the same pixels, flags for
negative prompt, size, sampler, seed, img2img / inpaint, prompt syntax; the README main job's grid."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffusekit.__main__ import main
from diffusekit.infotext import GenerationParameters, read_parameters

SD = "diffusekit-fashion-sd"
FAST = ["--steps", "3", "--width", "32", "--height", "32"]


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def params_of(path) -> GenerationParameters:
    return GenerationParameters.from_infotext(read_parameters(path))


def test_images_carry_parameters_and_from_png_remakes_them(tmp_path, capsys):
    out = tmp_path / "shoes.png"
    assert main(["generate", SD, "--prompt", "a photo of a (red:1.2) sneaker", "--negative-prompt", "blurry",
                 "--sampler", "DPM++ 2M Karras", "--seed", "5", "--num-images", "2", "--batch-size", "1",
                 "--guidance-scale", "4", *FAST, "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    first, second = tmp_path / "shoes-00.png", tmp_path / "shoes-01.png"
    assert pixels(out).shape == (32, 64, 3)  # the grid: two 32x32 images side by side
    p = params_of(second)
    assert (p.prompt, p.negative_prompt, p.seed, p.steps, p.cfg_scale, p.width, p.height) == \
        ("a photo of a (red:1.2) sneaker", "blurry", 6, 3, 4.0, 32, 32)
    assert (p.sampler, p.schedule_type, p.model, p.model_hash) == ("DPM++ 2M", "Karras", SD, None)
    assert params_of(first).seed == 5 and params_of(out).seed == 5  # the grid carries the first image's
    assert "Prompt syntax" not in read_parameters(second)  # A1111 syntax is the default, not recorded

    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(second), "--out", str(again)]) == 0  # model from the PNG
    assert np.array_equal(pixels(again), pixels(second))
    assert read_parameters(again) == read_parameters(second)
    # a flag overrides what the PNG says
    other = tmp_path / "other.png"
    assert main(["generate", SD, "--from-png", str(second), "--seed", "7", "--out", str(other)]) == 0
    assert params_of(other).seed == 7 and not np.array_equal(pixels(other), pixels(second))


def test_prompt_syntax_matters_and_plain_is_recorded(tmp_path):
    a1111, plain = tmp_path / "a.png", tmp_path / "p.png"
    args = ["generate", SD, "--prompt", "a photo of a (blue:1.5) coat", "--num-images", "1", *FAST]
    assert main([*args, "--out", str(a1111)]) == 0
    assert main([*args, "--prompt-syntax", "plain", "--out", str(plain)]) == 0
    assert not np.array_equal(pixels(a1111), pixels(plain))
    assert "Prompt syntax: plain" in read_parameters(plain)
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(plain), "--out", str(again)]) == 0
    assert np.array_equal(pixels(again), pixels(plain))


def test_image_to_image_and_inpainting(tmp_path):
    init = tmp_path / "init.png"
    Image.new("RGB", (32, 32), "white").save(init)
    mask = tmp_path / "mask.png"
    Image.new("L", (32, 32), 255).save(mask)
    out = tmp_path / "i2i.png"
    assert main(["generate", SD, "--prompt", "a red dress", "--image", str(init), "--strength", "0.6",
                 "--num-images", "1", "--steps", "4", "--out", str(out)]) == 0
    p = params_of(out)
    assert p.denoising_strength == 0.6 and pixels(out).shape == (32, 32, 3)
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(out), "--image", str(init), "--out", str(again)]) == 0
    assert np.array_equal(pixels(again), pixels(out))
    out = tmp_path / "inpaint.png"
    assert main(["generate", SD, "--prompt", "a red dress", "--image", str(init), "--mask", str(mask),
                 "--num-images", "1", *FAST, "--out", str(out)]) == 0
    assert pixels(out).shape == (32, 32, 3) and params_of(out).denoising_strength is None


def test_unconditional_grid_like_the_readme_main_job(tmp_path):
    out = tmp_path / "grid.png"
    assert main(["generate", "diffusekit-fashion-ddpm", "--steps", "2", "--num-images", "4", "--out", str(out)]) == 0
    assert Image.open(out).size == (56, 56)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid-00.png", "grid-01.png", "grid-02.png",
                                                          "grid-03.png", "grid.png"]
    assert [params_of(tmp_path / f"grid-0{i}.png").seed for i in range(4)] == [0, 1, 2, 3]


def test_clear_errors(tmp_path):
    bare = tmp_path / "bare.png"
    Image.new("RGB", (8, 8)).save(bare)
    with pytest.raises(SystemExit, match="no A1111 'parameters' text chunk"):
        main(["generate", SD, "--from-png", str(bare)])
    with pytest.raises(SystemExit, match="--mask needs --image"):
        main(["generate", SD, "--mask", str(bare)])
    with pytest.raises(SystemExit, match="name a model"):
        main(["generate", "--prompt", "x"])
    with pytest.raises(SystemExit, match="no such file"):
        main(["generate", SD, "--image", str(tmp_path / "missing.png")])


def test_unknown_sampler_fails_before_loading():
    with pytest.raises(SystemExit, match=r"unknown sampler name 'DPM\+\+ 9M'"):
        main(["generate", "no-such-model", "--sampler", "DPM++ 9M"])


def test_embedding_flag(tmp_path):
    import torch
    from safetensors.torch import save_file

    emb = tmp_path / "redstyle.safetensors"
    save_file({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(0))}, emb)
    out, plain = tmp_path / "ti.png", tmp_path / "plain.png"
    args = ["generate", SD, "--prompt", "a photo of a dress, redstyle", "--num-images", "1", *FAST]
    assert main([*args, "--embedding", str(emb), "--out", str(out)]) == 0
    assert main([*args, "--out", str(plain)]) == 0
    assert not np.array_equal(pixels(out), pixels(plain))
    from diffusekit.infotext import embedding_hash

    assert params_of(out).extra["TI hashes"] == f"redstyle: {embedding_hash(emb)}"  # A1111's 12 hex digits
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(out), "--embedding", f"{emb}:redstyle", "--out", str(again)]) == 0
    assert np.array_equal(pixels(again), pixels(out))
    with pytest.raises(SystemExit, match="--embedding .*missing.pt: no such file"):
        main([*args, "--embedding", str(tmp_path / "missing.pt")])


def test_single_file_model(tmp_path):
    from diffusekit import StableDiffusionPipeline
    from diffusekit.infotext import model_hash

    single = tmp_path / "fashion.safetensors"
    StableDiffusionPipeline.from_pretrained(SD).save_single_file(single)
    args = ["generate", "--prompt", "a photo of a green bag", "--num-images", "1", "--seed", "3", *FAST]
    folder_out, file_out = tmp_path / "folder.png", tmp_path / "file.png"
    assert main([*args[:1], SD, *args[1:], "--out", str(folder_out)]) == 0
    assert main([*args[:1], str(single), *args[1:], "--config", SD, "--out", str(file_out)]) == 0
    p = params_of(file_out)
    assert (p.model, p.model_hash) == ("fashion", model_hash(single))
    assert np.array_equal(pixels(file_out), pixels(folder_out))
    with pytest.raises(SystemExit, match="--config applies to single-file"):
        main(["generate", SD, "--config", SD])
