"""A toy text-to-multi-view model trained on synthetic scenes, shipped with the package (see `model` and `data`)."""

from .data import Scene, Solid, random_scene, render_scenes, scene_dataset, turned_and_mirrored
from .model import TOY_VARIANTS, build_toy_pipeline, load_toy_pipeline, toy_model_path

__all__ = [
    "TOY_VARIANTS",
    "Scene",
    "Solid",
    "build_toy_pipeline",
    "load_toy_pipeline",
    "random_scene",
    "render_scenes",
    "scene_dataset",
    "toy_model_path",
    "turned_and_mirrored",
]
