"""Procedural objects rendered at a layout's cameras, controlled multi-view inconsistencies and the MRC validity study.

`objects` renders exactly consistent views of random solids, `distortions` makes one view inconsistent with a chosen
strength, and `validity` measures how MRC (`carve3d_trl.rewards.MRCReward`) follows that strength.
"""

from .distortions import CAMERA_DISTORTIONS, DISTORTIONS, distort_views, moved_camera
from .objects import Primitive, SyntheticObject, object_depth, random_object, render_object
from .validity import (
    OracleReconstructor,
    TrueGeometryReconstructor,
    ValidityResult,
    consistent_views,
    run_validity_study,
    spearman,
    study_objects,
)

__all__ = [
    "CAMERA_DISTORTIONS",
    "DISTORTIONS",
    "OracleReconstructor",
    "Primitive",
    "SyntheticObject",
    "TrueGeometryReconstructor",
    "ValidityResult",
    "consistent_views",
    "distort_views",
    "moved_camera",
    "object_depth",
    "random_object",
    "render_object",
    "run_validity_study",
    "spearman",
    "study_objects",
]
