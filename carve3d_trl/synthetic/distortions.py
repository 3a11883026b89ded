"""Controlled multi-view inconsistencies: one view of a synthetic object made inconsistent with a chosen strength.

`distort_views` renders an object (`carve3d_trl.synthetic.objects`) at a layout's cameras, then changes one view
by a rotation of the object, a recolouring, a shift and scale, or a replaced patch (`DISTORTIONS`), or renders it
from a camera whose elevation or azimuth is off (`CAMERA_DISTORTIONS`: the view a model draws for the wrong camera);
at strength 0 the views stay exactly consistent.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..rewards.cameras import CameraLayout, look_at_cam2world
from ..rewards.crop import foreground_boxes, foreground_mask
from .objects import SyntheticObject, _render, render_object

__all__ = ["CAMERA_DISTORTIONS", "DISTORTIONS", "distort_views", "moved_camera"]

DISTORTIONS = ("rotate", "recolour", "shift_scale", "patch")
CAMERA_DISTORTIONS = ("camera_elevation", "camera_azimuth")

_MAX_ROTATION = 45.0  # degrees of yaw at strength 1
_MAX_HUE_SHIFT = 120.0  # degrees of hue rotation at strength 1
_MAX_SHIFT = 0.25  # world units along the camera's right axis at strength 1
_MAX_SCALE = 0.25  # relative growth at strength 1
_MAX_PATCH = 0.5  # side of the replaced patch, as a fraction of the foreground box, at strength 1
_MAX_ELEVATION_ERROR = 20.0  # degrees the camera is raised at strength 1
_MAX_AZIMUTH_ERROR = 30.0  # degrees the camera turns about the vertical at strength 1


def moved_camera(cam2world: torch.Tensor, elevation: float = 0.0, azimuth: float = 0.0) -> torch.Tensor:
    """A camera-to-world `(4, 4)` looking at the origin from the position of `cam2world`, raised by `elevation` and
    turned about the vertical (+Z) by `azimuth` degrees, at the same distance."""
    position = cam2world[:3, 3].double()
    radius = position.norm()
    old_elevation = torch.asin(position[2] / radius)
    old_azimuth = torch.atan2(position[1], position[0])
    new_elevation = old_elevation + torch.deg2rad(torch.tensor(elevation, dtype=torch.float64))
    new_azimuth = old_azimuth + torch.deg2rad(torch.tensor(azimuth, dtype=torch.float64))
    moved = radius * torch.stack(
        [new_elevation.cos() * new_azimuth.cos(), new_elevation.cos() * new_azimuth.sin(), new_elevation.sin()]
    )
    return look_at_cam2world(moved[None].to(cam2world.dtype))[0]


def distort_views(
    obj: SyntheticObject,
    layout: CameraLayout,
    view_size: int | tuple[int, int],
    kind: str,
    strength: float,
    view_index: int = 0,
    supersample: int = 2,
    views: torch.Tensor | None = None,
) -> torch.Tensor:
    """Views of `obj` where view `view_index` is made inconsistent with the others.

    Distortions at `strength` in [0, 1] (0 leaves the views consistent):
    `"rotate"`: the object turns about the vertical axis by up to 45 degrees in that view;
    `"recolour"`: its colours rotate in hue by up to 120 degrees;
    `"shift_scale"`: it moves by up to 0.25 along the camera's right axis and grows by up to 25%;
    `"patch"`: a square patch at the centre of the object, up to half the object's box side, is replaced by the
    same region of a render with opposite hues;
    `"camera_elevation"`: the view is rendered from a camera raised by up to 20 degrees ([`moved_camera`]);
    `"camera_azimuth"`: the view is rendered from a camera turned about the vertical by up to 30 degrees (the
    lights stay in the world, so unlike `"rotate"` the shading follows the camera).

    `views`, the output of `render_object` for the same arguments, saves rendering the consistent views again.

    Returns:
        `torch.Tensor` of shape `(V, 3, h, w)` in [0, 1].
    """
    if kind not in DISTORTIONS + CAMERA_DISTORTIONS:
        valid = ", ".join(DISTORTIONS + CAMERA_DISTORTIONS)
        raise ValueError(f"Unknown distortion {kind!r}; valid distortions: {valid}.")
    height, width = (view_size, view_size) if isinstance(view_size, int) else view_size
    views = render_object(obj, layout, (height, width), supersample) if views is None else views.clone()
    cam2world = layout.cam2world[view_index : view_index + 1]
    intrinsics = layout.intrinsics[view_index : view_index + 1]

    def render_one(changed: SyntheticObject, camera: torch.Tensor = cam2world) -> torch.Tensor:
        return _render(changed, camera, intrinsics, height, width, layout.background, supersample)[0]

    if kind in CAMERA_DISTORTIONS:
        if strength:
            if kind == "camera_elevation":
                camera = moved_camera(cam2world[0], elevation=_MAX_ELEVATION_ERROR * strength)
            else:
                camera = moved_camera(cam2world[0], azimuth=_MAX_AZIMUTH_ERROR * strength)
            views[view_index] = render_one(obj, camera[None])
    elif kind == "rotate":
        views[view_index] = render_one(replace(obj, yaw=obj.yaw + _MAX_ROTATION * strength))
    elif kind == "recolour":
        views[view_index] = render_one(replace(obj, hue_shift=obj.hue_shift + _MAX_HUE_SHIFT * strength))
    elif kind == "shift_scale":
        right = cam2world[0, :3, 0] * _MAX_SHIFT * strength
        offset = tuple((torch.tensor(obj.offset) + right).tolist())
        views[view_index] = render_one(replace(obj, offset=offset, scale=obj.scale * (1 + _MAX_SCALE * strength)))
    else:
        view = views[view_index]
        top, left, bottom, right = foreground_boxes(foreground_mask(view[None], layout.background))[0].tolist()
        side = round(_MAX_PATCH * strength * max(bottom - top, right - left))
        if side > 0:
            other = render_one(replace(obj, hue_shift=obj.hue_shift + 180.0))
            row, col = (top + bottom - side) // 2, (left + right - side) // 2
            view[:, row : row + side, col : col + side] = other[:, row : row + side, col : col + side]
    return views
