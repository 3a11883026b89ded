"""The plain-PyTorch Gaussian splatting renderer on analytic cases."""

import math

import pytest
import torch

from carve3d_trl.rewards.cameras import CameraLayout, multiview_cameras
from carve3d_trl.rewards.reconstructors.gaussian_splatting import quaternion_to_matrix, render_gaussians, splat

SIZE = 64
FOCAL = 1.2  # normalised focal length
DISTANCE = 2.0


def _gaussian(xyz, opacity=0.8, scale=(0.05, 0.05, 0.05), quaternion=(1.0, 0.0, 0.0, 0.0), rgb=(1.0, 0.0, 0.0)):
    return torch.tensor([*xyz, opacity, *scale, *quaternion, *rgb], dtype=torch.float32)


def _head_on_layout(principal=(32.5 / SIZE, 32.5 / SIZE)) -> CameraLayout:
    """One camera on +Z at `DISTANCE` looking at the origin (OpenGL axes: identity rotation); the principal point is
    a pixel centre, so a Gaussian at the origin is centred on pixel (32, 32)."""
    cam2world = torch.eye(4)
    cam2world[2, 3] = DISTANCE
    intrinsics = torch.tensor([[FOCAL, 0.0, principal[0]], [0.0, FOCAL, principal[1]], [0.0, 0.0, 1.0]])
    return CameraLayout(1, 1, cam2world[None], intrinsics[None])


def _std_along(profile: torch.Tensor, centre: int, offset: int) -> float:
    """Standard deviation of a Gaussian profile from its value at `centre` and `offset` pixels away."""
    ratio = (profile[centre + offset] / profile[centre]).item()
    return offset / math.sqrt(-2.0 * math.log(ratio))


@pytest.mark.parametrize("dilation", [0.0, 0.3])
def test_isotropic_gaussian_head_on(dilation):
    sigma, opacity, rgb = 0.05, 0.8, (0.2, 0.4, 0.9)
    gaussians = _gaussian((0.0, 0.0, 0.0), opacity, (sigma,) * 3, rgb=rgb)[None, None]
    image, alpha = render_gaussians(gaussians, _head_on_layout(), SIZE, return_alpha=True, dilation=dilation)
    assert image.shape == (1, 1, 3, SIZE, SIZE) and alpha.shape == (1, 1, 1, SIZE, SIZE)
    alpha = alpha[0, 0, 0]
    # Footprint centred on the projected centre, peak alpha = opacity, colour composited over white.
    assert divmod(alpha.argmax().item(), SIZE) == (32, 32)
    assert alpha[32, 32].item() == pytest.approx(opacity, abs=1e-6)
    expected = torch.tensor(rgb) * opacity + (1 - opacity)
    torch.testing.assert_close(image[0, 0, :, 32, 32], expected, atol=1e-5, rtol=0)
    # 2D standard deviation in pixels: sigma * focal_px / depth (plus the dilation, in px^2).
    std_px = math.sqrt((sigma * FOCAL * SIZE / DISTANCE) ** 2 + dilation)
    for offset in (1, 2, 3):
        assert _std_along(alpha[32], 32, offset) == pytest.approx(std_px, rel=1e-3)
        assert _std_along(alpha[:, 32], 32, offset) == pytest.approx(std_px, rel=1e-3)
    # Symmetric footprint; far pixels are background.
    torch.testing.assert_close(alpha[32, 32 - 3], alpha[32, 32 + 3])
    torch.testing.assert_close(image[0, 0, :, 0, 0], torch.ones(3))


def test_quaternion_is_real_part_first():
    # 90 degrees about world +Z, (w, x, y, z): a Gaussian long along x becomes long along world y (image vertical).
    half = math.sqrt(0.5)
    torch.testing.assert_close(
        quaternion_to_matrix(torch.tensor([half, 0.0, 0.0, half])),
        torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]),
        atol=1e-6,
        rtol=0,
    )
    gaussians = _gaussian((0.0, 0.0, 0.0), 0.9, (0.1, 0.02, 0.02), (half, 0.0, 0.0, half))[None, None]
    _, alpha = render_gaussians(gaussians, _head_on_layout(), SIZE, return_alpha=True, dilation=0.0)
    alpha = alpha[0, 0, 0]
    vertical, horizontal = _std_along(alpha[:, 32], 32, 2), _std_along(alpha[32], 32, 2)
    assert vertical == pytest.approx(0.1 * FOCAL * SIZE / DISTANCE, rel=1e-3)
    assert horizontal == pytest.approx(0.02 * FOCAL * SIZE / DISTANCE, rel=1e-3)


def test_nearer_gaussian_dominates_and_depth_swap_swaps():
    red, blue = (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)
    near, far = (0.0, 0.0, 0.3), (0.0, 0.0, -0.3)

    def scene(red_at, blue_at):
        # The projected centres both fall on pixel (32, 32): the Gaussians sit on the optical axis.
        red_gaussian = _gaussian(red_at, 0.7, (0.1,) * 3, rgb=red)
        blue_gaussian = _gaussian(blue_at, 0.6, (0.1,) * 3, rgb=blue)
        return torch.stack([red_gaussian, blue_gaussian])[None]

    red_front = render_gaussians(scene(near, far), _head_on_layout(), SIZE)[0, 0, :, 32, 32]
    blue_front = render_gaussians(scene(far, near), _head_on_layout(), SIZE)[0, 0, :, 32, 32]
    assert red_front[0] > red_front[2] and blue_front[2] > blue_front[0]
    white = torch.ones(3)
    torch.testing.assert_close(
        red_front, 0.7 * torch.tensor(red) + 0.3 * 0.6 * torch.tensor(blue) + 0.3 * 0.4 * white, atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        blue_front, 0.6 * torch.tensor(blue) + 0.4 * 0.7 * torch.tensor(red) + 0.4 * 0.3 * white, atol=1e-5, rtol=0
    )
    # The order of the Gaussians in the tensor does not matter, only their depth.
    flipped = render_gaussians(scene(near, far).flip(1), _head_on_layout(), SIZE)[0, 0, :, 32, 32]
    torch.testing.assert_close(flipped, red_front)


def test_camera_round_trip_on_multiview_cameras():
    layout = multiview_cameras(4).layout
    pixels = [(10, 41), (50, 5), (33, 33), (3, 60)]  # (row, col) per view
    gaussians = []
    for view, (row, col) in enumerate(pixels):
        fx, fy = layout.intrinsics[view, 0, 0] * SIZE, layout.intrinsics[view, 1, 1] * SIZE
        cx, cy = layout.intrinsics[view, 0, 2] * SIZE, layout.intrinsics[view, 1, 2] * SIZE
        # Ray through the pixel centre, in OpenGL camera axes (y up, looking down -z), then to the world.
        direction = torch.tensor([(col + 0.5 - cx) / fx, -(row + 0.5 - cy) / fy, -1.0])
        point = layout.cam2world[view, :3, 3] + 2.0 * (layout.cam2world[view, :3, :3] @ direction)
        gaussians.append(_gaussian(point.tolist(), 0.9, (0.004,) * 3, rgb=(0.0, 1.0, 0.0)))
    for view, (row, col) in enumerate(pixels):
        _, alpha = render_gaussians(torch.stack([gaussians[view]])[None], layout, SIZE, return_alpha=True)
        alpha = alpha[0, view, 0]
        assert divmod(alpha.argmax().item(), SIZE) == (row, col), view
        assert alpha[row, col].item() > 0.5


def test_empty_space_behind_camera_and_transparent_render_background():
    layout = multiview_cameras(4).layout
    white = torch.ones(2, 4, 3, SIZE, SIZE)
    empty = torch.zeros(2, 0, 14)
    torch.testing.assert_close(render_gaussians(empty, layout, SIZE), white)
    # A large opaque Gaussian just behind camera 0 is ignored by view 0.
    behind = layout.cam2world[0, :3, 3] + 0.5 * layout.cam2world[0, :3, 2]  # +z of an OpenGL camera is backwards
    gaussians = _gaussian(behind.tolist(), 1.0, (0.3,) * 3)[None, None]
    torch.testing.assert_close(render_gaussians(gaussians, layout, SIZE)[0, 0], white[0, 0])
    transparent = _gaussian((0.0, 0.0, 0.0), 1.0 / 512, (0.5,) * 3)[None, None]
    torch.testing.assert_close(render_gaussians(transparent, layout, SIZE), white[:1])
    black = render_gaussians(empty, layout, (16, 24), background=(0.0, 0.0, 0.0))
    assert black.shape == (2, 4, 3, 16, 24) and black.abs().max() == 0


def test_batched_render_matches_single_renders_and_tiles():
    torch.manual_seed(0)
    layout = multiview_cameras(4).layout
    gaussians = torch.rand(2, 300, 14)
    gaussians[..., :3] = gaussians[..., :3] * 2 - 1
    gaussians[..., 4:7] *= 0.05
    batched, alpha = render_gaussians(gaussians, layout, 32, return_alpha=True)
    assert torch.isfinite(batched).all() and batched.min() >= 0 and batched.max() <= 1
    assert alpha.min() >= 0 and alpha.max() <= 1 and alpha.mean() > 0.05
    single = render_gaussians(gaussians[1:], layout, 32)
    torch.testing.assert_close(batched[1:], single)
    # The tiling is an implementation detail: the image does not depend on it.
    whole = splat(gaussians, layout.cam2world, layout.intrinsics, 32, 32, tile_size=32)
    torch.testing.assert_close(batched, whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(render_gaussians(gaussians, layout, 32), batched)
