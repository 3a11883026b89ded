"""Pinhole camera geometry shared by the renderers: rays through pixels, projection of points, box clipping."""

from __future__ import annotations

import torch

__all__ = ["camera_rays", "intersect_box", "project_points", "scaled_size"]


def camera_rays(
    cam2world: torch.Tensor, intrinsics: torch.Tensor, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rays through the pixel centres of each camera (conventions of `carve3d_trl.rewards.cameras`).

    Args:
        cam2world (`torch.Tensor` of shape `(V, 4, 4)`): Camera-to-world matrices, OpenGL axes.
        intrinsics (`torch.Tensor` of shape `(V, 3, 3)`): Intrinsics normalised by the view size.
        height, width (`int`): Image size in pixels.

    Returns:
        `(origins, directions)`, each of shape `(V, height * width, 3)`, pixels row-major from the top-left;
        directions have unit length.
    """
    device = cam2world.device
    v = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    u = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    v, u = torch.meshgrid(v, u, indexing="ij")
    fx, fy = intrinsics[:, 0, 0, None], intrinsics[:, 1, 1, None]
    cx, cy = intrinsics[:, 0, 2, None], intrinsics[:, 1, 2, None]
    x = (u.reshape(1, -1) - cx) / fx
    y = -(v.reshape(1, -1) - cy) / fy  # image rows grow downwards, camera +Y points up
    local = torch.stack([x, y, -torch.ones_like(x)], dim=-1)  # (V, N, 3), the camera looks down -Z
    directions = torch.nn.functional.normalize(local @ cam2world[:, :3, :3].transpose(1, 2), dim=-1)
    origins = cam2world[:, None, :3, 3].expand_as(directions)
    return origins, directions


def project_points(
    points: torch.Tensor, cam2world: torch.Tensor, intrinsics: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Project world points into cameras.

    Args:
        points (`torch.Tensor` of shape `(..., 3)`): World points, broadcastable against the cameras' leading dims.
        cam2world (`torch.Tensor` of shape `(..., 4, 4)`), intrinsics (`torch.Tensor` of shape `(..., 3, 3)`).

    Returns:
        `(uv, depth)`: `uv` of shape `(..., 2)` in fractions of the view (x from the left, y from the top),
        `depth` of shape `(...)`, the distance in front of the camera (positive when visible).
    """
    rotation = cam2world[..., :3, :3]
    local = ((points - cam2world[..., :3, 3]).unsqueeze(-2) @ rotation).squeeze(-2)
    depth = -local[..., 2]
    safe_depth = depth.clamp_min(1e-6)
    u = intrinsics[..., 0, 0] * local[..., 0] / safe_depth + intrinsics[..., 0, 2]
    v = -intrinsics[..., 1, 1] * local[..., 1] / safe_depth + intrinsics[..., 1, 2]
    return torch.stack([u, v], dim=-1), depth


def intersect_box(
    origins: torch.Tensor, directions: torch.Tensor, bound: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clip rays against the axis-aligned cube `[-bound, bound]^3`.

    Returns:
        `(near, far, hit)` of shape `origins.shape[:-1]`: entry and exit distances (clamped at 0) and whether the
        ray crosses the cube.
    """
    safe = torch.where(directions.abs() < 1e-9, torch.full_like(directions, 1e-9), directions)
    t0 = (-bound - origins) / safe
    t1 = (bound - origins) / safe
    near = torch.minimum(t0, t1).amax(dim=-1).clamp_min(0.0)
    far = torch.maximum(t0, t1).amin(dim=-1)
    return near, far, far > near


def scaled_size(height: int, width: int, longest: int) -> tuple[int, int]:
    """`(height, width)` scaled so the longest side is `min(longest, max(height, width))` (never enlarged)."""
    scale = min(1.0, longest / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))
