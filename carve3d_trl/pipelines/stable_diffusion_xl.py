"""The Stable Diffusion XL family (e.g. Instant3D-like 2x2 multi-view grids): its conditioner and a DDPO pipeline on
TRL's interface."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .conditioning import Conditioning, ImageConditioner, repeat_conditioning
from .lora import DEFAULT_LORA_TARGETS
from .wrapped import WrappedDDPOPipeline

Size = tuple[int, int]


class StableDiffusionXLConditioner(ImageConditioner):
    """Stable Diffusion XL: `{"prompt_embeds": (B, L, D1 + D2), "pooled_prompt_embeds": (B, P),
    "add_time_ids": (B, 6)}`, encoded by diffusers' `StableDiffusionXLPipeline.encode_prompt` (both encoders'
    penultimate hidden states concatenated; the pooled projection of the second encoder).

    `add_time_ids` are SDXL's micro-conditioning `(original_size, crops_coords_top_left, target_size)`, the same for
    every sample and for the unconditional branch, as in diffusers' pipeline.

    Args:
        pipeline (`diffusers.StableDiffusionXLPipeline`): Supplies the tokenizers and frozen text encoders.
        original_size (`tuple[int, int]`, *optional*): `(height, width)`; defaults to the generated image's size.
        target_size (`tuple[int, int]`, *optional*): `(height, width)`; defaults to the generated image's size.
        crops_coords_top_left (`tuple[int, int]`): Crop offset the model is conditioned on.
        force_zeros_for_empty_prompt (`bool`, *optional*): Whether an empty negative prompt is all-zero embeddings
            (SDXL base) rather than the encoding of `""`; defaults to the pipeline's config.
    """

    keys = ("prompt_embeds", "pooled_prompt_embeds", "add_time_ids")

    def __init__(
        self,
        pipeline,
        *,
        original_size: Size | None = None,
        target_size: Size | None = None,
        crops_coords_top_left: Size = (0, 0),
        force_zeros_for_empty_prompt: bool | None = None,
    ):
        self.pipeline = pipeline
        unet = pipeline.unet
        latent = unet.config.sample_size
        latent = (latent, latent) if isinstance(latent, int) else tuple(latent)
        image_size = (latent[0] * pipeline.vae_scale_factor, latent[1] * pipeline.vae_scale_factor)
        self.time_ids = (*(original_size or image_size), *crops_coords_top_left, *(target_size or image_size))
        if force_zeros_for_empty_prompt is None:
            force_zeros_for_empty_prompt = bool(pipeline.config.force_zeros_for_empty_prompt)
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        expected = unet.add_embedding.linear_1.in_features
        given = unet.config.addition_time_embed_dim * len(self.time_ids)
        given += pipeline.text_encoder_2.config.projection_dim
        if given != expected:
            raise ValueError(
                f"The UNet's added embedding takes {expected} features, but {len(self.time_ids)} time ids and the "
                f"second text encoder's projection give {given}: the UNet and text_encoder_2 configs do not match."
            )

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Conditioning:
        device = self.pipeline.text_encoder_2.device
        prompt_embeds, _, pooled, _ = self.pipeline.encode_prompt(
            list(prompts), device=device, do_classifier_free_guidance=False
        )
        time_ids = torch.tensor([self.time_ids], dtype=prompt_embeds.dtype, device=device)
        return {
            "prompt_embeds": prompt_embeds,
            "pooled_prompt_embeds": pooled,
            "add_time_ids": time_ids.expand(len(prompts), -1).contiguous(),
        }

    def encode_negative(self, negative_prompt: str, batch_size: int) -> Conditioning:
        """The encoding of `negative_prompt`; with `force_zeros_for_empty_prompt`, an empty one is all-zero
        embeddings (the size/crop ids are kept)."""
        negative = self.encode([negative_prompt])
        if not negative_prompt and self.force_zeros_for_empty_prompt:
            negative["prompt_embeds"] = torch.zeros_like(negative["prompt_embeds"])
            negative["pooled_prompt_embeds"] = torch.zeros_like(negative["pooled_prompt_embeds"])
        return repeat_conditioning(negative, batch_size)

    def unet_kwargs(self, conditioning: Conditioning) -> dict[str, Any]:
        added = {"text_embeds": conditioning["pooled_prompt_embeds"], "time_ids": conditioning["add_time_ids"]}
        return {"encoder_hidden_states": conditioning["prompt_embeds"], "added_cond_kwargs": added}

    def to(self, device: torch.device | str, dtype: torch.dtype) -> None:
        self.pipeline.text_encoder.to(device, dtype=dtype)
        self.pipeline.text_encoder_2.to(device, dtype=dtype)


class Carve3DStableDiffusionXLPipeline(WrappedDDPOPipeline):
    """TRL's `DDPOStableDiffusionPipeline` interface for an SDXL model, sampling with DDIM as TRL does for SD.

    `Carve3DTrainer` trains it through the same code path as Stable Diffusion: the pipeline's `conditioner` (a
    [`StableDiffusionXLConditioner`]) supplies the prompt embeddings, pooled embeddings and size ids for sampling,
    training and the KL reference. LoRA checkpoints and `save_pretrained` folders are in the diffusers SDXL format
    (`StableDiffusionXLPipeline.load_lora_weights(folder)`).

    Args:
        pretrained_model_name (`str`): Hub model id or local diffusers folder of an SDXL model.
        pretrained_model_revision (`str`): Revision of a Hub model.
        use_lora (`bool`): Train LoRA adapters (else the whole UNet).
        lora_rank (`int`): LoRA rank (the Carve3D recipe uses 4).
        lora_alpha (`int`, *optional*): LoRA alpha; defaults to `lora_rank` (scale 1).
        lora_target_modules (`tuple[str, ...]`): UNet modules receiving adapters.
        force_zeros_for_empty_prompt (`bool`, *optional*): Unconditional branch of an empty negative prompt: zeros
            (SDXL base) or the encoding of `""`; defaults to the model's config.
        original_size, target_size (`tuple[int, int]`, *optional*): SDXL's size conditioning `(height, width)`;
            default: the generated image's size (1024x1024 for Instant3D's grid).
        crops_coords_top_left (`tuple[int, int]`): SDXL's crop conditioning.
    """

    def __init__(
        self,
        pretrained_model_name: str,
        *,
        pretrained_model_revision: str = "main",
        use_lora: bool = True,
        lora_rank: int = 4,
        lora_alpha: int | None = None,
        lora_target_modules: tuple[str, ...] = DEFAULT_LORA_TARGETS,
        force_zeros_for_empty_prompt: bool | None = None,
        original_size: Size | None = None,
        target_size: Size | None = None,
        crops_coords_top_left: Size = (0, 0),
    ):
        from diffusers import StableDiffusionXLPipeline

        lora_options = (lora_rank, lora_alpha, lora_target_modules)
        self._load(StableDiffusionXLPipeline, pretrained_model_name, pretrained_model_revision, use_lora, lora_options)
        self.conditioner = StableDiffusionXLConditioner(
            self.sd_pipeline,
            original_size=original_size,
            target_size=target_size,
            crops_coords_top_left=crops_coords_top_left,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        )

    @property
    def tokenizer_2(self):
        return self.sd_pipeline.tokenizer_2

    @property
    def text_encoder_2(self):
        return self.sd_pipeline.text_encoder_2
