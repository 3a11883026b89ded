"""MRC, Multi-view Reconstruction Consistency: Carve3D's reward, with TRL DDPO's reward signature."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .cameras import CameraLayout, instant3d_layout, split_grid
from .crop import crop_pairs, resize_to
from .metrics import ImageMetric, silhouette_disagreement
from .reconstructors import Reconstructor, make_reconstructor

__all__ = ["MRCReward"]

# Default (silhouette, MSE) weights of the two terms added to the metric: chosen with LPIPS by the validity study
# (benchmarks/RESULTS.md), off with the pixel metrics.
DEFAULT_TERM_WEIGHTS = {"lpips": (10.0, 10.0), "mse": (0.0, 0.0), "psnr": (0.0, 0.0)}


class MRCReward:
    """Carve3D's MRC reward: how well a reconstruction from the generated views reproduces them.

    For each sample (a grid image, split into views by the camera layout, or the views of a view-batched model
    given as they are): reconstruct 3D from the views, render the reconstruction at the views' cameras, crop each
    (view, render) pair with the square padded foreground box of the generated view, resize both crops to the render
    size (bicubic, antialiased) and compare them. MRC is the mean distance over the views.

    Metrics and signs:
        - `"lpips"` (the paper's; AlexNet trunk): MRC = mean LPIPS, reward = -MRC.
        - `"mse"`: MRC = mean squared error in [0, 1] units, reward = -MRC.
        - `"psnr"`: MRC = mean PSNR in dB (higher is more consistent), reward = +MRC.
    In every case a higher reward means more consistent views.

    Two terms are added to each view's distance (subtracted from PSNR), by default with LPIPS only:
        - silhouette: `silhouette_weight` times the disagreement of the view's and the render's foregrounds (`1 - IoU`
          of the whole images at the render size, `silhouette_disagreement`). The visual hull renders consistent
          views with their own silhouettes, so this term sees geometric inconsistency (a view from a wrong camera, a
          turned or moved object) without the noise of the painted colours.
        - pixels: `mse_weight` times the crops' mean squared error (in [0, 1] units), which ranks colour changes that
          LPIPS ranks poorly even on a perfect reconstruction (a hue rotation).
    `silhouette_weight=0, mse_weight=0` is the paper's MRC.

    Args:
        layout (`CameraLayout`, *optional*): Cameras of the grid tiles or of the views. Default:
            `instant3d_layout()`. For a view-batched model, the layout of the cameras it was given
            (`multiview_cameras(...).layout`).
        reconstructor (`Reconstructor` or `str`): An object with `reconstruct(views, layout)`, or a name for
            `make_reconstructor`: `"visual_hull"` (default; deterministic, no download), `"radiance_field"`,
            `"openlrm"`, `"instantmesh"`, `"lgm"`.
        metric (`str`): `"lpips"`, `"mse"` or `"psnr"`.
        lpips_pretrained (`bool`): Load the ImageNet AlexNet trunk of LPIPS (default). It is read from
            `$TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth` and never downloaded; a missing file raises
            `FileNotFoundError` at construction. `False` keeps a random trunk: for tests only.
        device (`str` or `torch.device`, *optional*): Where to compute. Default: the device of the input images.
        seed (`int`): Seed given to a reconstructor built by name that takes one (the radiance field).
        reconstructor_kwargs (`dict`, *optional*): Keyword arguments for a reconstructor built by name.
        silhouette_weight (`float`, *optional*): Weight of the silhouette term, >= 0. Default: 10 with `"lpips"`
            (chosen by the validity study, `benchmarks/RESULTS.md`), 0 (off) with `"mse"` and `"psnr"`.
        mse_weight (`float`, *optional*): Weight of the pixel term, >= 0. Default: 10 with `"lpips"`, 0 (off) with
            `"mse"` and `"psnr"`.
    """

    def __init__(
        self,
        layout: CameraLayout | None = None,
        reconstructor: Reconstructor | str = "visual_hull",
        *,
        metric: str = "lpips",
        lpips_pretrained: bool = True,
        device: str | torch.device | None = None,
        seed: int = 0,
        reconstructor_kwargs: dict[str, Any] | None = None,
        silhouette_weight: float | None = None,
        mse_weight: float | None = None,
    ):
        for name, weight in (("silhouette_weight", silhouette_weight), ("mse_weight", mse_weight)):
            if weight is not None and not weight >= 0:
                raise ValueError(f"{name} must be >= 0 (0 turns the term off), got {weight}.")
        self.layout = layout if layout is not None else instant3d_layout()
        self.device = torch.device(device) if device is not None else None
        self.metric = ImageMetric(metric, lpips_pretrained=lpips_pretrained)
        default_silhouette, default_mse = DEFAULT_TERM_WEIGHTS[metric]
        self.silhouette_weight = default_silhouette if silhouette_weight is None else float(silhouette_weight)
        self.mse_weight = default_mse if mse_weight is None else float(mse_weight)
        if isinstance(reconstructor, str):
            kwargs = dict(reconstructor_kwargs or {})
            if reconstructor == "radiance_field":
                kwargs.setdefault("seed", seed)
            elif reconstructor != "visual_hull" and self.device is not None:  # the built-in ones follow the views
                kwargs.setdefault("device", self.device)
            reconstructor = make_reconstructor(reconstructor, **kwargs)
        elif reconstructor_kwargs:
            raise ValueError("reconstructor_kwargs only apply to a reconstructor given by name.")
        self.reconstructor = reconstructor
        if self.device is not None:
            self.metric.to(self.device)

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str] = (), metadata: Sequence[dict] = ()
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Score grid images or views (TRL DDPO's `reward_fn(images, prompts, prompt_metadata)`).

        Args:
            images (`torch.Tensor`): In [0, 1], either
                - grid images of shape `(B, 3, H, W)` (a grid model such as Instant3D), split into views by the
                  layout (`split_grid`), or
                - views of shape `(B, V, 3, h, w)` (a view-batched model such as MVDream), scored as they are
                  (`score_views`); `V` must be `layout.num_views`, views in the layout's order.
            prompts (`Sequence[str]`): Unused; part of the reward signature.
            metadata (`Sequence[dict]`): Unused; part of the reward signature.

        Returns:
            `(rewards, reward_metadata)`: `rewards` a float32 CPU tensor `(B,)`; `reward_metadata` a dict of CPU
            tensors: `"mrc"` `(B,)`, `"mrc_per_view"` `(B, V)` (NaN for views not evaluated; the two terms
            included), `"silhouette"` `(B, V)` (the foregrounds' `1 - IoU`, before weighting), `"renders"`
            `(B, V, 3, h', w')` (the reconstructor's render size).

        Raises:
            ValueError: for another shape, a grid the layout does not divide, or a view count other than the
                layout's.
        """
        if images.ndim == 5:
            return self.score_views(images)
        if images.ndim != 4:
            raise ValueError(
                f"Expected grid images of shape (B, 3, H, W) or views of shape (B, {self.layout.num_views}, 3, h, w), "
                f"got {tuple(images.shape)}."
            )
        return self.score_views(split_grid(images, self.layout))

    @torch.no_grad()
    def score_views(self, views: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Like `__call__`, for views already split: `views` of shape `(B, V, 3, h, w)` in [0, 1], `V` the layout's
        number of views, in its order."""
        if views.ndim != 5:
            raise ValueError(f"Expected views of shape (B, V, 3, h, w), got {tuple(views.shape)}.")
        if views.shape[1] != self.layout.num_views:
            raise ValueError(
                f"Got {views.shape[1]} views per sample, but this reward's camera layout has {self.layout.num_views} "
                f"views ({self.layout.rows}x{self.layout.cols}). Build the reward with the model's camera layout, "
                f"e.g. MRCReward(layout=multiview_cameras(num_views={views.shape[1]}).layout) for a view-batched "
                "model, so that each view is reconstructed with its own camera."
            )
        device = self.device if self.device is not None else views.device
        views = views.to(device=device, dtype=torch.float32).clamp(0, 1)
        self.metric.to(device)
        renders = self.reconstructor.reconstruct(views, self.layout).to(device=device, dtype=torch.float32)
        view_crops, render_crops = crop_pairs(views, renders, self.layout.background)
        per_view = self.metric(view_crops.flatten(0, 1), render_crops.flatten(0, 1)).view(views.shape[:2])
        silhouette = self._silhouette_disagreement(views, renders)
        mse = (view_crops - render_crops).square().flatten(2).mean(dim=2)
        sign = -1.0 if self.metric.higher_is_better else 1.0
        for weight, term in ((self.silhouette_weight, silhouette), (self.mse_weight, mse)):
            if weight:
                per_view = per_view + sign * weight * term
        mrc = per_view.nanmean(dim=1)
        rewards = mrc if self.metric.higher_is_better else -mrc
        metadata = {
            "mrc": mrc.cpu(),
            "mrc_per_view": per_view.cpu(),
            "silhouette": silhouette.cpu(),
            "renders": renders.cpu(),
        }
        return rewards.float().cpu(), metadata

    def _silhouette_disagreement(self, views: torch.Tensor, renders: torch.Tensor) -> torch.Tensor:
        """`1 - IoU` `(B, V)` of the foregrounds of the views `(B, V, 3, h, w)` (resized to the render size as
        `crop_pairs` does) and of the renders `(B, V, 3, h', w')`; NaN for views not evaluated (NaN renders)."""
        flat_renders = renders.flatten(0, 1)
        flat_views = resize_to(views.flatten(0, 1), flat_renders.shape[-2:]).clamp(0, 1)
        silhouette = silhouette_disagreement(flat_views, flat_renders, self.layout.background).view(views.shape[:2])
        return torch.where(renders.isnan().flatten(2).any(dim=2), torch.nan, silhouette)
