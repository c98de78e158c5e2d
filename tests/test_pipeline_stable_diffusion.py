"""StableDiffusionPipeline: parity with diffusers + transformers on a tiny random pipeline, the tutorial's manual
loop, loading rules, and clear errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffusekit

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from sd_assets import build_tiny_sd, load_both  # noqa: E402

PROMPTS = ["a red sneaker", "an ankle boot, product shot"]


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def pipes(sd_folder):
    return load_both(sd_folder, "DiffusionPipeline")


def run_both(pipes, scheduler_name=None, **kwargs):
    ours, ref = pipes
    if scheduler_name:
        ours.scheduler = getattr(diffusekit, scheduler_name).from_config(ours.scheduler.config)
        ref.scheduler = getattr(diffusers, scheduler_name).from_config(ref.scheduler.config)
    kwargs.setdefault("num_inference_steps", 4)
    kwargs.setdefault("output_type", "np")
    a = ours(generator=torch.manual_seed(0), **kwargs)
    b = ref(generator=torch.manual_seed(0), **kwargs)
    return a, b


def test_loads_our_classes_from_a_diffusers_folder(pipes):
    ours, _ = pipes
    assert isinstance(ours, diffusekit.StableDiffusionPipeline)
    # model_index.json says ["transformers", "CLIPTextModel"]: diffusekit's own classes load
    assert isinstance(ours.text_encoder, diffusekit.CLIPTextModel)
    assert isinstance(ours.tokenizer, diffusekit.CLIPTokenizer)
    assert isinstance(ours.unet, diffusekit.UNet2DConditionModel)
    assert isinstance(ours.vae, diffusekit.AutoencoderKL)
    assert ours.safety_checker is None and ours.feature_extractor is None
    assert "transformers" not in type(ours.text_encoder).__module__


@pytest.mark.parametrize(
    "scheduler_name",
    ["PNDMScheduler", "EulerDiscreteScheduler", "UniPCMultistepScheduler", "DDIMScheduler",
     "DPMSolverMultistepScheduler", "EulerAncestralDiscreteScheduler"],
)
def test_text_to_image_parity(pipes, scheduler_name):
    a, b = run_both(pipes, scheduler_name, prompt=PROMPTS[0])
    assert a.images.shape == (1, 16, 16, 3)  # tiny VAE: one downsample, 8x8 latents
    assert np.abs(a.images - b.images).max() < 1 / 255
    assert a.nsfw_content_detected is None


def test_batch_negative_prompt_and_images_per_prompt(pipes):
    a, b = run_both(pipes, "PNDMScheduler", prompt=PROMPTS, negative_prompt=["blurry", "low quality"],
                    num_images_per_prompt=2, guidance_scale=5.0)
    assert a.images.shape == (4, 16, 16, 3)
    assert np.abs(a.images - b.images).max() < 1 / 255


def test_no_guidance_and_guidance_rescale_and_size(pipes):
    a, b = run_both(pipes, "EulerDiscreteScheduler", prompt=PROMPTS[1], guidance_scale=1.0, height=48, width=40)
    assert a.images.shape == (1, 48, 40, 3)
    assert np.abs(a.images - b.images).max() < 1 / 255
    a, b = run_both(pipes, "EulerDiscreteScheduler", prompt=PROMPTS[1], guidance_rescale=0.7)
    assert np.abs(a.images - b.images).max() < 1 / 255


def test_eta_reaches_ddim(pipes):
    a, b = run_both(pipes, "DDIMScheduler", prompt=PROMPTS[0], eta=1.0)
    assert np.abs(a.images - b.images).max() < 1 / 255
    c, _ = run_both(pipes, "DDIMScheduler", prompt=PROMPTS[0], eta=0.0)
    assert np.abs(a.images - c.images).max() > 1e-3  # eta changes the result, so it was passed on


def test_clip_skip_matches_transformers_hidden_states(pipes, sd_folder):
    """clip_skip=1 takes the penultimate layer through the final layer norm, as diffusers documents.

    (diffusers 0.42's own clip_skip path cannot run with transformers 5, so the reference embeddings are built from
    transformers' hidden states and handed to diffusers' pipeline as prompt_embeds.)
    """
    import transformers

    ours, ref = pipes
    tokenizer = transformers.CLIPTokenizer.from_pretrained(sd_folder, subfolder="tokenizer")
    encoder = transformers.CLIPTextModel.from_pretrained(sd_folder, subfolder="text_encoder")
    ids = tokenizer([PROMPTS[0]], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = encoder(ids, output_hidden_states=True).hidden_states[-2]
        norm = getattr(encoder, "text_model", encoder).final_layer_norm
        expected = norm(hidden)
    ours.scheduler = diffusekit.EulerDiscreteScheduler.from_config(ours.scheduler.config)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    a = ours(PROMPTS[0], clip_skip=1, guidance_scale=1.0, num_inference_steps=3, generator=torch.manual_seed(0),
             output_type="np").images
    b = ref(prompt_embeds=expected, guidance_scale=1.0, num_inference_steps=3, generator=torch.manual_seed(0),
            output_type="np").images
    assert np.abs(a - b).max() < 1 / 255
    plain = ours(PROMPTS[0], guidance_scale=1.0, num_inference_steps=3, generator=torch.manual_seed(0),
                 output_type="np").images
    assert np.abs(a - plain).max() > 1e-3  # clip_skip changed the embeddings


def test_clip_skip_applies_to_negative_prompt(pipes):
    ours, _ = pipes
    pos, neg = ours.encode_prompt(PROMPTS[0], do_classifier_free_guidance=True, clip_skip=1)
    expected, _ = ours.encode_prompt("", do_classifier_free_guidance=False, clip_skip=1)
    torch.testing.assert_close(neg, expected)


def test_prompt_embeds_and_latents_inputs(pipes):
    ours, ref = pipes
    embeds, negative = ours.encode_prompt(PROMPTS[0], do_classifier_free_guidance=True)
    latents = torch.randn(1, 4, 8, 8, generator=torch.manual_seed(5))
    a = ours(prompt_embeds=embeds, negative_prompt_embeds=negative, latents=latents, num_inference_steps=3,
             output_type="np").images
    b = ref(prompt_embeds=embeds, negative_prompt_embeds=negative, latents=latents, num_inference_steps=3,
            output_type="np").images
    assert np.abs(a - b).max() < 1 / 255


def test_output_types(pipes):
    ours, ref = pipes
    latent = ours(PROMPTS[0], num_inference_steps=2, generator=torch.manual_seed(0), output_type="latent").images
    assert latent.shape == (1, 4, 8, 8)
    pt = ours(PROMPTS[0], num_inference_steps=2, generator=torch.manual_seed(0), output_type="pt").images
    assert pt.shape == (1, 3, 16, 16) and 0 <= pt.min() and pt.max() <= 1
    pil = ours(PROMPTS[0], num_inference_steps=2, generator=torch.manual_seed(0)).images
    assert pil[0].size == (16, 16)
    images, nsfw = ours(PROMPTS[0], num_inference_steps=2, return_dict=False, output_type="np")
    assert images.shape == (1, 16, 16, 3) and nsfw is None


def test_callback_on_step_end_can_replace_latents(pipes):
    ours, _ = pipes
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append(i)
        return {"latents": torch.zeros_like(tensors["latents"])}

    ours.scheduler = diffusekit.EulerDiscreteScheduler.from_config(ours.scheduler.config)
    out = ours(PROMPTS[0], num_inference_steps=3, output_type="latent", callback_on_step_end=callback).images
    assert seen == [0, 1, 2] and torch.count_nonzero(out) == 0


def test_tutorial_manual_loop_matches_diffusers(sd_folder):
    """The diffusers 'deconstruct the SD pipeline' tutorial, with diffusekit classes, gives diffusers' latents."""

    def tutorial(lib, transformers_lib):
        vae = lib.AutoencoderKL.from_pretrained(sd_folder, subfolder="vae", use_safetensors=True)
        tokenizer = transformers_lib.CLIPTokenizer.from_pretrained(sd_folder, subfolder="tokenizer")
        text_encoder = transformers_lib.CLIPTextModel.from_pretrained(sd_folder, subfolder="text_encoder",
                                                                      use_safetensors=True)
        unet = lib.UNet2DConditionModel.from_pretrained(sd_folder, subfolder="unet", use_safetensors=True)
        scheduler = lib.UniPCMultistepScheduler.from_pretrained(sd_folder, subfolder="scheduler")
        prompt = ["a photograph of an astronaut riding a horse"]
        text_input = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                               truncation=True, return_tensors="pt")
        with torch.no_grad():
            text_embeddings = text_encoder(text_input.input_ids)[0]
        uncond_input = tokenizer([""], padding="max_length", max_length=text_input.input_ids.shape[-1],
                                 return_tensors="pt")
        with torch.no_grad():
            uncond_embeddings = text_encoder(uncond_input.input_ids)[0]
        text_embeddings = torch.cat([uncond_embeddings, text_embeddings])
        latents = torch.randn((1, unet.config.in_channels, 4, 4), generator=torch.manual_seed(0))
        latents = latents * scheduler.init_noise_sigma
        scheduler.set_timesteps(5)
        for t in scheduler.timesteps:
            latent_model_input = scheduler.scale_model_input(torch.cat([latents] * 2), timestep=t)
            with torch.no_grad():
                noise_pred = unet(latent_model_input, t, encoder_hidden_states=text_embeddings).sample
            uncond, text = noise_pred.chunk(2)
            noise_pred = uncond + 7.5 * (text - uncond)
            latents = scheduler.step(noise_pred, t, latents).prev_sample
        with torch.no_grad():
            image = vae.decode(latents / vae.config.scaling_factor).sample
        return latents, image, text_embeddings

    import transformers

    ours = tutorial(diffusekit, diffusekit)
    ref = tutorial(diffusers, transformers)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bad_inputs_have_clear_errors(pipes):
    ours, _ = pipes
    with pytest.raises(ValueError, match="multiples of 8"):
        ours(PROMPTS[0], height=30, width=32, num_inference_steps=1)
    with pytest.raises(ValueError, match="negative_prompt has 1 entries but prompt has 2"):
        ours(PROMPTS, negative_prompt=["x"], num_inference_steps=1)
    with pytest.raises(ValueError, match=r"prompt_embeds must have shape \(batch, tokens, 32\)"):
        ours(prompt_embeds=torch.zeros(1, 77, 16), num_inference_steps=1)
    with pytest.raises(ValueError, match="exactly one of prompt and prompt_embeds"):
        ours(num_inference_steps=1)
    with pytest.raises(TypeError, match="prompt must be a str"):
        ours(prompt=3, num_inference_steps=1)
    with pytest.raises(ValueError, match="latents must have shape"):
        ours(PROMPTS[0], latents=torch.zeros(1, 4, 5, 5), num_inference_steps=1)


def test_save_roundtrip_loads_in_diffusers(pipes, tmp_path):
    ours, ref = pipes
    ours.save_pretrained(tmp_path / "saved")
    reloaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "saved")
    reloaded.set_progress_bar_config(disable=True)
    reloaded.scheduler = diffusers.PNDMScheduler.from_config(reloaded.scheduler.config)
    ours.scheduler = diffusekit.PNDMScheduler.from_config(ours.scheduler.config)
    a = ours(PROMPTS[0], num_inference_steps=3, generator=torch.manual_seed(1), output_type="np").images
    b = reloaded(PROMPTS[0], num_inference_steps=3, generator=torch.manual_seed(1), output_type="np").images
    assert np.abs(a - b).max() < 1 / 255


def test_tokenizer_folder_with_vocab_and_merges(tmp_path):
    """SD checkpoints on the Hub carry vocab.json + merges.txt; folders saved by transformers 5 a tokenizer.json."""
    folder = build_tiny_sd(tmp_path / "legacy", legacy_tokenizer_files=True)
    ours = diffusekit.CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    import transformers

    ref = transformers.CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    assert ours(PROMPTS).input_ids == ref(PROMPTS).input_ids
