"""The toy text-to-multi-view model: its architecture, and its trained weights shipped with the package.

A Stable Diffusion pipeline in miniature (character-level CLIP tokenizer and text encoder, a 3-level `AutoencoderKL`
with a 16x16x4 latent for 64x64 images, a 3-level `UNet2DConditionModel`, DDIM), trained by
`scripts/train_toy_model.py` on 2x2 grids of synthetic scenes (`carve3d_trl.toy.data`). Two checkpoints are shipped:
`"short"` (stopped early, like Carve3D's short-SFT base model: plausible but imperfectly consistent views) and
`"long"` (trained longer, for comparison).

A second family, `"view_batched"` (MVDream's architecture: 4 views of 32 px denoised jointly, with a camera
embedding and cross-view attention; `carve3d_trl.toy.view_batched`), is made from the grid toy and trained by
`scripts/train_toy_view_batched.py`; its `"short"` and `"long"` checkpoints are `MultiViewDiffusionPipeline` folders
in `weights/view_batched/`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ..testing import assemble_sd_pipeline, build_tiny_tokenizer

__all__ = ["TOY_FAMILIES", "TOY_VARIANTS", "build_toy_pipeline", "load_toy_pipeline", "toy_model_path"]

TOY_VARIANTS = ("short", "long")
TOY_FAMILIES = ("grid", "view_batched")
WEIGHTS_DIR = Path(__file__).parent / "weights"
TOY_IMAGE_SIZE = 64
TEXT_HIDDEN_SIZE = 64
MAX_CAPTION_LENGTH = 64  # characters


def toy_model_path(variant: str = "short", family: str = "grid") -> Path:
    """The diffusers folder of a shipped toy checkpoint: `"short"` (the default base model) or `"long"`, of the
    `"grid"` toy (2x2 grids, a `StableDiffusionPipeline`) or the `"view_batched"` one (a `MultiViewDiffusionPipeline`).
    """
    if family not in TOY_FAMILIES:
        raise ValueError(f"Unknown toy model family {family!r}; valid families: {', '.join(TOY_FAMILIES)}.")
    if variant not in TOY_VARIANTS:
        raise ValueError(f"Unknown toy model variant {variant!r}; valid variants: {', '.join(TOY_VARIANTS)}.")
    path = WEIGHTS_DIR / variant if family == "grid" else WEIGHTS_DIR / family / variant
    if not (path / "model_index.json").is_file():
        script = "train_toy_model.py" if family == "grid" else "train_toy_view_batched.py"
        raise FileNotFoundError(f"No toy model weights at {path}; rebuild them with scripts/{script}.")
    return path


def load_toy_pipeline(variant: str = "short", family: str = "grid", **kwargs):
    """A shipped toy checkpoint, offline, in float32 by default: `StableDiffusionPipeline.from_pretrained` for the
    `"grid"` family, `MultiViewDiffusionPipeline.from_pretrained` for the `"view_batched"` one."""
    path = toy_model_path(variant, family)
    if family == "grid":
        from diffusers import StableDiffusionPipeline as pipeline_class
    else:
        from ..pipelines.view_batched import MultiViewDiffusionPipeline as pipeline_class

    kwargs.setdefault("torch_dtype", torch.float32)
    return pipeline_class.from_pretrained(path, local_files_only=True, **kwargs)


def build_toy_pipeline(seed: int = 0):
    """The toy architecture with random weights (what training starts from), deterministic in `seed`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tiny_tokenizer(tmp, model_max_length=MAX_CAPTION_LENGTH)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            block_out_channels=(16, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=TOY_IMAGE_SIZE,
            mid_block_add_attention=False,
        )
        unet = UNet2DConditionModel(
            sample_size=TOY_IMAGE_SIZE // 4,
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=TEXT_HIDDEN_SIZE,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=TEXT_HIDDEN_SIZE,
                intermediate_size=2 * TEXT_HIDDEN_SIZE,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=MAX_CAPTION_LENGTH,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    return assemble_sd_pipeline(vae, text_encoder, tokenizer, unet)
