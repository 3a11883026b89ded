"""DDPO pipelines: TRL's Stable Diffusion pipeline with a configurable LoRA and a diffusers-format LoRA export."""

from __future__ import annotations

from pathlib import Path

import torch
from trl import DefaultDDPOStableDiffusionPipeline

from .distributed import ensure_process_state

DEFAULT_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


class Carve3DStableDiffusionPipeline(DefaultDDPOStableDiffusionPipeline):
    """TRL's `DefaultDDPOStableDiffusionPipeline` with Carve3D's fixes and options.

    - Safe to build before any `Accelerator` exists (TRL's logs through accelerate and raises otherwise).
    - LoRA rank, alpha and target modules are arguments (TRL hard-codes rank 4).

    Args:
        pretrained_model_name (`str`): Hub model id or local diffusers folder of the base model.
        pretrained_model_revision (`str`): Revision of a Hub model.
        use_lora (`bool`): Train LoRA adapters (else the whole UNet).
        lora_rank (`int`): LoRA rank (the Carve3D recipe uses 4).
        lora_alpha (`int`, *optional*): LoRA alpha; defaults to `lora_rank` (scale 1).
        lora_target_modules (`tuple[str, ...]`): UNet modules receiving adapters.
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
    ):
        if lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {lora_rank}.")
        ensure_process_state()  # TRL's constructor logs through accelerate, which needs a state
        super().__init__(
            str(pretrained_model_name), pretrained_model_revision=pretrained_model_revision, use_lora=use_lora
        )
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha or lora_rank
        self.lora_target_modules = tuple(lora_target_modules)

    def get_trainable_layers(self):
        """Add the LoRA adapters (zero-initialised `B`, so the model starts as the base model) or unfreeze the UNet."""
        unet = self.sd_pipeline.unet
        if not self.use_lora:
            return unet
        from peft import LoraConfig

        unet.add_adapter(
            LoraConfig(
                r=self.lora_rank,
                lora_alpha=self.lora_alpha,
                init_lora_weights="gaussian",
                target_modules=list(self.lora_target_modules),
            )
        )
        for param in unet.parameters():
            if param.requires_grad:  # keep trainable LoRA weights in fp32 under mixed precision
                param.data = param.data.to(torch.float32)
        return unet


def load_lora_into_unet_adapter(unet: torch.nn.Module, input_dir: str | Path) -> None:
    """Load a diffusers-format `pytorch_lora_weights.safetensors` into `unet`'s existing "default" adapter, in place.

    TRL's checkpoint loader adds a second adapter instead, so a resumed run would silently train from scratch.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import set_peft_model_state_dict

    state_dict, _ = StableDiffusionPipeline.lora_state_dict(str(input_dir), weight_name=LORA_WEIGHT_NAME)
    unet_state = {k.removeprefix("unet."): v for k, v in state_dict.items() if k.startswith("unet.")}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(unet_state), adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"The LoRA weights in {input_dir} do not match this UNet: {result.unexpected_keys[:5]}")
