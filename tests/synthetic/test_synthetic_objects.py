import pytest
import torch

from carve3d_trl.rewards import foreground_mask, instant3d_layout, orbit_layout
from carve3d_trl.synthetic import (
    CAMERA_DISTORTIONS,
    DISTORTIONS,
    Primitive,
    SyntheticObject,
    distort_views,
    moved_camera,
    object_depth,
    random_object,
    render_object,
)
from carve3d_trl.synthetic.objects import _bounding_radius


@pytest.fixture(scope="module")
def scene():
    layout = instant3d_layout()
    obj = random_object(torch.Generator().manual_seed(3))
    return layout, obj, render_object(obj, layout, 32)


def test_random_objects_are_deterministic_and_normalised():
    first = random_object(torch.Generator().manual_seed(5))
    assert first == random_object(torch.Generator().manual_seed(5))
    assert first != random_object(torch.Generator().manual_seed(6))
    assert 2 <= len(first.primitives) <= 3
    assert _bounding_radius(first) == pytest.approx(0.9, abs=0.05)


def test_render_is_on_white_with_the_object_in_the_middle(scene):
    layout, _, views = scene
    assert views.shape == (4, 3, 32, 32)
    assert views.min() >= 0 and views.max() <= 1
    mask = foreground_mask(views)
    assert not mask[:, 0, :].any() and not mask[:, :, 0].any()  # borders are background
    assert mask[:, 12:20, 12:20].float().mean() > 0.5


def test_sphere_silhouette_matches_its_projection():
    layout = instant3d_layout()
    sphere = SyntheticObject((Primitive("sphere", (0.0, 0.0, 0.0), (0.5,)),))
    views = render_object(sphere, layout, 64)
    # Angular radius asin(0.5 / 2.5); the silhouette's half width in pixels is 64 * f * tan(.).
    focal = float(layout.intrinsics[0, 0, 0])
    half_width = 64 * focal * torch.tan(torch.asin(torch.tensor(0.5 / 2.5)))
    width = foreground_mask(views)[0, 32].sum()
    assert abs(float(width) - 2 * float(half_width)) <= 2


def test_object_depth_is_the_distance_to_the_surface_inside_the_silhouette(scene):
    layout, obj, views = scene
    depth = object_depth(obj, layout, 32)
    assert depth.shape == (4, 32 * 32)
    hit = depth.isfinite().view(4, 32, 32)
    mask = foreground_mask(views)
    interior = -torch.nn.functional.max_pool2d(-mask[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0.5
    assert (hit <= mask).all() and (interior <= hit).all()  # the silhouettes agree but for anti-aliased edges
    sphere = SyntheticObject((Primitive("sphere", (0.0, 0.0, 0.0), (0.5,)),))
    centre = object_depth(sphere, layout, 3)[:, 4]  # the middle pixel's ray is the optical axis
    camera_distance = layout.cam2world[:, :3, 3].norm(dim=-1)
    # the sphere tracer's minimum step (1e-4) carries it up to 96 steps past the surface, as in the renders
    assert ((centre - (camera_distance - 0.5)) >= 0).all() and ((centre - (camera_distance - 0.5)) < 0.01).all()


@pytest.mark.parametrize("kind", DISTORTIONS)
def test_distortions_change_only_the_chosen_view_and_vanish_at_strength_zero(scene, kind):
    layout, obj, views = scene
    torch.testing.assert_close(distort_views(obj, layout, 32, kind, 0.0, view_index=2, views=views), views)
    distorted = distort_views(obj, layout, 32, kind, 1.0, view_index=2, views=views)
    torch.testing.assert_close(distorted[[0, 1, 3]], views[[0, 1, 3]])
    assert (distorted[2] - views[2]).abs().mean() > 0.005


def test_unknown_names_are_rejected(scene):
    layout, obj, _ = scene
    with pytest.raises(ValueError, match="rotate, recolour, shift_scale, patch"):
        distort_views(obj, layout, 32, "blur", 0.5)
    with pytest.raises(ValueError, match="sphere, box, cylinder, torus"):
        Primitive("cone", (0.0, 0.0, 0.0), (0.3,))


@pytest.mark.parametrize("kind", CAMERA_DISTORTIONS)
def test_camera_distortions_change_only_the_chosen_view_and_vanish_at_strength_zero(scene, kind):
    layout, obj, views = scene
    torch.testing.assert_close(distort_views(obj, layout, 32, kind, 0.0, view_index=2, views=views), views)
    distorted = distort_views(obj, layout, 32, kind, 1.0, view_index=2, views=views)
    torch.testing.assert_close(distorted[[0, 1, 3]], views[[0, 1, 3]])
    assert (distorted[2] - views[2]).abs().mean() > 0.005


def test_a_camera_distortion_is_the_view_from_the_moved_camera():
    # instant3d's cameras are at elevation 20, azimuths 0/90/180/270: view 1 raised by 10 degrees (strength 0.5) is
    # the view from elevation 30 at azimuth 90, and view 1 turned by 15 degrees (strength 0.5) the one from 105.
    layout = instant3d_layout()
    obj = random_object(torch.Generator().manual_seed(3))
    raised = distort_views(obj, layout, 32, "camera_elevation", 0.5, view_index=1)
    turned = distort_views(obj, layout, 32, "camera_azimuth", 0.5, view_index=1)
    radius = float(layout.cam2world[1, :3, 3].norm())
    for views, elevation, azimuth in ((raised, 30.0, 90.0), (turned, 20.0, 105.0)):
        expected = orbit_layout(1, 1, elevation, [azimuth], radius, 50.0)  # instant3d_layout's field of view
        torch.testing.assert_close(views[1], render_object(obj, expected, 32)[0], atol=1e-5, rtol=0)
    camera = moved_camera(layout.cam2world[1], elevation=10.0)
    torch.testing.assert_close(camera[:3, 3].norm(), layout.cam2world[1, :3, 3].norm())
