"""DDPO pipelines, one file per model family, and what they share.

- `conditioning.py`: the [`PromptConditioner`] protocol every family implements, and guidance.
- `sampling.py`: the one DDIM loop with log-probabilities, transition log-probabilities (the KL reference), decode.
- `lora.py`: LoRA adapters: adding, writing (diffusers format), loading in place. `mixin.py`: what pipelines share.
- `stable_diffusion.py`, `stable_diffusion_xl.py` (grid models), `view_batched.py` (MVDream's architecture): each
  family's conditioner and pipeline; `wrapped.py`: TRL's DDPO interface over a diffusers pipeline.
- `loading.py`: family detection, `load_ddpo_pipeline`, `conditioner_of`.
"""

from .conditioning import (
    Conditioning,
    ImageConditioner,
    PromptConditioner,
    concat_conditioning,
    guided_noise,
    repeat_conditioning,
    split_conditioning,
)
from .loading import (
    FAMILIES,
    GRID_FAMILIES,
    PIPELINES,
    conditioner_of,
    detect_family,
    load_ddpo_pipeline,
    model_camera_layout,
    resolve_family,
)
from .lora import (
    DEFAULT_LORA_TARGETS,
    LORA_WEIGHT_NAME,
    add_lora_adapter,
    load_lora_into_unet_adapter,
    save_unet_weights,
)
from .mixin import Carve3DPipelineMixin
from .sampling import decode_latents, sample_prompts, sample_with_log_probs, transition_log_probs
from .stable_diffusion import Carve3DStableDiffusionPipeline, StableDiffusionConditioner
from .stable_diffusion_xl import Carve3DStableDiffusionXLPipeline, StableDiffusionXLConditioner
from .view_batched import (
    Carve3DViewBatchedPipeline,
    MultiViewAttnProcessor,
    MultiViewDiffusionPipeline,
    ViewBatchedConditioner,
    check_reward_cameras,
    install_multiview_attention,
)

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "FAMILIES",
    "GRID_FAMILIES",
    "LORA_WEIGHT_NAME",
    "PIPELINES",
    "Carve3DPipelineMixin",
    "Carve3DStableDiffusionPipeline",
    "Carve3DStableDiffusionXLPipeline",
    "Carve3DViewBatchedPipeline",
    "MultiViewAttnProcessor",
    "MultiViewDiffusionPipeline",
    "Conditioning",
    "ImageConditioner",
    "PromptConditioner",
    "StableDiffusionConditioner",
    "StableDiffusionXLConditioner",
    "ViewBatchedConditioner",
    "add_lora_adapter",
    "concat_conditioning",
    "conditioner_of",
    "decode_latents",
    "detect_family",
    "check_reward_cameras",
    "guided_noise",
    "install_multiview_attention",
    "load_ddpo_pipeline",
    "load_lora_into_unet_adapter",
    "model_camera_layout",
    "repeat_conditioning",
    "resolve_family",
    "sample_prompts",
    "sample_with_log_probs",
    "save_unet_weights",
    "split_conditioning",
    "transition_log_probs",
]
