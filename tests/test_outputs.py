"""Outputs are ordered dicts and pytree nodes, as diffusers' ``BaseOutput`` (checked against diffusers' own)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch.utils import _pytree as pytree

import diffusers
from diffusekit import SchedulerOutput
from diffusekit.models.autoencoder_kl import DecoderOutput
from diffusekit.models.unet_2d import UNet2DOutput

X = torch.arange(6.0).reshape(1, 1, 2, 3)
Y = -X


def both(field_values: dict):
    return SchedulerOutput(**field_values), diffusers.schedulers.scheduling_ddpm.DDPMSchedulerOutput(**field_values)


@pytest.mark.parametrize("values", [{"prev_sample": X}, {"prev_sample": X, "pred_original_sample": Y}])
def test_dict_behaviour_matches_diffusers(values):
    ours, theirs = both(values)
    assert isinstance(ours, dict) and isinstance(theirs, dict)
    assert list(ours.keys()) == list(theirs.keys())
    assert len(ours) == len(theirs)
    assert list(ours) == list(theirs)  # iteration yields keys, as for any dict
    for (k1, v1), (k2, v2) in zip(ours.items(), theirs.items()):
        assert k1 == k2 and v1 is v2
    assert len(ours.values()) == len(theirs.values())
    assert all(a is b for a, b in zip(ours.values(), theirs.values()))
    assert len(ours.to_tuple()) == len(theirs.to_tuple())
    assert all(a is b for a, b in zip(ours.to_tuple(), theirs.to_tuple()))
    assert ours[0] is theirs[0] is X
    assert ours["prev_sample"] is X
    assert ("pred_original_sample" in ours) == ("pred_original_sample" in theirs)
    assert ours[-1] is theirs[-1]
    assert ours[:1][0] is X


def test_none_fields_are_not_keys():
    out = SchedulerOutput(prev_sample=X)
    assert list(out.keys()) == ["prev_sample"]
    assert out.pred_original_sample is None
    with pytest.raises(KeyError):
        out["pred_original_sample"]
    with pytest.raises(IndexError):
        out[1]


def test_built_from_a_dict_like_diffusers():
    ours = SchedulerOutput({"prev_sample": X, "pred_original_sample": Y})
    theirs = diffusers.schedulers.scheduling_ddpm.DDPMSchedulerOutput({"prev_sample": X, "pred_original_sample": Y})
    assert list(ours.keys()) == list(theirs.keys()) == ["prev_sample", "pred_original_sample"]
    assert ours.pred_original_sample is Y and ours["pred_original_sample"] is Y


def test_setting_a_field_updates_the_key():
    out = SchedulerOutput(prev_sample=X)
    out.prev_sample = Y
    assert out["prev_sample"] is Y and out[0] is Y
    out["prev_sample"] = X
    assert out.prev_sample is X


@pytest.mark.parametrize("method", ["pop", "update", "setdefault", "__delitem__"])
def test_keys_cannot_be_removed(method):
    out = SchedulerOutput(prev_sample=X)
    with pytest.raises(TypeError, match="cannot be removed"):
        getattr(out, method)("prev_sample")


def test_pickle_and_copy_round_trip():
    out = DecoderOutput(sample=X)
    for again in (pickle.loads(pickle.dumps(out)), copy.deepcopy(out), copy.copy(out)):
        assert type(again) is DecoderOutput
        assert list(again.keys()) == ["sample"] and torch.equal(again.sample, X) and torch.equal(again["sample"], X)


def test_registered_as_pytree_nodes():
    out = SchedulerOutput(prev_sample=X, pred_original_sample=Y)
    leaves, spec = pytree.tree_flatten(out)
    assert len(leaves) == 2 and leaves[0] is X and leaves[1] is Y
    rebuilt = pytree.tree_unflatten([leaf * 2 for leaf in leaves], spec)
    assert type(rebuilt) is SchedulerOutput and torch.equal(rebuilt.prev_sample, X * 2)
    # a None field stays None and is not a leaf
    leaves, spec = pytree.tree_flatten(UNet2DOutput(sample=X))
    assert leaves == [X]
    assert type(pytree.tree_unflatten(leaves, spec)) is UNet2DOutput
    paths = [p for p, _ in pytree.tree_flatten_with_path(out)[0]]
    assert [pytree.keystr(p) for p in paths] == ["['prev_sample']", "['pred_original_sample']"]


def test_model_outputs_pass_through_torch_export():
    class Wrap(torch.nn.Module):
        def forward(self, x):
            return UNet2DOutput(sample=x * 2)

    exported = torch.export.export(Wrap(), (X,))
    out = exported.module()(X)
    assert isinstance(out, UNet2DOutput) and torch.equal(out.sample, X * 2)
