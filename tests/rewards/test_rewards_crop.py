import torch
import torch.nn.functional as F

from carve3d_trl.rewards import crop_pairs, foreground_boxes, foreground_mask


def _mask(height, width, top, left, bottom, right):
    mask = torch.zeros(1, height, width, dtype=torch.bool)
    mask[0, top:bottom, left:right] = True
    return mask


def test_foreground_rule_is_any_channel_below_095_on_white():
    views = torch.ones(1, 3, 1, 4)
    views[0, :, 0, 1] = 0.96  # light grey: background
    views[0, 1, 0, 2] = 0.94  # one channel below 0.95: foreground
    views[0, :, 0, 3] = 0.0
    assert foreground_mask(views).tolist() == [[[False, False, True, True]]]
    grey = torch.full((1, 3, 1, 2), 0.5)
    grey[0, 0, 0, 1] = 0.9
    assert foreground_mask(grey, background=(0.5, 0.5, 0.5)).tolist() == [[[False, True]]]


def test_tall_box_grows_its_width_with_the_odd_pixel_on_the_left():
    # Foreground rows 20..29 (10 tall), columns 30..32 (3 wide): grow the width by 7 -> 4 left, 3 right.
    box = foreground_boxes(_mask(64, 64, 20, 30, 30, 33), padding=0)
    assert box.tolist() == [[20, 26, 30, 36]]
    assert foreground_boxes(_mask(64, 64, 20, 30, 30, 33)).tolist() == [[15, 21, 35, 41]]  # default pad: 5 px


def test_wide_box_grows_its_height_with_the_odd_pixel_on_top():
    # Rows 40..41 (2 tall), columns 10..14 (5 wide): grow the height by 3 -> 2 on top, 1 below.
    box = foreground_boxes(_mask(64, 64, 40, 10, 42, 15), padding=0)
    assert box.tolist() == [[38, 10, 43, 15]]
    assert foreground_boxes(_mask(64, 64, 40, 10, 42, 15), padding=1).tolist() == [[37, 9, 44, 16]]


def test_boxes_are_clipped_to_the_image_and_empty_views_keep_everything():
    masks = torch.cat([_mask(16, 20, 0, 16, 3, 20), _mask(16, 20, 0, 0, 0, 0)])
    # First: rows 0..2, cols 16..19 -> square rows -1..2 (odd on top) -> padded -6..7, 11..24 -> clipped.
    assert foreground_boxes(masks).tolist() == [[0, 11, 8, 20], [0, 0, 16, 20]]


def test_crop_pairs_crops_both_with_the_view_box_and_resizes_to_the_render_size():
    views = torch.ones(2, 3, 3, 32, 32)
    views[:, :, :, 8:16, 10:14] = 0.2  # rows 8..15, cols 10..13 -> square cols 8..15 -> padded 3..20 (18 x 18)
    renders = torch.rand(2, 3, 3, 32, 32)
    view_crops, render_crops = crop_pairs(views, renders)
    assert view_crops.shape == render_crops.shape == (2, 3, 3, 32, 32)
    expected = F.interpolate(renders[0, 0, None, :, 3:21, 3:21], size=(32, 32), mode="bicubic", antialias=True)
    torch.testing.assert_close(render_crops[0, 0], expected[0].clamp(0, 1))
    assert view_crops.amin() >= 0 and view_crops.amax() <= 1
    same_view, same_render = crop_pairs(views, views)
    torch.testing.assert_close(same_view, same_render)


def test_smaller_renders_are_compared_at_their_own_size():
    views = torch.ones(1, 1, 3, 64, 64)
    views[..., 20:40, 24:34] = 0.3
    small = F.interpolate(views[0], size=(32, 32), mode="bicubic", antialias=True)[None]
    view_crops, render_crops = crop_pairs(views, small)
    assert view_crops.shape == (1, 1, 3, 32, 32)
    # The render is the view at its size, so both crops agree up to resampling.
    assert (view_crops - render_crops).abs().max() < 1e-5
