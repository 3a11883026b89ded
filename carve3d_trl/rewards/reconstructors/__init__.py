"""Reconstructors for MRC: the built-in radiance field and adapters for OpenLRM, InstantMesh and LGM."""

from __future__ import annotations

from typing import Any

from .base import Reconstructor
from .instantmesh import InstantMeshReconstructor
from .lgm import LGMReconstructor
from .openlrm import OpenLRMReconstructor
from .radiance_field import RadianceFieldReconstructor

__all__ = [
    "InstantMeshReconstructor",
    "LGMReconstructor",
    "OpenLRMReconstructor",
    "RadianceFieldReconstructor",
    "Reconstructor",
    "make_reconstructor",
]

RECONSTRUCTORS = {
    "radiance_field": RadianceFieldReconstructor,
    "openlrm": OpenLRMReconstructor,
    "instantmesh": InstantMeshReconstructor,
    "lgm": LGMReconstructor,
}


def make_reconstructor(name: str = "radiance_field", **kwargs: Any) -> Reconstructor:
    """Build a reconstructor by name: `"radiance_field"` (default), `"openlrm"`, `"instantmesh"` or `"lgm"`.

    `kwargs` go to the class's constructor (`RadianceFieldReconstructor`, `OpenLRMReconstructor`,
    `InstantMeshReconstructor`, `LGMReconstructor`).
    """
    if name not in RECONSTRUCTORS:
        raise ValueError(f"Unknown reconstructor {name!r}; valid names: {', '.join(RECONSTRUCTORS)}.")
    return RECONSTRUCTORS[name](**kwargs)
