import math

import torch

from carve3d_trl.rewards import fov_to_intrinsics, instant3d_layout, orbit_cam2world, zero123pp_layout
from carve3d_trl.rewards.reconstructors.camera_conventions import (
    instantmesh_input_cameras,
    openlrm_canonical_cam2world,
    openlrm_source_camera,
    render_camera_vectors,
    similarity_transform,
    to_openlrm_frame,
)


def test_canonical_openlrm_source_camera():
    canonical = openlrm_canonical_cam2world(2.0)
    # On the -Y axis, looking at the origin along +Y with image-up +Z (OpenGL axes: the camera looks down its -Z).
    torch.testing.assert_close(canonical[:3, 3], torch.tensor([0.0, -2.0, 0.0]))
    torch.testing.assert_close(-canonical[:3, 2], torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(canonical[:3, 1], torch.tensor([0.0, 0.0, 1.0]))
    vector = openlrm_source_camera(2.0, 0.75)
    expected = [1, 0, 0, 0, 0, 0, -1, -2, 0, 1, 0, 0, 0.75, 0.75, 0.5, 0.5]
    torch.testing.assert_close(vector, torch.tensor(expected, dtype=torch.float32))


def test_a_layout_camera_like_openlrms_maps_exactly_onto_the_canonical_camera():
    # Azimuth -90 degrees, elevation 0, distance 2 is the canonical position; focal 0.75 is the canonical focal.
    fov = math.degrees(2 * math.atan(0.5 / 0.75))
    cam2world = orbit_cam2world(0.0, [-90.0, 0.0], 2.0)
    moved, rotation, scale = to_openlrm_frame(cam2world, fov_to_intrinsics(fov, 2), source_index=0)
    torch.testing.assert_close(moved[0], openlrm_canonical_cam2world(2.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(rotation, torch.eye(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(scale, torch.tensor(1.0))
    torch.testing.assert_close(moved[1], cam2world[1], atol=1e-6, rtol=0)


def test_any_source_view_becomes_canonical_up_to_distance_and_relative_poses_are_kept():
    layout = instant3d_layout()  # distance 2.5, fov 50
    for source in range(4):
        moved, rotation, scale = to_openlrm_frame(layout.cam2world, layout.intrinsics, source)
        canonical = openlrm_canonical_cam2world(2.0)
        torch.testing.assert_close(moved[source, :3, :3], canonical[:3, :3], atol=1e-6, rtol=0)
        direction = torch.nn.functional.normalize(moved[source, :3, 3], dim=0)
        torch.testing.assert_close(direction, torch.tensor([0.0, -1.0, 0.0]), atol=1e-6, rtol=0)
        # Scale keeps the apparent size: distance * f_source / (d_source * 0.75).
        expected_scale = 2.0 * layout.intrinsics[0, 0, 0] / (2.5 * 0.75)
        torch.testing.assert_close(scale, expected_scale)
        torch.testing.assert_close(moved[:, :3, 3].norm(dim=-1), torch.full((4,), 2.5) * expected_scale)
        # Relative poses between cameras are unchanged by a rotation (translations scale).
        relative = torch.linalg.inv(moved[0]) @ moved[1]
        original = torch.linalg.inv(layout.cam2world[0]) @ layout.cam2world[1]
        torch.testing.assert_close(relative[:3, :3], original[:3, :3], atol=1e-5, rtol=0)
        # Round trip: the inverse similarity restores the layout.
        back = similarity_transform(moved, rotation.T, 1 / scale)
        torch.testing.assert_close(back, layout.cam2world, atol=1e-5, rtol=0)


def test_render_camera_vectors_flatten_cam2world_then_intrinsics():
    layout = zero123pp_layout()
    vectors = render_camera_vectors(layout.cam2world, layout.intrinsics)
    assert vectors.shape == (6, 25)
    torch.testing.assert_close(vectors[2, :16].view(4, 4), layout.cam2world[2])
    torch.testing.assert_close(vectors[2, 16:].view(3, 3), layout.intrinsics[2])


def test_instantmesh_input_cameras_follow_its_zero123plus_formula():
    layout = zero123pp_layout()
    cameras = instantmesh_input_cameras(layout.cam2world, layout.intrinsics)
    assert cameras.shape == (6, 16)
    # InstantMesh: x = r cos(el) cos(az), y = r cos(el) sin(az), z = r sin(el), OpenGL look-at with +Z up.
    az, el = math.radians(150), math.radians(20)
    position = torch.tensor([4 * math.cos(el) * math.cos(az), 4 * math.cos(el) * math.sin(az), 4 * math.sin(el)])
    extrinsics = cameras[2, :12].view(3, 4)
    torch.testing.assert_close(extrinsics[:, 3], position)
    torch.testing.assert_close(extrinsics[:, 2], position / 4)  # camera +Z points away from the origin
    x_axis = torch.linalg.cross(torch.tensor([0.0, 0.0, 1.0]), position / 4, dim=0)
    torch.testing.assert_close(extrinsics[:, 0], x_axis / x_axis.norm())
    focal = 0.5 / math.tan(math.radians(15))
    torch.testing.assert_close(cameras[2, 12:], torch.tensor([focal, focal, 0.5, 0.5]))
