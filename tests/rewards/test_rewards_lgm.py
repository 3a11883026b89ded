"""The LGM adapter: camera conventions without LGM, and a tiny random LGM from a real clone (`LGM_PATH`).

To run the clone tests: `git clone https://github.com/3DTopia/LGM /tmp/lgm_clone`, install its Python requirements
except the CUDA rasteriser (`kiui`, `tyro`, `roma`, `opencv-python-headless` are what `core` needs on CPU), then
`LGM_PATH=/tmp/lgm_clone pytest tests/rewards/test_rewards_lgm.py`.
"""

import dataclasses
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from carve3d_trl.rewards import MRCReward, make_reconstructor, multiview_cameras
from carve3d_trl.rewards.reconstructors import RECONSTRUCTORS, LGMReconstructor
from carve3d_trl.rewards.reconstructors._external import patched
from carve3d_trl.rewards.reconstructors.lgm import (
    MVDREAM_TO_LGM_ORDER,
    _NoRenderer,
    import_lgm,
    lgm_input_cameras,
    plucker_rays,
    to_lgm_frame,
)

LGM_PATH = os.environ.get("LGM_PATH")
needs_lgm = pytest.mark.skipif(
    not LGM_PATH, reason="set LGM_PATH to a clone of 3DTopia/LGM (with its CPU requirements) to test against it"
)
# A tiny LGM: 64 px inputs, a 3-level U-Net (group norms need multiples of 32 channels), 4 x 32 x 32 Gaussians.
TINY = dict(
    input_size=64,
    down_channels=(32, 32, 64),
    down_attention=(False, False, True),
    mid_attention=True,
    up_channels=(64, 32),
    up_attention=(True, False),
    splat_size=32,
    output_size=64,
)


# ------------------------------------------------------------------------------------------------------ without LGM
def test_registered_by_name():
    assert RECONSTRUCTORS["lgm"] is LGMReconstructor
    from carve3d_trl.rewards.arguments import RECONSTRUCTORS as FLAG_CHOICES

    assert "lgm" in FLAG_CHOICES


def test_a_missing_clone_gives_a_clear_error(monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not a clone of LGM .*git clone https://github.com/3DTopia/LGM"):
        LGMReconstructor(tmp_path / "model.safetensors", repo=tmp_path)
    monkeypatch.setitem(sys.modules, "core", None)  # `core` not importable, whatever is on the path
    with pytest.raises(ImportError, match=r"LGM is not importable .*git clone https://github.com/3DTopia/LGM"):
        make_reconstructor("lgm", checkpoint=tmp_path / "model.safetensors")


def test_mvdream_cameras_land_on_lgms_input_cameras():
    for elevation in (0.0, 15.0):
        layout = multiview_cameras(4, elevation=elevation).layout  # radius 2.5, MVDream's view order
        moved = to_lgm_frame(layout, MVDREAM_TO_LGM_ORDER, 1.5)
        expected = lgm_input_cameras(1.5, elevation)
        torch.testing.assert_close(moved.cam2world[list(MVDREAM_TO_LGM_ORDER)], expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(moved.intrinsics, layout.intrinsics)
    # LGM's input camera at azimuth 0 looks along -Z from +Z (OpenGL, +Y up), azimuth 90 sits on +X.
    torch.testing.assert_close(lgm_input_cameras()[0, :3, 3], torch.tensor([0.0, 0.0, 1.5]))
    torch.testing.assert_close(lgm_input_cameras()[1, :3, 3], torch.tensor([1.5, 0.0, 0.0]), atol=1e-6, rtol=0)


def test_plucker_rays_pass_through_the_pixel_centres():
    rays = plucker_rays(lgm_input_cameras(), 8, 49.1)
    assert rays.shape == (4, 6, 8, 8)
    directions = rays[:, 3:]
    torch.testing.assert_close(directions.norm(dim=1), torch.ones(4, 8, 8))
    # The four central pixels' rays are symmetric about the optical axis (-Z of camera 0 is world -Z).
    centre = directions[0, :, 3:5, 3:5].mean(dim=(1, 2))
    torch.testing.assert_close(F.normalize(centre, dim=0), torch.tensor([0.0, 0.0, -1.0]), atol=1e-6, rtol=0)
    # Moment o x d is orthogonal to d.
    assert (rays[:, :3] * directions).sum(dim=1).abs().max() < 1e-5


# --------------------------------------------------------------------------------------------------------- with LGM
@pytest.fixture(scope="module")
def tiny_lgm(tmp_path_factory):
    """(reconstructor, the clone's LGM model with the same weights, the clone's modules) for a tiny random LGM."""
    options, models = import_lgm(LGM_PATH)
    opt = dataclasses.replace(options.config_defaults["big"], **TINY, lambda_lpips=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        with patched(models, "GaussianRenderer", _NoRenderer):
            model = models.LGM(opt).eval()
    path = tmp_path_factory.mktemp("lgm") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    reconstructor = LGMReconstructor(path, repo=LGM_PATH, options=TINY, render_size=32, device="cpu")
    return reconstructor, model


def _views(batch=2, size=48):
    generator = torch.Generator().manual_seed(1)
    views = torch.ones(batch, 4, 3, size, size)
    views[..., 12:36, 16:32] = torch.rand(batch, 4, 3, 24, 16, generator=generator)  # an object on white
    return views


@needs_lgm
def test_lgm_end_to_end_on_multiview_cameras(tiny_lgm):
    reconstructor, _ = tiny_lgm
    layout = multiview_cameras(4).layout
    views = _views()
    renders = reconstructor.reconstruct(views, layout)
    assert renders.shape == (2, 4, 3, 32, 32) and renders.dtype == torch.float32
    assert torch.isfinite(renders).all() and renders.min() >= 0 and renders.max() <= 1
    assert renders.std() > 0.01  # the random Gaussians are visible
    torch.testing.assert_close(reconstructor.reconstruct(views, layout), renders, rtol=0, atol=0)
    gaussians = reconstructor.predict_gaussians(views)
    assert gaussians.shape == (2, 4 * 32 * 32, 14)
    torch.testing.assert_close(gaussians[..., 7:11].norm(dim=-1), torch.ones(2, 4096))  # unit quaternions
    # The stand-in for LGM's CUDA rasteriser only lived while `core.models` was imported.
    stub = sys.modules.get("diff_gaussian_rasterization")
    assert stub is None or getattr(stub, "__file__", None) is not None


@needs_lgm
def test_lgm_weights_of_another_config_are_refused(tiny_lgm):
    reconstructor, _ = tiny_lgm
    with pytest.raises(ValueError, match="does not match the LGM config"):
        LGMReconstructor(reconstructor.checkpoint, repo=LGM_PATH, options=dict(TINY, mid_attention=False))


@needs_lgm
def test_lgm_gaussians_equal_the_clones_forward_gaussians_on_its_own_preprocessing(tiny_lgm):
    reconstructor, model = tiny_lgm
    views = _views()
    # LGM's demo (app.py): views 1, 2, 3, 0 of MVDream, bilinear resize, ImageNet normalisation, its own rays.
    images = views[:, [1, 2, 3, 0]].flatten(0, 1)
    images = F.interpolate(images, size=(64, 64), mode="bilinear", align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    images = ((images - mean) / std).view(2, 4, 3, 64, 64)
    try:
        rays = model.prepare_default_rays("cpu")  # needs kiui.op (opencv)
    except ImportError as error:
        pytest.skip(f"the clone's prepare_default_rays needs {error.name}")
    torch.testing.assert_close(reconstructor.rays, rays.float(), atol=1e-5, rtol=0)
    expected_input = torch.cat([images, rays.float().expand(2, -1, -1, -1, -1)], dim=2)
    torch.testing.assert_close(reconstructor.preprocess(views), expected_input, atol=1e-5, rtol=0)
    with torch.no_grad():
        expected = model.forward_gaussians(expected_input)
    torch.testing.assert_close(reconstructor.predict_gaussians(views), expected, atol=1e-4, rtol=1e-4)


@needs_lgm
def test_lgm_cameras_match_kiuis_orbit_camera():
    pytest.importorskip("cv2")
    import_lgm(LGM_PATH)
    from kiui.cam import orbit_camera

    for elevation in (0.0, 20.0):  # kiui's elevation is negative above the horizon
        expected = np.stack([orbit_camera(-elevation, azimuth, radius=1.5) for azimuth in (0, 90, 180, 270)])
        torch.testing.assert_close(
            lgm_input_cameras(1.5, elevation), torch.from_numpy(expected).float(), atol=1e-5, rtol=0
        )


@needs_lgm
def test_view_batched_samples_to_lgm_mrc_rewards_and_advantages(tiny_lgm):
    from carve3d_trl.stats import compute_advantages
    from carve3d_trl.testing import TinyPipelineSpec, build_tiny_view_batched_pipeline

    reconstructor, _ = tiny_lgm
    pipe = build_tiny_view_batched_pipeline(TinyPipelineSpec(image_size=32))
    prompts = ["a chair", "a mug"]
    out = pipe(prompts, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 4, 3, 32, 32)
    layout = multiview_cameras(4, elevation=15.0).layout  # the tiny pipeline's cameras
    lgm = LGMReconstructor(
        reconstructor.checkpoint, repo=LGM_PATH, options=TINY, input_elevation=15.0, render_size=32, device="cpu"
    )
    reward = MRCReward(layout, reconstructor=lgm, lpips_pretrained=False)
    rewards, info = reward(out.images, prompts, ({}, {}))
    assert rewards.shape == (2,) and torch.isfinite(rewards).all()
    assert info["renders"].shape == (2, 4, 3, 32, 32)
    advantages = compute_advantages(prompts * 2, np.concatenate([rewards.numpy(), rewards.numpy() + 0.1]), None)
    assert advantages.shape == (4,) and np.isfinite(advantages).all()
