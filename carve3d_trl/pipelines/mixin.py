"""What every Carve3D DDPO pipeline shares, whatever the model family."""

from __future__ import annotations

from pathlib import Path

from .lora import add_lora_adapter, load_lora_into_unet_adapter, save_unet_weights


class Carve3DPipelineMixin:
    """A LoRA of configurable rank, alpha and targets, memory options, and checkpoint hooks that write and resume the
    diffusers format.

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
        if self.use_lora:
            add_lora_adapter(unet, self.lora_rank, self.lora_alpha, self.lora_target_modules)
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
            vae_slicing (`bool`, *optional*, defaults to `False`): Decode a batch of latents one image at a time.
            vae_tiling (`bool`, *optional*, defaults to `False`): Decode images larger than the VAE's `sample_size`
                (SDXL: 1024 px) in overlapping tiles of that size.
            attention_slicing (`str` or `int`, *optional*): Compute attention in slices: `"auto"` (two), `"max"` (one
                head at a time) or a slice size (see diffusers' `enable_attention_slicing`). Not with PyTorch's SDPA on
                a GPU, which is already memory-efficient and slows down when sliced.
            gradient_checkpointing (`bool`, *optional*, defaults to `False`): Recompute the UNet's activations in the
                backward pass of training.
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
