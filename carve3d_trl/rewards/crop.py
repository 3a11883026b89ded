"""The foreground crop that MRC applies to each (generated view, render) pair before comparing them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["crop_pairs", "foreground_boxes", "foreground_mask", "resize_to"]

FOREGROUND_THRESHOLD = 0.05  # a pixel is foreground when a channel differs from the background by more than this
CROP_PADDING = 5


def foreground_mask(
    views: torch.Tensor, background: Sequence[float] = (1.0, 1.0, 1.0), threshold: float = FOREGROUND_THRESHOLD
) -> torch.Tensor:
    """Foreground pixels of views on a plain background.

    With a white background this is the Carve3D rule "any channel < 0.95".

    Args:
        views (`torch.Tensor` of shape `(..., 3, h, w)`): Images in [0, 1].

    Returns:
        `torch.BoolTensor` of shape `(..., h, w)`.
    """
    bg = torch.as_tensor(background, dtype=views.dtype, device=views.device).view(3, 1, 1)
    return ((views - bg).abs() > threshold).any(dim=-3)


def foreground_boxes(mask: torch.Tensor, padding: int = CROP_PADDING) -> torch.Tensor:
    """Square, padded bounding boxes of foreground masks (Carve3D's MRC crop).

    The tight box of the foreground is made square by growing its short side (when the growth is odd, the extra
    pixel goes to the top / left), padded by `padding` pixels on every side, then clipped to the image. An image
    without foreground gets the whole image.

    Args:
        mask (`torch.BoolTensor` of shape `(N, h, w)`).

    Returns:
        `torch.LongTensor` of shape `(N, 4)`: `(top, left, bottom, right)`, bottom / right exclusive.
    """
    n, h, w = mask.shape
    rows, cols = mask.any(dim=2), mask.any(dim=1)
    row_idx = torch.arange(h, device=mask.device)
    col_idx = torch.arange(w, device=mask.device)
    top = torch.where(rows, row_idx, h).amin(dim=1)
    bottom = torch.where(rows, row_idx, -1).amax(dim=1) + 1
    left = torch.where(cols, col_idx, w).amin(dim=1)
    right = torch.where(cols, col_idx, -1).amax(dim=1) + 1
    grow = (right - left) - (bottom - top)  # > 0: grow the height, < 0: grow the width
    grow_h, grow_w = grow.clamp_min(0), (-grow).clamp_min(0)
    top, bottom = top - (grow_h + 1) // 2, bottom + grow_h // 2
    left, right = left - (grow_w + 1) // 2, right + grow_w // 2
    boxes = torch.stack(
        [
            (top - padding).clamp(0, h),
            (left - padding).clamp(0, w),
            (bottom + padding).clamp(0, h),
            (right + padding).clamp(0, w),
        ],
        dim=1,
    )
    empty = ~mask.flatten(1).any(dim=1)
    full = torch.tensor([0, 0, h, w], device=mask.device)
    return torch.where(empty[:, None], full, boxes)


def resize_to(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Images `(N, 3, h, w)` resized to `size` as MRC compares them (bicubic, antialiased; not clamped); returned as
    they are when already that size."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode="bicubic", antialias=True)


def crop_pairs(
    views: torch.Tensor, renders: torch.Tensor, background: Sequence[float] = (1.0, 1.0, 1.0)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop each (view, render) pair with the foreground box of the view and resize both crops to the render size.

    The box is found on the view at its own resolution (see `foreground_boxes`). When the renders have another size
    than the views, the views are first resized to the render size (bicubic, antialiased) and the box is scaled to
    it (outwards to whole pixels), so both crops are taken at the same resolution. Crops are resized with bicubic
    interpolation (antialiased) and clamped to [0, 1].

    Args:
        views (`torch.Tensor` of shape `(B, V, 3, h, w)`): Generated views in [0, 1].
        renders (`torch.Tensor` of shape `(B, V, 3, h', w')`): Renders of the reconstruction at the views' cameras.
        background (`Sequence[float]`): Background RGB of the views.

    Returns:
        `(view_crops, render_crops)`, each of shape `(B, V, 3, h', w')`.
    """
    b, v, c, h, w = views.shape
    out_h, out_w = renders.shape[-2:]
    flat_views = views.reshape(b * v, c, h, w)
    flat_renders = renders.reshape(b * v, c, out_h, out_w)
    boxes = foreground_boxes(foreground_mask(flat_views, background)).double()
    if (out_h, out_w) != (h, w):
        flat_views = resize_to(flat_views, (out_h, out_w))
        scale = boxes.new_tensor([out_h / h, out_w / w, out_h / h, out_w / w])
        boxes = torch.cat([(boxes[:, :2] * scale[:2]).floor(), (boxes[:, 2:] * scale[2:]).ceil()], dim=1)
    view_crops, render_crops = [], []
    for i, (top, left, bottom, right) in enumerate(boxes.long().tolist()):
        pair = torch.stack([flat_views[i, :, top:bottom, left:right], flat_renders[i, :, top:bottom, left:right]])
        pair = F.interpolate(pair, size=(out_h, out_w), mode="bicubic", antialias=True)
        view_crops.append(pair[0])
        render_crops.append(pair[1])
    view_crops = torch.stack(view_crops).clamp(0, 1).reshape(b, v, c, out_h, out_w)
    render_crops = torch.stack(render_crops).clamp(0, 1).reshape(b, v, c, out_h, out_w)
    return view_crops, render_crops
