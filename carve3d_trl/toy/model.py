"""The toy text-to-multi-view models: their architecture, and their trained weights shipped with the package.

A Stable Diffusion pipeline in miniature (a CLIP tokenizer with one token per caption word, a CLIP text encoder, a
3-level `AutoencoderKL` with a 4x downsampled 4-channel latent, a 3-level `UNet2DConditionModel`, DDIM), made in two
stages as real multi-view models are (`scripts/train_toy_model.py`):

1. a single-view text-to-image model (32-px views of the synthetic scenes of `carve3d_trl.toy.data` from many
   cameras), shipped as `weights/single_view/` (`toy_single_view_path()`), the toy's "pretrained" model;
2. fine-tuned from it, the `"grid"` family (64x64 grids of 2x2 views, like Instant3D): a `"short"` checkpoint
   (stopped early, like Carve3D's short-SFT base model: one-solid captions drawn right, views that agree less; the
   second solid of a composition often takes the wrong colour) and a `"long"` one (trained longer, for comparison).
   Their prompt adherence is measured by `carve3d_trl.toy.adherence`.

The `"view_batched"` family (MVDream's architecture: 4 views of 32 px denoised jointly, with a camera embedding and
cross-view attention; `carve3d_trl.toy.view_batched`) is fine-tuned from the same single-view model by
`scripts/train_toy_view_batched.py`; its `"short"` and `"long"` checkpoints are `MultiViewDiffusionPipeline` folders
in `weights/view_batched/`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ..testing import assemble_sd_pipeline
from .tokenizer import build_toy_tokenizer

__all__ = [
    "TOY_FAMILIES",
    "TOY_MRC_RECONSTRUCTOR",
    "TOY_VARIANTS",
    "build_toy_pipeline",
    "load_toy_pipeline",
    "toy_model_path",
    "toy_single_view_path",
]

TOY_VARIANTS = ("short", "long")
TOY_FAMILIES = ("grid", "view_batched")
WEIGHTS_DIR = Path(__file__).parent / "weights"
TOY_IMAGE_SIZE = 64  # the grid toy's 2x2 grids
SINGLE_VIEW_SIZE = 32  # one view
# The radiance field (`held_out`) with which the replication and the adherence evaluation score the toys' MRC: fitted
# at 16 px with 50 steps, 0.3-0.7 s per sample instead of 2-7 s at its defaults; the opaque start
# (`density_offset=-1`) is the one the recorded runs used, so they reproduce.
TOY_MRC_RECONSTRUCTOR = {
    "fit_size": 16,
    "grid_resolution": 16,
    "samples_per_ray": 16,
    "steps": 50,
    "density_offset": -1,
}
TOY_GUIDANCE_SCALE = 3.0  # the toys' classifier-free guidance: at 5 their colours over-shoot to neighbouring hues
TEXT_HIDDEN_SIZE = 64
TEXT_LAYERS = 2
UNET_CHANNELS = (32, 64, 64)  # the UNet's block widths (the shipped checkpoints')
MAX_CAPTION_LENGTH = 64  # tokens (a caption word each; a character each elsewhere)


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


def toy_single_view_path() -> Path:
    """The diffusers folder of the shipped single-view toy (a `StableDiffusionPipeline` of 32-px images): the stage 1
    model that both families are fine-tuned from."""
    path = WEIGHTS_DIR / "single_view"
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"No single-view toy weights at {path}; rebuild them with scripts/train_toy_model.py.")
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


def valid_unet_channels(channels: tuple[int, ...]) -> bool:
    """Whether `channels` can be the toy UNet's block widths: 3 of them, each a positive multiple of 8 (its group-norm
    size and attention head width)."""
    return len(channels) == 3 and all(c >= 8 and c % 8 == 0 for c in channels)


def build_toy_pipeline(
    seed: int = 0,
    image_size: int = TOY_IMAGE_SIZE,
    tokenizer: str = "word",
    text_layers: int = TEXT_LAYERS,
    unet_channels: tuple[int, int, int] = UNET_CHANNELS,
):
    """The toy architecture with random weights (what training starts from), deterministic in `seed`, for images
    of `image_size` pixels (the UNet's `sample_size` is a quarter of it; the weights do not depend on it), with the
    `"word"` tokenizer (the shipped checkpoints') or the `"character"` one (`carve3d_trl.toy.tokenizer`) and a text
    encoder of `text_layers` transformer layers (the shipped checkpoints': 2; the VAE's and UNet's initial weights do
    not depend on it) and a UNet of block widths `unet_channels` (the shipped checkpoints': 32, 64, 64; multiples
    of 8, its group-norm size and attention head width; the VAE's initial weights do not depend on them)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if not valid_unet_channels(unet_channels):
        raise ValueError(
            f"unet_channels must be 3 block widths, each a multiple of 8, got {tuple(unet_channels)}; e.g. "
            f"{UNET_CHANNELS}."
        )
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_toy_tokenizer(tmp, tokenizer, model_max_length=MAX_CAPTION_LENGTH)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            block_out_channels=(16, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=image_size,
            mid_block_add_attention=False,
        )
        unet = UNet2DConditionModel(
            sample_size=image_size // 4,
            block_out_channels=tuple(unet_channels),
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
                num_hidden_layers=text_layers,
                num_attention_heads=4,
                max_position_embeddings=MAX_CAPTION_LENGTH,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    return assemble_sd_pipeline(vae, text_encoder, tokenizer, unet)
