"""Gradient checkpointing on the UNets and the VAE: same gradients, fewer saved activations, diffusers' API."""

from __future__ import annotations

import pytest
import torch

import diffusekit
from sd_assets import tiny_unet_kwargs, tiny_vae_kwargs
from test_unet_2d import TINY as UNET2D_TINY

diffusers = pytest.importorskip("diffusers")


def _unet2d():
    return diffusekit.UNet2DModel(**dict(UNET2D_TINY, layers_per_block=2, dropout=0.1)), (torch.randn(2, 3, 16, 16), 7)


def _unet2d_condition():
    model = diffusekit.UNet2DConditionModel(**tiny_unet_kwargs(layers_per_block=2, dropout=0.1))
    return model, (torch.randn(2, 4, 8, 8), 7, torch.randn(2, 5, 32))


def _vae():
    return diffusekit.AutoencoderKL(**dict(tiny_vae_kwargs(), layers_per_block=2)), (torch.randn(2, 3, 16, 16),)


MODELS = {"UNet2DModel": _unet2d, "UNet2DConditionModel": _unet2d_condition, "AutoencoderKL": _vae}


def _loss_and_grads(model, inputs, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks (and VAE posterior sample) in both runs
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = model(*inputs).sample
        loss = (out.float() ** 2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, sum(saved)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_same_gradients_with_fewer_saved_activations(name):
    model, inputs = MODELS[name]()
    model.train()
    assert not model.is_gradient_checkpointing
    loss, grads, saved = _loss_and_grads(model, inputs)
    model.enable_gradient_checkpointing()
    assert model.is_gradient_checkpointing
    loss_ckpt, grads_ckpt, saved_ckpt = _loss_and_grads(model, inputs)
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    assert grads_ckpt.keys() == grads.keys() and len(grads) == len(list(model.parameters()))
    for key in grads:
        torch.testing.assert_close(grads_ckpt[key], grads[key], rtol=1e-6, atol=1e-7, msg=key)
    assert saved_ckpt < saved * 0.6, (saved_ckpt, saved)  # activations inside the layers are not kept
    model.disable_gradient_checkpointing()
    assert not model.is_gradient_checkpointing
    assert _loss_and_grads(model, inputs)[2] == saved
    with torch.no_grad():  # no effect without grad
        model.enable_gradient_checkpointing()
        model(*inputs)


def test_custom_checkpoint_function_is_used():
    model, inputs = _unet2d()
    calls = []

    def func(layer, *args):
        calls.append(type(layer).__name__)
        return layer(*args)

    model.enable_gradient_checkpointing(func)
    model(*inputs).sample.sum().backward()
    assert {"ResnetBlock2D", "Attention"} <= set(calls)


def test_api_and_state_as_diffusers():
    ref = diffusers.UNet2DConditionModel(**tiny_unet_kwargs())
    ours = diffusekit.UNet2DConditionModel(**tiny_unet_kwargs())
    for model in (ref, ours):
        assert model.is_gradient_checkpointing is False
        model.enable_gradient_checkpointing()
        assert model.is_gradient_checkpointing is True
        model.disable_gradient_checkpointing()
        assert model.is_gradient_checkpointing is False
    text = diffusekit.CLIPTextModel.from_config(dict(vocab_size=100, hidden_size=8, intermediate_size=8,
                                                     num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="does not support gradient checkpointing"):
        text.enable_gradient_checkpointing()


def test_train_cli_flag_gives_the_same_run(tmp_path):
    import json

    from test_training import train

    plain = train(tmp_path / "plain", "--steps", "3", "--checkpoint-every", "0")
    ckpt = train(tmp_path / "ckpt", "--steps", "3", "--checkpoint-every", "0", "--gradient-checkpointing")
    torch.testing.assert_close(torch.tensor(ckpt["losses"]), torch.tensor(plain["losses"]), rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "ckpt" / "train_log.json").read_text())["gradient_checkpointing"] is True
    assert json.loads((tmp_path / "plain" / "train_log.json").read_text())["gradient_checkpointing"] is False
