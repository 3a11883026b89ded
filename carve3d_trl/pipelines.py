"""DDPO pipelines: TRL's Stable Diffusion pipeline with a configurable LoRA, memory options and a diffusers-format LoRA
export; [`Carve3DPipelineMixin`] holds what every model family shares (SDXL: `pipelines_sdxl.py`)."""

from __future__ import annotations

from pathlib import Path

import torch
from trl import DefaultDDPOStableDiffusionPipeline

from .distributed import ensure_process_state
from .export import LORA_WEIGHT_NAME, save_unet_weights

DEFAULT_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")


class Carve3DPipelineMixin:
    """What Carve3D's DDPO pipelines share, whatever the model family: a LoRA of configurable rank, alpha and targets,
    memory options, and checkpoint hooks that write and resume the diffusers format.

    The class using it sets `sd_pipeline` (the diffusers pipeline) and `use_lora`, and calls `_set_lora_options`.
    """

    sd_pipeline: object
    use_lora: bool

    def _set_lora_options(self, rank: int, alpha: int | None, target_modules: tuple[str, ...]) -> None:
        if rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {rank}.")
        self.lora_rank = rank
        self.lora_alpha = alpha or rank
        self.lora_target_modules = tuple(target_modules)

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

    def enable_memory_savings(
        self,
        *,
        vae_slicing: bool = False,
        vae_tiling: bool = False,
        attention_slicing: str | int | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        """Trade speed for memory (call before building the trainer; each option is off by default).

        Args:
            vae_slicing (`bool`): Decode a batch of latents one image at a time.
            vae_tiling (`bool`): Decode images larger than the VAE's `sample_size` (SDXL: 1024 px) in overlapping
                tiles of that size.
            attention_slicing (`str` or `int`, *optional*): Compute attention in slices: `"auto"` (two), `"max"` (one
                head at a time) or a slice size (see diffusers' `enable_attention_slicing`). Not with PyTorch's SDPA on
                a GPU, which is already memory-efficient and slows down when sliced.
            gradient_checkpointing (`bool`): Recompute the UNet's activations in the backward pass of training.
        """
        vae, unet = self.sd_pipeline.vae, self.sd_pipeline.unet
        if vae_slicing:
            vae.enable_slicing()
        if vae_tiling:
            vae.enable_tiling()
        if attention_slicing is not None:
            self.sd_pipeline.enable_attention_slicing(attention_slicing)
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing()

    def save_checkpoint(self, models, weights, output_dir: str | Path) -> None:
        """accelerate's save-state hook: the trained weights in the diffusers format ([`save_unet_weights`])."""
        save_unet_weights(self, Path(output_dir))

    def load_checkpoint(self, models, input_dir: str | Path) -> None:
        """accelerate's load-state hook: what [`save_checkpoint`] wrote, into the UNet being trained (in place)."""
        if self.use_lora:
            load_lora_into_unet_adapter(self.sd_pipeline.unet, input_dir)
            return
        from diffusers import UNet2DConditionModel

        saved = UNet2DConditionModel.from_pretrained(str(input_dir), subfolder="unet")
        self.sd_pipeline.unet.load_state_dict(saved.state_dict())


class Carve3DStableDiffusionPipeline(Carve3DPipelineMixin, DefaultDDPOStableDiffusionPipeline):
    """TRL's `DefaultDDPOStableDiffusionPipeline` (Stable Diffusion 1.x/2.x) with Carve3D's fixes and options.

    - Safe to build before any `Accelerator` exists (TRL's logs through accelerate and raises otherwise).
    - LoRA rank, alpha and target modules are arguments (TRL hard-codes rank 4).
    - Memory options ([`~Carve3DPipelineMixin.enable_memory_savings`]); checkpoints resume into the trained adapter.

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
        self._set_lora_options(lora_rank, lora_alpha, lora_target_modules)
        ensure_process_state()  # TRL's constructor logs through accelerate, which needs a state
        super().__init__(
            str(pretrained_model_name), pretrained_model_revision=pretrained_model_revision, use_lora=use_lora
        )


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
