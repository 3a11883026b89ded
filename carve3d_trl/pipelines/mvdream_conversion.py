"""MVDream's original weights in the view-batched family's diffusers form ([`MultiViewDiffusionPipeline`]).

MVDream (bytedance/MVDream) ships its model as one LDM checkpoint (`sd-v2.1-base-4view.pt`): the UNet under
`model.diffusion_model.` (`time_embed`, `camera_embed`, `input_blocks`, `middle_block`, `output_blocks`, `out`), next
to the frozen VAE and text encoder of the Stable Diffusion it was fine-tuned from. Its UNet is a Stable Diffusion UNet
plus a camera MLP and cross-view self-attention, so:

- the UNet's weights map one to one onto a stock `UNet2DConditionModel` of the same sizes ([`diffusers_unet_config`]):
  Stable Diffusion's LDM-to-diffusers names (the ones diffusers' `convert_ldm_unet_checkpoint` uses, which the tests
  check this mapping against) plus the camera MLP, `camera_embed.0` / `camera_embed.2` -> `class_embedding.linear_1` /
  `class_embedding.linear_2`; the mapping is explicit in both directions ([`to_mvdream_state_dict`] writes a UNet,
  e.g. a fine-tuned one, back in MVDream's format), so a mismatch is named by MVDream's own key;
- the cross-view attention has no weights of its own (it reuses each block's `attn1`): [`MultiViewDiffusionPipeline`]
  installs it when it is built;
- the VAE, text encoder, tokenizer and scheduler are those of the base model's diffusers folder (Stable Diffusion
  2.1-base for `sd-v2.1-base-4view`, whose OpenCLIP "penultimate" text features are diffusers' SD 2.1 text encoder).

A folder of ashawkey's diffusers port (ashawkey/mvdream_diffusers) converts too ([`read_mvdream_port`]): its UNet
keeps MVDream's keys, and it holds the other parts itself.

Every conversion is checked key by key and shape by shape against the UNet the config builds; a mismatch is refused
with the first offending key. Tested exact (fp32, max abs difference ~1e-6) against MVDream's own `MultiViewUNetModel`
on tiny random configurations (`tests/test_mvdream_conversion.py`).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_directory
from .view_batched import CAMERA_INPUTS, MultiViewDiffusionPipeline

__all__ = [
    "LDM_UNET_PREFIX",
    "MVDREAM_DDIM",
    "MVDREAM_PORT_AZIMUTH_START",
    "MVDREAM_TRAINING_SCHEDULE",
    "MVDREAM_UNET_PARAMS",
    "build_mvdream_pipeline",
    "convert_mvdream_checkpoint",
    "convert_mvdream_unet_state_dict",
    "diffusers_unet_config",
    "load_mvdream_checkpoint",
    "mvdream_unet",
    "read_mvdream_port",
    "to_mvdream_state_dict",
]

LDM_UNET_PREFIX = "model.diffusion_model."
# Modules named alike in both forms except for these (ours -> MVDream's): the embeddings and the outer layers ...
_FIXED_NAMES = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "class_embedding.linear_1": "camera_embed.0",
    "class_embedding.linear_2": "camera_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# ... and the layers of a resnet block (the transformers' names are the same in both).
_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
# The `unet_config.params` of MVDream's two released models (its `configs/sd-v2-base.yaml` and `configs/sd-v1.yaml`,
# commit 618f844), keyed by the checkpoint's name on the Hub (`MVDream/MVDream`).
MVDREAM_UNET_PARAMS: dict[str, dict[str, Any]] = {
    "sd-v2.1-base-4view": {
        "image_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 320,
        "attention_resolutions": [4, 2, 1],
        "num_res_blocks": 2,
        "channel_mult": [1, 2, 4, 4],
        "num_head_channels": 64,
        "use_spatial_transformer": True,
        "use_linear_in_transformer": True,
        "transformer_depth": 1,
        "context_dim": 1024,
        "use_checkpoint": False,
        "legacy": False,
        "camera_dim": 16,
    },
    "sd-v1.5-4view": {
        "image_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 320,
        "attention_resolutions": [4, 2, 1],
        "num_res_blocks": 2,
        "channel_mult": [1, 2, 4, 4],
        "num_heads": 8,
        "use_spatial_transformer": True,
        "transformer_depth": 1,
        "context_dim": 768,
        "use_checkpoint": False,
        "legacy": False,
        "camera_dim": 16,
    },
}
# `MultiViewUNetModel` options a stock `UNet2DConditionModel` with the camera embedding cannot express, with the value
# that it can (MVDream's defaults; both released models use them).
_FIXED_OPTIONS = {
    "dims": 2,
    "conv_resample": True,
    "num_classes": None,
    "use_scale_shift_norm": False,
    "resblock_updown": False,
    "use_spatial_transformer": True,
    "n_embed": None,
    "disable_self_attentions": None,
    "num_attention_blocks": None,
    "disable_middle_self_attn": False,
    "use_fp16": False,
    "use_bf16": False,
    "dropout": 0,
}
# MVDream's diffusion (both configs: `linear_start`, `linear_end`, `timesteps`, `parameterization`; LDM's "linear"
# betas are diffusers' "scaled_linear") and its DDIM sampler ("uniform" steps 1, 1 + 1000 / n, ...; the last step goes
# to alphas_cumprod[0]): the base model's scheduler must train with the first and is loaded with the second.
MVDREAM_TRAINING_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}
MVDREAM_DDIM = {"set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False, "timestep_spacing": "leading"}
_GROUP_NORM_GROUPS = 32  # MVDream's `normalization` and its transformers' `Normalize`: 32 groups


def _resolve_params(model: str | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(model, str):
        if model not in MVDREAM_UNET_PARAMS:
            raise ValueError(
                f"Unknown MVDream model {model!r}; choose one of {sorted(MVDREAM_UNET_PARAMS)} or pass its "
                "`unet_config.params` as a mapping."
            )
        return dict(MVDREAM_UNET_PARAMS[model])
    return dict(model)


def diffusers_unet_config(model: str | Mapping[str, Any]) -> dict[str, Any]:
    """The `UNet2DConditionModel` config of an MVDream UNet, from its `unet_config.params` (or a
    [`MVDREAM_UNET_PARAMS`] name): the Stable Diffusion UNet of those sizes with the 16-input camera embedding.

    Raises:
        ValueError: for an option the stock UNet cannot express (named, with the value it needs).
    """
    params = _resolve_params(model)
    for name, supported in _FIXED_OPTIONS.items():
        if params.get(name, supported) != supported:
            raise ValueError(
                f"MVDream option {name}={params[name]!r} has no counterpart in the view-batched UNet "
                f"(UNet2DConditionModel with the camera embedding); it supports {name}={supported!r} only."
            )
    if params.get("camera_dim") != CAMERA_INPUTS:
        raise ValueError(
            f"MVDream option camera_dim={params.get('camera_dim')!r}: the view-batched family takes "
            f"{CAMERA_INPUTS} camera inputs (flattened 4x4 camera-to-world matrices), camera_dim={CAMERA_INPUTS}."
        )
    for name in ("num_res_blocks", "transformer_depth", "context_dim"):
        if not isinstance(params.get(name), int):
            raise ValueError(f"MVDream option {name} must be one integer for every level, got {params.get(name)!r}.")
    model_channels = int(params["model_channels"])
    widths = [model_channels * int(mult) for mult in params["channel_mult"]]
    attention = [2**level in params["attention_resolutions"] for level in range(len(widths))]
    head_channels, num_heads = params.get("num_head_channels", -1), params.get("num_heads", -1)
    if head_channels == -1 and num_heads == -1:
        raise ValueError("MVDream's UNet needs num_head_channels or num_heads; the config sets neither.")
    heads = [width // head_channels if head_channels != -1 else num_heads for width in widths]
    for level, width in enumerate(widths):
        needs_heads = attention[level] or level == len(widths) - 1  # the middle block attends at the last width
        if needs_heads and (width % head_channels if head_channels != -1 else width % num_heads):
            raise ValueError(
                f"Width {width} of level {level} does not split evenly into attention heads (num_head_channels="
                f"{head_channels}, num_heads={num_heads})."
            )
        if width % _GROUP_NORM_GROUPS:
            raise ValueError(f"Width {width} of level {level} is not a multiple of {_GROUP_NORM_GROUPS} groups.")
    return {
        "sample_size": int(params["image_size"]),
        "in_channels": int(params["in_channels"]),
        "out_channels": int(params["out_channels"]),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "block_out_channels": widths,
        "layers_per_block": params["num_res_blocks"],
        "attention_head_dim": heads,  # diffusers' historical name: the number of heads per level (as SD 2's config)
        "cross_attention_dim": params["context_dim"],
        "transformer_layers_per_block": params["transformer_depth"],
        "use_linear_projection": bool(params.get("use_linear_in_transformer", False)),
        "norm_num_groups": _GROUP_NORM_GROUPS,
        "class_embed_type": "projection",
        "projection_class_embeddings_input_dim": CAMERA_INPUTS,
    }


def _unet_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The UNet's entries, without `LDM_UNET_PREFIX` (a full checkpoint) or as they are (a UNet state dict)."""
    if any(key.startswith(LDM_UNET_PREFIX) for key in state_dict):
        return {
            key[len(LDM_UNET_PREFIX) :]: value for key, value in state_dict.items() if key.startswith(LDM_UNET_PREFIX)
        }
    return dict(state_dict)


def _mvdream_names(keys: Iterable[str], layers_per_block: int) -> dict[str, str]:
    """MVDream's name of each of our UNet's keys. MVDream numbers its modules in order: `input_blocks.0` is
    `conv_in`, then per level `layers_per_block` blocks `[resnet, transformer]` and a downsampler; `middle_block` is
    `[resnet, transformer, resnet]`; `output_blocks` has `layers_per_block + 1` blocks `[resnet, transformer]` per
    level, the last one ending with the upsampler (the transformer is absent at levels without attention)."""
    keys = list(keys)
    per_level = layers_per_block + 1
    up_attention = {int(match[1]) for key in keys if (match := re.match(r"up_blocks\.(\d+)\.attentions\.", key))}

    def resnet(rest: str) -> str:
        layer, _, param = rest.partition(".")
        return f"{_RESNET_NAMES[layer]}.{param}"

    def name(key: str) -> str:
        module, _, param = key.rpartition(".")
        if module in _FIXED_NAMES:
            return f"{_FIXED_NAMES[module]}.{param}"
        if match := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
            part, index, rest = match[1], int(match[2]), match[3]
            return f"middle_block.{2 * index}.{resnet(rest)}" if part == "resnets" else f"middle_block.1.{rest}"
        match = re.fullmatch(
            r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", key
        )
        if match is None:
            raise ValueError(f"{key!r} is not a key of a Stable Diffusion UNet with the camera embedding.")
        side, level, part, index, rest = match[1], int(match[2]), match[3], int(match[4]), match[5]
        blocks, first = (
            ("input_blocks", 1 + level * per_level) if side == "down" else ("output_blocks", level * per_level)
        )
        if part == "resnets":
            return f"{blocks}.{first + index}.0.{resnet(rest)}"
        if part == "attentions":
            return f"{blocks}.{first + index}.1.{rest}"
        if part == "downsamplers":  # its own block after the level's layers
            return f"input_blocks.{first + layers_per_block}.0.op.{rest.removeprefix('conv.')}"
        # the upsampler ends the level's last block: after its resnet (and its transformer, if the level has one)
        return f"output_blocks.{first + layers_per_block}.{2 if level in up_attention else 1}.{rest}"

    return {key: name(key) for key in keys}


def to_mvdream_state_dict(
    state_dict: Mapping[str, torch.Tensor], layers_per_block: int, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Our view-batched UNet's state dict under MVDream's names (`prefix=LDM_UNET_PREFIX`: as in its checkpoint):
    the inverse of [`convert_mvdream_unet_state_dict`], e.g. to use a fine-tuned UNet (LoRA merged) in MVDream's code.

    Args:
        state_dict: A `UNet2DConditionModel` state dict ([`diffusers_unet_config`]'s kind).
        layers_per_block: Its config's `layers_per_block` (MVDream's `num_res_blocks`).
        prefix: Prepended to every key.
    """
    names = _mvdream_names(state_dict, layers_per_block)
    return {prefix + names[key]: value for key, value in state_dict.items()}


def convert_mvdream_unet_state_dict(
    state_dict: Mapping[str, torch.Tensor], unet_config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Map MVDream's UNet weights (LDM keys, with or without the checkpoint's `model.diffusion_model.` prefix; other
    entries of a full checkpoint are ignored) onto the keys of `UNet2DConditionModel(**unet_config)`
    ([`diffusers_unet_config`]). The tensors are not copied.

    Raises:
        ValueError: naming the first unexpected key, the first missing key (MVDream's name and ours) or the first
            shape that differs, when the weights are not those of an MVDream UNet of this config.
    """
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        expected = UNet2DConditionModel(**unet_config).state_dict()
    theirs = _mvdream_names(expected, unet_config["layers_per_block"])
    ours = {name: key for key, name in theirs.items()}
    source = _unet_keys(state_dict)
    hint = (
        "check that the MVDream config (model_channels, channel_mult, num_res_blocks, attention_resolutions, "
        "transformer_depth, context_dim, use_linear_in_transformer) is the one these weights were trained with"
    )
    for key in source:
        if key not in ours:
            raise ValueError(
                f"Unexpected key {key!r} in MVDream's UNet weights: this UNet has no place for it; {hint}."
            )
    for key, target in expected.items():
        name = theirs[key]
        if name not in source:
            raise ValueError(f"Missing key {name!r} (our {key!r}) in MVDream's UNet weights; {hint}.")
        if source[name].shape != target.shape:
            raise ValueError(
                f"Shape mismatch: {name!r} has shape {tuple(source[name].shape)}, our {key!r} needs "
                f"{tuple(target.shape)}; {hint}."
            )
    return {key: source[theirs[key]] for key in expected}


def mvdream_unet(
    state_dict: Mapping[str, torch.Tensor], model: str | Mapping[str, Any] = "sd-v2.1-base-4view"
) -> torch.nn.Module:
    """A `UNet2DConditionModel` (camera embedding included) holding MVDream's UNet weights, in float32.

    It attends per view until [`install_multiview_attention`] (or [`MultiViewDiffusionPipeline`], which does it) makes
    its self-attention cross-view.

    Args:
        state_dict: MVDream's checkpoint or UNet state dict ([`convert_mvdream_unet_state_dict`]).
        model: A [`MVDREAM_UNET_PARAMS`] name or MVDream's `unet_config.params`.
    """
    from diffusers import UNet2DConditionModel

    config = diffusers_unet_config(model)
    weights = convert_mvdream_unet_state_dict(state_dict, config)
    unet = UNet2DConditionModel(**config)
    unet.load_state_dict(weights, strict=True)
    return unet


def load_mvdream_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read MVDream's checkpoint (`sd-v2.1-base-4view.pt`, a torch pickle of the whole model's state dict) safely,
    with `torch.load(weights_only=True)`: tensors only, no arbitrary code.

    Raises:
        ValueError: if the file holds other objects than tensors (it is not MVDream's released checkpoint).
    """
    path = Path(path)
    try:
        # mmap: the multi-GB file is paged in as the tensors are read (zip-format files only)
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} does not load with torch.load(weights_only=True) (it holds objects other than tensors: {error}). "
            "If you trust the file, load it yourself (torch.load(path, weights_only=False)) and pass its state dict "
            "to carve3d_trl.pipelines.mvdream_conversion.mvdream_unet."
        ) from error
    if isinstance(checkpoint, Mapping) and "state_dict" in checkpoint:  # a Lightning-style checkpoint
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a state dict.")
    return dict(checkpoint)


# ashawkey/mvdream_diffusers (a diffusers port): its `unet/` folder holds MVDream's UNet class as a diffusers model,
# under MVDream's own keys; its config is MVDream's `unet_config.params` less these (its transformers are all linear).
PORT_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# The `azimuth_start` (MVDream's convention, `multiview_cameras`) at which the port's own camera function puts its
# views: its `get_camera(num_frames, elevation)` (kiui's `orbit_camera`, then OpenGL -> Blender) equals MVDream's
# `get_camera` exactly, so 0, as for the original checkpoint (measured at ashawkey/mvdream_diffusers 8b318ef with kiui
# 0.2.0, the version it pins; `tests/test_mvdream_cameras.py`). The 90 degrees said to separate the ports are
# lizhiqi49/mvdream-diffusers' (its azimuth 0 on +X is MVDream's 90): a layout this module does not read.
MVDREAM_PORT_AZIMUTH_START = 0.0
_PORT_DEFAULTS = {"use_spatial_transformer": True, "use_linear_in_transformer": True}


def read_mvdream_port(folder: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The UNet weights (MVDream's keys) and MVDream `unet_config.params` of a folder of ashawkey's diffusers port
    (ashawkey/mvdream_diffusers; on the Hub `ashawkey/mvdream-sd2.1-diffusers`), for [`mvdream_unet`].

    Raises:
        ValueError: for an ImageDream folder (`ip_dim > 0`: image-prompt layers the view-batched UNet does not have),
            or a `unet/` folder without its config or weights.
    """
    unet_dir = Path(folder) / "unet"
    if not (unet_dir / "config.json").is_file():
        raise ValueError(f"{folder} is not a folder of ashawkey's MVDream port: it has no unet/config.json.")
    config = json.loads((unet_dir / "config.json").read_text())
    if config.get("ip_dim", 0):
        raise ValueError(
            f"{folder} is an ImageDream model (ip_dim={config['ip_dim']}): its image-prompt layers have no "
            "counterpart in the view-batched (text-to-multi-view) UNet."
        )
    weights = next((unet_dir / name for name in PORT_WEIGHT_NAMES if (unet_dir / name).is_file()), None)
    if weights is None:
        raise ValueError(f"{unet_dir} has no weights: none of {PORT_WEIGHT_NAMES}.")
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        state_dict = load_file(weights)
    else:
        state_dict = load_mvdream_checkpoint(weights)
    ignored = ("ip_dim", "ip_weight", "adm_in_channels")
    params = {k: v for k, v in config.items() if not k.startswith("_") and k not in ignored}
    return state_dict, {**params, **_PORT_DEFAULTS}


def build_mvdream_pipeline(
    checkpoint: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    base_model: str | os.PathLike[str] | None = None,
    *,
    model: str | Mapping[str, Any] | None = None,
    num_views: int = 4,
    elevation: float = 15.0,
    torch_dtype: torch.dtype | str = torch.float32,
) -> MultiViewDiffusionPipeline:
    """A [`MultiViewDiffusionPipeline`] of MVDream's UNet and the base model's VAE, text encoder, tokenizer and
    scheduler (as DDIM with MVDream's sampler settings, [`MVDREAM_DDIM`]).

    Args:
        checkpoint: MVDream's checkpoint file (`sd-v2.1-base-4view.pt`), its loaded state dict, or a folder of
            ashawkey's diffusers port ([`read_mvdream_port`]).
        base_model: The diffusers folder (or Hub id) of the Stable Diffusion MVDream was fine-tuned from: SD 2.1-base
            (`stabilityai/stable-diffusion-2-1-base`) for `sd-v2.1-base-4view`, SD 1.5 for `sd-v1.5-4view`. For a
            port folder it defaults to that folder (which holds them).
        model: A [`MVDREAM_UNET_PARAMS`] name or MVDream's `unet_config.params`; default `"sd-v2.1-base-4view"`, or
            for a port folder its own config.
        num_views: Views per object (the released models are trained with 4).
        elevation: Camera elevation of the views, degrees (MVDream's default: 15).
        torch_dtype: Dtype of every model in the pipeline (or its name: `"float16"`).

    Raises:
        ValueError: if the checkpoint does not match `model`, or `base_model` does not fit it.
    """
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    if isinstance(torch_dtype, str):
        if not isinstance(getattr(torch, torch_dtype, None), torch.dtype):
            raise ValueError(f"Unknown dtype {torch_dtype!r}; use e.g. 'float32', 'float16' or 'bfloat16'.")
        torch_dtype = getattr(torch, torch_dtype)
    azimuth_start = 0.0  # MVDream's own cameras; a converted folder keeps its source's (`camera_inputs()`)
    if not isinstance(checkpoint, Mapping) and Path(checkpoint).is_dir():
        azimuth_start = MVDREAM_PORT_AZIMUTH_START
        base_model = base_model or checkpoint
        checkpoint, port_params = read_mvdream_port(checkpoint)
        model = model or port_params
    if base_model is None:
        raise ValueError(
            "base_model is needed: the diffusers folder of the Stable Diffusion MVDream was fine-tuned from "
            "(SD 2.1-base for sd-v2.1-base-4view), for its VAE, text encoder, tokenizer and scheduler."
        )
    model = model or "sd-v2.1-base-4view"
    config = diffusers_unet_config(model)
    # the base model's parts first: a mismatch is refused before the (multi-GB) checkpoint is read
    text_encoder = CLIPTextModel.from_pretrained(base_model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(base_model, subfolder="vae")
    scheduler = DDIMScheduler.from_pretrained(base_model, subfolder="scheduler", **MVDREAM_DDIM)
    if text_encoder.config.hidden_size != config["cross_attention_dim"]:
        raise ValueError(
            f"The text encoder of {base_model} has width {text_encoder.config.hidden_size}, MVDream's UNet reads "
            f"{config['cross_attention_dim']}: use the Stable Diffusion it was fine-tuned from (SD 2.1-base for "
            "sd-v2.1-base-4view, SD 1.5 for sd-v1.5-4view)."
        )
    if vae.config.latent_channels != config["in_channels"]:
        raise ValueError(
            f"The VAE of {base_model} has {vae.config.latent_channels} latent channels, MVDream's UNet reads "
            f"{config['in_channels']}."
        )
    for name, value in MVDREAM_TRAINING_SCHEDULE.items():
        found = scheduler.config.get(name)
        if found != value and not (isinstance(value, float) and math.isclose(found, value)):
            raise ValueError(
                f"The scheduler of {base_model} has {name}={found!r}, MVDream was trained with {name}={value!r}: "
                "use the Stable Diffusion it was fine-tuned from."
            )
    if not isinstance(checkpoint, Mapping):
        checkpoint = load_mvdream_checkpoint(checkpoint)
    unet = mvdream_unet(checkpoint, model)
    pipeline = MultiViewDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(base_model, subfolder="tokenizer"),
        unet=unet,
        scheduler=scheduler,
        num_views=num_views,
        elevation=elevation,
        azimuth_start=azimuth_start,
    )
    return pipeline if torch_dtype == torch.float32 else pipeline.to(dtype=torch_dtype)


def convert_mvdream_checkpoint(
    checkpoint: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    base_model: str | os.PathLike[str] | None,
    output_dir: str | os.PathLike[str],
    **kwargs: Any,
) -> Path:
    """[`build_mvdream_pipeline`] and save it (safetensors) as a diffusers folder at `output_dir`, atomically: the
    folder appears complete or not at all (an existing one is replaced only once the new one is written).
    `MultiViewDiffusionPipeline.from_pretrained(output_dir)` and `load_ddpo_pipeline(output_dir)` load it.

    Returns:
        `Path`: `output_dir`.
    """
    pipeline = build_mvdream_pipeline(checkpoint, base_model, **kwargs)
    with atomic_directory(output_dir) as tmp:
        pipeline.save_pretrained(tmp, safe_serialization=True)
    return Path(output_dir)
