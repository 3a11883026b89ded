"""The view-batched toy model (MVDream's architecture in miniature): its views, its architecture, its augmentation.

The same captioned scenes as the grid toy (`carve3d_trl.toy.data`), rendered as 4 separate 32-px views at the
cameras of the view-batched family (`multiview_cameras(4, elevation=15.0)`: MVDream's default elevation, the
layout's default distance and field of view), in the model's view order. The model is made from the single-view toy
as MVDream is made from Stable Diffusion: its tokenizer, text encoder, VAE and scheduler, and its UNet's weights in a
UNet that adds the 16-input camera embedding (zero-initialised output, so that it starts neutral) and
sees one view (8x8 latent) per sample, with self-attention across the views of an object
([`~carve3d_trl.pipelines.MultiViewDiffusionPipeline`] installs it). `scripts/train_toy_view_batched.py` trains it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..rewards.cameras import CameraLayout, ViewBatchedCameras, multiview_cameras
from ..synthetic.objects import render_object
from .data import Scene, random_scene

__all__ = [
    "NUM_VIEWS",
    "VIEW_ELEVATION",
    "VIEW_SIZE",
    "build_toy_view_batched_pipeline",
    "mirrored_views",
    "render_scene_views",
    "scene_view_dataset",
    "toy_view_cameras",
    "turned_and_mirrored_views",
    "turned_views",
]

NUM_VIEWS = 4
VIEW_ELEVATION = 15.0  # MVDream's default
VIEW_SIZE = 32
CAMERA_INPUTS = 16


def toy_view_cameras() -> ViewBatchedCameras:
    """The view-batched toy's cameras: `multiview_cameras(4, elevation=15.0)` (views on -Y, +X, +Y, -X)."""
    return multiview_cameras(NUM_VIEWS, elevation=VIEW_ELEVATION)


def render_scene_views(
    scenes: Sequence[Scene], view_size: int = VIEW_SIZE, layout: CameraLayout | None = None
) -> torch.Tensor:
    """Views `(N, V, 3, view_size, view_size)` in [0, 1] of `scenes` at the layout's cameras, in its view order
    (default: the view-batched toy's cameras, [`toy_view_cameras`])."""
    layout = layout or toy_view_cameras().layout
    return torch.stack([render_object(scene.to_object(), layout, view_size) for scene in scenes])


def scene_view_dataset(
    num_scenes: int, seed: int = 0, view_size: int = VIEW_SIZE, layout: CameraLayout | None = None
) -> tuple[list[str], torch.Tensor]:
    """The scenes of `carve3d_trl.toy.data.scene_dataset(num_scenes, seed)` (the same captions) as views
    `(N, V, 3, view_size, view_size)` at the view-batched toy's cameras (see [`render_scene_views`])."""
    generator = torch.Generator().manual_seed(seed)
    scenes = [random_scene(generator) for _ in range(num_scenes)]
    return [scene.caption for scene in scenes], render_scene_views(scenes, view_size, layout)


def turned_views(views: torch.Tensor, quarters: int = 1) -> torch.Tensor:
    """The views `(..., V, C, h, w)` of the scene turned by `quarters` x 360/V degrees about the vertical (+Z, from
    +X towards +Y): a cyclic shift of the views, for cameras evenly spaced in azimuth in that direction, as
    `multiview_cameras` places them (view `i` of the turned scene is view `i - quarters` of the scene). The world
    lights do not turn, so the shading differs; the views stay exactly consistent."""
    return views.roll(quarters, dims=-4)


def mirrored_views(views: torch.Tensor) -> torch.Tensor:
    """The 4 views `(..., 4, C, h, w)` of the scene mirrored across the vertical plane of cameras 0 and 2.

    For 4 look-at cameras at one elevation and azimuths 90 degrees apart, the mirror maps cameras 0 and 2 onto
    themselves and swaps cameras 1 and 3, reversing each camera's right axis (the up and backward axes are mirrored
    with the camera centre): each view of the mirrored scene is the flipped view from the mirrored camera. The
    toy's solids and relations are mirror-symmetric, so the caption still describes the mirrored scene.
    """
    if views.shape[-4] != 4:
        raise ValueError(f"Mirroring needs 4 views 90 degrees apart, got {views.shape[-4]}.")
    return views.flip(-1)[..., [0, 3, 2, 1], :, :, :]


def turned_and_mirrored_views(views: torch.Tensor) -> torch.Tensor:
    """The 8 turned and mirrored versions of each object's 4 views `(N, 4, C, h, w)`: `(8N, 4, C, h, w)`, object
    by object (the 4 quarter turns of the scene, then those of its mirror image)."""
    versions = [turned_views(v, quarter) for v in (views, mirrored_views(views)) for quarter in range(4)]
    return torch.stack(versions, dim=1).flatten(0, 1)


def build_toy_view_batched_pipeline(base=None, seed: int = 0):
    """The view-batched toy's architecture (what training starts from), made from a single-view or grid toy
    `StableDiffusionPipeline` `base` (default: the shipped single-view toy, `toy_single_view_path()`): its
    tokenizer, text encoder, VAE and scheduler, and its UNet's weights in a UNet with the camera embedding
    (`class_embed_type="projection"`, 16 inputs) and `sample_size` one view's latent side. The camera
    embedding's first layer is random (deterministic in `seed`), its last layer zero.

    Returns:
        [`~carve3d_trl.pipelines.MultiViewDiffusionPipeline`] with 4 views at elevation 15 degrees.
    """
    from diffusers import UNet2DConditionModel

    from ..pipelines.view_batched import MultiViewDiffusionPipeline

    if base is None:
        from diffusers import StableDiffusionPipeline

        from .model import toy_single_view_path

        base = StableDiffusionPipeline.from_pretrained(
            toy_single_view_path(), torch_dtype=torch.float32, local_files_only=True
        )
    latent_size = VIEW_SIZE // (2 ** (len(base.vae.config.block_out_channels) - 1))
    config = {k: v for k, v in base.unet.config.items() if not k.startswith("_")}
    config.update(
        class_embed_type="projection", projection_class_embeddings_input_dim=CAMERA_INPUTS, sample_size=latent_size
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(config)
    missing, unexpected = unet.load_state_dict(base.unet.state_dict(), strict=False)
    if unexpected or any(not key.startswith("class_embedding.") for key in missing):
        raise ValueError(
            f"The base UNet does not fit the view-batched one: missing {missing}, unexpected {unexpected}."
        )
    torch.nn.init.zeros_(unet.class_embedding.linear_2.weight)
    torch.nn.init.zeros_(unet.class_embedding.linear_2.bias)
    return MultiViewDiffusionPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=unet,
        scheduler=base.scheduler,
        num_views=NUM_VIEWS,
        elevation=VIEW_ELEVATION,
    )
