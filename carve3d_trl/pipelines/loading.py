"""Which model family serves a model or a pipeline: Stable Diffusion 1.x/2.x (`"sd"`) and Stable Diffusion XL
(`"sdxl"`), both grid models, or view-batched (`"view_batched"`, MVDream's architecture), and the DDPO pipeline and
conditioner of each."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..rewards.cameras import CameraLayout
from .conditioning import PromptConditioner
from .stable_diffusion import Carve3DStableDiffusionPipeline, StableDiffusionConditioner
from .stable_diffusion_xl import Carve3DStableDiffusionXLPipeline, StableDiffusionXLConditioner
from .view_batched import Carve3DViewBatchedPipeline, MultiViewDiffusionPipeline, cameras_of_config

PIPELINES = {
    "sd": Carve3DStableDiffusionPipeline,
    "sdxl": Carve3DStableDiffusionXLPipeline,
    "view_batched": Carve3DViewBatchedPipeline,
}
FAMILIES = ("auto", *PIPELINES)
GRID_FAMILIES = ("sd", "sdxl")  # one image tiled with the views


def detect_family(pretrained_model_name: str, revision: str = "main") -> str:
    """`"view_batched"` when the model's `model_index.json` names [`MultiViewDiffusionPipeline`], `"sdxl"` when it
    names an SDXL pipeline class or a second text encoder, else `"sd"` (only that file is read: a local folder, or one
    file from the Hub)."""
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(str(pretrained_model_name), revision=revision)
    if index.get("_class_name") == MultiViewDiffusionPipeline.__name__:
        return "view_batched"
    second_encoder = index.get("text_encoder_2") or [None, None]
    is_sdxl = "StableDiffusionXL" in index.get("_class_name", "") or second_encoder[0] is not None
    return "sdxl" if is_sdxl else "sd"


def resolve_family(pretrained_model_name: str, family: str = "auto", revision: str = "main") -> str:
    """`"sd"`, `"sdxl"` or `"view_batched"`: `family` itself, or with `"auto"` what [`detect_family`] reads."""
    if family not in FAMILIES:
        raise ValueError(f"Unknown pipeline family {family!r}; choose one of {FAMILIES}.")
    if family == "auto":
        return detect_family(pretrained_model_name, revision)
    if (Path(str(pretrained_model_name)) / "model_index.json").is_file():  # a local model: check the kind cheaply
        detected = detect_family(pretrained_model_name, revision)
        if (detected == "view_batched") != (family == "view_batched"):
            kind = "a view-batched" if detected == "view_batched" else "a grid"
            raise ValueError(
                f"'{pretrained_model_name}' is {kind} model (family {detected!r}), but family {family!r} was asked "
                f"for; use family {detected!r} or 'auto'."
            )
    return family


def load_ddpo_pipeline(
    pretrained_model_name: str, *, family: str = "auto", pretrained_model_revision: str = "main", **kwargs: Any
) -> Carve3DStableDiffusionPipeline | Carve3DStableDiffusionXLPipeline | Carve3DViewBatchedPipeline:
    """The Carve3D DDPO pipeline of `family` (`"auto"`: [`detect_family`]) for a model; `kwargs` go to its
    constructor (`use_lora`, `lora_rank`, ...)."""
    family = resolve_family(pretrained_model_name, family, pretrained_model_revision)
    return PIPELINES[family](pretrained_model_name, pretrained_model_revision=pretrained_model_revision, **kwargs)


def model_camera_layout(pretrained_model_name: str, revision: str = "main") -> CameraLayout | None:
    """A view-batched model's cameras as the MRC layout, read from its `model_index.json` alone (no weights load);
    `None` for a grid model."""
    if detect_family(pretrained_model_name, revision) != "view_batched":
        return None
    from diffusers import DiffusionPipeline

    config = DiffusionPipeline.load_config(str(pretrained_model_name), revision=revision)
    return cameras_of_config(config).layout


def conditioner_of(pipeline) -> PromptConditioner:
    """The conditioner of a pipeline: a DDPO pipeline's own `conditioner`; for a diffusers SDXL pipeline a
    [`StableDiffusionXLConditioner`]; else (TRL's or diffusers' Stable Diffusion pipelines) a
    [`StableDiffusionConditioner`] over its tokenizer and text encoder."""
    conditioner = getattr(pipeline, "conditioner", None)
    if conditioner is not None:
        return conditioner
    if getattr(pipeline, "text_encoder_2", None) is not None:
        return StableDiffusionXLConditioner(pipeline)
    if getattr(pipeline, "tokenizer", None) is None or getattr(pipeline, "text_encoder", None) is None:
        raise TypeError(
            f"{type(pipeline).__name__} has neither a `conditioner` nor a tokenizer and text encoder; use "
            "Carve3DStableDiffusionPipeline or Carve3DStableDiffusionXLPipeline, or give the pipeline a `conditioner` "
            "(see carve3d_trl.pipelines.PromptConditioner)."
        )
    return StableDiffusionConditioner(pipeline.tokenizer, pipeline.text_encoder)
