import pytest
import torch

from carve3d_trl.rewards import (
    MRCReward,
    RadianceFieldReconstructor,
    crop_pairs,
    instant3d_layout,
    make_reconstructor,
    silhouette_disagreement,
    split_grid,
    tile_views,
)
from carve3d_trl.rewards.cameras import multiview_cameras
from carve3d_trl.synthetic import distort_views, random_object, render_object

FAST = dict(fit_size=32, steps=60)


class EchoReconstructor:
    """Renders = the views, shifted by `offset`: a stand-in with a known MRC."""

    def __init__(self, offset=0.0):
        self.offset = offset

    def reconstruct(self, views, layout):
        return (views + self.offset).clamp(0, 1)


@pytest.fixture(scope="module")
def grids():
    layout = instant3d_layout()
    obj = random_object(torch.Generator().manual_seed(1))
    views = render_object(obj, layout, 64)
    rotated = distort_views(obj, layout, 64, "rotate", 1.0, views=views)
    return layout, tile_views(torch.stack([views, rotated]), layout)


def test_reward_has_the_trl_signature_and_is_minus_the_mean_per_view_lpips(grids):
    layout, images = grids
    reward = MRCReward(layout, RadianceFieldReconstructor(**FAST), lpips_pretrained=False)
    rewards, info = reward(images, ("a chair", "a chair"), ({}, {}))
    assert rewards.dtype == torch.float32 and rewards.device.type == "cpu" and rewards.shape == (2,)
    assert info["mrc_per_view"].shape == (2, 4) and info["renders"].shape == (2, 4, 3, 32, 32)
    torch.testing.assert_close(info["mrc"], info["mrc_per_view"].mean(dim=1))
    torch.testing.assert_close(rewards, -info["mrc_per_view"].mean(dim=1))
    # The per-view values are LPIPS of the cropped pairs plus 10 (LPIPS's default weights) times the disagreement of
    # the whole view's and render's silhouettes, at the render size, and 10 times the crops' mean squared error.
    views = images.view(2, 3, 2, 64, 2, 64).permute(0, 2, 4, 1, 3, 5).reshape(2, 4, 3, 64, 64)
    view_crops, render_crops = (crops.flatten(0, 1) for crops in crop_pairs(views, info["renders"]))
    small = torch.nn.functional.interpolate(views.flatten(0, 1), size=32, mode="bicubic", antialias=True).clamp(0, 1)
    silhouette = silhouette_disagreement(small, info["renders"].flatten(0, 1)).view(2, 4)
    torch.testing.assert_close(info["silhouette"], silhouette)
    mse = (view_crops - render_crops).square().flatten(1).mean(dim=1).view(2, 4)
    expected = reward.metric(view_crops, render_crops).view(2, 4) + 10.0 * silhouette + 10.0 * mse
    torch.testing.assert_close(info["mrc_per_view"], expected)
    assert reward.silhouette_weight == 10.0 and reward.mse_weight == 10.0


class ShrinkingReconstructor:
    """Renders = the views with their foreground's right half turned to background: a known silhouette loss."""

    def reconstruct(self, views, layout):
        renders = views.clone()
        renders[..., views.shape[-1] // 2 :] = 1.0
        return renders


def test_the_silhouette_term_counts_the_weighted_foreground_disagreement(grids):
    layout, images = grids
    off, info_off = MRCReward(layout, ShrinkingReconstructor(), metric="mse", silhouette_weight=0.0)(images)
    on, info_on = MRCReward(layout, ShrinkingReconstructor(), metric="mse", silhouette_weight=2.0)(images)
    assert (info_on["silhouette"] > 0.1).all()  # the foreground's part in the right half of each view is gone
    torch.testing.assert_close(on, off - 2.0 * info_on["silhouette"].mean(dim=1))
    psnr_off, _ = MRCReward(layout, ShrinkingReconstructor(), metric="psnr")(images)  # off by default with PSNR
    psnr_on, _ = MRCReward(layout, ShrinkingReconstructor(), metric="psnr", silhouette_weight=10.0)(images)
    torch.testing.assert_close(psnr_on, psnr_off - 10.0 * info_on["silhouette"].mean(dim=1))
    _, perfect = MRCReward(layout, EchoReconstructor(), metric="mse")(images)
    assert (perfect["silhouette"] == 0).all()
    with pytest.raises(ValueError, match="silhouette_weight must be >= 0"):
        MRCReward(layout, EchoReconstructor(), metric="mse", silhouette_weight=-1.0)
    with pytest.raises(ValueError, match="mse_weight must be >= 0"):
        MRCReward(layout, EchoReconstructor(), metric="mse", mse_weight=-1.0)


def test_the_pixel_term_counts_the_weighted_mean_squared_error_of_the_crops(grids):
    layout, images = grids
    rewards = {}
    for weight in (0.0, 5.0):
        torch.manual_seed(0)  # the same random LPIPS trunk
        rewards[weight] = MRCReward(
            layout, EchoReconstructor(-0.2), lpips_pretrained=False, silhouette_weight=0.0, mse_weight=weight
        )
    paper, weighted = rewards[0.0], rewards[5.0]
    _, mse = MRCReward(layout, EchoReconstructor(-0.2), metric="mse")(images)  # the pixel metric: no terms added
    torch.testing.assert_close(weighted(images)[1]["mrc"], paper(images)[1]["mrc"] + 5.0 * mse["mrc"])


def test_silhouette_disagreement_is_one_minus_the_foregrounds_iou():
    white = torch.ones(3, 3, 8, 8)
    a, b = white.clone(), white.clone()
    a[0, :, :, :4] = 0.0  # image 0: left half dark in a, top-left quarter in b: IoU 1/2
    b[0, :, :4, :4] = 0.0
    a[1, :, :, :4] = 0.0  # image 1: disjoint halves
    b[1, :, :, 4:] = 0.0
    torch.testing.assert_close(silhouette_disagreement(a, b), torch.tensor([0.5, 1.0, 0.0]))  # image 2: both empty


def test_consistent_views_score_better_than_a_rotated_view(grids):
    layout, images = grids
    for metric in ("mse", "psnr"):
        rewards, _ = MRCReward(layout, RadianceFieldReconstructor(**FAST), metric=metric)(images)
        assert rewards[0] > rewards[1], metric


def test_pixel_metric_signs_and_a_perfect_reconstruction(grids):
    layout, images = grids
    perfect, info = MRCReward(layout, EchoReconstructor(), metric="mse")(images)
    torch.testing.assert_close(perfect, torch.zeros(2))
    worse, _ = MRCReward(layout, EchoReconstructor(-0.2), metric="mse")(images)
    assert (worse < 0).all()
    psnr, info = MRCReward(layout, EchoReconstructor(-0.2), metric="psnr")(images)
    torch.testing.assert_close(psnr, info["mrc"])  # PSNR: reward = +MRC
    assert (psnr > 0).all()


def test_batch_reward_equals_per_sample_rewards(grids):
    layout, images = grids
    reward = MRCReward(layout, RadianceFieldReconstructor(**FAST), metric="psnr")
    batched, _ = reward(images)
    singles = torch.cat([reward(images[i : i + 1])[0] for i in range(2)])
    torch.testing.assert_close(batched, singles, atol=1e-3, rtol=0)


def test_wrong_grid_size_is_a_clear_error():
    reward = MRCReward(reconstructor=EchoReconstructor(), metric="mse")
    with pytest.raises(ValueError, match="does not fit the 2x2"):
        reward(torch.rand(1, 3, 64, 63))


def test_reconstructors_by_name():
    assert isinstance(make_reconstructor("radiance_field"), RadianceFieldReconstructor)
    reward = MRCReward(reconstructor="radiance_field", metric="mse", seed=7, reconstructor_kwargs={"steps": 3})
    assert reward.reconstructor.seed == 7 and reward.reconstructor.steps == 3
    hull = MRCReward(metric="mse", device="cpu", reconstructor_kwargs={"protocol": "same_view"}).reconstructor
    assert hull.protocol == "same_view"  # the default, built without the seed and device it does not take
    with pytest.raises(ValueError, match="visual_hull, radiance_field, openlrm, instantmesh"):
        make_reconstructor("nerfstudio")
    with pytest.raises(ValueError, match="by name"):
        MRCReward(reconstructor=EchoReconstructor(), metric="mse", reconstructor_kwargs={"steps": 3})


def test_explicit_device_moves_the_inputs(grids):
    layout, images = grids
    reward = MRCReward(layout, EchoReconstructor(), metric="mse", device="cpu")
    rewards, info = reward(images.double())
    assert rewards.dtype == torch.float32 and info["renders"].dtype == torch.float32


def test_views_not_evaluated_are_nan_and_left_out_of_the_mean(grids):
    layout, images = grids
    reward = MRCReward(layout, RadianceFieldReconstructor(held_out_views=2, steps=5), metric="mse")
    rewards, info = reward(images)
    per_view = info["mrc_per_view"]
    assert per_view.isnan().sum(dim=1).tolist() == [2, 2]
    torch.testing.assert_close(info["mrc"], per_view.nanmean(dim=1))
    assert rewards.isfinite().all()


def test_views_score_like_the_equivalent_grid(grids):
    layout, images = grids
    views = images.view(2, 3, 2, 64, 2, 64).permute(0, 2, 4, 1, 3, 5).reshape(2, 4, 3, 64, 64)  # row-major tiles
    for reconstructor, metric in ((RadianceFieldReconstructor(**FAST), "psnr"), (EchoReconstructor(-0.1), "mse")):
        reward = MRCReward(layout, reconstructor, metric=metric)
        from_grid, grid_info = reward(images, ("a", "b"), ({}, {}))
        from_views, view_info = reward(views, ("a", "b"), ({}, {}))
        torch.testing.assert_close(from_views, from_grid, atol=1e-6, rtol=0)
        assert view_info.keys() == grid_info.keys()
        for key in grid_info:
            torch.testing.assert_close(view_info[key], grid_info[key], atol=1e-6, rtol=0, equal_nan=True)


def test_view_batched_samples_are_scored_with_the_model_cameras():
    cameras = multiview_cameras(6)  # a 1x6 layout: views are never tiled before scoring
    views = render_object(random_object(torch.Generator().manual_seed(3)), cameras.layout, 32)
    batch = torch.stack([views, views.flip(0)])  # the second sample's views are in the wrong order
    rewards, info = MRCReward(cameras.layout, RadianceFieldReconstructor(**FAST), metric="psnr")(batch)
    assert info["mrc_per_view"].shape == (2, 6) and rewards[0] > rewards[1]
    # A grid image of the same views scores the same.
    grid_rewards, _ = MRCReward(cameras.layout, RadianceFieldReconstructor(**FAST), metric="psnr")(
        tile_views(batch, cameras.layout)
    )
    torch.testing.assert_close(grid_rewards, rewards, atol=1e-6, rtol=0)
    torch.testing.assert_close(split_grid(tile_views(batch, cameras.layout), cameras.layout), batch)


def test_a_view_count_other_than_the_layouts_is_refused():
    reward = MRCReward(reconstructor=EchoReconstructor(), metric="mse")  # Instant3D's 4 views
    message = r"Got 6 views per sample, but this reward's camera layout has 4 views \(2x2\)\. Build the reward with "
    message += r"the model's camera layout, e\.g\. MRCReward\(layout=multiview_cameras\(num_views=6\)\.layout\)"
    with pytest.raises(ValueError, match=message):
        reward(torch.rand(1, 6, 3, 32, 32))
    with pytest.raises(ValueError, match="Got 6 views per sample"):
        reward.score_views(torch.rand(1, 6, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\) or views of shape \(B, 4, 3, h, w\), got \(3, 64, 64\)"):
        reward(torch.rand(3, 64, 64))
