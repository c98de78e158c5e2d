"""The GPU checks: the same tiny random pipelines as the CPU suite, run on a CUDA device by diffusekit and by
diffusers in fp32, fp16 and bf16, compared; offload, attention slicing, schedulers, LoRA and ``optimize()`` there.

Marked ``gpu`` and skipped without CUDA (CI has none). Run them on a GPU machine with
``python -m pytest -m gpu tests/test_gpu.py``. Tolerances: fp32 results on a GPU depend on the kernels cuDNN and
cuBLAS pick (TF32 convolutions are on by default in torch), so the two libraries are compared at the 8-bit image
level for fp32 and within a few 8-bit levels for the half types, whose rounding differs by kernel.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffusekit
from sd_assets import build_tiny_sd
from sdxl_assets import build_tiny_sdxl

diffusers = pytest.importorskip("diffusers")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: largest allowed |ours - diffusers| on images in [0, 1], per dtype (fp32: one 8-bit level)
IMAGE_ATOL = {torch.float32: 1 / 255, torch.float16: 4 / 255, torch.bfloat16: 12 / 255}
PROMPT = "a red sneaker on a white table"


def load_pair(folder, dtype, device="cuda"):
    pair = []
    for lib in (diffusekit, diffusers):
        pipe = lib.DiffusionPipeline.from_pretrained(folder, torch_dtype=dtype).to(device)
        pipe.set_progress_bar_config(disable=True)
        pair.append(pipe)
    return pair


def cuda_generator(seed=0):
    return torch.Generator("cuda").manual_seed(seed)


def assert_images_match(ours, ref, atol):
    a, b = np.asarray(ours, dtype=np.float32), np.asarray(ref, dtype=np.float32)
    assert a.shape == b.shape
    assert np.isfinite(a).all()
    diff = np.abs(a - b).max()
    assert diff <= atol, f"max |ours - diffusers| = {diff:.4g} > {atol:.4g}"


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "sd")


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_text_to_image_matches_diffusers_on_cuda(sd_folder, dtype_name):
    dtype = DTYPES[dtype_name]
    ours, ref = load_pair(sd_folder, dtype)
    assert ours.unet.dtype == dtype and ours.device.type == "cuda"
    kwargs = dict(prompt=[PROMPT, "a cat"], num_inference_steps=3, height=32, width=32, output_type="np")
    a = ours(generator=cuda_generator(), **kwargs).images
    b = ref(generator=cuda_generator(), **kwargs).images
    assert_images_match(a, b, IMAGE_ATOL[dtype])


def test_cpu_generator_with_a_cuda_pipeline_gives_the_cpu_noise(sd_folder):
    """diffusers draws the noise on the generator's device and moves it: a CPU seed gives the same image on any
    device. Ours must do the same, and agree with our CPU run."""
    ours, ref = load_pair(sd_folder, torch.float32)
    kwargs = dict(prompt=PROMPT, num_inference_steps=3, height=32, width=32, output_type="np")
    a = ours(generator=torch.manual_seed(0), **kwargs).images
    b = ref(generator=torch.manual_seed(0), **kwargs).images
    assert_images_match(a, b, IMAGE_ATOL[torch.float32])
    cpu = diffusekit.DiffusionPipeline.from_pretrained(sd_folder)
    cpu.set_progress_bar_config(disable=True)
    assert_images_match(a, cpu(generator=torch.manual_seed(0), **kwargs).images, 2 / 255)


@pytest.mark.parametrize("scheduler_name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                                            "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
                                            "HeunDiscreteScheduler", "LMSDiscreteScheduler", "DDIMScheduler"])
def test_schedulers_on_cuda(sd_folder, scheduler_name):
    ours, ref = load_pair(sd_folder, torch.float16)
    ours.scheduler = getattr(diffusekit, scheduler_name).from_config(ours.scheduler.config)
    ref.scheduler = getattr(diffusers, scheduler_name).from_config(ref.scheduler.config)
    kwargs = dict(prompt=PROMPT, num_inference_steps=4, height=32, width=32, output_type="np")
    assert_images_match(ours(generator=cuda_generator(), **kwargs).images,
                        ref(generator=cuda_generator(), **kwargs).images, IMAGE_ATOL[torch.float16])


@pytest.mark.parametrize("pipeline,channels", [("StableDiffusionImg2ImgPipeline", 4),
                                               ("StableDiffusionInpaintPipeline", 9)])
def test_img2img_and_inpaint_on_cuda(tmp_path, pipeline, channels):
    from PIL import Image

    folder = build_tiny_sd(tmp_path / "p", pipeline=pipeline, unet_in_channels=channels)
    ours, ref = load_pair(folder, torch.float16)
    # DDIM: part-way PNDM differs from diffusers on purpose (test_pipeline_img2img.test_pndm_img2img)
    ours.scheduler = diffusekit.DDIMScheduler.from_config(ours.scheduler.config)
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    x = np.linspace(0, 1, 32 * 32 * 3, dtype=np.float32).reshape(32, 32, 3)
    image = Image.fromarray((np.sin(x * 20) * 127 + 128).astype(np.uint8))
    extra = {}
    if channels == 9:
        mask = Image.new("L", (32, 32))
        mask.paste(255, (8, 8, 24, 24))
        extra["mask_image"] = mask
    kwargs = dict(prompt=PROMPT, image=image, strength=0.7, num_inference_steps=4, output_type="np", **extra)
    assert_images_match(ours(generator=cuda_generator(), **kwargs).images,
                        ref(generator=cuda_generator(), **kwargs).images, IMAGE_ATOL[torch.float16])


def test_sdxl_on_cuda(tmp_path):
    folder = build_tiny_sdxl(tmp_path / "xl")
    ours, ref = load_pair(folder, torch.float16)
    kwargs = dict(prompt=PROMPT, num_inference_steps=3, height=32, width=32, output_type="np")
    assert_images_match(ours(generator=cuda_generator(), **kwargs).images,
                        ref(generator=cuda_generator(), **kwargs).images, IMAGE_ATOL[torch.float16])


def test_unconditional_ddpm_on_cuda(tmp_path):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=16, block_out_channels=(16, 32), norm_num_groups=8,
                                 layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    ours, ref = load_pair(tmp_path / "ddpm", torch.float32)
    a = ours(batch_size=2, num_inference_steps=10, generator=cuda_generator(), output_type="np").images
    b = ref(batch_size=2, num_inference_steps=10, generator=cuda_generator(), output_type="np").images
    assert_images_match(a, b, IMAGE_ATOL[torch.float32])


@pytest.mark.parametrize("method", ["enable_model_cpu_offload", "enable_sequential_cpu_offload"])
def test_offload_to_cuda_keeps_the_images(sd_folder, method):
    kwargs = dict(prompt=PROMPT, num_inference_steps=3, height=32, width=32, output_type="np")
    plain = diffusekit.DiffusionPipeline.from_pretrained(sd_folder, torch_dtype=torch.float16).to("cuda")
    plain.set_progress_bar_config(disable=True)
    expected = plain(generator=cuda_generator(), **kwargs).images
    del plain
    pipe = diffusekit.DiffusionPipeline.from_pretrained(sd_folder, torch_dtype=torch.float16)
    pipe.set_progress_bar_config(disable=True)
    getattr(pipe, method)()
    assert pipe._execution_device.type == "cuda"
    assert_images_match(pipe(generator=cuda_generator(), **kwargs).images, expected, 1 / 255)
    if method == "enable_model_cpu_offload":  # every model goes back to the CPU after the call
        assert {p.device.type for p in pipe.unet.parameters()} == {"cpu"}


def test_attention_slicing_and_vae_tiling_on_cuda(sd_folder):
    ours, _ = load_pair(sd_folder, torch.float16)
    kwargs = dict(prompt=PROMPT, num_inference_steps=3, height=32, width=32, output_type="np")
    expected = ours(generator=cuda_generator(), **kwargs).images
    ours.enable_attention_slicing(1)
    ours.enable_vae_slicing()
    assert_images_match(ours(generator=cuda_generator(), **kwargs).images, expected, 2 / 255)


def test_lora_on_cuda_matches_diffusers(sd_folder, tmp_path):
    """A kohya-format LoRA file (LoCon: attention, linear and conv layers) on a fp16 CUDA pipeline, unfused and
    fused, against diffusers + peft."""
    pytest.importorskip("peft")
    from safetensors.torch import save_file
    from test_lora import UNET_PATHS, random_lora  # the CPU suite's writer of kohya keys

    ours, ref = load_pair(sd_folder, torch.float16)
    save_file(random_lora(ours.unet, UNET_PATHS, "kohya", "lora_unet_", alpha=2.0, seed=6),
              tmp_path / "style.safetensors")
    kwargs = dict(prompt=PROMPT, num_inference_steps=3, height=32, width=32, output_type="np")
    plain = ours(generator=cuda_generator(), **kwargs).images
    for pipe in (ours, ref):
        pipe.load_lora_weights(str(tmp_path), weight_name="style.safetensors")
    a = ours(generator=cuda_generator(), **kwargs).images
    assert np.abs(a - plain).max() > 4 / 255  # the LoRA changes the image
    assert_images_match(a, ref(generator=cuda_generator(), **kwargs).images, IMAGE_ATOL[torch.float16])
    for pipe in (ours, ref):
        pipe.fuse_lora()
    assert_images_match(ours(generator=cuda_generator(), **kwargs).images,
                        ref(generator=cuda_generator(), **kwargs).images, IMAGE_ATOL[torch.float16])


def test_optimize_on_cuda_compiles_and_keeps_the_images(sd_folder):
    ours, _ = load_pair(sd_folder, torch.float16)
    kwargs = dict(prompt=PROMPT, num_inference_steps=3, height=32, width=32, output_type="np")
    expected = ours(generator=cuda_generator(), **kwargs).images
    ours.optimize()
    assert_images_match(ours(generator=cuda_generator(), **kwargs).images, expected, 4 / 255)


def test_quantize_on_cuda_is_a_clear_error(sd_folder):
    ours, _ = load_pair(sd_folder, torch.float16)
    with pytest.raises((RuntimeError, ValueError), match="CPU"):
        ours.quantize(["a cat"], num_inference_steps=2)
