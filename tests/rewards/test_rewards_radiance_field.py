import pytest
import torch
import torch.nn.functional as F

from carve3d_trl.rewards import RadianceFieldReconstructor, foreground_mask, instant3d_layout
from carve3d_trl.rewards.reconstructors.radiance_field import _flush_denormal_enabled, flush_denormal
from carve3d_trl.synthetic import distort_views, random_object, render_object

FAST = dict(fit_size=24, steps=40)
TRIPLANE = dict(grid_resolution=0, plane_resolution=32, density_offset=-1.0)  # the former default field
FIELDS = {"grid": {}, "triplane": TRIPLANE, "grid+triplane": dict(plane_resolution=16)}


@pytest.fixture(scope="module")
def scene():
    layout = instant3d_layout()
    generator = torch.Generator().manual_seed(0)
    objects = [random_object(generator) for _ in range(2)]
    return layout, objects, torch.stack([render_object(obj, layout, 32) for obj in objects])


def test_unregularised_same_view_fit_reproduces_the_views(scene):
    layout, _, views = scene
    renders = RadianceFieldReconstructor("same_view", tv_weight=0.0, **FAST).reconstruct(views, layout)
    assert renders.shape == (2, 4, 3, 24, 24)
    targets = F.interpolate(views.flatten(0, 1), size=(24, 24), mode="bilinear", antialias=True).view_as(renders)
    fg = foreground_mask(targets)
    error = ((renders - targets).square().mean(dim=2) * fg).sum() / fg.sum()
    assert -10 * torch.log10(error) > 25  # dB on the object


def test_held_out_renders_come_from_fields_that_did_not_see_the_view(scene):
    layout, objects, views = scene
    reconstructor = RadianceFieldReconstructor(**FAST)
    # Changing view 0 must not change view 0's own held-out render, only the renders of the fields that used it.
    changed = views.clone()
    changed[0, 0] = distort_views(objects[0], layout, 32, "recolour", 1.0, view_index=0)[0]
    base, other = reconstructor.reconstruct(views[:1], layout), reconstructor.reconstruct(changed[:1], layout)
    torch.testing.assert_close(base[0, 0], other[0, 0])
    assert (base[0, 1:] - other[0, 1:]).abs().amax() > 0.05


@pytest.mark.parametrize("field", FIELDS)
def test_batch_equals_samples_one_by_one_and_seeds_are_deterministic(scene, field):
    layout, _, views = scene
    reconstructor = RadianceFieldReconstructor(**FAST, **FIELDS[field], seed=3)
    batched = reconstructor.reconstruct(views, layout)
    assert batched.shape == (2, 4, 3, 24, 24) and batched.min() >= 0 and batched.max() <= 1
    singles = torch.cat([reconstructor.reconstruct(views[i : i + 1], layout) for i in range(2)])
    torch.testing.assert_close(batched, singles, atol=1e-5, rtol=0)
    again = RadianceFieldReconstructor(**FAST, **FIELDS[field], seed=3).reconstruct(views, layout)
    torch.testing.assert_close(again, batched)
    other_seed = RadianceFieldReconstructor(**FAST, **FIELDS[field], seed=4).reconstruct(views, layout)
    assert not torch.equal(other_seed, batched)


def test_a_changed_view_leaks_less_into_the_opposite_view_with_a_voxel_grid_than_with_a_triplane(scene):
    # A triplane shares features along each axis, so a field fitted on views 0, 1, 3 paints view 0's colours onto
    # the back that view 2 sees; a voxel grid does not. This leak is what broke MRC's monotonicity with held_out.
    layout, objects, views = scene
    changed = views.clone()
    for i, obj in enumerate(objects):
        changed[i, 0] = distort_views(obj, layout, 32, "recolour", 1.0, view_index=0)[0]
    leak = {}
    for field in ("grid", "triplane"):
        reconstructor = RadianceFieldReconstructor(**FAST, **FIELDS[field])
        renders = reconstructor.reconstruct(views, layout), reconstructor.reconstruct(changed, layout)
        leak[field] = (renders[0][:, 2] - renders[1][:, 2]).abs().mean()
    assert leak["grid"] < 0.75 * leak["triplane"], leak


def test_held_out_subset_marks_unevaluated_views_with_nan(scene):
    layout, _, views = scene
    renders = RadianceFieldReconstructor(held_out_views=2, fit_size=16, steps=5).reconstruct(views, layout)
    evaluated = ~renders.isnan().flatten(2).any(dim=2)
    assert evaluated.sum(dim=1).tolist() == [2, 2]
    assert renders[evaluated].min() >= 0


def test_options_are_validated():
    with pytest.raises(ValueError, match="'held_out', 'same_view'"):
        RadianceFieldReconstructor("multi_view")
    with pytest.raises(ValueError, match="held_out_views"):
        RadianceFieldReconstructor("same_view", held_out_views=2)
    with pytest.raises(ValueError, match="a voxel grid or a triplane"):
        RadianceFieldReconstructor(grid_resolution=0)
    with pytest.raises(ValueError, match="plane_resolution must be 0"):
        RadianceFieldReconstructor(plane_resolution=1)
    layout = instant3d_layout()
    with pytest.raises(ValueError, match="3 views for a layout of 4 cameras"):
        RadianceFieldReconstructor().reconstruct(torch.ones(1, 3, 3, 8, 8), layout)


def test_flush_denormal_scope_restores_the_previous_mode():
    torch.set_flush_denormal(False)
    with flush_denormal():
        assert _flush_denormal_enabled()
    assert not _flush_denormal_enabled()
    torch.set_flush_denormal(True)
    try:
        with flush_denormal():
            pass
        assert _flush_denormal_enabled()
    finally:
        torch.set_flush_denormal(False)
