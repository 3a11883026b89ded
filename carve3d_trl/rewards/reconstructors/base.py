"""The interface every reconstructor implements."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from ..cameras import CameraLayout

__all__ = ["Reconstructor"]


@runtime_checkable
class Reconstructor(Protocol):
    """Reconstructs 3D from posed views and renders the reconstruction back at the views' cameras."""

    def reconstruct(self, views: torch.Tensor, layout: CameraLayout) -> torch.Tensor:
        """Reconstruct and render.

        Args:
            views (`torch.Tensor` of shape `(B, V, 3, h, w)`): Views in [0, 1], row-major order of `layout`.
            layout (`CameraLayout`): The cameras of the views.

        Returns:
            `torch.Tensor` of shape `(B, V, 3, h', w')` in [0, 1], on the device of `views`: the render at each
            view's camera (any size; MRC compares at the render size). NaN marks a view that was not evaluated.
        """
        ...
