"""Compatibility suite: diffusers' public API, read from diffusers' own classes at test time, is the specification.

For every class diffusekit exports that diffusers also exports:

* every public method, property and class attribute of diffusers' class exists on ours;
* every ``__init__`` parameter (for configurable classes: every config key) exists with the same default;
* every parameter of a method both have exists in ours;
* schedulers: every public instance attribute exists; a sampling loop gives the same numbers; config keys read as
  deprecated attributes the same way; outputs behave as the same dicts.

A new diffusers release therefore shows its new names here as failures. Names we leave out on purpose are listed in
``ALLOWED`` below with the reason; keep its format simple so anyone can add to it:

    "ClassName.name": "reason"             a method / property / attribute
    "ClassName.__init__(param)": "reason"  an __init__ parameter (config key) or its default
    "ClassName.method(param)": "reason"    a parameter of a method
    "*.name" / "*.method(param)"           the same for every class

``python tests/test_public_surface.py`` prints how many public names are checked and how many differ on purpose.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections import OrderedDict

import pytest
import torch

import diffusekit

diffusers = pytest.importorskip("diffusers")

_OUT_OF_SCOPE = "out of scope for now (see README 'What is in the box')"
_LORA = "LoRA / adapters: diffusekit's LoRA support (docs) has its own API; peft's adapter methods are not mirrored"
_NO_UPLOAD = "diffusekit never uploads: save_pretrained, then `hf upload` (huggingface_hub)"
_ATTN_PROCESSORS = "attention-processor classes are not mirrored: attention is always torch SDPA"
_INTERNAL = "an internal step of diffusers' implementation, public by accident; ours lives in a private helper"
_PIPELINE_CONFIG = ("a pipeline's config is its model_index.json (config, load_config, save_config, to_json_string); "
                    "pipelines are built from components (from_pretrained, from_pipe, Cls(**pipe.components)), so "
                    "diffusers' ConfigMixin construction methods are not mirrored")
_PIPELINES = ("DiffusionPipeline", "DDPMPipeline", "DDIMPipeline", "StableDiffusionPipeline",
              "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline", "StableDiffusionDepth2ImgPipeline",
              "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")

ALLOWED: dict[str, str] = {
    # ---- uploading, remote code, hub downloads outside from_pretrained ------------------------------------------
    "*.push_to_hub": _NO_UPLOAD,
    "*.save_config(push_to_hub)": _NO_UPLOAD,
    "*.save_pretrained(push_to_hub)": _NO_UPLOAD,
    "*.register_for_auto_class": "custom (remote) code is never executed from a repo",
    "*.download": "use `hf download REPO` or from_pretrained, which fetches what it needs",
    "*.save_pretrained(use_flashpack)": "flashpack format not supported (safetensors only)",
    "*.save_pretrained(save_function)": "saving is always atomic safetensors (or torch.save for .bin)",
    "*.save_pretrained(is_main_process)": "single process saves; run it on rank 0 yourself",
    # ---- model features outside the scope -------------------------------------------------------------------
    "*.attn_processors": _ATTN_PROCESSORS,
    "*.set_attn_processor": _ATTN_PROCESSORS,
    "*.set_default_attn_processor": _ATTN_PROCESSORS,
    "*.load_attn_procs": _ATTN_PROCESSORS,
    "*.save_attn_procs": _ATTN_PROCESSORS,
    "*.set_attention_backend": _ATTN_PROCESSORS,
    "*.reset_attention_backend": _ATTN_PROCESSORS,
    "*.enable_npu_flash_attention": "Ascend NPU kernels: no NPU support",
    "*.disable_npu_flash_attention": "Ascend NPU kernels: no NPU support",
    "*.set_use_npu_flash_attention": "Ascend NPU kernels: no NPU support",
    "*.enable_xla_flash_attention": "TPU/XLA kernels: no XLA support",
    "*.disable_xla_flash_attention": "TPU/XLA kernels: no XLA support",
    "*.set_use_xla_flash_attention": "TPU/XLA kernels: no XLA support",
    "*.dequantize": "quantised weights (bitsandbytes, gguf, torchao) are not supported",
    "*.enable_layerwise_casting": "fp8 storage with layerwise upcasting: " + _OUT_OF_SCOPE,
    "*.enable_group_offload": "group offload (diffusers hooks): use enable_model_cpu_offload / sequential",
    "*.compile_repeated_blocks": "regional torch.compile: " + _OUT_OF_SCOPE,
    "*.enable_parallelism": "context parallelism across devices: " + _OUT_OF_SCOPE,
    "*.hf_device_map": "device_map loading is not supported (one device per pipeline, or CPU offload)",
    "*.reset_device_map": "device_map loading is not supported (one device per pipeline, or CPU offload)",
    # ---- IP-Adapter / image encoder ----------------------------------------------------------------------------
    "*.load_ip_adapter": "IP-Adapter: " + _OUT_OF_SCOPE,
    "*.unload_ip_adapter": "IP-Adapter: " + _OUT_OF_SCOPE,
    "*.set_ip_adapter_scale": "IP-Adapter: " + _OUT_OF_SCOPE,
    "*.prepare_ip_adapter_image_embeds": "IP-Adapter: " + _OUT_OF_SCOPE,
    "*.encode_image": "IP-Adapter image encoder: " + _OUT_OF_SCOPE,
    "*.__call__(ip_adapter_image)": "IP-Adapter: " + _OUT_OF_SCOPE,
    "*.__call__(ip_adapter_image_embeds)": "IP-Adapter: " + _OUT_OF_SCOPE,
    "*.check_inputs(ip_adapter_image)": "IP-Adapter: " + _OUT_OF_SCOPE,
    "*.check_inputs(ip_adapter_image_embeds)": "IP-Adapter: " + _OUT_OF_SCOPE,
    "*.__init__(image_encoder)": "IP-Adapter image encoder component: " + _OUT_OF_SCOPE,
    "*.process_encoder_hidden_states": "IP-Adapter / text-image projections of the UNet: " + _OUT_OF_SCOPE,
    "*.get_guidance_scale_embedding": "guidance-embedding (LCM-distilled UNets with time_cond_proj_dim): "
                                      + _OUT_OF_SCOPE,
    # ---- LoRA / adapters (peft API) ------------------------------------------------------------------------------
    **{f"*.{name}": _LORA for name in (
        "active_adapters", "add_adapter", "delete_adapters", "disable_adapters", "disable_lora", "enable_adapters",
        "enable_lora", "enable_lora_hotswap", "fuse_lora", "fused_loras", "get_active_adapters", "get_list_adapters",
        "load_lora_adapter", "load_lora_into_text_encoder", "load_lora_into_unet", "load_lora_weights", "lora_scale",
        "lora_state_dict", "num_fused_loras", "pack_weights", "save_lora_adapter", "save_lora_weights", "set_adapter",
        "set_adapters", "set_lora_device", "text_encoder_name", "unet_name", "unfuse_lora", "unload_lora",
        "unload_lora_weights", "write_lora_layers", "load_textual_inversion", "unload_textual_inversion",
        "maybe_convert_prompt",
    )},
    "*.load_lora_weights(hotswap)": "LoRA hotswapping into compiled models: " + _OUT_OF_SCOPE,
    # ---- internals of diffusers' implementations ---------------------------------------------------------------
    **{f"{cls}.{name}": _INTERNAL for cls, names in {
        "DPMSolverMultistepScheduler": ("dpm_solver_first_order_update", "multistep_dpm_solver_second_order_update",
                                        "multistep_dpm_solver_third_order_update"),
        "DPMSolverSinglestepScheduler": ("dpm_solver_first_order_update", "singlestep_dpm_solver_second_order_update",
                                         "singlestep_dpm_solver_third_order_update", "singlestep_dpm_solver_update"),
        "DEISMultistepScheduler": ("deis_first_order_update", "multistep_deis_second_order_update",
                                   "multistep_deis_third_order_update"),
        "UniPCMultistepScheduler": ("multistep_uni_p_bh_update", "multistep_uni_c_bh_update", "time_shift",
                                    "stretch_shift_to_terminal"),
        "UNet2DConditionModel": ("get_time_embed", "get_class_embed", "get_aug_embed"),
        "AutoencoderKL": ("blend_h", "blend_v"),
    }.items() for name in names},
    "*.get_timesteps": _INTERNAL + " (img2img's strength schedule: pipelines/pieces.py)",
    "*.prepare_mask_latents": _INTERNAL + " (inpainting latents: pipelines/pieces.py)",
    # the pipelines' own step helpers take other arguments (one request object instead of many): composed pieces
    **{f"*.{method}({param})": _INTERNAL for method, params in {
        "check_inputs": ("strength", "callback_steps", "callback_on_step_end_tensor_inputs", "image", "mask_image",
                         "output_type", "padding_mask_crop"),
        "prepare_latents": ("image", "timestep", "batch_size", "num_images_per_prompt", "num_channels_latents",
                            "is_strength_max", "add_noise", "return_noise", "return_image_latents"),
        "prepare_depth_map": ("batch_size", "do_classifier_free_guidance"),
        "run_safety_checker": ("image", "device", "dtype"),
    }.items() for param in params},
    # ---- pipelines are built from components, not from a config ------------------------------------------------
    **{f"{cls}.{name}": _PIPELINE_CONFIG for cls in _PIPELINES for name in (
        "from_config", "extract_init_dict", "get_config_dict", "register_to_config",
        "load_config(return_unused_kwargs)", "load_config(return_commit_hash)")},
    **{f"{cls}.{name}": "Auto* pipelines are factories (from_pretrained / from_pipe) without a config of their own"
       for cls in ("AutoPipelineForText2Image", "AutoPipelineForImage2Image", "AutoPipelineForInpainting")
       for name in ("config", "config_name", "extract_init_dict", "from_config", "get_config_dict",
                    "has_compatibles", "ignore_for_config", "load_config", "register_to_config", "save_config",
                    "to_json_file", "to_json_string")},
    **{f"{cls}.from_pretrained(pretrained_model_or_path)": "the first argument is positional everywhere; named "
       "pretrained_model_name_or_path as in every other from_pretrained"
       for cls in ("AutoPipelineForText2Image", "AutoPipelineForImage2Image", "AutoPipelineForInpainting")},
    # ---- SDXL: owned by the SDXL work ---------------------------------------------------------------------------
    **{f"{cls}.{name}": "SDXL pipelines: owned by the SDXL work (inputs are checked by the shared request pieces; "
       "upcast_vae is deprecated in diffusers)"
       for cls in ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")
       for name in ("check_inputs", "upcast_vae")},
    # ---- deliberate differences (documented in the class docstrings) --------------------------------------------
    "*.__init__(safety_checker)": "optional (default None) here; diffusers requires the argument",
    "*.__init__(feature_extractor)": "optional (default None) here; diffusers requires the argument",
    "*.__init__(depth_estimator)": "optional (default None): built on demand from the folder or a user depth map",
}


# ------------------------------------------------------------------------------------------------------- helpers


def _is_class(obj) -> bool:
    return inspect.isclass(obj)


def shared_classes() -> list[str]:
    """Names diffusekit exports as classes that diffusers also exports as classes."""
    names = []
    for name in sorted(diffusekit._EXPORTS):
        theirs = getattr(diffusers, name, None)
        if theirs is None or not _is_class(theirs):
            continue
        names.append(name)
    return names


def _base_names(cls) -> set[str]:
    if issubclass(cls, torch.nn.Module):
        return set(dir(torch.nn.Module))
    if issubclass(cls, OrderedDict):
        return set(dir(OrderedDict))
    return set(dir(object))


def public_names(cls) -> list[str]:
    """Public names of ``cls`` beyond those of torch.nn.Module / OrderedDict / object (those are the same here)."""
    base = _base_names(cls)
    return sorted(n for n in dir(cls) if not n.startswith("_") and n not in base)


def allowed(cls_name: str, key: str) -> bool:
    return f"{cls_name}.{key}" in ALLOWED or f"*.{key}" in ALLOWED


def _params(func) -> dict[str, inspect.Parameter] | None:
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return None
    return {k: p for k, p in params.items() if k not in ("self", "cls") and p.kind not in (p.VAR_KEYWORD,
                                                                                              p.VAR_POSITIONAL)}


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def missing_names(name: str) -> tuple[list[str], list[str]]:
    """(checked keys, keys that differ) for one class: names, __init__ defaults, method parameters."""
    ours, theirs = getattr(diffusekit, name), getattr(diffusers, name)
    checked, differ = [], []
    for attr in public_names(theirs):
        checked.append(attr)
        if not hasattr(ours, attr):
            differ.append(attr)
    init_theirs, init_ours = _params(theirs.__init__), _params(ours.__init__)
    if init_theirs is not None and init_ours is not None:
        for param, p in init_theirs.items():
            key = f"__init__({param})"
            checked.append(key)
            if param not in init_ours:
                differ.append(key)
            elif p.default is not inspect.Parameter.empty or init_ours[param].default is not inspect.Parameter.empty:
                if _plain(p.default) != _plain(init_ours[param].default):
                    differ.append(key)
    for method in [*public_names(theirs), "__call__", "forward"]:
        a, b = inspect.getattr_static(theirs, method, None), inspect.getattr_static(ours, method, None)
        if a is None or b is None or isinstance(a, (property, type)) or isinstance(b, (property, type)):
            continue
        a, b = getattr(theirs, method), getattr(ours, method)
        if not (callable(a) and callable(b)):
            continue
        pa, pb = _params(a), _params(b)
        if pa is None or pb is None:
            continue
        for param in pa:
            key = f"{method}({param})"
            checked.append(key)
            if param not in pb:
                differ.append(key)
    return checked, differ


CLASSES = shared_classes()


# ------------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", CLASSES)
def test_public_surface_matches_diffusers(name):
    _, differ = missing_names(name)
    unexplained = [key for key in differ if not allowed(name, key)]
    assert not unexplained, (
        f"{name}: diffusers has these public names / parameters / defaults that diffusekit lacks or differs on: "
        f"{unexplained}. Implement them, or add them to ALLOWED in tests/test_public_surface.py with the reason"
    )


def test_allow_list_is_well_formed():
    exported = set(diffusekit._EXPORTS)
    for key, reason in ALLOWED.items():
        cls, _, rest = key.partition(".")
        assert rest and (cls == "*" or cls in exported), f"ALLOWED key {key!r}: expected 'ClassName.name' or '*.name'"
        assert isinstance(reason, str) and len(reason) > 10, f"ALLOWED[{key!r}] needs a reason"


SCHEDULERS = [n for n in CLASSES if n.endswith("Scheduler")]


@pytest.mark.parametrize("name", SCHEDULERS)
def test_scheduler_instance_attributes_match(name):
    ours, theirs = getattr(diffusekit, name)(), getattr(diffusers, name)()
    missing = [k for k in vars(theirs) if not k.startswith("_") and not hasattr(ours, k)
               and not allowed(name, k)]
    assert not missing, f"{name} instances lack {missing}"


@pytest.mark.parametrize("name", SCHEDULERS)
def test_scheduler_config_attributes_warn_alike(name):
    ours, theirs = getattr(diffusekit, name)(), getattr(diffusers, name)()
    for key in ("num_train_timesteps", "beta_schedule"):
        with warnings.catch_warnings(record=True) as ours_w:
            warnings.simplefilter("always")
            a = getattr(ours, key)
        with warnings.catch_warnings(record=True) as theirs_w:
            warnings.simplefilter("always")
            b = getattr(theirs, key)
        assert a == b
        assert [str(w.message) for w in ours_w] == [str(w.message) for w in theirs_w]


@pytest.mark.parametrize("name", [n for n in SCHEDULERS if n != "DPMSolverSDEScheduler"])
def test_scheduler_defaults_sample_alike(name):
    """The default config of each scheduler gives the same 5-step loop (DPMSolverSDE's Brownian noise has its own
    parity tests)."""
    from scheduler_helpers import OWN, quiet, run_loop

    quiet()
    ours, theirs = getattr(diffusekit, name)(), getattr(diffusers, name)()
    a, b = run_loop(ours), run_loop(theirs)
    scale = max(1.0, float(b.abs().max()))
    assert float((a - b).abs().max()) <= OWN * scale


OUTPUTS = [n for n in CLASSES if n.endswith("Output")]


@pytest.mark.parametrize("name", OUTPUTS)
def test_outputs_behave_alike(name):
    import dataclasses

    ours_cls, theirs_cls = getattr(diffusekit, name), getattr(diffusers, name)
    first = dataclasses.fields(theirs_cls)[0].name
    value = torch.zeros(1, 2)
    ours, theirs = ours_cls(**{first: value}), theirs_cls(**{first: value})
    assert isinstance(ours, dict) == isinstance(theirs, dict)
    assert list(ours.keys()) == list(theirs.keys())
    assert ours[0] is theirs[0] is value and ours[first] is value
    assert len(ours.to_tuple()) == len(theirs.to_tuple())


# ------------------------------------------------------------------------------------------------------- counts


def surface_counts() -> dict[str, int]:
    checked = differ_on_purpose = 0
    for name in CLASSES:
        keys, differ = missing_names(name)
        checked += len(keys)
        differ_on_purpose += sum(1 for key in differ if allowed(name, key))
    return {"classes": len(CLASSES), "checked": checked, "differ_on_purpose": differ_on_purpose,
            "allow_list_entries": len(ALLOWED)}


def test_counts_are_reported(capsys):
    counts = surface_counts()
    with capsys.disabled():
        print(f"\npublic surface vs diffusers {diffusers.__version__}: {counts['checked']} names checked over "
              f"{counts['classes']} classes, {counts['differ_on_purpose']} differ on purpose "
              f"({counts['allow_list_entries']} allow-list entries)")
    assert counts["checked"] > 1000


if __name__ == "__main__":
    logging.disable(logging.WARNING)
    counts = surface_counts()
    print(f"diffusers {diffusers.__version__}: {counts['checked']} public names checked over {counts['classes']} "
          f"classes; {counts['differ_on_purpose']} differ on purpose ({counts['allow_list_entries']} allow-list "
          "entries)")
    used = set()
    for name in CLASSES:
        keys, differ = missing_names(name)
        on_purpose = [k for k in differ if allowed(name, k)]
        used.update(f"{name}.{k}" if f"{name}.{k}" in ALLOWED else f"*.{k}" for k in on_purpose)
        print(f"  {name}: {len(keys)} checked, {len(on_purpose)} on purpose, "
              f"{len(differ) - len(on_purpose)} unexplained")
    stale = [key for key in ALLOWED if key not in used]
    if stale:
        print(f"allow-list entries no longer needed (the names exist now): {stale}")


# ------------------------------------------------------------------------------------------------------- behaviour
# the names filled in for this suite, run against diffusers on the same inputs


def test_config_machinery_behaves_alike(tmp_path):
    config = {"_class_name": "DDIMScheduler", "num_train_timesteps": 500, "clip_sample": False, "foo": 1}
    ours = diffusekit.DDIMScheduler.extract_init_dict(config, steps_offset=1)
    theirs = diffusers.DDIMScheduler.extract_init_dict(dict(config), steps_offset=1)
    assert {k: v for k, v in ours[0].items() if k in config or k == "steps_offset"} == \
        {k: v for k, v in theirs[0].items() if k in config or k == "steps_offset"}
    assert ours[1] == {"foo": 1} and ours[2]["_class_name"] == "DDIMScheduler"
    results = []
    for lib in (diffusekit, diffusers):
        scheduler, unused = lib.DDIMScheduler.from_config(dict(config), return_unused_kwargs=True, not_a_key=3)
        assert scheduler.config.num_train_timesteps == 500
        results.append(unused)
        assert lib.DDIMScheduler.has_compatibles and not lib.UNet2DModel.has_compatibles
    assert results[0] == results[1] == {"_class_name": "DDIMScheduler", "foo": 1, "not_a_key": 3}
    diffusers.DDIMScheduler(num_train_timesteps=500).save_config(tmp_path)
    ours, unused, commit = diffusekit.DDIMScheduler.load_config(tmp_path, return_unused_kwargs=True,
                                                                return_commit_hash=True, extra=1)
    theirs, theirs_unused, their_commit = diffusers.DDIMScheduler.load_config(
        tmp_path, return_unused_kwargs=True, return_commit_hash=True, extra=1)
    assert ours["num_train_timesteps"] == theirs["num_train_timesteps"] == 500
    assert unused == {"extra": 1} and commit is their_commit is None
    assert diffusekit.DDIMScheduler.get_config_dict(tmp_path) == ours
    scheduler = diffusekit.DDIMScheduler()
    scheduler.register_to_config(steps_offset=1)
    assert scheduler.config.steps_offset == 1 and "steps_offset" not in scheduler.config.defaults_used


def test_commit_hash_comes_from_the_hub_cache(tmp_path):
    from test_hub import COMMIT, make_cache

    diffusers.DDIMScheduler().save_config(tmp_path / "src")
    make_cache(tmp_path / "cache", "acme/sched", tmp_path / "src")
    _, commit = diffusekit.DDIMScheduler.load_config("acme/sched", cache_dir=tmp_path / "cache",
                                                     local_files_only=True, return_commit_hash=True)
    assert commit == COMMIT


def test_model_counts_match_diffusers():
    kwargs = dict(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
                  down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                  class_embed_type=None, num_class_embeds=3)
    ours, theirs = diffusekit.UNet2DModel(**kwargs), diffusers.UNet2DModel(**kwargs)
    for options in ({}, {"only_trainable": True}, {"exclude_embeddings": True}):
        assert ours.num_parameters(**options) == theirs.num_parameters(**options), options
    ours.conv_in.weight.requires_grad_(False)
    theirs.conv_in.weight.requires_grad_(False)
    assert ours.num_parameters(only_trainable=True) == theirs.num_parameters(only_trainable=True)
    assert ours.get_memory_footprint() == theirs.get_memory_footprint()
    ours.enable_xformers_memory_efficient_attention()  # a no-op here (SDPA), never an error
    ours.disable_xformers_memory_efficient_attention()


def test_pipeline_helpers_behave_alike(tmp_path):
    import numpy as np

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))
    diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler()).save_pretrained(tmp_path / "ddim")
    ours = diffusekit.DDIMPipeline.from_pretrained(tmp_path / "ddim")
    theirs = diffusers.DDIMPipeline.from_pretrained(tmp_path / "ddim")
    assert ours.name_or_path == theirs.name_or_path == tmp_path / "ddim"
    assert ours.parameters == theirs.parameters == {}
    assert diffusekit.DiffusionPipeline.load_config(tmp_path / "ddim")["_class_name"] == "DDIMPipeline"
    assert set(ours.prepare_extra_step_kwargs(None, 0.5)) == {"generator", "eta"}
    images = np.random.default_rng(0).random((2, 4, 4, 3)).astype(np.float32)
    assert [np.asarray(a).tolist() for a in ours.numpy_to_pil(images)] == \
        [np.asarray(b).tolist() for b in theirs.numpy_to_pil(images)]
    ours.save_pretrained(tmp_path / "sharded", max_shard_size="10KB")
    assert len(list((tmp_path / "sharded" / "unet").glob("*.safetensors"))) > 1
    reloaded = diffusers.DDIMPipeline.from_pretrained(tmp_path / "sharded")
    assert all(torch.equal(a, b) for a, b in zip(reloaded.unet.state_dict().values(),
                                                 ours.unet.state_dict().values()))
    assert json_of(ours.to_json_string()) == json_of((tmp_path / "sharded" / "model_index.json").read_text())


def json_of(text):
    import json

    return json.loads(text)


def test_vae_image_processor_config_round_trips(tmp_path):
    from PIL import Image

    ours = diffusekit.VaeImageProcessor(vae_scale_factor=4, do_binarize=True)
    ours.save_config(tmp_path)
    theirs = diffusers.VaeImageProcessor.from_config(diffusers.VaeImageProcessor.load_config(tmp_path))
    assert plain_config(theirs.config) == plain_config(ours.config)
    back = diffusekit.VaeImageProcessor.from_config(diffusekit.VaeImageProcessor.load_config(tmp_path))
    assert back.config == ours.config
    image = Image.new("RGB", (4, 4), (10, 200, 30))
    assert ours.convert_to_grayscale(image).tobytes() == theirs.convert_to_grayscale(image).tobytes()
    assert ours.convert_to_rgb(image.convert("L")).mode == theirs.convert_to_rgb(image.convert("L")).mode == "RGB"


def plain_config(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}
