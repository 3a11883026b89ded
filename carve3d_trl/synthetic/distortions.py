"""Controlled multi-view inconsistencies: one view of a synthetic object made inconsistent with a chosen strength.

`distort_views` renders an object (`carve3d_trl.synthetic.objects`) at a layout's cameras, then changes one view
by a rotation of the object, a recolouring, a shift and scale, or a replaced patch; at strength 0 the views stay
exactly consistent.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..rewards.cameras import CameraLayout
from ..rewards.crop import foreground_boxes, foreground_mask
from .objects import SyntheticObject, _render, render_object

__all__ = ["DISTORTIONS", "distort_views"]

DISTORTIONS = ("rotate", "recolour", "shift_scale", "patch")

_MAX_ROTATION = 45.0  # degrees of yaw at strength 1
_MAX_HUE_SHIFT = 120.0  # degrees of hue rotation at strength 1
_MAX_SHIFT = 0.25  # world units along the camera's right axis at strength 1
_MAX_SCALE = 0.25  # relative growth at strength 1
_MAX_PATCH = 0.5  # side of the replaced patch, as a fraction of the foreground box, at strength 1


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
    same region of a render with opposite hues.

    `views`, the output of `render_object` for the same arguments, saves rendering the consistent views again.

    Returns:
        `torch.Tensor` of shape `(V, 3, h, w)` in [0, 1].
    """
    if kind not in DISTORTIONS:
        raise ValueError(f"Unknown distortion {kind!r}; valid distortions: {', '.join(DISTORTIONS)}.")
    height, width = (view_size, view_size) if isinstance(view_size, int) else view_size
    views = render_object(obj, layout, (height, width), supersample) if views is None else views.clone()
    cam2world = layout.cam2world[view_index : view_index + 1]
    intrinsics = layout.intrinsics[view_index : view_index + 1]

    def render_one(changed: SyntheticObject) -> torch.Tensor:
        return _render(changed, cam2world, intrinsics, height, width, layout.background, supersample)[0]

    if kind == "rotate":
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
