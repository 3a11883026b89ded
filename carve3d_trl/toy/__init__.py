"""A toy text-to-multi-view model trained on synthetic scenes, shipped with the package (see `model` and `data`), in
two families: `"grid"` (2x2 grids, Stable Diffusion) and `"view_batched"` (MVDream's architecture, `view_batched`),
both fine-tuned from a single-view toy; its prompt adherence is measured by `adherence`, and `training` holds what
the training scripts share."""

from .adherence import load_adherence_classifier, measure_adherence
from .data import Scene, Solid, random_scene, render_random_views, render_scenes, scene_dataset, turned_and_mirrored
from .model import (
    TOY_FAMILIES,
    TOY_GUIDANCE_SCALE,
    TOY_MRC_RECONSTRUCTOR,
    TOY_VARIANTS,
    build_toy_pipeline,
    load_toy_pipeline,
    toy_model_path,
    toy_single_view_path,
)
from .view_batched import (
    build_toy_view_batched_pipeline,
    render_scene_views,
    scene_view_dataset,
    toy_view_cameras,
    turned_and_mirrored_views,
)

__all__ = [
    "TOY_FAMILIES",
    "TOY_GUIDANCE_SCALE",
    "TOY_MRC_RECONSTRUCTOR",
    "TOY_VARIANTS",
    "Scene",
    "Solid",
    "build_toy_pipeline",
    "build_toy_view_batched_pipeline",
    "load_adherence_classifier",
    "load_toy_pipeline",
    "measure_adherence",
    "random_scene",
    "render_random_views",
    "render_scene_views",
    "render_scenes",
    "scene_dataset",
    "scene_view_dataset",
    "toy_model_path",
    "toy_single_view_path",
    "toy_view_cameras",
    "turned_and_mirrored",
    "turned_and_mirrored_views",
]
