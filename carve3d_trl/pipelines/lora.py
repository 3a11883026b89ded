"""LoRA adapters on a diffusers UNet: adding them, writing them in the diffusers format, loading them back in place."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

DEFAULT_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def add_lora_adapter(unet: torch.nn.Module, rank: int, alpha: int, target_modules: tuple[str, ...]) -> None:
    """Add the trainable "default" adapter to `unet` (zero-initialised `B`, so the model starts as the base model);
    its weights are kept in float32 under mixed precision."""
    from peft import LoraConfig

    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(target_modules))
    )
    for param in unet.parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.float32)


def save_unet_weights(ddpo_pipeline: Any, output_dir: Path) -> Path:
    """Write the trained UNet weights of a DDPO pipeline into `output_dir`; returns the file or folder written.

    With LoRA: `pytorch_lora_weights.safetensors` in the diffusers format of the pipeline's family
    (`pipe.load_lora_weights(output_dir)` with the family's diffusers pipeline). Without: the full UNet as a diffusers
    `unet/` subfolder.
    """
    if getattr(ddpo_pipeline, "use_lora", False):
        from peft.utils import get_peft_model_state_dict
        from trl.models.sd_utils import convert_state_dict_to_diffusers

        state = convert_state_dict_to_diffusers(get_peft_model_state_dict(ddpo_pipeline.unet))
        type(ddpo_pipeline.sd_pipeline).save_lora_weights(
            save_directory=str(output_dir), unet_lora_layers=state, weight_name=LORA_WEIGHT_NAME
        )
        return output_dir / LORA_WEIGHT_NAME
    ddpo_pipeline.unet.save_pretrained(output_dir / "unet")
    return output_dir / "unet"


def load_lora_into_unet_adapter(unet: torch.nn.Module, input_dir: str | Path) -> None:
    """Load a diffusers-format `pytorch_lora_weights.safetensors` (SD or SDXL) into `unet`'s existing "default"
    adapter, in place.

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
