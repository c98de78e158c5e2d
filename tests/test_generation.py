"""generation.generate: per-image seeds, sampler per call, task from inputs, parameters that remake the image."""

from __future__ import annotations

import numpy as np
import pytest

from diffusekit.infotext import GenerationParameters


@pytest.fixture(scope="module")
def sd_pipe():
    from diffusekit import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained("diffusekit-fashion-sd")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _params(**kw):
    base = dict(prompt="a photo of a red dress", negative_prompt="", steps=3, sampler="Euler a", cfg_scale=4.0,
                seed=11, width=32, height=32)
    return GenerationParameters(**{**base, **kw})


def test_image_depends_only_on_its_seed(sd_pipe):
    from diffusekit.generation import generate

    pair = generate(sd_pipe, _params(), batch_size=2)
    assert [p.seed for p in pair.parameters] == [11, 12]
    single = generate(sd_pipe, _params(seed=12))
    a, b = np.asarray(pair.images[1], dtype=int), np.asarray(single.images[0], dtype=int)
    assert np.abs(a - b).max() <= 1  # same noise; batched convolutions may differ in the last bit
    assert not np.array_equal(np.asarray(pair.images[0]), np.asarray(pair.images[1]))


def test_sampler_is_per_call_and_parameters_remake_the_image(sd_pipe):
    from diffusekit.generation import generate

    before = type(sd_pipe.scheduler).__name__
    first = generate(sd_pipe, _params(sampler="DPM++ 2M", schedule_type="Karras"))
    assert type(sd_pipe.scheduler).__name__ == before
    text = first.parameters[0].to_infotext()
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in text
    again = generate(sd_pipe, GenerationParameters.from_infotext(text))
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(again.images[0]))


def test_random_seed_is_recorded(sd_pipe):
    from diffusekit.generation import generate

    result = generate(sd_pipe, _params(seed=-1, steps=1))
    assert 0 <= result.parameters[0].seed < 2**32


def test_image_and_mask_pick_the_task(sd_pipe):
    from PIL import Image

    from diffusekit.generation import generate, task_of

    init = Image.new("RGB", (32, 32), "white")
    mask = Image.new("L", (32, 32), 255)
    assert task_of() == "text-to-image" and task_of(init) == "image-to-image" and task_of(init, mask) == "inpainting"
    with pytest.raises(ValueError, match="mask needs an image"):
        task_of(None, mask)
    out = generate(sd_pipe, _params(denoising_strength=0.5, steps=4), image=init)
    assert out.images[0].size == (32, 32)
    out = generate(sd_pipe, _params(steps=2), image=init, mask=mask)
    assert out.images[0].size == (32, 32)


def test_inpainted_image_depends_only_on_its_seed(sd_pipe):
    """Inpainting encodes one image once per call; generate gives each output image its own copy, so image i of a
    batch equals the single image of seed + i (as for text-to-image and img2img)."""
    from PIL import Image, ImageDraw

    from diffusekit.generation import generate

    init = Image.new("RGB", (32, 32), (30, 90, 200))
    ImageDraw.Draw(init).ellipse((4, 6, 28, 26), fill=(220, 200, 40))
    mask = Image.new("L", (32, 32), 0)
    ImageDraw.Draw(mask).rectangle((8, 0, 23, 31), fill=255)
    pair = generate(sd_pipe, _params(steps=2, denoising_strength=0.9), batch_size=2, image=init, mask=mask)
    single = generate(sd_pipe, _params(steps=2, denoising_strength=0.9, seed=12), image=init, mask=mask)
    a, b = np.asarray(pair.images[1], dtype=int), np.asarray(single.images[0], dtype=int)
    assert np.abs(a - b).max() <= 1  # batched convolutions may differ in the last bit


def test_unconditional_pipeline():
    from diffusekit import DiffusionPipeline
    from diffusekit.generation import generate

    pipe = DiffusionPipeline.from_pretrained("diffusekit-fashion-ddpm")
    pipe.set_progress_bar_config(disable=True)
    out = generate(pipe, GenerationParameters(steps=2, seed=3, sampler="DDIM", cfg_scale=7.5), batch_size=2)
    assert [p.seed for p in out.parameters] == [3, 4] and out.parameters[0].width == 28
    assert "CFG scale" not in out.parameters[0].to_infotext()  # guidance does not apply to unconditional models
