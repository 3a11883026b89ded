import math

import pytest
import torch

from carve3d_trl.rewards import (
    CameraLayout,
    fov_to_intrinsics,
    instant3d_layout,
    look_at_cam2world,
    orbit_cam2world,
    split_grid,
    tile_views,
    zero123pp_layout,
)
from carve3d_trl.rewards.rays import camera_rays, intersect_box, project_points


def test_instant3d_layout_cameras_orbit_the_origin_at_elevation_20():
    layout = instant3d_layout()
    assert (layout.rows, layout.cols, layout.num_views, layout.background) == (2, 2, 4, (1.0, 1.0, 1.0))
    positions = layout.cam2world[:, :3, 3]
    torch.testing.assert_close(positions.norm(dim=-1), torch.full((4,), 2.5))
    elevation = torch.rad2deg(torch.asin(positions[:, 2] / 2.5))
    torch.testing.assert_close(elevation, torch.full((4,), 20.0))
    azimuth = torch.rad2deg(torch.atan2(positions[:, 1], positions[:, 0])) % 360
    torch.testing.assert_close(azimuth, torch.tensor([0.0, 90.0, 180.0, 270.0]), atol=1e-4, rtol=0)


def test_look_at_uses_opengl_axes_with_world_z_up():
    cam2world = look_at_cam2world(torch.tensor([[3.0, 0.0, 0.0], [1.0, 1.0, 1.0]]))
    rotation = cam2world[:, :3, :3]
    torch.testing.assert_close(rotation @ rotation.transpose(1, 2), torch.eye(3).expand(2, 3, 3))
    torch.testing.assert_close(torch.linalg.det(rotation), torch.ones(2))
    # The camera looks down its -Z axis, at the origin.
    forward = -rotation[:, :, 2]
    torch.testing.assert_close(forward, torch.nn.functional.normalize(-cam2world[:, :3, 3], dim=-1))
    # A camera on +X looking at the origin: image right is world +Y, image up is world +Z.
    torch.testing.assert_close(rotation[0, :, 0], torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(rotation[0, :, 1], torch.tensor([0.0, 0.0, 1.0]))
    assert (rotation[:, 2, 1] > 0).all()  # camera up always has a positive world-Z component
    with pytest.raises(ValueError, match="straight up or down"):
        look_at_cam2world(torch.tensor([[0.0, 0.0, 2.0]]))


def test_zero123pp_layout_matches_instantmesh_input_cameras():
    layout = zero123pp_layout()
    assert (layout.rows, layout.cols) == (3, 2)
    azimuths = [30, 90, 150, 210, 270, 330]
    elevations = [20, -10, 20, -10, 20, -10]
    for view, (az, el) in enumerate(zip(azimuths, elevations)):
        az, el = math.radians(az), math.radians(el)
        expected = 4.0 * torch.tensor([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
        torch.testing.assert_close(layout.cam2world[view, :3, 3], expected)
    focal = 0.5 / math.tan(math.radians(15))
    torch.testing.assert_close(layout.intrinsics[:, 0, 0], torch.full((6,), focal))


def test_fov_to_intrinsics():
    k = fov_to_intrinsics(90.0, num_views=2)
    torch.testing.assert_close(k, torch.tensor([[0.5, 0.0, 0.5], [0.0, 0.5, 0.5], [0.0, 0.0, 1.0]]).expand(2, 3, 3))


def test_split_grid_is_row_major_and_tile_views_inverts_it():
    layout = zero123pp_layout()  # 3 rows, 2 columns
    grid = torch.zeros(2, 3, 3 * 4, 2 * 5)
    for row in range(3):
        for col in range(2):
            grid[:, :, row * 4 : (row + 1) * 4, col * 5 : (col + 1) * 5] = row * 2 + col
    views = split_grid(grid, layout)
    assert views.shape == (2, 6, 3, 4, 5)
    torch.testing.assert_close(views.amax(dim=(0, 2, 3, 4)), torch.arange(6.0))
    torch.testing.assert_close(views.amin(dim=(0, 2, 3, 4)), torch.arange(6.0))
    random_grid = torch.rand(2, 3, 12, 10)
    torch.testing.assert_close(tile_views(split_grid(random_grid, layout), layout), random_grid)


def test_layout_mismatch_errors_name_the_sizes():
    layout = instant3d_layout()
    with pytest.raises(ValueError, match=r"129x128 .* 2x2 .* multiple of 2 \(e\.g\. 128 or 130\)"):
        split_grid(torch.rand(1, 3, 129, 128), layout)
    with pytest.raises(ValueError, match=r"\(B, 4, C, h, w\)"):
        tile_views(torch.rand(1, 6, 3, 8, 8), layout)


def test_camera_layout_validates_its_data():
    cam2world = orbit_cam2world(20.0, [0.0, 90.0], 2.0)
    with pytest.raises(ValueError, match=r"cam2world must have shape \(4, 4, 4\)"):
        CameraLayout(2, 2, cam2world, fov_to_intrinsics(40.0, 4))
    with pytest.raises(ValueError, match="background"):
        CameraLayout(1, 2, cam2world, fov_to_intrinsics(40.0, 2), background=(2.0, 0.0, 0.0))
    layout = CameraLayout(1, 2, cam2world.double(), fov_to_intrinsics(40.0, 2), background=[0.5, 0.5, 0.5])
    assert layout.cam2world.dtype == torch.float32 and layout.background == (0.5, 0.5, 0.5)


def test_rays_project_back_to_their_pixels():
    layout = instant3d_layout()
    origins, directions = camera_rays(layout.cam2world, layout.intrinsics, 6, 8)
    points = origins + 1.7 * directions
    uv, depth = project_points(points, layout.cam2world[:, None], layout.intrinsics[:, None])
    v, u = torch.meshgrid((torch.arange(6) + 0.5) / 6, (torch.arange(8) + 0.5) / 8, indexing="ij")
    expected = torch.stack([u.flatten(), v.flatten()], dim=-1).expand(4, -1, -1)
    torch.testing.assert_close(uv, expected)
    assert (depth > 0).all()
    # The top-left pixel's ray goes up and to the left of the optical axis.
    up, right = layout.cam2world[0, :3, 1], layout.cam2world[0, :3, 0]
    assert directions[0, 0] @ up > 0 and directions[0, 0] @ right < 0


def test_intersect_box():
    origins = torch.tensor([[-3.0, 0.0, 0.0], [-3.0, 5.0, 0.0]])
    directions = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    near, far, hit = intersect_box(origins, directions, 1.0)
    torch.testing.assert_close(near[0], torch.tensor(2.0))
    torch.testing.assert_close(far[0], torch.tensor(4.0))
    assert hit.tolist() == [True, False]
