"""Carve3D's MRC reward (Multi-view Reconstruction Consistency) and what it is built from."""

from .cameras import (
    CameraLayout,
    fov_to_intrinsics,
    instant3d_layout,
    look_at_cam2world,
    orbit_cam2world,
    orbit_layout,
    split_grid,
    tile_views,
    zero123pp_layout,
)
from .crop import crop_pairs, foreground_boxes, foreground_mask
from .metrics import ImageMetric, alexnet_weights_path, load_lpips
from .mrc import MRCReward
from .reconstructors import (
    InstantMeshReconstructor,
    OpenLRMReconstructor,
    RadianceFieldReconstructor,
    Reconstructor,
    make_reconstructor,
)

__all__ = [
    "CameraLayout",
    "ImageMetric",
    "InstantMeshReconstructor",
    "MRCReward",
    "OpenLRMReconstructor",
    "RadianceFieldReconstructor",
    "Reconstructor",
    "alexnet_weights_path",
    "crop_pairs",
    "fov_to_intrinsics",
    "foreground_boxes",
    "foreground_mask",
    "instant3d_layout",
    "load_lpips",
    "look_at_cam2world",
    "make_reconstructor",
    "orbit_cam2world",
    "orbit_layout",
    "split_grid",
    "tile_views",
    "zero123pp_layout",
]
