"""Adapter for OpenLRM (single-image large reconstruction model), imported from a user's clone."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import torch
import torch._dynamo
import torch.nn.functional as F

from ..cameras import CameraLayout
from ._external import default_device, import_from_clone, patched, resolve_file
from .camera_conventions import (
    OPENLRM_SOURCE_DISTANCE,
    OPENLRM_SOURCE_FOCAL,
    openlrm_source_camera,
    render_camera_vectors,
    to_openlrm_frame,
)

__all__ = ["OpenLRMReconstructor"]

_CLONE_URL = "https://github.com/3DTopia/OpenLRM"


class OpenLRMReconstructor:
    """Reconstructs with OpenLRM from one view (or from each view in turn) and renders all the layout's views.

    OpenLRM is imported from a clone on `PYTHONPATH` (its code and weights carry non-commercial licences and are not
    shipped here). Weights are `config.json` (the `ModelLRM` keyword arguments) and `model.safetensors`, read from a
    local folder or downloaded with `huggingface_hub.hf_hub_download` from a Hub repo such as
    `zxhezexin/openlrm-mix-base-1.1`. The DINOv2 encoder is built without its pretrained weights (the
    safetensors hold them), so construction downloads nothing else. Construction sets
    `torch._dynamo.config.disable = True` for the whole process: OpenLRM decorates its methods with `torch.compile`.

    The source view is given OpenLRM's canonical camera; the layout's cameras are moved into that frame by
    `to_openlrm_frame` and rendered with their own intrinsics.

    Args:
        model (`str` or `os.PathLike`): Hub repo id or local folder.
        source_view (`int`, *optional*): The view reconstructed from. `None`: reconstruct from each view in turn and
            average the renders.
        source_size (`int`): Side of the source image fed to the encoder (336 for the base models, 448 for large).
        render_size (`int`): Side of the square renders.
        source_distance (`float`), source_focal (`float`): OpenLRM's canonical source camera distance and
            normalised focal length.
        revision (`str`, *optional*): Hub revision.
        device (`str` or `torch.device`, *optional*): Device of the model. Default: CUDA when available.
    """

    def __init__(
        self,
        model: str | os.PathLike = "zxhezexin/openlrm-mix-base-1.1",
        *,
        source_view: int | None = 0,
        source_size: int = 336,
        render_size: int = 128,
        source_distance: float = OPENLRM_SOURCE_DISTANCE,
        source_focal: float = OPENLRM_SOURCE_FOCAL,
        revision: str | None = None,
        device: str | torch.device | None = None,
    ):
        modeling = import_from_clone("openlrm.models.modeling_lrm", "OpenLRM", _CLONE_URL)
        dinov2 = import_from_clone("openlrm.models.encoders.dinov2_wrapper", "OpenLRM", _CLONE_URL)
        torch._dynamo.config.disable = True
        config = json.loads(resolve_file(model, "config.json", revision).read_text())
        weights = resolve_file(model, "model.safetensors", revision)
        from ...distributed import ensure_process_state

        ensure_process_state()  # OpenLRM logs through accelerate, which raises without a state
        with _dinov2_without_download(dinov2):
            lrm = modeling.ModelLRM(**config)
        from safetensors.torch import load_file

        lrm.load_state_dict(load_file(weights), strict=True)
        self.device = default_device(device)
        self.model = lrm.eval().requires_grad_(False).to(self.device)
        self.source_view = source_view
        self.source_size = source_size
        self.render_size = render_size
        self.source_distance = source_distance
        self.source_focal = source_focal

    @torch.no_grad()
    def reconstruct(self, views: torch.Tensor, layout: CameraLayout) -> torch.Tensor:
        """Reconstruct from the source view(s) and render every view of `layout`.

        Args:
            views (`torch.Tensor` of shape `(B, V, 3, h, w)`): Views in [0, 1].

        Returns:
            `torch.Tensor` of shape `(B, V, 3, render_size, render_size)` on the device of `views`.
        """
        batch, num_views = views.shape[:2]
        sources = range(num_views) if self.source_view is None else [self.source_view]
        source_camera = openlrm_source_camera(self.source_distance, self.source_focal).to(self.device)
        size = self.render_size
        background = torch.full((batch, 1, 1), sum(layout.background) / 3, device=self.device)
        total = torch.zeros(batch, num_views, 3, size, size, device=self.device)
        for source in sources:
            size_in = (self.source_size, self.source_size)
            image = F.interpolate(views[:, source].to(self.device), size=size_in, mode="bicubic", antialias=True)
            image = image.clamp(0, 1)
            planes = self.model.forward_planes(image, source_camera.expand(batch, -1))
            cam2world, _, _ = to_openlrm_frame(
                layout.cam2world, layout.intrinsics, source, self.source_distance, self.source_focal
            )
            cameras = render_camera_vectors(cam2world, layout.intrinsics).to(self.device)
            for view in range(num_views):
                rendered = self.model.synthesizer(
                    planes,
                    cameras[view].expand(batch, 1, -1),
                    torch.zeros(batch, 1, 2, device=self.device),
                    torch.full((batch, 1, 1), float(size), device=self.device),
                    background,
                    size,
                )
                total[:, view] += rendered["images_rgb"][:, 0]
        return (total / len(sources)).clamp(0, 1).to(views.device)


@contextmanager
def _dinov2_without_download(dinov2: ModuleType) -> Iterator[None]:
    """Make OpenLRM's `Dinov2Wrapper` build its backbone with `pretrained=False` (no weight download)."""
    build = dinov2.Dinov2Wrapper._build_dinov2

    def build_untrained(model_name: str, modulation_dim: int | None = None, pretrained: bool = True):
        return build(model_name, modulation_dim=modulation_dim, pretrained=False)

    with patched(dinov2.Dinov2Wrapper, "_build_dinov2", staticmethod(build_untrained)):
        yield
