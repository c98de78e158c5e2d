"""Step previews of diffusekit serve: the fitted latent -> RGB projection predicts the decoded image's colours."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def sd_pipe():
    from diffusekit import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained("diffusekit-fashion-sd")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_vae_projection_tracks_decoded_colours(sd_pipe):
    import torch
    import torch.nn.functional as F

    from diffusekit.serve.previews import fit_vae_preview

    preview = fit_vae_preview(sd_pipe.vae)
    assert preview.weight.shape == (3, 4, 3, 3) and preview.r2 > 0.6
    for prompt in ("a photo of a green bag", "a photo of a yellow ankle boot"):
        latents = sd_pipe(prompt=prompt, num_inference_steps=8, guidance_scale=4, output_type="latent",
                          generator=torch.manual_seed(0)).images  # (1, 4, 8, 8)
        decoded = F.avg_pool2d(sd_pipe.decode_latents(latents), 4)  # (1, 3, 8, 8)
        predicted = preview.rgb(latents)
        corr = torch.corrcoef(torch.stack([decoded.flatten(), predicted.flatten()]))[0, 1]
        assert corr > 0.6, (prompt, float(corr))
        # the mean colour of the garment pixels has the same dominant channel
        mask = decoded.mean(1, keepdim=True) > -0.5
        assert decoded[:, :, mask[0, 0]].mean(-1).argmax() == predicted[:, :, mask[0, 0]].mean(-1).argmax()
    png = preview.png(latents, size=(32, 32))
    assert png.startswith(b"\x89PNG")


def test_pixel_space_preview_is_the_sample():
    import torch

    from diffusekit.serve.previews import identity_preview

    sample = torch.rand(1, 1, 4, 4) * 2 - 1
    rgb = identity_preview(1).rgb(sample)
    assert torch.equal(rgb, sample.repeat(1, 3, 1, 1))


def test_tiny_vae_previews_decode_exactly(sd_pipe):
    import numpy as np
    import torch

    from diffusekit.serve.previews import preview_for

    preview = preview_for(sd_pipe)
    assert preview.decode is not None  # the bundled VAE's decoder is tiny (0.6 M parameters)
    output = sd_pipe(prompt="a photo of a yellow bag", num_inference_steps=4, guidance_scale=4, output_type="latent",
                     generator=torch.manual_seed(0)).images
    want = sd_pipe.latents_to_images(output, "pil")[0][0]
    got = preview.image(output)
    assert got.size == want.size == (32, 32)
    assert np.abs(np.asarray(got, dtype=int) - np.asarray(want, dtype=int)).max() <= 1
