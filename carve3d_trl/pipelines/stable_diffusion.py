"""The Stable Diffusion 1.x/2.x family: its conditioner and TRL's DDPO pipeline with Carve3D's fixes and options."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from trl import DefaultDDPOStableDiffusionPipeline
from trl.models.modeling_sd_base import DDPOPipelineOutput

from ..distributed import ensure_process_state
from .conditioning import Conditioning, ImageConditioner, repeat_conditioning
from .lora import DEFAULT_LORA_TARGETS
from .mixin import Carve3DPipelineMixin
from .sampling import Generators, sample_with_log_probs


class StableDiffusionConditioner(ImageConditioner):
    """Stable Diffusion 1.x/2.x: the CLIP text encoder's last hidden states, `{"prompt_embeds": (B, L, D)}`.

    Args:
        tokenizer (`transformers.CLIPTokenizer`): The pipeline's tokenizer.
        text_encoder (`transformers.CLIPTextModel`): The pipeline's text encoder (frozen).
    """

    keys = ("prompt_embeds",)

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Conditioning:
        ids = self.tokenizer(
            list(prompts),
            return_tensors="pt",
            padding="max_length",
            truncation=True,
            max_length=self.tokenizer.model_max_length,
        ).input_ids.to(self.text_encoder.device)
        return {"prompt_embeds": self.text_encoder(ids)[0]}

    def encode_negative(self, negative_prompt: str, batch_size: int) -> Conditioning:
        return repeat_conditioning(self.encode([negative_prompt]), batch_size)

    def unet_kwargs(self, conditioning: Conditioning) -> dict[str, Any]:
        return {"encoder_hidden_states": conditioning["prompt_embeds"]}

    def to(self, device: torch.device | str, dtype: torch.dtype) -> None:
        self.text_encoder.to(device, dtype=dtype)


class Carve3DStableDiffusionPipeline(Carve3DPipelineMixin, DefaultDDPOStableDiffusionPipeline):
    """TRL's `DefaultDDPOStableDiffusionPipeline` (Stable Diffusion 1.x/2.x) with Carve3D's fixes and options.

    - Safe to build before any `Accelerator` exists (TRL's logs through accelerate and raises otherwise).
    - LoRA rank, alpha and target modules are arguments (TRL hard-codes rank 4).
    - Samples through the library's one DDIM loop ([`sample_with_log_probs`]), as the trainer does.
    - Memory options ([`~Carve3DPipelineMixin.enable_memory_savings`]); checkpoints resume into the trained adapter.

    Args:
        pretrained_model_name (`str`): Hub model id or local diffusers folder of the base model.
        pretrained_model_revision (`str`, *optional*, defaults to `"main"`): Revision of a Hub model.
        use_lora (`bool`, *optional*, defaults to `True`): Train LoRA adapters (else the whole UNet).
        lora_rank (`int`, *optional*, defaults to 4): LoRA rank (the Carve3D recipe uses 4).
        lora_alpha (`int`, *optional*): LoRA alpha; defaults to `lora_rank` (scale 1).
        lora_target_modules (`tuple[str, ...]`, *optional*, defaults to `("to_k", "to_q", "to_v", "to_out.0")`): UNet
            modules receiving adapters.
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
        self.conditioner = StableDiffusionConditioner(self.sd_pipeline.tokenizer, self.sd_pipeline.text_encoder)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | None = None,
        *,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        eta: float = 0.0,
        generator: Generators = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pt",
        **unsupported: Any,
    ) -> DDPOPipelineOutput:
        """Sample with DDIM through [`sample_with_log_probs`], recording every latent and step log-probability.

        Takes the arguments of TRL's `pipeline_step` that DDPO uses (defaults as TRL's; DDPO needs `eta > 0`).

        Args:
            prompt (`str` or `list[str]`, *optional*): The prompts; or pass `prompt_embeds` `(B, L, D)`.
            negative_prompt (`str`, *optional*): The unconditional prompt of guidance (default `""`); or pass
                `negative_prompt_embeds` `(B, L, D)`.
            num_images_per_prompt (`int`, *optional*, defaults to 1): Samples per prompt.
            latents (`torch.Tensor`, *optional*): Initial noise `(B, 4, h, w)` (else drawn from `generator`).
            output_type (`str`, *optional*, defaults to `"pt"`): `"pt"` (tensor), `"np"` or `"pil"`.

        Returns:
            `DDPOPipelineOutput`: `images` `(B, 3, H, W)` in [0, 1] (for `"pt"`), `latents` (`T + 1` tensors
            `(B, 4, h, w)`, the initial noise first) and `log_probs` (`T` tensors `(B,)`).
        """
        given = sorted(name for name, value in unsupported.items() if value not in (None, 0, 0.0, True))
        if given:
            raise ValueError(f"Carve3DStableDiffusionPipeline.__call__ does not support {given}; leave them unset.")
        conditioning = self._conditioning(prompt, prompt_embeds, num_images_per_prompt)
        batch_size = conditioning["prompt_embeds"].shape[0]
        negative = None
        if guidance_scale > 1.0:
            if negative_prompt_embeds is not None:
                negative = {"prompt_embeds": negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)}
            else:
                negative = self.conditioner.encode_negative(negative_prompt or "", batch_size)
        output = sample_with_log_probs(
            self,
            self.conditioner,
            conditioning,
            negative,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            eta=eta,
            generator=generator,
            latents=latents,
        )
        if output_type != "pt":
            output.images = self.sd_pipeline.image_processor.postprocess(
                output.images, output_type=output_type, do_denormalize=[False] * batch_size
            )
        return output

    def _conditioning(
        self, prompt: str | list[str] | None, prompt_embeds: torch.Tensor | None, num_images_per_prompt: int
    ) -> Conditioning:
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("Pass exactly one of `prompt` and `prompt_embeds`.")
        if prompt_embeds is None:
            prompt_embeds = self.conditioner.encode([prompt] if isinstance(prompt, str) else list(prompt))[
                "prompt_embeds"
            ]
        return {"prompt_embeds": prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)}
