"""Adapter for LGM (Large Multi-View Gaussian Model, 3DTopia/LGM), imported from a user's clone.

LGM predicts 3D Gaussians from 4 views taken at fixed cameras; this adapter renders them with the plain-PyTorch
splatting renderer of `gaussian_splatting`, so neither LGM's CUDA rasteriser nor a GPU is needed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import sys
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..cameras import CameraLayout
from ._external import default_device, import_from_clone, patched
from .gaussian_splatting import render_gaussians

__all__ = ["LGMReconstructor", "MVDREAM_TO_LGM_ORDER", "lgm_input_cameras", "plucker_rays", "to_lgm_frame"]

_CLONE_URL = "https://github.com/3DTopia/LGM"
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# LGM's demo feeds MVDream's views 1, 2, 3, 0 to its input cameras at azimuths 0, 90, 180, 270.
MVDREAM_TO_LGM_ORDER = (1, 2, 3, 0)
# This project's world frame (+Z up) to LGM's OpenGL world frame (+Y up): (x, y, z) -> (x, z, -y).
_PROJECT_TO_OPENGL = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])


class LGMReconstructor:
    """Reconstructs 3D Gaussians with LGM from 4 of the views and renders them at every camera of the layout.

    LGM is imported from a clone of https://github.com/3DTopia/LGM (package `core`; MIT licence, not shipped here):
    pass its root folder as `repo`, or put it on `PYTHONPATH`; its requirements (`kiui`, `tyro`, `roma`, ...) must be
    installed, but not its CUDA rasteriser. While `core.models` is imported, a stand-in `diff_gaussian_rasterization`
    module is placed in `sys.modules` when the real one is not installed (LGM's `core/gs.py` imports it at module
    level), and while `LGM(opt)` is built its `GaussianRenderer` is replaced by an empty stand-in (it allocates a CUDA
    tensor); LGM's renderer is never used. The model is built with `lambda_lpips = 0` (no VGG download).

    Preprocessing follows LGM's demo for multi-view images (`app.py`): the views `view_order` are taken (MVDream's
    `(1, 2, 3, 0)` by default), views with an alpha channel are composited over white (this project's views are RGB
    on white already), resized to the model's input size (bilinear), normalised with ImageNet's mean and standard
    deviation, and concatenated with the Plucker rays `(o x d, d)` of LGM's fixed input cameras (elevation
    `input_elevation`, azimuths 0/90/180/270, radius `opt.cam_radius` = 1.5, vertical field of view `opt.fovy` =
    49.1 degrees). No recentring: LGM recentres only the single image its image-to-multi-view stage is conditioned on,
    never the multi-view images it reconstructs from (recentring each view alone would break their shared geometry).

    Rendering: `to_lgm_frame` moves the layout's cameras into LGM's world (OpenGL axes, +Y up), rotated about the
    vertical so that the camera of view `view_order[0]` sits at LGM's azimuth 0, and scaled about the origin so the
    source views' mean camera distance is `opt.cam_radius` (the views are assumed framed like LGM's inputs: the object
    fills the image as at radius 1.5 with a 49.1 degree field of view, i.e. LGM's Gaussians live in its radius-1.5
    frame; a uniform scale of the whole scene does not change the images). The renders use the layout's own
    intrinsics, so they are pixel-aligned with the views. With `multiview_cameras(4, elevation=0)` the 4 source
    cameras land exactly on LGM's input cameras; at another elevation, set `input_elevation` to it (LGM was trained
    at elevation 0).

    Args:
        checkpoint (`str` or `os.PathLike`): A `.safetensors` file, a folder holding `filename`, or a Hub repo id
            (e.g. `"ashawkey/LGM"`) from which `filename` is downloaded with `huggingface_hub`.
        repo (`str` or `os.PathLike`, *optional*): Root folder of the LGM clone; default: import `core` from
            `PYTHONPATH`.
        config (`str` or LGM `Options`): A key of the clone's `core.options.config_defaults` (`"big"` for the
            released `model_fp16_fixrot.safetensors`, `"small"`, `"tiny"`, `"lrm"`) or an `Options` instance.
        options (`dict`, *optional*): Fields of `Options` to override (e.g. `{"input_size": 128}`).
        filename (`str`): Weights file name inside a folder or Hub repo.
        view_order (`Sequence[int]`): The 4 views, in the layout's order, fed to LGM's input cameras at azimuths 0,
            90, 180 and 270 degrees. Default `(1, 2, 3, 0)`: MVDream's order, as LGM's demo feeds it (the layouts of
            `multiview_cameras(4)`).
        input_elevation (`float`): Elevation of LGM's input cameras, in degrees above the horizon (0 in training).
        render_size (`int`): Side of the square renders.
        render_kwargs (`dict`, *optional*): Passed to `render_gaussians` (`dilation`, `near`, `tile_size`, ...).
        revision (`str`, *optional*): Hub revision.
        device (`str` or `torch.device`, *optional*): Device of the model. Default: CUDA when available.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        *,
        repo: str | os.PathLike | None = None,
        config: Any = "big",
        options: dict[str, Any] | None = None,
        filename: str = "model_fp16_fixrot.safetensors",
        view_order: Sequence[int] = MVDREAM_TO_LGM_ORDER,
        input_elevation: float = 0.0,
        render_size: int = 128,
        render_kwargs: dict[str, Any] | None = None,
        revision: str | None = None,
        device: str | torch.device | None = None,
    ):
        view_order = tuple(int(v) for v in view_order)
        if len(view_order) != 4 or len(set(view_order)) != 4 or min(view_order) < 0:
            raise ValueError(f"view_order must be 4 distinct view indices, got {view_order}.")
        options_module, models_module = import_lgm(repo)
        if isinstance(config, str):
            if config not in options_module.config_defaults:
                raise ValueError(
                    f"Unknown LGM config {config!r}; the clone defines {', '.join(options_module.config_defaults)}."
                )
            config = options_module.config_defaults[config]
        self.opt = dataclasses.replace(config, **(options or {}), lambda_lpips=0.0)
        weights = _resolve_checkpoint(checkpoint, filename, revision)
        with patched(models_module, "GaussianRenderer", _NoRenderer):
            model = models_module.LGM(self.opt)
        from safetensors.torch import load_file

        state = load_file(str(weights))
        state = {key: value for key, value in state.items() if "lpips" not in key}
        # Compare the key sets (load_state_dict does not report keys under a `None` submodule as unexpected).
        expected = set(model.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(
                f"{weights} does not match the LGM config (down_channels {self.opt.down_channels}, up_channels "
                f"{self.opt.up_channels}, input_size {self.opt.input_size}): "
                f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]} (check `config`)."
            )
        model.load_state_dict(state, strict=True)
        self.checkpoint = weights
        self.device = default_device(device)
        self.model = model.float().eval().requires_grad_(False).to(self.device)
        self.view_order = view_order
        self.input_elevation = float(input_elevation)
        self.render_size = render_size
        self.render_kwargs = dict(render_kwargs or {})
        cameras = lgm_input_cameras(self.opt.cam_radius, self.input_elevation)
        self.rays = plucker_rays(cameras, self.opt.input_size, self.opt.fovy).to(self.device)  # (4, 6, H, W)

    def preprocess(self, views: torch.Tensor) -> torch.Tensor:
        """LGM's input `(B, 4, 9, input_size, input_size)` from views `(B, V, 3 or 4, h, w)` in [0, 1]."""
        if views.ndim != 5 or views.shape[2] not in (3, 4):
            raise ValueError(f"views must have shape (B, V, 3 or 4, h, w), got {tuple(views.shape)}.")
        if max(self.view_order) >= views.shape[1]:
            raise ValueError(f"view_order {self.view_order} needs more than the {views.shape[1]} views given.")
        images = views[:, list(self.view_order)].to(self.device, torch.float32)
        if images.shape[2] == 4:  # composite over white, as LGM's data
            images = images[:, :, :3] * images[:, :, 3:] + (1.0 - images[:, :, 3:])
        batch = images.shape[0]
        size = self.opt.input_size
        images = F.interpolate(images.flatten(0, 1), size=(size, size), mode="bilinear", align_corners=False)
        mean = torch.tensor(_IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(_IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        images = ((images - mean) / std).view(batch, 4, 3, size, size)
        return torch.cat([images, self.rays.expand(batch, -1, -1, -1, -1)], dim=2)

    @torch.no_grad()
    def predict_gaussians(self, views: torch.Tensor) -> torch.Tensor:
        """LGM's Gaussians `(B, N, 14)` (xyz, opacity, scale, rotation `(w, x, y, z)`, RGB) in LGM's world frame."""
        return self.model.forward_gaussians(self.preprocess(views))

    @torch.no_grad()
    def reconstruct(self, views: torch.Tensor, layout: CameraLayout) -> torch.Tensor:
        """Predict the Gaussians from the views `view_order` and render them at every camera of `layout`.

        Args:
            views (`torch.Tensor` of shape `(B, V, 3, h, w)`): Views in [0, 1], on white.
            layout (`CameraLayout`): The views' cameras.

        Returns:
            `torch.Tensor` of shape `(B, V, 3, render_size, render_size)` in [0, 1] on the device of `views`.
        """
        if views.shape[1] != layout.num_views:
            raise ValueError(f"Got {views.shape[1]} views for a layout of {layout.num_views}.")
        gaussians = self.predict_gaussians(views)
        cameras = to_lgm_frame(layout, self.view_order, self.opt.cam_radius)
        renders = render_gaussians(gaussians, cameras, self.render_size, **self.render_kwargs)
        return renders.to(views.device)


def import_lgm(repo: str | os.PathLike | None = None) -> tuple[types.ModuleType, types.ModuleType]:
    """Import `core.options` and `core.models` from an LGM clone (`repo`, or `PYTHONPATH`) without its rasteriser."""
    root = None
    if repo is not None:
        root = Path(repo).expanduser().resolve()
        if not (root / "core" / "models.py").is_file():
            raise FileNotFoundError(
                f"{root} is not a clone of LGM (no core/models.py): clone it with `git clone {_CLONE_URL}`."
            )
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
    with _stub_rasterizer():
        options = import_from_clone("core.options", "LGM", _CLONE_URL)
        models = import_from_clone("core.models", "LGM", _CLONE_URL)
    if not hasattr(models, "LGM") or not hasattr(options, "config_defaults"):
        raise ImportError(f"The package `core` imported from {models.__file__} is not LGM's (no core.models.LGM).")
    if root is not None and root not in Path(models.__file__).resolve().parents:
        raise ImportError(
            f"Another package named `core` ({models.__file__}) was imported before the LGM clone at {root}: "
            "LGM needs a fresh process or that package removed from sys.modules."
        )
    return options, models


@contextmanager
def _stub_rasterizer() -> Iterator[None]:
    """Provide a placeholder `diff_gaussian_rasterization` module while importing, when it is not installed."""
    if "diff_gaussian_rasterization" in sys.modules or importlib.util.find_spec("diff_gaussian_rasterization"):
        yield
        return
    stub = types.ModuleType("diff_gaussian_rasterization")

    def unavailable(*args: Any, **kwargs: Any):
        raise RuntimeError("LGM's CUDA rasteriser is not installed; carve3d_trl renders with gaussian_splatting.")

    stub.GaussianRasterizationSettings = unavailable
    stub.GaussianRasterizer = unavailable
    sys.modules["diff_gaussian_rasterization"] = stub
    try:
        yield
    finally:
        if sys.modules.get("diff_gaussian_rasterization") is stub:
            del sys.modules["diff_gaussian_rasterization"]


class _NoRenderer:
    """Stands in for LGM's `GaussianRenderer` (CUDA only), which the adapter never calls."""

    def __init__(self, opt: Any):
        self.opt = opt


def _resolve_checkpoint(checkpoint: str | os.PathLike, filename: str, revision: str | None) -> Path:
    path = Path(checkpoint).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if not (path / filename).is_file():
            raise FileNotFoundError(f"No {filename} in the folder {path}.")
        return path / filename
    text = str(checkpoint)
    if path.suffix in (".safetensors", ".pt", ".ckpt", ".bin") or text.count("/") != 1 or text.startswith((".", "/")):
        raise FileNotFoundError(f"LGM checkpoint {text!r} is neither a file, a folder nor a Hub repo id.")
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id=text, filename=filename, revision=revision))


def lgm_input_cameras(radius: float = 1.5, elevation: float = 0.0) -> torch.Tensor:
    """LGM's 4 input cameras `(4, 4, 4)` in its OpenGL world frame (+Y up): azimuths 0, 90, 180, 270 degrees.

    Azimuth 0 is on +Z and 90 on +X; `elevation` is in degrees above the horizon (LGM's `orbit_camera` takes its
    negative). Columns of the rotation: right, up, backward (the camera looks at the origin).
    """
    azimuth = torch.deg2rad(torch.tensor([0.0, 90.0, 180.0, 270.0], dtype=torch.float64))
    elev = torch.tensor(math.radians(elevation), dtype=torch.float64).expand_as(azimuth)
    centre = radius * torch.stack([elev.cos() * azimuth.sin(), elev.sin(), elev.cos() * azimuth.cos()], dim=-1)
    backward = F.normalize(centre, dim=-1)
    world_up = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64).expand_as(backward)
    right = F.normalize(torch.linalg.cross(world_up, backward, dim=-1), dim=-1)
    up = torch.linalg.cross(backward, right, dim=-1)
    cam2world = torch.eye(4, dtype=torch.float64).repeat(4, 1, 1)
    cam2world[:, :3, :3] = torch.stack([right, up, backward], dim=-1)
    cam2world[:, :3, 3] = centre
    return cam2world.float()


def plucker_rays(cam2world: torch.Tensor, size: int, fovy: float) -> torch.Tensor:
    """Plucker rays `(V, 6, size, size)`, channels `(o x d, d)`, of square pinhole cameras (OpenGL axes).

    `d` is the unit direction through each pixel centre, `o` the camera centre; `fovy` is in degrees.
    """
    focal = 0.5 * size / math.tan(math.radians(fovy) / 2)
    centres = torch.arange(size, dtype=torch.float32) + 0.5 - 0.5 * size
    row, col = torch.meshgrid(centres, centres, indexing="ij")
    directions = torch.stack([col / focal, -row / focal, -torch.ones_like(col)], dim=-1)  # (H, W, 3)
    directions = torch.einsum("vij,hwj->vhwi", cam2world[:, :3, :3].float(), directions)
    directions = F.normalize(directions, dim=-1)
    origins = cam2world[:, None, None, :3, 3].float().expand_as(directions)
    rays = torch.cat([torch.linalg.cross(origins, directions, dim=-1), directions], dim=-1)
    return rays.permute(0, 3, 1, 2).contiguous()


def to_lgm_frame(layout: CameraLayout, view_order: Sequence[int], radius: float = 1.5) -> CameraLayout:
    """`layout`'s cameras moved into LGM's world frame (see `LGMReconstructor`), same intrinsics and background.

    The world is turned from this project's +Z-up axes to LGM's +Y-up OpenGL axes, rotated about the vertical so that
    the camera of view `view_order[0]` is at LGM's azimuth 0 (on +Z), and scaled about the origin so the mean
    distance of the cameras `view_order` is `radius`.
    """
    order = list(view_order)
    rotation = _PROJECT_TO_OPENGL.double()
    centres = layout.cam2world[:, :3, 3].double() @ rotation.T
    first = centres[order[0]]
    angle = -math.atan2(first[0].item(), first[2].item())  # rotate its azimuth to 0
    cos, sin = math.cos(angle), math.sin(angle)
    about_y = torch.tensor([[cos, 0.0, sin], [0.0, 1.0, 0.0], [-sin, 0.0, cos]], dtype=torch.float64)
    rotation = about_y @ rotation
    scale = radius / layout.cam2world[order, :3, 3].double().norm(dim=-1).mean()
    cam2world = layout.cam2world.double().clone()
    cam2world[:, :3, :3] = rotation @ cam2world[:, :3, :3]
    cam2world[:, :3, 3] = scale * cam2world[:, :3, 3] @ rotation.T
    return CameraLayout(layout.rows, layout.cols, cam2world.float(), layout.intrinsics, layout.background)
