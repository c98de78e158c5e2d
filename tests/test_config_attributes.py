"""Config keys read as attributes of models and schedulers (deprecated, as in diffusers); assigning them is refused."""

from __future__ import annotations

import warnings

import pytest

import diffusers
import diffusekit

UNET = dict(
    sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
    down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8,
)


def read_with_warning(obj, name):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = getattr(obj, name)
    future = [w for w in caught if issubclass(w.category, FutureWarning)]
    assert len(future) == 1, [str(w.message) for w in caught]
    return value, str(future[0].message)


@pytest.mark.parametrize(
    "cls_name, kwargs, key",
    [
        ("UNet2DModel", UNET, "in_channels"),
        ("UNet2DModel", UNET, "block_out_channels"),
        ("DDPMScheduler", {}, "num_train_timesteps"),
        ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}, "timestep_spacing"),
    ],
)
def test_config_key_as_attribute_warns_like_diffusers(cls_name, kwargs, key):
    ours = getattr(diffusekit, cls_name)(**kwargs)
    theirs = getattr(diffusers, cls_name)(**kwargs)
    value, message = read_with_warning(ours, key)
    expected, their_message = read_with_warning(theirs, key)
    assert value == ours.config[key]
    plain = (lambda v: list(v) if isinstance(v, (tuple, list)) else v)
    assert plain(value) == plain(expected)
    assert message == their_message  # same text: it names `.config.<key>`
    assert f".config.{key}" in message


def test_pipeline_options_read_as_attributes_like_diffusers(tmp_path):
    from sd_assets import build_tiny_sd

    folder = build_tiny_sd(tmp_path / "sd")
    ours = diffusekit.StableDiffusionPipeline.from_pretrained(folder)
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                               requires_safety_checker=False)
    value, message = read_with_warning(ours, "requires_safety_checker")
    expected, their_message = read_with_warning(theirs, "requires_safety_checker")
    assert value is expected is False and message == their_message
    with pytest.raises(AttributeError, match="no attribute 'not_an_option'"):
        ours.not_an_option


def test_unknown_attribute_is_still_an_attribute_error():
    unet = diffusekit.UNet2DModel(**UNET)
    with pytest.raises(AttributeError, match="no attribute 'not_a_key'"):
        unet.not_a_key
    scheduler = diffusekit.DDPMScheduler()
    with pytest.raises(AttributeError, match="no attribute 'not_a_key'"):
        scheduler.not_a_key
    assert not hasattr(scheduler, "_private_config_like")


def test_real_attributes_and_submodules_win_without_warning():
    unet = diffusekit.UNet2DModel(**UNET)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unet.conv_in  # a submodule
        unet.config.in_channels
        diffusekit.DDPMScheduler().timesteps


@pytest.mark.parametrize("make", [lambda: diffusekit.UNet2DModel(**UNET), lambda: diffusekit.DDPMScheduler()])
def test_assigning_a_config_key_is_refused(make):
    obj = make()
    key = "in_channels" if isinstance(obj, diffusekit.UNet2DModel) else "num_train_timesteps"
    with pytest.raises(AttributeError, match=rf"\.config\.{key}.*from_config"):
        setattr(obj, key, 7)
    with pytest.raises(TypeError, match="frozen"):
        obj.config[key] = 7
    # other attributes still assign
    obj.some_user_attribute = 1
    assert obj.some_user_attribute == 1
