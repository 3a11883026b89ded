"""carve3d-trl: Carve3D's RL fine-tuning of multi-view diffusion models, on TRL's DDPO."""

from .config import Carve3DConfig
from .families import detect_family, load_ddpo_pipeline
from .image_logging import ImageSamplesLogger
from .pipelines import Carve3DStableDiffusionPipeline
from .pipelines_sdxl import Carve3DStableDiffusionXLPipeline
from .prompts import PromptCycler, load_prompts
from .stats import PromptStatTracker, compute_advantages
from .trainer import Carve3DTrainer

__version__ = "0.1.0"

__all__ = [
    "Carve3DConfig",
    "Carve3DStableDiffusionPipeline",
    "Carve3DStableDiffusionXLPipeline",
    "Carve3DTrainer",
    "ImageSamplesLogger",
    "PromptCycler",
    "PromptStatTracker",
    "compute_advantages",
    "detect_family",
    "load_ddpo_pipeline",
    "load_prompts",
]
