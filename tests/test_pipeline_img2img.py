"""StableDiffusionImg2ImgPipeline: parity with diffusers on a tiny random pipeline and a real photo, strength and
step counts, input kinds, batches, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import diffusekit

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
skimage_data = pytest.importorskip("skimage.data")
from sd_assets import build_tiny_sd  # noqa: E402

PROMPT = "a cat on a sofa, oil painting"


@pytest.fixture(scope="module")
def cat():
    """A real photo, resized to an odd size: the pipeline rounds it down to a multiple of the VAE scale factor."""
    return Image.fromarray(skimage_data.chelsea()).resize((37, 29), Image.BICUBIC)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    folder = build_tiny_sd(tmp_path_factory.mktemp("img2img"), pipeline="StableDiffusionImg2ImgPipeline")
    ours = diffusekit.DiffusionPipeline.from_pretrained(folder)
    ref = diffusers.DiffusionPipeline.from_pretrained(folder)
    for pipe in (ours, ref):
        pipe.set_progress_bar_config(disable=True)
    return ours, ref


def run_both(pipes, scheduler_name="DDIMScheduler", seed=0, **kwargs):
    ours, ref = pipes
    ours.scheduler = getattr(diffusekit, scheduler_name).from_config(ours.scheduler.config)
    ref.scheduler = getattr(diffusers, scheduler_name).from_config(ref.scheduler.config)
    kwargs.setdefault("prompt", PROMPT)
    kwargs.setdefault("num_inference_steps", 4)
    kwargs.setdefault("output_type", "np")
    count = kwargs.pop("_generators", None)

    def gen():
        return torch.manual_seed(seed) if count is None else [torch.manual_seed(seed + i) for i in range(count)]

    a = ours(generator=gen(), **kwargs)
    b = ref(generator=gen(), **kwargs)
    return a, b


def assert_images_match(a, b):
    a, b = np.asarray(a.images, dtype=np.float32), np.asarray(b.images, dtype=np.float32)
    assert a.shape == b.shape
    assert np.abs(a - b).max() < 1 / 255


def test_loads_as_img2img(pipes):
    ours, _ = pipes
    assert type(ours) is diffusekit.StableDiffusionImg2ImgPipeline
    assert isinstance(ours.unet, diffusekit.UNet2DConditionModel)


@pytest.mark.parametrize("scheduler_name", [
    "DDIMScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
    "HeunDiscreteScheduler",  # order 2: the start index is counted in scheduler steps
    # PNDM (SD checkpoints' default) differs on purpose when starting part-way: see PNDMScheduler's docstring and
    # test_pndm_img2img below
])
def test_parity_on_a_photo(pipes, cat, scheduler_name):
    a, b = run_both(pipes, scheduler_name, image=cat, strength=0.75)
    assert a.images.shape == (1, 28, 36, 3)  # 29x37 rounded down to multiples of 2 (the tiny VAE's factor)
    assert_images_match(a, b)
    assert a.nsfw_content_detected is None


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_strength_parity(pipes, cat, strength):
    assert_images_match(*run_both(pipes, "EulerDiscreteScheduler", image=cat, strength=strength))


def test_steps_run_is_strength_times_steps(pipes, cat):
    ours, _ = pipes
    ours.scheduler = diffusekit.DDIMScheduler.from_config(ours.scheduler.config)
    schedule = diffusekit.DDIMScheduler.from_config(ours.scheduler.config)
    schedule.set_timesteps(10)
    for strength, expected in ((1.0, 10), (0.75, 7), (0.31, 3)):
        seen = []
        ours(PROMPT, image=cat, strength=strength, num_inference_steps=10, output_type="latent",
             callback_on_step_end=lambda p, i, t, k: seen.append(int(t)) or {})
        assert len(seen) == expected
        assert seen == schedule.timesteps[10 - expected:].tolist()  # the schedule's last steps


def test_tiny_strength_runs_one_step(pipes, cat):
    """Deliberate difference: int(4 * 0.1) == 0 steps would fail in diffusers; we run the last step, which is what
    diffusers runs for a strength giving exactly one step (0.25 of 4)."""
    ours, ref = pipes
    for pipe, mod in ((ours, diffusekit), (ref, diffusers)):
        pipe.scheduler = mod.DDIMScheduler.from_config(pipe.scheduler.config)
    seen = []
    a = ours(PROMPT, image=cat, strength=0.1, num_inference_steps=4, generator=torch.manual_seed(0), output_type="np",
             callback_on_step_end=lambda p, i, t, k: seen.append(int(t)) or {})
    b = ref(PROMPT, image=cat, strength=0.25, num_inference_steps=4, generator=torch.manual_seed(0), output_type="np")
    assert len(seen) == 1
    assert np.abs(a.images - b.images).max() < 1 / 255
    c = ours(PROMPT, image=cat, strength=0.0, num_inference_steps=4, generator=torch.manual_seed(0), output_type="np")
    np.testing.assert_array_equal(c.images, a.images)  # strength 0: also the single last step


def test_batches_and_generator_lists(pipes, cat):
    dog = Image.fromarray(skimage_data.astronaut()).resize((37, 29))
    # two prompts, two images
    assert_images_match(*run_both(pipes, image=[cat, dog], prompt=[PROMPT, "an astronaut"], strength=0.75))
    # one image, several per prompt, one generator each (each image gets its own posterior sample)
    a, b = run_both(pipes, "EulerAncestralDiscreteScheduler", image=cat, num_images_per_prompt=3, strength=0.6,
                    _generators=3)
    assert a.images.shape[0] == 3
    assert_images_match(a, b)
    assert np.abs(a.images[0] - a.images[1]).max() > 1e-3


def test_input_kinds_give_the_same_image(pipes, cat):
    ours, _ = pipes
    ours.scheduler = diffusekit.DDIMScheduler.from_config(ours.scheduler.config)
    pixels = np.asarray(cat.crop((0, 0, 36, 28)), dtype=np.float32) / 255

    def run(image):
        return ours(PROMPT, image=image, strength=0.7, num_inference_steps=3, generator=torch.manual_seed(1),
                    output_type="np").images

    expected = run(cat.crop((0, 0, 36, 28)))
    for image in (pixels, pixels[None], torch.from_numpy(pixels).permute(2, 0, 1), [pixels],
                  (pixels * 255).round().astype(np.uint8), cat.crop((0, 0, 36, 28)).convert("RGBA")):
        np.testing.assert_allclose(run(image), expected, atol=1e-5)


def test_latents_as_image_and_output_types(pipes, cat):
    ours, ref = pipes
    latents = torch.randn(1, 4, 14, 18, generator=torch.manual_seed(3))
    assert_images_match(*run_both(pipes, image=latents, strength=0.5))
    out = ours(PROMPT, image=cat, num_inference_steps=2, output_type="pil", return_dict=False)
    assert isinstance(out, tuple) and out[0][0].size == (36, 28) and out[1] is None
    assert ours(PROMPT, image=cat, num_inference_steps=2, output_type="latent").images.shape == (1, 4, 14, 18)


def test_bad_inputs_have_clear_errors(pipes, cat):
    ours, _ = pipes
    with pytest.raises(ValueError, match="strength"):
        ours(PROMPT, image=cat, strength=1.5)
    with pytest.raises(ValueError, match="strength"):
        ours(PROMPT, image=cat, strength=-0.1)
    with pytest.raises(ValueError, match="image is required"):
        ours(PROMPT)
    with pytest.raises(TypeError, match="PIL image"):
        ours(PROMPT, image="cat.png")
    with pytest.raises(ValueError, match="2 images for 3 prompt"):
        ours([PROMPT] * 3, image=[cat, cat], num_inference_steps=2)
    with pytest.raises(ValueError, match="generators"):
        ours(PROMPT, image=cat, num_inference_steps=2, generator=[torch.manual_seed(0)] * 2)
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        ours(PROMPT, image=cat, callback_on_step_end_tensor_inputs=["mask"])


def test_pndm_img2img(pipes, cat):
    """At strength 1 PNDM matches diffusers; part-way it takes every remaining step (diffusers skips one)."""
    assert_images_match(*run_both(pipes, "PNDMScheduler", image=cat, strength=1.0))
    ours, ref = pipes
    a, b = run_both(pipes, "PNDMScheduler", image=cat, strength=0.5, num_inference_steps=8)
    # diffusers leaves noise behind (one schedule step is skipped), so the two differ visibly
    assert np.abs(np.asarray(a.images) - np.asarray(b.images)).max() > 1 / 255
