"""Pure conversions between this project's cameras and the camera inputs of OpenLRM and InstantMesh.

Both models use OpenGL camera axes and a +Z-up world like `carve3d_trl.rewards.cameras`, and normalised
intrinsics; they differ in where they expect the cameras to be.
"""

from __future__ import annotations

import torch

__all__ = [
    "OPENLRM_SOURCE_DISTANCE",
    "OPENLRM_SOURCE_FOCAL",
    "instantmesh_input_cameras",
    "openlrm_canonical_cam2world",
    "openlrm_source_camera",
    "render_camera_vectors",
    "similarity_transform",
    "to_openlrm_frame",
]

OPENLRM_SOURCE_DISTANCE = 2.0
OPENLRM_SOURCE_FOCAL = 0.75


def openlrm_canonical_cam2world(distance: float = OPENLRM_SOURCE_DISTANCE) -> torch.Tensor:
    """OpenLRM's canonical source camera, `(4, 4)`: on the -Y axis at `distance`, looking at the origin, +Z up."""
    return torch.tensor(
        [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, -1.0, -distance], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
    )


def openlrm_source_camera(
    distance: float = OPENLRM_SOURCE_DISTANCE, focal: float = OPENLRM_SOURCE_FOCAL
) -> torch.Tensor:
    """OpenLRM's source camera vector, `(16,)`: the canonical 3x4 camera-to-world, flattened, then fx, fy, cx, cy."""
    extrinsics = openlrm_canonical_cam2world(distance)[:3].flatten()
    return torch.cat([extrinsics, torch.tensor([focal, focal, 0.5, 0.5])])


def similarity_transform(cam2world: torch.Tensor, rotation: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Move cameras `(..., 4, 4)` with the world map `x -> scale * rotation @ x`; a camera keeps its axes' scale."""
    moved = cam2world.clone()
    moved[..., :3, :3] = rotation @ cam2world[..., :3, :3]
    moved[..., :3, 3] = scale * (cam2world[..., :3, 3] @ rotation.transpose(-1, -2))
    return moved


def to_openlrm_frame(
    cam2world: torch.Tensor,
    intrinsics: torch.Tensor,
    source_index: int,
    distance: float = OPENLRM_SOURCE_DISTANCE,
    focal: float = OPENLRM_SOURCE_FOCAL,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Express cameras in the frame where OpenLRM sees view `source_index` from its canonical source camera.

    The world is rotated so the source camera's axes become the canonical ones, and scaled so the object keeps its
    apparent size: OpenLRM reads the source image as taken at `distance` with focal `focal`, so an object filling a
    fraction of a view taken at distance `d_s` with focal `f_s` is `scale = distance * f_s / (d_s * focal)` times as
    large in OpenLRM's frame. The other cameras keep their intrinsics. Assumes the source camera looks at the origin.

    Args:
        cam2world (`torch.Tensor` of shape `(V, 4, 4)`), intrinsics (`torch.Tensor` of shape `(V, 3, 3)`).
        source_index (`int`): The view fed to OpenLRM.

    Returns:
        `(cam2world, rotation, scale)`: the moved cameras `(V, 4, 4)`, and the world rotation `(3, 3)` and scale
        that moved them (see `similarity_transform`).
    """
    source = cam2world[source_index]
    rotation = openlrm_canonical_cam2world(distance)[:3, :3].to(source) @ source[:3, :3].T
    source_focal = 0.5 * (intrinsics[source_index, 0, 0] + intrinsics[source_index, 1, 1])
    scale = distance * source_focal / (source[:3, 3].norm() * focal)
    return similarity_transform(cam2world, rotation, scale), rotation, scale


def render_camera_vectors(cam2world: torch.Tensor, intrinsics: torch.Tensor) -> torch.Tensor:
    """Render cameras as OpenLRM's and InstantMesh's synthesizers take them: `(..., 25)` = 4x4 camera-to-world,
    flattened, then the normalised 3x3 intrinsics, flattened."""
    return torch.cat([cam2world.flatten(-2), intrinsics.flatten(-2)], dim=-1)


def instantmesh_input_cameras(cam2world: torch.Tensor, intrinsics: torch.Tensor) -> torch.Tensor:
    """InstantMesh's input cameras, `(..., 16)`: 3x4 camera-to-world, flattened, then fx, fy, cx, cy."""
    k = intrinsics
    return torch.cat(
        [cam2world[..., :3, :].flatten(-2), torch.stack([k[..., 0, 0], k[..., 1, 1], k[..., 0, 2], k[..., 1, 2]], -1)],
        dim=-1,
    )
