"""Adapter for InstantMesh's NeRF variant (sparse-view reconstruction from posed views), from a user's clone."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

from ..cameras import CameraLayout
from ._external import default_device, import_from_clone, patched, resolve_file
from .camera_conventions import instantmesh_input_cameras, render_camera_vectors, similarity_transform
from .transformers_compat import provide_transformers4_helpers

__all__ = ["InstantMeshReconstructor"]

_CLONE_URL = "https://github.com/TencentARC/InstantMesh"
_DINO_NAME = "facebook/dino-vitb16"
# facebook/dino-vitb16's published configuration: a ViT-B/16.
_DINO_CONFIG = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    hidden_act="gelu",
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    layer_norm_eps=1e-12,
    image_size=224,
    patch_size=16,
    num_channels=3,
    qkv_bias=True,
)
_IMAGENET_MEAN = [0.485, 0.456, 0.406]
_IMAGENET_STD = [0.229, 0.224, 0.225]


class InstantMeshReconstructor:
    """Reconstructs with InstantMesh's NeRF variant (`InstantNeRF`) from all the posed views, renders every view.

    InstantMesh is imported from a clone on `PYTHONPATH` (package `src`; its code carries non-commercial licences and
    is not shipped here). The model is trained on Zero123++ v1.2's 6 views (or 4 of them) at distance 4.0 with a 30
    degree field of view; use `zero123pp_layout()`. The layout's cameras are scaled about the origin so their mean
    distance is `reference_distance`, and passed with their own intrinsics. The DINO encoder is built from its
    configuration without downloading `facebook/dino-vitb16` (the checkpoint holds its weights).

    Args:
        checkpoint (`str` or `os.PathLike`): A checkpoint file (with a `state_dict` of `lrm_generator.*` keys), or a
            Hub repo id from which `filename` is downloaded.
        filename (`str`): Checkpoint file name in the Hub repo.
        config (`str`, `os.PathLike` or `dict`, *optional*): `InstantNeRF` keyword arguments, or an InstantMesh YAML
            config holding them under `model_config.params`. Default: the clone's `configs/instant-nerf-large.yaml`.
        input_size (`int`): Side of the views fed to the encoder.
        render_size (`int`): Side of the square renders.
        reference_distance (`float`): Camera distance the model was trained with.
        revision (`str`, *optional*): Hub revision.
        device (`str` or `torch.device`, *optional*): Device of the model. Default: CUDA when available.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike = "TencentARC/InstantMesh",
        *,
        filename: str = "instant_nerf_large.ckpt",
        config: str | os.PathLike | dict[str, Any] | None = None,
        input_size: int = 320,
        render_size: int = 128,
        reference_distance: float = 4.0,
        revision: str | None = None,
        device: str | torch.device | None = None,
    ):
        provide_transformers4_helpers()  # the clone's encoder was written for transformers 4
        lrm = import_from_clone("src.models.lrm", "InstantMesh", _CLONE_URL)
        dino = import_from_clone("src.models.encoder.dino_wrapper", "InstantMesh", _CLONE_URL)
        kwargs = _model_kwargs(config, Path(lrm.__file__).resolve().parents[2])
        with _dino_without_download(dino):
            model = lrm.InstantNeRF(**kwargs)
        path = Path(checkpoint)
        if not path.is_file():
            path = resolve_file(checkpoint, filename, revision)
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        prefix = "lrm_generator."
        model.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
        self.device = default_device(device)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.input_size = input_size
        self.render_size = render_size
        self.reference_distance = reference_distance

    @torch.no_grad()
    def reconstruct(self, views: torch.Tensor, layout: CameraLayout) -> torch.Tensor:
        """Reconstruct from all views and render every view of `layout`.

        Args:
            views (`torch.Tensor` of shape `(B, V, 3, h, w)`): Views in [0, 1].

        Returns:
            `torch.Tensor` of shape `(B, V, 3, render_size, render_size)` on the device of `views`.
        """
        batch, num_views = views.shape[:2]
        size = self.input_size
        images = F.interpolate(
            views.flatten(0, 1).to(self.device), size=(size, size), mode="bicubic", antialias=True
        ).clamp(0, 1)
        scale = self.reference_distance / layout.camera_distances().mean()
        cam2world = similarity_transform(layout.cam2world, torch.eye(3), scale)
        cameras = instantmesh_input_cameras(cam2world, layout.intrinsics).to(self.device)
        planes = self.model.forward_planes(images.view(batch, num_views, 3, size, size), cameras.expand(batch, -1, -1))
        render_cameras = render_camera_vectors(cam2world, layout.intrinsics).to(self.device)
        renders = [
            self.model.forward_synthesizer(planes, render_cameras[view].expand(batch, 1, -1), self.render_size)[
                "images_rgb"
            ][:, 0]
            for view in range(num_views)
        ]
        return torch.stack(renders, dim=1).clamp(0, 1).to(views.device)


def _model_kwargs(config: str | os.PathLike | dict[str, Any] | None, clone_root: Path) -> dict[str, Any]:
    if isinstance(config, dict):
        return dict(config)
    import yaml

    path = Path(config) if config is not None else clone_root / "configs" / "instant-nerf-large.yaml"
    return dict(yaml.safe_load(path.read_text())["model_config"]["params"])


@contextmanager
def _dino_without_download(dino: ModuleType) -> Iterator[None]:
    """Make InstantMesh's `DinoWrapper` build `facebook/dino-vitb16` from its configuration, without weights."""
    build = dino.DinoWrapper._build_dino

    def build_untrained(model_name: str, *args, **kwargs):
        if model_name != _DINO_NAME:
            return build(model_name, *args, **kwargs)
        from transformers import ViTConfig, ViTImageProcessor

        model = dino.ViTModel(ViTConfig(**_DINO_CONFIG), add_pooling_layer=False)
        processor = ViTImageProcessor(image_mean=_IMAGENET_MEAN, image_std=_IMAGENET_STD)
        return model, processor

    with patched(dino.DinoWrapper, "_build_dino", staticmethod(build_untrained)):
        yield
