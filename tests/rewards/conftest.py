"""In-process stand-ins for the OpenLRM and InstantMesh packages, injected into `sys.modules`.

They mirror the parts of the real APIs the adapters use (module paths, constructor keyword arguments, the
encoder-building static methods, `forward_planes` / synthesizer signatures and output keys) and record their calls.
"""

import sys
import types

import pytest
import torch
import torch._dynamo
from torch import nn


def _install(monkeypatch, modules: dict[str, types.ModuleType]):
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)


def _module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    return module


class FakeDinov2Wrapper(nn.Module):
    def __init__(self, model_name: str, modulation_dim=None, freeze: bool = True):
        super().__init__()
        self.model = self._build_dinov2(model_name, modulation_dim=modulation_dim)

    @staticmethod
    def _build_dinov2(model_name: str, modulation_dim=None, pretrained: bool = True):
        if pretrained:
            raise RuntimeError(f"{model_name}: would download DINOv2 weights")
        return nn.Linear(3, 8)


class FakeOpenLRMSynthesizer(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, planes, cameras, anchors, resolutions, bg_colors, region_size: int):
        self.calls.append(dict(cameras=cameras, anchors=anchors, resolutions=resolutions, bg_colors=bg_colors))
        n, m = cameras.shape[:2]
        # Colour = the planes' mean colour, brightened by the camera's height: renders depend on both inputs.
        color = planes.mean(dim=(1, 3, 4))[:, None, :, None, None] + 0.1 * cameras[:, :, 11, None, None, None]
        image = color.expand(n, m, 3, region_size, region_size)
        return {"images_rgb": image, "images_depth": image[:, :, :1], "images_weight": image[:, :, :1]}


class FakeModelLRM(nn.Module):
    def __init__(
        self,
        camera_embed_dim,
        rendering_samples_per_ray,
        transformer_dim,
        transformer_layers,
        transformer_heads,
        triplane_low_res,
        triplane_high_res,
        triplane_dim,
        encoder_freeze=True,
        encoder_type="dino",
        encoder_model_name="facebook/dino-vitb16",
        encoder_feat_dim=768,
    ):
        super().__init__()
        assert encoder_type == "dinov2"
        self.encoder = FakeDinov2Wrapper(model_name=encoder_model_name, freeze=encoder_freeze)
        self.gain = nn.Parameter(torch.ones(()))
        self.synthesizer = FakeOpenLRMSynthesizer()
        self.plane_calls = []

    def forward_planes(self, image, camera):
        self.plane_calls.append(dict(image=image, camera=camera))
        return (self.gain * image.mean(dim=(2, 3)))[:, None, :, None, None].expand(-1, 3, -1, 2, 2)


@pytest.fixture
def fake_openlrm(monkeypatch):
    """A fake `openlrm` package; returns its `ModelLRM` class."""
    modules = {
        "openlrm": _module("openlrm"),
        "openlrm.models": _module("openlrm.models"),
        "openlrm.models.modeling_lrm": _module("openlrm.models.modeling_lrm", ModelLRM=FakeModelLRM),
        "openlrm.models.encoders": _module("openlrm.models.encoders"),
        "openlrm.models.encoders.dinov2_wrapper": _module(
            "openlrm.models.encoders.dinov2_wrapper", Dinov2Wrapper=FakeDinov2Wrapper
        ),
    }
    _install(monkeypatch, modules)
    # Not monkeypatch.setattr: undoing it deletes the entry from dynamo's config module.
    previous = torch._dynamo.config.disable
    torch._dynamo.config.disable = False
    yield FakeModelLRM
    torch._dynamo.config.disable = previous


class FakeViTModel(nn.Module):
    def __init__(self, config, add_pooling_layer: bool = True, use_mask_token: bool = False):
        super().__init__()
        self.config = config
        self.proj = nn.Linear(3, config.hidden_size)


class FakeDinoWrapper(nn.Module):
    def __init__(self, model_name: str, freeze: bool = True):
        super().__init__()
        self.model, self.processor = self._build_dino(model_name)

    @staticmethod
    def _build_dino(model_name: str, proxy_error_retries: int = 3, proxy_error_cooldown: int = 5):
        raise RuntimeError(f"{model_name}: would download from the Hugging Face Hub")


class FakeInstantNeRF(nn.Module):
    def __init__(self, encoder_freeze=False, encoder_model_name="facebook/dino-vitb16", encoder_feat_dim=768, **kw):
        super().__init__()
        self.kwargs = kw
        self.encoder = FakeDinoWrapper(model_name=encoder_model_name, freeze=encoder_freeze)
        self.gain = nn.Parameter(torch.ones(()))
        self.plane_calls, self.render_calls = [], []

    def forward_planes(self, images, cameras):
        self.plane_calls.append(dict(images=images, cameras=cameras))
        return self.gain * images.mean(dim=(1, 3, 4))  # (B, 3): the mean colour over views

    def forward_synthesizer(self, planes, render_cameras, render_size: int):
        self.render_calls.append(dict(render_cameras=render_cameras, render_size=render_size))
        b, m = render_cameras.shape[:2]
        image = planes[:, None, :, None, None].expand(b, m, 3, render_size, render_size)
        return {"images_rgb": image, "images_depth": image[:, :, :1], "images_weight": image[:, :, :1]}


@pytest.fixture
def fake_instantmesh(monkeypatch, tmp_path):
    """A fake InstantMesh clone (package `src`) at `tmp_path`; returns the clone root."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "instant-nerf-large.yaml").write_text(
        "model_config:\n  target: src.models.lrm.InstantNeRF\n  params:\n    encoder_feat_dim: 768\n"
        "    encoder_model_name: facebook/dino-vitb16\n    triplane_dim: 80\n"
    )
    lrm = _module("src.models.lrm", InstantNeRF=FakeInstantNeRF)
    lrm.__file__ = str(tmp_path / "src" / "models" / "lrm.py")
    modules = {
        "src": _module("src"),
        "src.models": _module("src.models"),
        "src.models.lrm": lrm,
        "src.models.encoder": _module("src.models.encoder"),
        "src.models.encoder.dino_wrapper": _module(
            "src.models.encoder.dino_wrapper", DinoWrapper=FakeDinoWrapper, ViTModel=FakeViTModel
        ),
    }
    _install(monkeypatch, modules)
    return tmp_path
