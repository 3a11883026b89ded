"""The cameras of ashawkey's MVDream port (ashawkey/mvdream_diffusers) against MVDream's own (`multiview_cameras`).

Set `MVDREAM_DIFFUSERS_PATH` to a clone of ashawkey/mvdream_diffusers (and install `kiui`, the camera helper it calls)
to measure the port's camera function itself; without them the hard-coded measurement below stands in for it.
"""

import ast
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from carve3d_trl.pipelines import MultiViewDiffusionPipeline
from carve3d_trl.pipelines.mvdream_conversion import (
    MVDREAM_PORT_AZIMUTH_START,
    build_mvdream_pipeline,
    diffusers_unet_config,
    to_mvdream_state_dict,
)
from carve3d_trl.rewards import multiview_cameras

# The port's `get_camera(4, elevation=15)` (its pipeline's call, azimuth_start left at 0), printed to 4 decimals from a
# clone of ashawkey/mvdream_diffusers at commit 8b318ef (`mv_unet.py`) with kiui 0.2.0 (the version its
# requirements.lock.txt pins). Row-major flattened 4x4 camera-to-world matrices, one row per view. They equal
# bytedance/MVDream's `get_camera(4, elevation=15)` (618f844), i.e. `multiview_cameras(4, 15, azimuth_start=0)`:
# the port's azimuth offset is 0 degrees.
C, S = 0.2588, 0.9659  # sin 15, cos 15
PORT_CAMERAS_4_VIEWS_ELEVATION_15 = [
    [1, 0, 0, 0, 0, C, -S, -S, 0, S, C, C, 0, 0, 0, 1],  # camera at (0, -0.9659, 0.2588): -Y
    [0, -C, S, S, 1, 0, 0, 0, 0, S, C, C, 0, 0, 0, 1],  # +X
    [-1, 0, 0, 0, 0, -C, S, S, 0, S, C, C, 0, 0, 0, 1],  # +Y
    [0, C, -S, -S, -1, 0, 0, 0, 0, S, C, C, 0, 0, 0, 1],  # -X
]
MEASURED_OFFSET = 0.0  # degrees, MVDream's azimuth convention


def port_get_camera():
    """The port's own `get_camera`, read from the clone's source and run with the installed kiui's `orbit_camera`
    (the port's module imports xformers at the top, so it is not imported whole)."""
    root = os.environ.get("MVDREAM_DIFFUSERS_PATH")
    if not root:
        pytest.skip("MVDREAM_DIFFUSERS_PATH is not set (a clone of ashawkey/mvdream_diffusers).")
    try:
        from kiui.cam import orbit_camera
    except Exception as error:  # kiui missing, or its optional imports (cv2) failing
        pytest.skip(f"kiui.cam does not import ({error!r}): the port's get_camera calls kiui's orbit_camera.")
    for relative in ("mv_unet.py", "mvdream/util.py", "mvdream/models.py"):  # the layouts of the port's history
        source = Path(root) / relative
        if not source.is_file():
            continue
        module = ast.parse(source.read_text())
        found = [node for node in module.body if isinstance(node, ast.FunctionDef) and node.name == "get_camera"]
        if found:
            namespace = {"np": np, "torch": torch, "orbit_camera": orbit_camera}
            exec(compile(ast.Module(found, type_ignores=[]), str(source), "exec"), namespace)
            return namespace["get_camera"]
    pytest.fail(f"No get_camera in {root}: not a clone of ashawkey/mvdream_diffusers?")


def test_the_port_offset_is_measured_against_its_own_camera_function():
    get_camera = port_get_camera()
    port = get_camera(4, elevation=15).double()
    assert torch.allclose(port, torch.tensor(PORT_CAMERAS_4_VIEWS_ELEVATION_15, dtype=torch.float64), atol=1e-4)
    matches = [
        offset
        for offset in range(0, 360, 15)
        if torch.allclose(port, multiview_cameras(4, 15, azimuth_start=offset).model_inputs.double(), atol=1e-6)
    ]
    assert matches == [MEASURED_OFFSET] == [MVDREAM_PORT_AZIMUTH_START]
    for num_views, elevation in ((4, 0), (4, 30), (8, 15)):  # the offset does not depend on the settings
        expected = multiview_cameras(num_views, elevation, azimuth_start=MVDREAM_PORT_AZIMUTH_START).model_inputs
        assert torch.allclose(get_camera(num_views, elevation=elevation), expected, atol=1e-6)


def test_the_hard_coded_measurement_is_mvdreams_convention_at_the_measured_offset():
    measured = torch.tensor(PORT_CAMERAS_4_VIEWS_ELEVATION_15)
    assert torch.allclose(multiview_cameras(4, 15, azimuth_start=MEASURED_OFFSET).model_inputs, measured, atol=1e-4)
    # a 90-degree offset (lizhiqi49/mvdream-diffusers' convention) is the same four cameras, one view further on
    shifted = multiview_cameras(4, 15, azimuth_start=90).model_inputs
    assert not torch.allclose(shifted, measured, atol=1e-2)
    assert torch.allclose(shifted, measured.roll(-1, dims=0), atol=1e-4)


# A tiny MVDream UNet of SD 2.1's kind, as ashawkey's port writes it (the config less these keys).
PORT_PARAMS = dict(
    image_size=16,
    in_channels=4,
    out_channels=4,
    model_channels=32,
    use_spatial_transformer=True,
    use_linear_in_transformer=True,
    legacy=False,
    camera_dim=16,
    use_checkpoint=False,
    channel_mult=[1, 2],
    attention_resolutions=[1, 2],
    num_res_blocks=1,
    num_head_channels=16,
    transformer_depth=1,
    context_dim=32,
)
PORT_DROPPED = ("legacy", "use_linear_in_transformer", "use_spatial_transformer")


def write_port_folder(folder, tiny_model_path):
    for part in ("vae", "text_encoder", "tokenizer", "scheduler"):
        shutil.copytree(Path(tiny_model_path) / part, folder / part)
    (folder / "unet").mkdir()
    config = {k: v for k, v in PORT_PARAMS.items() if k not in PORT_DROPPED}
    (folder / "unet" / "config.json").write_text(json.dumps({"_class_name": "MultiViewUNetModel", **config}))
    unet = UNet2DConditionModel(**diffusers_unet_config(PORT_PARAMS))
    weights = to_mvdream_state_dict(unet.state_dict(), PORT_PARAMS["num_res_blocks"])
    save_file({k: v.contiguous() for k, v in weights.items()}, folder / "unet" / "diffusion_pytorch_model.safetensors")
    return folder


def test_a_converted_port_folder_feeds_the_port_cameras(tmp_path, tiny_model_path):
    port = write_port_folder(tmp_path / "port", tiny_model_path)
    pipeline = build_mvdream_pipeline(port)
    assert pipeline.config.azimuth_start == MVDREAM_PORT_AZIMUTH_START == MEASURED_OFFSET
    pipeline.save_pretrained(tmp_path / "converted", safe_serialization=True)
    converted = MultiViewDiffusionPipeline.from_pretrained(tmp_path / "converted")
    measured = torch.tensor(PORT_CAMERAS_4_VIEWS_ELEVATION_15)
    for candidate in (pipeline, converted):
        assert torch.allclose(candidate.camera_inputs(), measured, atol=1e-4)
        # MRC's layout is the same cameras (scaled to the render radius): view i is scored where it was generated
        layout = candidate.camera_layout()
        assert torch.allclose(
            layout.cam2world[:, :3, :3].reshape(4, 9), measured.reshape(4, 4, 4)[:, :3, :3].reshape(4, 9), atol=1e-4
        )
        assert torch.allclose(layout.camera_distances(), torch.full((4,), candidate.config.camera_radius))
