"""DDPM / DDIM pipelines: parity with diffusers on a tiny random UNet, loading, saving, outputs, concurrency."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

import diffusekit
from conftest import assert_close

diffusers = pytest.importorskip("diffusers")

UNET = dict(
    sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8, attention_head_dim=8,
)


@pytest.fixture(scope="module")
def ddpm_folder(tmp_path_factory):
    """A DDPM pipeline saved by diffusers: the format users download."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ddpm")
    unet = diffusers.UNet2DModel(**UNET)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    return folder


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_ddpm_pipeline_parity(ddpm_folder):
    ours = quiet(diffusekit.DDPMPipeline.from_pretrained(ddpm_folder, use_safetensors=True))
    ref = quiet(diffusers.DDPMPipeline.from_pretrained(ddpm_folder, use_safetensors=True))
    a = ours(batch_size=2, num_inference_steps=10, generator=torch.manual_seed(0), output_type="np").images
    b = ref(batch_size=2, num_inference_steps=10, generator=torch.manual_seed(0), output_type="np").images
    assert a.shape == (2, 16, 16, 3)
    assert np.abs(a - b).max() < 1 / 255


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_pipeline_parity(ddpm_folder, eta):
    ours = quiet(diffusekit.DDIMPipeline.from_pretrained(ddpm_folder))
    ref = quiet(diffusers.DDIMPipeline.from_pretrained(ddpm_folder))
    assert type(ours.scheduler).__name__ == "DDIMScheduler"  # converted from the folder's DDPM config
    a = ours(batch_size=2, num_inference_steps=8, eta=eta, generator=torch.manual_seed(3), output_type="np").images
    b = ref(batch_size=2, num_inference_steps=8, eta=eta, generator=torch.manual_seed(3), output_type="np").images
    assert np.abs(a - b).max() < 1 / 255


def test_generic_pipeline_dispatches_on_model_index(ddpm_folder):
    pipe = diffusekit.DiffusionPipeline.from_pretrained(ddpm_folder)
    assert isinstance(pipe, diffusekit.DDPMPipeline)
    assert isinstance(pipe.unet, diffusekit.UNet2DModel) and isinstance(pipe.scheduler, diffusekit.DDPMScheduler)
    assert set(pipe.components) == {"unet", "scheduler"}
    assert pipe.device == torch.device("cpu") and pipe.dtype == torch.float32


def test_list_of_generators_seeds_each_image(ddpm_folder):
    # DDIM with eta=0 is deterministic after the initial noise, so image 2 of a pair seeded [1, 2] must equal a
    # lone image seeded 2
    ddim = quiet(diffusekit.DDIMPipeline.from_pretrained(ddpm_folder))
    seeded = lambda s: torch.Generator().manual_seed(s)  # noqa: E731  (torch.manual_seed returns one global object)
    pair = ddim(batch_size=2, num_inference_steps=3, output_type="np", generator=[seeded(1), seeded(2)]).images
    single = ddim(batch_size=1, num_inference_steps=3, output_type="np", generator=seeded(2)).images
    np.testing.assert_allclose(pair[1], single[0], atol=1e-5)
    with pytest.raises(ValueError, match="generators"):
        ddim(batch_size=3, num_inference_steps=2, generator=[seeded(1), seeded(2)])


def test_output_types_and_return_dict(ddpm_folder):
    pipe = quiet(diffusekit.DDIMPipeline.from_pretrained(ddpm_folder))
    run = lambda **kw: pipe(num_inference_steps=2, generator=torch.manual_seed(0), **kw)  # noqa: E731
    pil = run().images
    assert len(pil) == 1 and pil[0].size == (16, 16) and pil[0].mode == "RGB"
    array = run(output_type="np").images
    tensor = run(output_type="pt").images
    assert tensor.shape == (1, 3, 16, 16)
    assert_close(tensor.permute(0, 2, 3, 1).numpy(), array)
    assert np.array_equal(np.asarray(pil[0]), (array[0] * 255).round().astype(np.uint8))
    (images,) = run(return_dict=False)
    assert len(images) == 1
    with pytest.raises(ValueError, match="output_type"):
        run(output_type="jpeg")


def test_bad_call_arguments(ddpm_folder):
    pipe = quiet(diffusekit.DDPMPipeline.from_pretrained(ddpm_folder))
    with pytest.raises(ValueError, match="batch_size"):
        pipe(batch_size=0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe(num_inference_steps=0)


def test_our_save_loads_in_diffusers(ddpm_folder, tmp_path):
    ours = diffusekit.DDPMPipeline.from_pretrained(ddpm_folder)
    ours.save_pretrained(tmp_path / "resaved")
    index = json.loads((tmp_path / "resaved" / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline" and index["unet"] == ["diffusers", "UNet2DModel"]
    ref = quiet(diffusers.DiffusionPipeline.from_pretrained(tmp_path / "resaved"))
    ours = quiet(ours)
    a = ours(num_inference_steps=4, generator=torch.manual_seed(0), output_type="np").images
    b = ref(num_inference_steps=4, generator=torch.manual_seed(0), output_type="np").images
    assert np.abs(a - b).max() < 1 / 255


def test_component_override_and_bad_index(ddpm_folder, tmp_path):
    scheduler = diffusekit.DDIMScheduler.from_pretrained(ddpm_folder, subfolder="scheduler")
    pipe = diffusekit.DDPMPipeline.from_pretrained(ddpm_folder, scheduler=scheduler)
    assert pipe.scheduler is scheduler
    with pytest.raises(TypeError, match="unknown argument"):
        diffusekit.DDPMPipeline.from_pretrained(ddpm_folder, vae=None)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline", "unet": ["diffusers", "NoSuchNet"],
                                                          "scheduler": ["diffusers", "DDPMScheduler"]}))
    with pytest.raises(ValueError, match=r"component 'unet'.*'NoSuchNet' is not implemented"):
        diffusekit.DiffusionPipeline.from_pretrained(broken)
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline", "scheduler": ["diffusers", "DDPMScheduler"]}))
    with pytest.raises(ValueError, match=r"component 'unet' is missing"):
        diffusekit.DiffusionPipeline.from_pretrained(broken)
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "FancyPipeline"}))
    with pytest.raises(ValueError, match="FancyPipeline"):
        diffusekit.DiffusionPipeline.from_pretrained(broken)


def test_two_threads_share_one_pipeline(ddpm_folder):
    """Each call works on its own scheduler copy: concurrent calls equal sequential ones."""
    pipe = quiet(diffusekit.DDIMPipeline.from_pretrained(ddpm_folder))
    torch.set_num_threads(1)
    seeds = [0, 1]
    # one generator object per call: torch.manual_seed returns the process-wide generator, which two threads
    # would draw from in an arbitrary interleaving
    sequential = [pipe(num_inference_steps=6, generator=torch.Generator().manual_seed(s), output_type="np").images
                  for s in seeds]
    results: dict[int, np.ndarray] = {}

    def work(seed):
        results[seed] = pipe(num_inference_steps=6, generator=torch.Generator().manual_seed(seed),
                             output_type="np").images

    threads = [threading.Thread(target=work, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seed, expected in zip(seeds, sequential):
        np.testing.assert_array_equal(results[seed], expected)
    assert pipe.scheduler.num_inference_steps is None  # the loaded scheduler itself was never advanced


def test_to_moves_modules_and_dtype(ddpm_folder):
    pipe = diffusekit.DDPMPipeline.from_pretrained(ddpm_folder)
    assert pipe.to(torch.float64).dtype == torch.float64
    assert pipe.unet.dtype == torch.float64


@pytest.mark.parametrize("cls", ["DDPMPipeline", "DDIMPipeline"])
def test_step_callback_sees_replaces_and_interrupts(ddpm_folder, cls):
    """Our extension: callback_on_step_end on the unconditional pipelines (diffusers' have none)."""
    pipe = quiet(getattr(diffusekit, cls).from_pretrained(ddpm_folder))
    plain = pipe(num_inference_steps=4, generator=torch.manual_seed(0), output_type="pt").images
    seen = []

    def watch(p, i, t, tensors):
        seen.append((i, int(t), tensors["latents"].clone(), p.num_timesteps))
        return {}

    watched = pipe(num_inference_steps=4, generator=torch.manual_seed(0), output_type="pt",
                   callback_on_step_end=watch).images
    torch.testing.assert_close(watched, plain, rtol=0, atol=0)  # watching changes nothing
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(4)
    assert [(i, t, n) for i, t, _, n in seen] == [(i, int(t), 4) for i, t in enumerate(scheduler.timesteps)]
    torch.testing.assert_close(((seen[-1][2] / 2 + 0.5).clamp(0, 1)), plain)  # the last step's sample is the image
    assert not torch.equal(seen[0][2], seen[-1][2])
    # a returned sample replaces the loop's; pipe._interrupt = True skips the remaining steps
    grey = pipe(num_inference_steps=4, generator=torch.manual_seed(0), output_type="pt",
                callback_on_step_end=lambda p, i, t, x: {"latents": torch.zeros_like(x["latents"])}).images
    assert torch.all(grey == 0.5)
    calls = []

    def stop(p, i, t, tensors):
        calls.append(i)
        p._interrupt = True
        return {}

    early = pipe(num_inference_steps=4, generator=torch.manual_seed(0), output_type="pt",
                 callback_on_step_end=stop).images
    assert calls == [0] and pipe.interrupt
    torch.testing.assert_close(early, (seen[0][2] / 2 + 0.5).clamp(0, 1))
    pipe(num_inference_steps=1, output_type="pt")  # the next call starts afresh
    assert not pipe.interrupt
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs must be among"):
        pipe(num_inference_steps=1, callback_on_step_end=watch, callback_on_step_end_tensor_inputs=["prompt_embeds"])
