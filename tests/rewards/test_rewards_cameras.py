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
from carve3d_trl.rewards.cameras import ViewBatchedCameras, multiview_cameras
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


# View-batched (MVDream-like) cameras: `multiview_cameras`.


def _mvdream_camera_utils():
    """MVDream's `camera_utils` module from a clone of bytedance/MVDream on the path, or skip.

    The file is loaded on its own (it needs only numpy and torch): importing the `mvdream` package would import its
    model code and that code's requirements (einops, omegaconf, huggingface_hub).
    """
    import importlib.util

    spec = importlib.util.find_spec("mvdream")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("no clone of bytedance/MVDream on PYTHONPATH (package `mvdream` not found)")
    for folder in spec.submodule_search_locations:
        path = f"{folder}/camera_utils.py"
        try:
            module_spec = importlib.util.spec_from_file_location("_mvdream_camera_utils", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        except FileNotFoundError:
            continue
        return module
    pytest.skip("the `mvdream` package on PYTHONPATH has no camera_utils.py")


def test_multiview_cameras_equal_mvdream_reference_values():
    cameras = multiview_cameras()
    assert isinstance(cameras, ViewBatchedCameras)
    assert cameras.model_inputs.shape == (4, 16) and cameras.model_inputs.dtype == torch.float32
    assert cameras.azimuths == (0.0, 90.0, 180.0, 270.0) and cameras.elevation == 15.0 and cameras.num_views == 4
    # bytedance/MVDream 618f844, get_camera(4, elevation=15, azimuth_start=0), REFERENCE §9.
    view0 = [1, 0, 0, 0, 0, 0.2588, -0.9659, -0.9659, 0, 0.9659, 0.2588, 0.2588, 0, 0, 0, 1]
    view1 = [0, -0.2588, 0.9659, 0.9659, 1, 0, 0, 0, 0, 0.9659, 0.2588, 0.2588, 0, 0, 0, 1]
    torch.testing.assert_close(cameras.model_inputs[0], torch.tensor(view0, dtype=torch.float32), atol=1e-4, rtol=0)
    torch.testing.assert_close(cameras.model_inputs[1], torch.tensor(view1, dtype=torch.float32), atol=1e-4, rtol=0)
    # Views 2 and 3 at +Y and -X, the same elevation (Blender axes, +Z up).
    cos, sin = math.cos(math.radians(15)), math.sin(math.radians(15))
    centres = cameras.model_inputs.view(4, 4, 4)[:, :3, 3]
    expected = torch.tensor([[0.0, -cos, sin], [cos, 0.0, sin], [0.0, cos, sin], [-cos, 0.0, sin]])
    torch.testing.assert_close(centres, expected, atol=1e-6, rtol=0)
    # Every matrix is a rigid camera-to-world on the unit sphere looking at the origin (OpenGL axes: -Z forward).
    matrices = cameras.model_inputs.view(4, 4, 4)
    rotation = matrices[:, :3, :3]
    torch.testing.assert_close(rotation @ rotation.transpose(1, 2), torch.eye(3).expand(4, 3, 3))
    torch.testing.assert_close(torch.linalg.det(rotation), torch.ones(4))
    torch.testing.assert_close(-rotation[:, :, 2], -centres, atol=1e-6, rtol=0)
    torch.testing.assert_close(matrices[:, 3], torch.tensor([0.0, 0.0, 0.0, 1.0]).expand(4, 4))


@pytest.mark.parametrize(
    "num_views, elevation, azimuth_start, azimuth_span",
    [(4, 15, 0, 360), (4, 0, 45, 360), (1, 30, 10, 360), (2, -10, 90, 360), (6, 20.5, -30, 360), (8, 5, 0, 180)],
)
def test_multiview_cameras_equal_mvdream_get_camera(num_views, elevation, azimuth_start, azimuth_span):
    camera_utils = _mvdream_camera_utils()
    expected = camera_utils.get_camera(
        num_views, elevation=elevation, azimuth_start=azimuth_start, azimuth_span=azimuth_span
    )
    cameras = multiview_cameras(num_views, elevation, azimuth_start, azimuth_span)
    torch.testing.assert_close(cameras.model_inputs, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("num_views, grid", [(4, (2, 2)), (6, (1, 6)), (1, (1, 1))])
def test_multiview_layout_is_the_model_cameras_at_radius(num_views, grid):
    cameras = multiview_cameras(num_views, elevation=20.0, azimuth_start=30.0, fov=40.0, radius=1.8)
    layout = cameras.layout
    assert (layout.rows, layout.cols) == grid and layout.num_views == num_views
    assert (cameras.fov, cameras.radius, layout.background) == (40.0, 1.8, (1.0, 1.0, 1.0))
    torch.testing.assert_close(layout.intrinsics, fov_to_intrinsics(40.0, num_views))
    model = cameras.model_inputs.view(num_views, 4, 4)
    # The project's world frame is MVDream's Blender frame: no axis change, centres scaled to the radius, the same
    # orientations.
    torch.testing.assert_close(layout.cam2world[:, :3, 3], 1.8 * model[:, :3, 3])
    torch.testing.assert_close(layout.cam2world[:, :3, :3], model[:, :3, :3])
    torch.testing.assert_close(layout.camera_distances(), torch.full((num_views,), 1.8))
    # Every layout camera looks at the origin with world +Z up, as the project's own look-at builds it.
    torch.testing.assert_close(layout.cam2world, look_at_cam2world(layout.cam2world[:, :3, 3]), atol=1e-6, rtol=0)
    # MVDream azimuth a is the project's orbit azimuth a - 90 (0 on +X, towards +Y).
    orbit = orbit_cam2world(20.0, [a - 90.0 for a in cameras.azimuths], 1.8)
    torch.testing.assert_close(layout.cam2world, orbit, atol=1e-5, rtol=0)


def test_multiview_cameras_validate_their_arguments():
    with pytest.raises(ValueError, match="num_views must be an integer >= 1"):
        multiview_cameras(0)
    with pytest.raises(ValueError, match="num_views must be an integer >= 1"):
        multiview_cameras(2.0)
    with pytest.raises(ValueError, match=r"fov must be in \(0, 180\)"):
        multiview_cameras(fov=180.0)
    with pytest.raises(ValueError, match=r"fov must be in \(0, 180\)"):
        multiview_cameras(fov=0.0)
    with pytest.raises(ValueError, match="radius must be > 0"):
        multiview_cameras(radius=0.0)
    with pytest.raises(ValueError, match=r"elevation must be in \(-90, 90\)"):
        multiview_cameras(elevation=90.0)
    with pytest.raises(ValueError, match="azimuth_start must be a finite"):
        multiview_cameras(azimuth_start=float("nan"))


def _marker_centroids(views, channel):
    """Per view: (pixel count, centroid (u, v) in fractions of the view) of the pixels dominated by `channel`."""
    others = [c for c in range(3) if c != channel]
    mask = (views[:, channel] > views[:, others[0]] + 0.25) & (views[:, channel] > views[:, others[1]] + 0.25)
    height, width = mask.shape[1:]
    v, u = torch.meshgrid((torch.arange(height) + 0.5) / height, (torch.arange(width) + 0.5) / width, indexing="ij")
    counts = mask.sum(dim=(1, 2))
    centroids = torch.stack([(mask * u).sum(dim=(1, 2)), (mask * v).sum(dim=(1, 2))], dim=-1)
    return counts, centroids / counts.clamp_min(1)[:, None]


def _project_with_model_inputs(point, model_inputs, radius, fov):
    """(u, v) of a world point in each camera of the model inputs (Blender axes = project axes, OpenGL cameras)."""
    matrices = model_inputs.view(-1, 4, 4)
    local = (torch.tensor(point) - radius * matrices[:, :3, 3]).unsqueeze(1) @ matrices[:, :3, :3]
    x, y, z = local[:, 0].unbind(-1)
    focal = 0.5 / math.tan(math.radians(fov) / 2)
    return torch.stack([0.5 + focal * x / -z, 0.5 - focal * y / -z], dim=-1)


def test_multiview_layout_renders_show_the_model_cameras_viewpoints():
    from carve3d_trl.synthetic.objects import Primitive, SyntheticObject, render_object

    cameras = multiview_cameras()
    # A grey body at the origin, a red marker on +X and a green one on +Y (project frame = Blender frame).
    # MVDream's view 1 (azimuth 90) is on +X and view 2 on +Y: they see their marker in front, at the image's
    # horizontal centre; view 3 (-X) and view 0 (-Y) see it hidden behind the body. A 90 degree azimuth error moves
    # the markers to other views; a mirrored image or orbit swaps left and right in the side views.
    red, green = (0.65, 0.0, 0.0), (0.0, 0.65, 0.0)
    obj = SyntheticObject(
        (
            Primitive("sphere", (0.0, 0.0, 0.0), (0.35,), color=(0.6, 0.6, 0.6)),
            Primitive("sphere", red, (0.12,), color=(0.95, 0.05, 0.05)),
            Primitive("sphere", green, (0.12,), color=(0.05, 0.95, 0.05)),
        )
    )
    views = render_object(obj, cameras.layout, 64)
    for channel, marker, visible, facing in ((0, red, [1, 1, 1, 0], 1), (1, green, [0, 1, 1, 1], 2)):
        counts, centroids = _marker_centroids(views, channel)
        assert (counts > 10).tolist() == [bool(v) for v in visible], (channel, counts)
        assert counts[visible.index(0)] == 0
        expected = _project_with_model_inputs(marker, cameras.model_inputs, cameras.radius, cameras.fov)
        shown = torch.tensor(visible, dtype=torch.bool)
        torch.testing.assert_close(centroids[shown], expected[shown], atol=0.02, rtol=0)
        # The view facing the marker sees it in the horizontal centre, below the image centre (camera above).
        assert abs(centroids[facing, 0] - 0.5) < 0.02 and centroids[facing, 1] > 0.5
    # The side views: from -Y (view 0) +X is on the right; from +Y (view 2) on the left.
    counts, centroids = _marker_centroids(views, 0)
    assert centroids[0, 0] > 0.6 and centroids[2, 0] < 0.4
