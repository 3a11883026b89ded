"""Reconstructors for MRC: the built-in visual hull (default) and radiance field, and adapters for OpenLRM,
InstantMesh and LGM."""

from __future__ import annotations

from typing import Any

from .base import Reconstructor
from .instantmesh import InstantMeshReconstructor
from .lgm import LGMReconstructor
from .openlrm import OpenLRMReconstructor
from .radiance_field import RadianceFieldReconstructor
from .visual_hull import VisualHullReconstructor

__all__ = [
    "InstantMeshReconstructor",
    "LGMReconstructor",
    "OpenLRMReconstructor",
    "RadianceFieldReconstructor",
    "Reconstructor",
    "VisualHullReconstructor",
    "make_reconstructor",
]

RECONSTRUCTORS = {
    "visual_hull": VisualHullReconstructor,
    "radiance_field": RadianceFieldReconstructor,
    "openlrm": OpenLRMReconstructor,
    "instantmesh": InstantMeshReconstructor,
    "lgm": LGMReconstructor,
}


def make_reconstructor(name: str = "visual_hull", **kwargs: Any) -> Reconstructor:
    """Build a reconstructor by name: `"visual_hull"` (default), `"radiance_field"`, `"openlrm"`, `"instantmesh"` or
    `"lgm"`.

    `kwargs` go to the class's constructor (`VisualHullReconstructor`, `RadianceFieldReconstructor`,
    `OpenLRMReconstructor`, `InstantMeshReconstructor`, `LGMReconstructor`).
    """
    if name not in RECONSTRUCTORS:
        raise ValueError(f"Unknown reconstructor {name!r}; valid names: {', '.join(RECONSTRUCTORS)}.")
    return RECONSTRUCTORS[name](**kwargs)
