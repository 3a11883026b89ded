"""carve3d-trl: Carve3D's RL fine-tuning of multi-view diffusion models, on TRL's DDPO.

The public names below load on first use, so `import carve3d_trl.rewards` stays free of TRL and diffusers.
"""

from typing import TYPE_CHECKING

from ._lazy import lazy_namespace

__version__ = "0.1.0"

_EXPORTS = {
    "config": ["Carve3DConfig"],
    "image_logging": ["ImageSamplesLogger"],
    "kl": ["KLMode"],
    "pipelines": [
        "Carve3DStableDiffusionPipeline",
        "Carve3DStableDiffusionXLPipeline",
        "detect_family",
        "load_ddpo_pipeline",
    ],
    "prompts": ["PromptCycler", "load_prompts"],
    "stats": ["PromptStatTracker", "compute_advantages"],
    "trainer": ["Carve3DTrainer"],
}
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
__getattr__, __dir__ = lazy_namespace(__name__, _EXPORTS)

if TYPE_CHECKING:
    from .config import Carve3DConfig
    from .image_logging import ImageSamplesLogger
    from .kl import KLMode
    from .pipelines import (
        Carve3DStableDiffusionPipeline,
        Carve3DStableDiffusionXLPipeline,
        detect_family,
        load_ddpo_pipeline,
    )
    from .prompts import PromptCycler, load_prompts
    from .stats import PromptStatTracker, compute_advantages
    from .trainer import Carve3DTrainer
