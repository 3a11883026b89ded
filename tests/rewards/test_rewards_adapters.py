"""Adapters for OpenLRM and InstantMesh: orchestration against in-process fakes, real packages when installed."""

import importlib
import importlib.util
import json
import sys

import huggingface_hub
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from carve3d_trl.distributed import ensure_process_state
from carve3d_trl.rewards import (
    InstantMeshReconstructor,
    MRCReward,
    OpenLRMReconstructor,
    instant3d_layout,
    make_reconstructor,
    tile_views,
    zero123pp_layout,
)
from carve3d_trl.rewards.reconstructors.camera_conventions import (
    instantmesh_input_cameras,
    openlrm_source_camera,
    render_camera_vectors,
    similarity_transform,
    to_openlrm_frame,
)
from carve3d_trl.rewards.reconstructors.instantmesh import _dino_without_download
from carve3d_trl.rewards.reconstructors.openlrm import _dinov2_without_download
from carve3d_trl.rewards.reconstructors.transformers_compat import provide_transformers4_helpers

LRM_CONFIG = dict(
    camera_embed_dim=32,
    rendering_samples_per_ray=8,
    transformer_dim=32,
    transformer_layers=1,
    transformer_heads=2,
    triplane_low_res=4,
    triplane_high_res=8,
    triplane_dim=4,
    encoder_type="dinov2",
    encoder_model_name="dinov2_vits14_reg",
    encoder_feat_dim=384,
    encoder_freeze=False,
)


def _importable(module: str) -> bool:
    """Whether a clone providing `module` is on the path (found, not imported: the adapter prepares the import)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def _forget_cached(monkeypatch, top_level: str) -> None:
    """Drop `top_level` and its submodules from `sys.modules` for one test (a real clone on PYTHONPATH is imported
    when the skip conditions below are evaluated, and its cached modules would bypass the import under test)."""
    for name in [name for name in sys.modules if name == top_level or name.startswith(top_level + ".")]:
        monkeypatch.delitem(sys.modules, name)


@pytest.fixture
def forget_src_package():
    """Forget the file-based `src` package a test imports."""
    yield
    for name in [name for name in sys.modules if name == "src" or name.startswith("src.")]:
        del sys.modules[name]


@pytest.fixture
def openlrm_folder(fake_openlrm, tmp_path):
    with _dinov2_without_download(sys.modules["openlrm.models.encoders.dinov2_wrapper"]):
        model = fake_openlrm(**LRM_CONFIG)
    with torch.no_grad():
        model.gain.fill_(0.5)
    (tmp_path / "config.json").write_text(json.dumps(LRM_CONFIG))
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    return tmp_path


def _views(batch, num_views, size=32):
    return torch.rand(batch, num_views, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_missing_packages_raise_import_errors_saying_how_to_install(monkeypatch):
    _forget_cached(monkeypatch, "openlrm")
    monkeypatch.setitem(sys.modules, "openlrm", None)
    with pytest.raises(ImportError, match=r"git clone https://github.com/3DTopia/OpenLRM.*PYTHONPATH"):
        OpenLRMReconstructor("unused")
    _forget_cached(monkeypatch, "src")
    monkeypatch.setitem(sys.modules, "src", None)
    with pytest.raises(ImportError, match=r"git clone https://github.com/TencentARC/InstantMesh.*PYTHONPATH"):
        make_reconstructor("instantmesh")


def _broken_instantmesh_clone(root, monkeypatch, lrm_source: str) -> None:
    """A clone at `root` whose `src/models/lrm.py` is `lrm_source`, first on the path for one test."""
    package = root / "src" / "models"
    package.mkdir(parents=True)
    (root / "src" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "lrm.py").write_text(lrm_source)
    _forget_cached(monkeypatch, "src")
    monkeypatch.syspath_prepend(str(root))


def test_missing_dependency_of_a_clone_is_named(tmp_path, monkeypatch, forget_src_package):
    _broken_instantmesh_clone(tmp_path, monkeypatch, "import nvdiffrast_not_installed_here\n")
    with pytest.raises(ImportError, match="dependency 'nvdiffrast_not_installed_here' is missing"):
        InstantMeshReconstructor("unused")


def test_openlrm_adapter_loads_weights_without_dinov2_download(openlrm_folder):
    reconstructor = OpenLRMReconstructor(openlrm_folder, device="cpu")
    assert torch._dynamo.config.disable is True
    assert reconstructor.model.gain.item() == 0.5  # read from model.safetensors


def test_openlrm_adapter_feeds_the_canonical_source_camera_and_converted_render_cameras(openlrm_folder):
    layout = instant3d_layout()
    reconstructor = OpenLRMReconstructor(openlrm_folder, source_view=1, source_size=16, render_size=8, device="cpu")
    views = _views(2, 4)
    renders = reconstructor.reconstruct(views, layout)
    assert renders.shape == (2, 4, 3, 8, 8)
    model = reconstructor.model
    (planes_call,) = model.plane_calls
    expected_image = F.interpolate(views[:, 1], size=(16, 16), mode="bicubic", antialias=True).clamp(0, 1)
    torch.testing.assert_close(planes_call["image"], expected_image)
    torch.testing.assert_close(planes_call["camera"], openlrm_source_camera().expand(2, -1))
    cam2world, _, _ = to_openlrm_frame(layout.cam2world, layout.intrinsics, 1)
    expected_cameras = render_camera_vectors(cam2world, layout.intrinsics)
    assert len(model.synthesizer.calls) == 4
    for view, call in enumerate(model.synthesizer.calls):
        torch.testing.assert_close(call["cameras"], expected_cameras[view].expand(2, 1, -1))
        assert call["resolutions"].flatten().tolist() == [8.0, 8.0]
        assert call["bg_colors"].flatten().tolist() == [1.0, 1.0]  # white background
    # The fake renders the source's mean colour (times the loaded gain), lifted by the camera height.
    colour = 0.5 * expected_image.mean(dim=(2, 3))
    expected = colour[:, None, :] + 0.1 * expected_cameras[None, :, 11, None]
    torch.testing.assert_close(renders[:, :, :, 0, 0], expected.clamp(0, 1))


def test_openlrm_adapter_can_average_over_every_source_view(openlrm_folder):
    reconstructor = OpenLRMReconstructor(openlrm_folder, source_view=None, source_size=16, render_size=8, device="cpu")
    views = _views(1, 4)
    renders = reconstructor.reconstruct(views, instant3d_layout())
    assert len(reconstructor.model.plane_calls) == 4
    per_source = []
    for source in range(4):
        single = OpenLRMReconstructor(openlrm_folder, source_view=source, source_size=16, render_size=8, device="cpu")
        per_source.append(single.reconstruct(views, instant3d_layout()))
    torch.testing.assert_close(renders, torch.stack(per_source).mean(dim=0))


def test_openlrm_weights_come_from_the_hub_by_repo_id(openlrm_folder, monkeypatch):
    requested = []

    def fake_download(repo_id, filename, revision=None):
        requested.append((repo_id, filename, revision))
        return str(openlrm_folder / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    OpenLRMReconstructor("zxhezexin/openlrm-mix-base-1.1", revision="main", device="cpu")
    assert requested == [
        ("zxhezexin/openlrm-mix-base-1.1", "config.json", "main"),
        ("zxhezexin/openlrm-mix-base-1.1", "model.safetensors", "main"),
    ]


def test_openlrm_adapter_inside_the_mrc_reward(openlrm_folder):
    layout = instant3d_layout()
    reward = MRCReward(
        layout,
        "openlrm",
        metric="mse",
        device="cpu",
        reconstructor_kwargs=dict(model=openlrm_folder, source_size=16, render_size=8),
    )
    rewards, info = reward(tile_views(_views(2, 4), layout), ("a", "b"), ({}, {}))
    assert rewards.shape == (2,) and info["renders"].shape == (2, 4, 3, 8, 8)


@pytest.fixture
def instantmesh_checkpoint(fake_instantmesh):
    with _dino_without_download(sys.modules["src.models.encoder.dino_wrapper"]):
        model = sys.modules["src.models.lrm"].InstantNeRF(encoder_model_name="facebook/dino-vitb16")
    with torch.no_grad():
        model.gain.fill_(0.25)
    state = {f"lrm_generator.{k}": v for k, v in model.state_dict().items()}
    state["lpips.weight"] = torch.zeros(1)  # other training modules in the checkpoint are skipped
    path = fake_instantmesh / "instant_nerf_large.ckpt"
    torch.save({"state_dict": state}, path)
    return path


def test_instantmesh_adapter_builds_dino_offline_and_loads_the_checkpoint(instantmesh_checkpoint):
    reconstructor = InstantMeshReconstructor(instantmesh_checkpoint, device="cpu")
    model = reconstructor.model
    assert model.gain.item() == 0.25
    assert model.kwargs == {"triplane_dim": 80}  # from the clone's configs/instant-nerf-large.yaml
    config = model.encoder.model.config
    assert (config.hidden_size, config.num_hidden_layers, config.patch_size, config.layer_norm_eps) == (
        768,
        12,
        16,
        1e-12,
    )
    assert list(model.encoder.processor.image_mean) == [0.485, 0.456, 0.406]


def test_instantmesh_adapter_passes_posed_views_and_render_cameras(instantmesh_checkpoint):
    layout = zero123pp_layout()
    reconstructor = InstantMeshReconstructor(instantmesh_checkpoint, input_size=16, render_size=8, device="cpu")
    views = _views(2, 6)
    renders = reconstructor.reconstruct(views, layout)
    assert renders.shape == (2, 6, 3, 8, 8)
    model = reconstructor.model
    (call,) = model.plane_calls
    assert call["images"].shape == (2, 6, 3, 16, 16)
    # Zero123++'s layout is at InstantMesh's distance 4: the cameras go in unchanged.
    expected = instantmesh_input_cameras(layout.cam2world, layout.intrinsics)
    torch.testing.assert_close(call["cameras"], expected.expand(2, -1, -1))
    render_cameras = render_camera_vectors(layout.cam2world, layout.intrinsics)
    assert [c["render_size"] for c in model.render_calls] == [8] * 6
    for view, render_call in enumerate(model.render_calls):
        torch.testing.assert_close(render_call["render_cameras"], render_cameras[view].expand(2, 1, -1))
    colour = 0.25 * call["images"].mean(dim=(1, 3, 4))
    torch.testing.assert_close(renders[:, 3, :, 4, 4], colour)


def test_instantmesh_adapter_rescales_other_layouts_to_its_camera_distance(instantmesh_checkpoint):
    layout = instant3d_layout()  # distance 2.5
    reconstructor = InstantMeshReconstructor(instantmesh_checkpoint, input_size=16, render_size=8, device="cpu")
    reconstructor.reconstruct(_views(1, 4), layout)
    cameras = reconstructor.model.plane_calls[0]["cameras"][0]
    positions = cameras[:, :12].view(4, 3, 4)[:, :, 3]
    torch.testing.assert_close(positions.norm(dim=-1), torch.full((4,), 4.0))
    scaled = similarity_transform(layout.cam2world, torch.eye(3), 4.0 / 2.5)
    torch.testing.assert_close(cameras, instantmesh_input_cameras(scaled, layout.intrinsics))


def test_instantmesh_checkpoint_comes_from_the_hub_by_repo_id(instantmesh_checkpoint, monkeypatch):
    requested = []

    def fake_download(repo_id, filename, revision=None):
        requested.append((repo_id, filename))
        return str(instantmesh_checkpoint)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    InstantMeshReconstructor("TencentARC/InstantMesh", filename="instant_nerf_base.ckpt", device="cpu")
    assert requested == [("TencentARC/InstantMesh", "instant_nerf_base.ckpt")]


@pytest.mark.skipif(not _importable("openlrm.models.modeling_lrm"), reason="no OpenLRM clone on PYTHONPATH")
def test_real_openlrm_tiny_model(tmp_path):
    modeling = importlib.import_module("openlrm.models.modeling_lrm")
    dinov2 = importlib.import_module("openlrm.models.encoders.dinov2_wrapper")
    ensure_process_state()  # OpenLRM logs through accelerate, which raises without a state
    with _dinov2_without_download(dinov2):
        model = modeling.ModelLRM(**LRM_CONFIG)
    (tmp_path / "config.json").write_text(json.dumps(LRM_CONFIG))
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    reconstructor = OpenLRMReconstructor(tmp_path, source_size=28, render_size=8, device="cpu")
    renders = reconstructor.reconstruct(_views(1, 4), instant3d_layout())
    assert renders.shape == (1, 4, 3, 8, 8) and renders.min() >= 0 and renders.max() <= 1


@pytest.mark.skipif(not _importable("src.models.lrm"), reason="no InstantMesh clone on PYTHONPATH")
def test_real_instantmesh_tiny_model(tmp_path):
    lrm = importlib.import_module("src.models.lrm")
    dino = importlib.import_module("src.models.encoder.dino_wrapper")
    config = dict(
        encoder_freeze=False,
        encoder_model_name="facebook/dino-vitb16",
        encoder_feat_dim=768,
        transformer_dim=32,
        transformer_layers=1,
        transformer_heads=2,
        triplane_low_res=4,
        triplane_high_res=8,
        triplane_dim=4,
        rendering_samples_per_ray=8,
    )
    with _dino_without_download(dino):
        model = lrm.InstantNeRF(**config)
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": {f"lrm_generator.{k}": v for k, v in model.state_dict().items()}}, path)
    reconstructor = InstantMeshReconstructor(path, config=config, input_size=32, render_size=8, device="cpu")
    renders = reconstructor.reconstruct(_views(1, 6), zero123pp_layout())
    assert renders.shape == (1, 6, 3, 8, 8) and renders.min() >= 0 and renders.max() <= 1


def test_instantmesh_gets_the_transformers4_helpers_it_needs_and_nothing_else(monkeypatch):
    import transformers.pytorch_utils as pytorch_utils
    from transformers import PreTrainedModel

    for owner, name in ((pytorch_utils, "find_pruneable_heads_and_indices"), (PreTrainedModel, "get_head_mask")):
        monkeypatch.setattr(owner, name, None, raising=False)  # so that the test leaves transformers as it was
        monkeypatch.delattr(owner, name)
    provide_transformers4_helpers()
    assert PreTrainedModel.get_head_mask(object(), None, 3) == [None, None, None]
    with pytest.raises(NotImplementedError, match="head_mask=None"):
        PreTrainedModel.get_head_mask(object(), torch.ones(3), 3)
    with pytest.raises(NotImplementedError, match="never prunes"):
        pytorch_utils.find_pruneable_heads_and_indices({0}, 2, 4, set())
    own_version = PreTrainedModel.get_head_mask
    monkeypatch.setattr(PreTrainedModel, "get_head_mask", lambda *args: "transformers' own")
    provide_transformers4_helpers()  # an existing helper is kept
    assert PreTrainedModel.get_head_mask() == "transformers' own" and own_version is not PreTrainedModel.get_head_mask


def test_a_clone_that_fails_to_import_says_so(tmp_path, monkeypatch, forget_src_package):
    _broken_instantmesh_clone(tmp_path, monkeypatch, "from torch import name_that_does_not_exist\n")
    with pytest.raises(ImportError, match="InstantMesh was found but does not import with the installed packages"):
        InstantMeshReconstructor("unused")
