"""The models that ship inside the package: they load by name, offline, and diffusers reads the same folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffusekit.hub import BUNDLED_DIR, bundled_models

DDPM = "diffusekit-fashion-ddpm"
SD = "diffusekit-fashion-sd"


def _folder_bytes(name: str) -> int:
    return sum(p.stat().st_size for p in (BUNDLED_DIR / name).rglob("*") if p.is_file())


def test_bundled_models_are_listed_and_small():
    names = bundled_models()
    assert DDPM in names
    assert _folder_bytes(DDPM) <= 10 * 2**20
    assert sum(_folder_bytes(n) for n in names) <= 30 * 2**20
    for name in names:
        assert (BUNDLED_DIR / name / "README.md").is_file(), f"{name} has no model card"


def test_fashion_ddpm_loads_by_name_and_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    from diffusekit import DDPMPipeline, DiffusionPipeline

    pipe = DDPMPipeline.from_pretrained(DDPM)
    assert type(DiffusionPipeline.from_pretrained(DDPM)) is DDPMPipeline
    assert pipe.unet.config.sample_size == 28 and pipe.unet.config.in_channels == 1
    theirs = diffusers.DDPMPipeline.from_pretrained(BUNDLED_DIR / DDPM)
    theirs.set_progress_bar_config(disable=True)
    kwargs = dict(batch_size=2, num_inference_steps=4, output_type="np")
    a = pipe(generator=torch.manual_seed(0), **kwargs).images
    b = theirs(generator=torch.manual_seed(0), **kwargs).images
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert a.shape == (2, 28, 28, 1)
    # a trained model: garments are bright on a black background, not noise
    assert a[:, 0, :, 0].mean() < 0.15 and a.mean() > 0.1


@pytest.mark.skipif(SD not in bundled_models(), reason=f"{SD} is not bundled")
def test_fashion_sd_loads_by_name_and_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from diffusekit import DiffusionPipeline, StableDiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(SD)
    assert isinstance(pipe, StableDiffusionPipeline)
    index = json.loads((BUNDLED_DIR / SD / "model_index.json").read_text())
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert len(pipe.tokenizer("a red sneaker").input_ids) == 5  # the real CLIP vocabulary: one token per word
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(BUNDLED_DIR / SD, safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=4, guidance_scale=4.0, output_type="np")
    prompts = ["a photo of a red sneaker", "a blue bag"]
    a = pipe(prompts, generator=torch.manual_seed(0), **kwargs).images
    b = theirs(prompts, generator=torch.manual_seed(0), **kwargs).images
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert a.shape == (2, 32, 32, 3)
