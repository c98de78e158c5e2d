"""Safety checker: the CLIP vision tower, the concept rule (with its special-care adjustment), the CLIP image
preprocessing, both checkpoint spellings, and an SD pipeline that flags and blacks out images, against diffusers and
transformers."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

import diffusekit
from diffusekit.models.clip_vision import CLIPVisionModel
from diffusekit.pipelines.image_processor import CLIPImageProcessor, numpy_to_pil

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
skimage_data = pytest.importorskip("skimage.data")
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker as RefChecker  # noqa
from sd_assets import build_tiny_sd  # noqa: E402

VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
CLIP_CONFIG = dict(text_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2),
                   vision_config=VISION, projection_dim=16)
PROCESSOR = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def ref_checker(seed: int = 0) -> RefChecker:
    torch.manual_seed(seed)
    return RefChecker(transformers.CLIPConfig(**CLIP_CONFIG)).eval()


def to_hub_spelling(folder) -> None:
    """Rewrite a transformers-5 checkpoint with the keys of the SD checkpoints on the Hub (transformers 4)."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    state = load_file(path)
    state = {(f"vision_model.{k}" if k.startswith("vision_model.") else k): v for k, v in state.items()}
    state["vision_model.vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    save_file(state, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def photos():
    return [Image.fromarray(skimage_data.chelsea()), Image.fromarray(skimage_data.coffee()),
            Image.fromarray(skimage_data.astronaut()).convert("RGBA"), Image.fromarray(skimage_data.camera()),
            Image.fromarray(skimage_data.chelsea()).resize((20, 50))]


# ---------------------------------------------------------------------------------------------------- vision tower


def test_vision_tower_matches_transformers(tmp_path):
    torch.manual_seed(0)
    ref = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)).eval()
    ref.save_pretrained(tmp_path / "ref")
    ours = CLIPVisionModel.from_pretrained(tmp_path / "ref")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = ours(pixels, output_hidden_states=True), ref(pixels, output_hidden_states=True)
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.pooler_output, b.pooler_output, rtol=1e-5, atol=1e-5)
    for x, y in zip(a.hidden_states, b.hidden_states, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    ours.save_pretrained(tmp_path / "ours")  # transformers reads what we write
    back = transformers.CLIPVisionModel.from_pretrained(tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(back(pixels).pooler_output, b.pooler_output, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="32x32"):
        ours(torch.zeros(1, 3, 16, 16))


# ---------------------------------------------------------------------------------------------------- the checker


def rigged_checker(tmp_path) -> tuple[RefChecker, torch.Tensor]:
    """A diffusers checker whose concepts flag image 0 outright and image 1 only through the special-care
    adjustment (its concept score is 0.005 below the threshold, and a special-care concept fires); image 2 is clean
    only through diffusers' rounding of the scores to 3 decimals."""
    ref = ref_checker()
    clip_input = torch.randn(3, 3, 32, 32, generator=torch.manual_seed(1))
    with torch.no_grad():
        embeds = ref.visual_projection(ref.vision_model(clip_input)[1])
        unit = torch.nn.functional.normalize(embeds)
        assert (unit @ unit.T - torch.eye(3)).max() < 0.99  # distinct images: the thresholds below separate them
        ref.concept_embeds_weights.fill_(2.0)  # nothing flags ...
        ref.special_care_embeds_weights.fill_(2.0)
        ref.concept_embeds[0] = embeds[0]
        ref.concept_embeds_weights[0] = 0.995  # ... but image 0 (cosine 1)
        ref.special_care_embeds[1] = embeds[1]
        ref.special_care_embeds_weights[1] = 0.995  # image 1 is special-care: +0.01 on its concept scores
        ref.concept_embeds[1] = embeds[1]
        ref.concept_embeds_weights[1] = 1.005  # image 1: 1 - 1.005 = -0.005, flagged only with the adjustment
        ref.concept_embeds[2] = embeds[2]
        ref.concept_embeds_weights[2] = 0.9996  # image 2: +0.0004, which rounds to 0.000: not flagged
    ref.save_pretrained(tmp_path)
    return ref, clip_input


def test_checker_flags_like_diffusers(tmp_path, caplog):
    ref, clip_input = rigged_checker(tmp_path)
    ours = diffusekit.StableDiffusionSafetyChecker.from_pretrained(tmp_path)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    expected_images, expected = ref(clip_input=clip_input, images=images.clone())
    assert expected == [True, True, False]  # the rig works in diffusers
    with caplog.at_level(logging.WARNING):
        got_images, got = ours(clip_input=clip_input, images=images)
    assert got == expected
    torch.testing.assert_close(got_images, expected_images, rtol=0, atol=0)
    assert torch.equal(got_images[2], images[2]) and not got_images[:2].any()
    assert "NSFW" in caplog.text
    arrays = images.permute(0, 2, 3, 1).numpy()  # numpy images (B, H, W, C) are blacked out too
    blacked, _ = ours(clip_input=clip_input, images=arrays)
    assert isinstance(blacked, np.ndarray) and not blacked[:2].any() and np.array_equal(blacked[2], arrays[2])


def test_both_checkpoint_spellings_load_and_we_write_the_hubs(tmp_path):
    ref = ref_checker(seed=3)
    ref.save_pretrained(tmp_path / "t5")  # transformers 5: vision_model.embeddings...
    ref.save_pretrained(tmp_path / "hub")
    to_hub_spelling(tmp_path / "hub")  # the Hub: vision_model.vision_model.embeddings..., plus position_ids
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = ref.visual_projection(ref.vision_model(pixels)[1])
    for name in ("t5", "hub"):
        ours = diffusekit.StableDiffusionSafetyChecker.from_pretrained(tmp_path / name)
        with torch.no_grad():
            torch.testing.assert_close(ours.image_embeds(pixels), expected, rtol=1e-5, atol=1e-5)
    ours.save_pretrained(tmp_path / "ours")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ours" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "vision_model.vision_model.embeddings.patch_embedding.weight" in keys
    assert {"visual_projection.weight", "concept_embeds", "special_care_embeds", "concept_embeds_weights",
            "special_care_embeds_weights"} <= keys
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["model_type"] == "clip" and config["vision_config"]["hidden_size"] == 32
    back = RefChecker.from_pretrained(tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(back.visual_projection(back.vision_model(pixels)[1]), expected, rtol=1e-5,
                                   atol=1e-5)


# ---------------------------------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("config", [{}, PROCESSOR, dict(size={"shortest_edge": 40}, crop_size={"height": 48,
                                                                                              "width": 24})])
def test_clip_image_processor_matches_transformers(photos, config):
    ours, ref = CLIPImageProcessor(**config), transformers.CLIPImageProcessor(**config)
    for image in photos:  # odd sizes, RGBA (onto white), grayscale, smaller than the crop (zero padded)
        a = ours(image, return_tensors="pt").pixel_values
        b = ref(image, return_tensors="pt").pixel_values
        assert a.dtype == torch.float32 and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(ours(photos[:2]).pixel_values, ref(photos[:2], return_tensors="pt").pixel_values,
                               rtol=0, atol=0)


def test_preprocessor_config_files(tmp_path, photos):
    CLIPImageProcessor(**PROCESSOR).save_pretrained(tmp_path / "ours")
    loaded = transformers.CLIPImageProcessor.from_pretrained(tmp_path / "ours")
    torch.testing.assert_close(loaded(photos[0], return_tensors="pt").pixel_values,
                               CLIPImageProcessor(**PROCESSOR)(photos[0]).pixel_values, rtol=0, atol=0)
    old = tmp_path / "old"  # an SD 1.x feature_extractor/ file: ints and the old class name
    old.mkdir()
    (old / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 32, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 32}))
    ours = diffusekit.CLIPFeatureExtractor.from_pretrained(old)
    assert ours.size == {"shortest_edge": 32} and ours.crop_size == {"height": 32, "width": 32}
    expected = transformers.CLIPImageProcessor(**PROCESSOR)(photos[1], return_tensors="pt").pixel_values
    torch.testing.assert_close(ours(photos[1]).pixel_values, expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------- in a pipeline


@pytest.fixture(scope="module")
def checked_folder(tmp_path_factory):
    """A tiny SD pipeline with a safety checker and feature extractor, saved by diffusers."""
    base = diffusers.StableDiffusionPipeline.from_pretrained(build_tiny_sd(tmp_path_factory.mktemp("sd")))
    pipe = diffusers.StableDiffusionPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
        scheduler=diffusers.DDIMScheduler.from_config(base.scheduler.config), safety_checker=ref_checker(seed=5),
        feature_extractor=transformers.CLIPImageProcessor(**PROCESSOR),
    )
    folder = tmp_path_factory.mktemp("checked")
    pipe.save_pretrained(folder)
    return folder


def test_pipeline_flags_and_blacks_out_like_diffusers(checked_folder):
    index = json.loads((checked_folder / "model_index.json").read_text())
    assert index["safety_checker"] == ["stable_diffusion", "StableDiffusionSafetyChecker"]
    ours = diffusekit.DiffusionPipeline.from_pretrained(checked_folder)
    ref = diffusers.DiffusionPipeline.from_pretrained(checked_folder)
    assert isinstance(ours.safety_checker, diffusekit.StableDiffusionSafetyChecker)
    assert isinstance(ours.feature_extractor, CLIPImageProcessor)
    prompts = ["a red sneaker", "an ankle boot"]

    def run(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(prompts, num_inference_steps=2, generator=torch.manual_seed(0), output_type="np")

    clean = run(ours)
    assert clean.nsfw_content_detected == [False, False] == run(ref).nsfw_content_detected
    # a threshold between the two images' scores on concept 0 flags exactly one of them
    pixels = ours.feature_extractor(numpy_to_pil(clean.images))  # what the pipeline hands the checker
    with torch.no_grad():
        embeds = ours.safety_checker.image_embeds(pixels.pixel_values)
        cos = torch.nn.functional.normalize(embeds) @ torch.nn.functional.normalize(
            ours.safety_checker.concept_embeds[:1]).T
    low, high = sorted(cos[:, 0].tolist())
    assert high - low > 0.01, "the two images score too alike to separate"
    for pipe in (ours, ref):
        with torch.no_grad():
            pipe.safety_checker.concept_embeds_weights[0] = (low + high) / 2
    a, b = run(ours), run(ref)
    assert a.nsfw_content_detected == b.nsfw_content_detected
    assert sorted(a.nsfw_content_detected) == [False, True]
    assert np.abs(a.images - b.images).max() < 1 / 255
    flagged = a.nsfw_content_detected.index(True)
    assert not a.images[flagged].any()  # black
    np.testing.assert_allclose(a.images[1 - flagged], clean.images[1 - flagged], atol=1e-6)


def test_safety_checker_none_warns_once(checked_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="diffusekit"):
        pipe = diffusekit.StableDiffusionPipeline.from_pretrained(checked_folder, safety_checker=None)
    assert sum("without a safety checker" in r.getMessage() for r in caplog.records) == 1
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a red sneaker", num_inference_steps=1, output_type="np").nsfw_content_detected is None
    with pytest.raises(ValueError, match="feature_extractor"):
        diffusekit.StableDiffusionPipeline.from_pretrained(checked_folder, feature_extractor=None)


def test_image_pipelines_screen_their_output_too(checked_folder):
    """img2img and inpainting reuse the text-to-image pipeline's screening: with a concept every image matches,
    everything comes back black and flagged, as in diffusers."""
    photo = Image.fromarray(skimage_data.astronaut()).resize((32, 32))
    mask = Image.new("L", (32, 32))
    mask.paste(255, (8, 8, 24, 24))
    ours = diffusekit.AutoPipelineForImage2Image.from_pretrained(checked_folder)
    ref = diffusers.AutoPipelineForImage2Image.from_pretrained(checked_folder)
    with torch.no_grad():
        for pipe in (ours, ref):
            pipe.safety_checker.concept_embeds_weights[3] = -1.0  # every image scores above it
    for make in (lambda p, lib: p, lambda p, lib: lib.AutoPipelineForInpainting.from_pipe(p)):
        outs = []
        for pipe, lib in ((ours, diffusekit), (ref, diffusers)):
            pipe = make(pipe, lib)
            pipe.set_progress_bar_config(disable=True)
            extra = {"mask_image": mask, "height": 32, "width": 32} if "Inpaint" in type(pipe).__name__ else {}
            outs.append(pipe("an astronaut", image=photo, num_inference_steps=2, strength=0.5, output_type="np",
                             generator=torch.manual_seed(0), **extra))
        assert outs[0].nsfw_content_detected == outs[1].nsfw_content_detected == [True]
        assert not outs[0].images.any() and not outs[1].images.any()
