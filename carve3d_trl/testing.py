"""Tiny, randomly initialised text-to-image pipelines built offline, for tests, examples and benchmarks.

The pipelines are ordinary diffusers folders: `StableDiffusionPipeline.from_pretrained(path)` and
`DefaultDDPOStableDiffusionPipeline(path)` load them (`StableDiffusionXLPipeline.from_pretrained(path)` and
`Carve3DStableDiffusionXLPipeline(path)` the tiny SDXL). Their images are grids of views (2x2 by default), so the
multi-view reward runs on them. Everything is deterministic for a given seed.
"""

from __future__ import annotations

import importlib.util
import string
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


@dataclass(frozen=True)
class TinyPipelineSpec:
    """Sizes of a tiny Stable Diffusion pipeline.

    Args:
        image_size (`int`): Height and width of the generated grid image, in pixels.
        grid (`tuple[int, int]`): Rows and columns of views in the grid; `image_size` must divide by both.
        vae_blocks (`int`): VAE resolution levels; the latent is `image_size / 2 ** (vae_blocks - 1)` pixels wide.
        unet_channels (`tuple[int, ...]`): UNet block widths (one down and one up block per entry).
        text_hidden_size (`int`): Width of the CLIP text encoder (and the UNet's cross-attention).
        layers_per_block (`int`): ResNet (and attention) layers in each UNet down block.
        cross_attention_blocks (`int`, *optional*): How many blocks have cross-attention: the first ones going down
            and the last ones going up (Stable Diffusion 1.5: 3 of 4). Default: all of them.
        norm_num_groups (`int`): Group-norm groups of the UNet (every width must divide by it).
        attention_head_dim (`int`): diffusers' `attention_head_dim` of the UNet (the number of heads, in SD 1.x).

    The defaults are the tiny model of the tests. Stable Diffusion 1.5's UNet (about 860M parameters) is
    `unet_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_blocks=3, norm_num_groups=32,
    text_hidden_size=768` (its VAE and text encoder stay tiny here).
    """

    image_size: int = 64
    grid: tuple[int, int] = (2, 2)
    vae_blocks: int = 2
    unet_channels: tuple[int, ...] = (32, 64)
    text_hidden_size: int = 32
    layers_per_block: int = 1
    cross_attention_blocks: int | None = None
    norm_num_groups: int = 8
    attention_head_dim: int = 8

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (self.vae_blocks - 1)

    def __post_init__(self):
        rows, cols = self.grid
        if self.image_size % rows or self.image_size % cols:
            raise ValueError(f"image_size {self.image_size} does not split into a {rows}x{cols} grid of views.")
        if self.image_size % 2 ** (self.vae_blocks - 1):
            raise ValueError(f"image_size {self.image_size} must be divisible by 2 ** (vae_blocks - 1).")
        blocks = len(self.unet_channels)
        if self.cross_attention_blocks is not None and not 0 <= self.cross_attention_blocks <= blocks:
            raise ValueError(
                f"cross_attention_blocks must be between 0 and {blocks}, got {self.cross_attention_blocks}."
            )
        if any(width % self.norm_num_groups for width in self.unet_channels):
            raise ValueError(
                f"Every UNet width {self.unet_channels} must divide by norm_num_groups {self.norm_num_groups}."
            )

    @property
    def unet_block_types(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The UNet's down and up block types: cross-attention blocks first going down and last going up."""
        blocks = len(self.unet_channels)
        attention = blocks if self.cross_attention_blocks is None else self.cross_attention_blocks
        down = ("CrossAttnDownBlock2D",) * attention + ("DownBlock2D",) * (blocks - attention)
        up = ("UpBlock2D",) * (blocks - attention) + ("CrossAttnUpBlock2D",) * attention
        return down, up


def character_tokens() -> list[str]:
    """The tokens of the character-level CLIP vocabulary, in id order: the special tokens, then every printable ASCII
    character alone and at a word's end (`"a"`, `"a</w>"`)."""
    symbols = [c for c in string.printable if not c.isspace()]
    return [*SPECIAL_TOKENS, *symbols, *(s + "</w>" for s in symbols)]


def build_tiny_tokenizer(save_directory: str | Path, model_max_length: int = 32):
    """A character-level CLIP tokenizer (printable ASCII) of `model_max_length` tokens, built with public APIs only."""
    from transformers import CLIPTokenizer

    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    vocab = {token: i for i, token in enumerate(character_tokens())}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)
    tokenizer.save_pretrained(save_directory)
    return tokenizer


def _tiny_unet(spec: TinyPipelineSpec, **extra):
    """The tiny UNet: one down and one up block per `spec.unet_channels` entry (with cross-attention as
    `spec.cross_attention_blocks` says); `extra` adds config fields (SDXL's added conditioning)."""
    from diffusers import UNet2DConditionModel

    down_block_types, up_block_types = spec.unet_block_types
    return UNet2DConditionModel(
        sample_size=spec.latent_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=spec.unet_channels,
        layers_per_block=spec.layers_per_block,
        down_block_types=down_block_types,
        up_block_types=up_block_types,
        cross_attention_dim=spec.text_hidden_size,
        attention_head_dim=spec.attention_head_dim,
        norm_num_groups=spec.norm_num_groups,
        **extra,
    )


def _tiny_vae(spec: TinyPipelineSpec):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16,) * spec.vae_blocks,
        down_block_types=("DownEncoderBlock2D",) * spec.vae_blocks,
        up_block_types=("UpDecoderBlock2D",) * spec.vae_blocks,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=spec.image_size,
    )


def _tiny_text_config(tokenizer, hidden_size: int, **extra):
    """A two-layer `CLIPTextConfig` of width `hidden_size` over `tokenizer`'s vocabulary."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _tiny_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _tiny_tokenizer():
    with tempfile.TemporaryDirectory() as tmp:
        return build_tiny_tokenizer(tmp)


def assemble_sd_pipeline(vae, text_encoder, tokenizer, unet):
    """A `StableDiffusionPipeline` of these models with the DDIM scheduler of the tiny models and no safety checker."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_tiny_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_pipeline(spec: TinyPipelineSpec | None = None, seed: int = 0):
    """Build a tiny random `StableDiffusionPipeline` (on CPU, float32) from `spec`, deterministic in `seed`."""
    from transformers import CLIPTextModel

    spec = spec or TinyPipelineSpec()
    tokenizer = _tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _tiny_unet(spec)
        torch.manual_seed(seed + 1)
        vae = _tiny_vae(spec)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(_tiny_text_config(tokenizer, spec.text_hidden_size))
    return assemble_sd_pipeline(vae, text_encoder, tokenizer, unet)


def build_tiny_sdxl_pipeline(spec: TinyPipelineSpec | None = None, seed: int = 0):
    """Build a tiny random `StableDiffusionXLPipeline` (on CPU, float32) matching [`build_tiny_pipeline`]'s sizes.

    The UNet, VAE and scheduler are those of the tiny SD pipeline, plus SDXL's added conditioning
    (`addition_embed_type="text_time"`: pooled text embeddings and the 6 size/crop ids). Two text encoders of width
    `spec.text_hidden_size // 2` (the second a `CLIPTextModelWithProjection`) share the character-level tokenizer;
    their concatenated hidden states have the tiny SD's cross-attention width, so both UNets cost the same.
    """
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    spec = spec or TinyPipelineSpec()
    tokenizer = _tiny_tokenizer()
    width = spec.text_hidden_size // 2
    time_embed_dim = 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _tiny_unet(
            spec,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            projection_class_embeddings_input_dim=6 * time_embed_dim + width,
        )
        torch.manual_seed(seed + 1)
        vae = _tiny_vae(spec)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(_tiny_text_config(tokenizer, width))
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(_tiny_text_config(tokenizer, width, projection_dim=width))
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=_tiny_scheduler(),
        add_watermarker=False,
    )


def build_tiny_view_batched_pipeline(spec: TinyPipelineSpec | None = None, seed: int = 0, num_views: int = 4):
    """Build a tiny random [`~carve3d_trl.pipelines.MultiViewDiffusionPipeline`] (MVDream's architecture: the tiny
    UNet plus the 16-input camera embedding, cross-view attention installed), deterministic in `seed`.

    `spec.image_size` is the side of one view (`spec.grid` is unused); the default gives 4 views of 64x64.
    """
    from transformers import CLIPTextModel

    from .pipelines import MultiViewDiffusionPipeline

    spec = spec or TinyPipelineSpec()
    tokenizer = _tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _tiny_unet(spec, class_embed_type="projection", projection_class_embeddings_input_dim=16)
        torch.manual_seed(seed + 1)
        vae = _tiny_vae(spec)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(_tiny_text_config(tokenizer, spec.text_hidden_size))
    return MultiViewDiffusionPipeline(vae, text_encoder, tokenizer, unet, _tiny_scheduler(), num_views=num_views)


def save_tiny_pipeline(path: str | Path, spec: TinyPipelineSpec | None = None, seed: int = 0) -> Path:
    """Build the tiny pipeline and save it as a diffusers folder at `path` (returned)."""
    path = Path(path)
    build_tiny_pipeline(spec, seed).save_pretrained(path)
    return path


def save_tiny_sdxl_pipeline(path: str | Path, spec: TinyPipelineSpec | None = None, seed: int = 0) -> Path:
    """Build the tiny SDXL pipeline and save it as a diffusers folder at `path` (returned)."""
    path = Path(path)
    build_tiny_sdxl_pipeline(spec, seed).save_pretrained(path)
    return path


def load_script(path: str | Path) -> ModuleType:
    """Import a self-contained script (an `examples/` or `benchmarks/` file) from its path as a module, for tests that
    call its functions in-process; nothing is added to `sys.path`."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def save_tiny_view_batched_pipeline(
    path: str | Path, spec: TinyPipelineSpec | None = None, seed: int = 0, num_views: int = 4
) -> Path:
    """Build the tiny view-batched pipeline and save it as a diffusers folder at `path` (returned)."""
    path = Path(path)
    build_tiny_view_batched_pipeline(spec, seed, num_views).save_pretrained(path)
    return path
