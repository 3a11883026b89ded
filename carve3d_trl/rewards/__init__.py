"""Carve3D's MRC reward (Multi-view Reconstruction Consistency) and what it is built from.

The public names below load on first use (TRL, diffusers and accelerate are never imported by this package).
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_namespace

_EXPORTS = {
    "cameras": [
        "CameraLayout",
        "ViewBatchedCameras",
        "fov_to_intrinsics",
        "instant3d_layout",
        "look_at_cam2world",
        "multiview_cameras",
        "orbit_cam2world",
        "orbit_layout",
        "split_grid",
        "tile_views",
        "zero123pp_layout",
    ],
    "crop": ["crop_pairs", "foreground_boxes", "foreground_mask", "resize_to"],
    "lpips_trunk": ["LPIPSTrunkError", "fetch_lpips_trunk"],
    "metadata": ["RewardMetadata", "per_sample_values"],
    "metrics": [
        "METRIC_NAMES",
        "ImageMetric",
        "alexnet_weights_path",
        "load_lpips",
        "metric_higher_is_better",
        "silhouette_disagreement",
    ],
    "mrc": ["MRCReward"],
    "reconstructors": [
        "InstantMeshReconstructor",
        "LGMReconstructor",
        "OpenLRMReconstructor",
        "RadianceFieldReconstructor",
        "Reconstructor",
        "VisualHullReconstructor",
        "make_reconstructor",
    ],
}
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
__getattr__, __dir__ = lazy_namespace(__name__, _EXPORTS)

if TYPE_CHECKING:
    from .cameras import (
        CameraLayout,
        ViewBatchedCameras,
        fov_to_intrinsics,
        instant3d_layout,
        look_at_cam2world,
        multiview_cameras,
        orbit_cam2world,
        orbit_layout,
        split_grid,
        tile_views,
        zero123pp_layout,
    )
    from .crop import crop_pairs, foreground_boxes, foreground_mask, resize_to
    from .lpips_trunk import LPIPSTrunkError, fetch_lpips_trunk
    from .metadata import RewardMetadata, per_sample_values
    from .metrics import (
        METRIC_NAMES,
        ImageMetric,
        alexnet_weights_path,
        load_lpips,
        metric_higher_is_better,
        silhouette_disagreement,
    )
    from .mrc import MRCReward
    from .reconstructors import (
        InstantMeshReconstructor,
        LGMReconstructor,
        OpenLRMReconstructor,
        RadianceFieldReconstructor,
        Reconstructor,
        VisualHullReconstructor,
        make_reconstructor,
    )
