"""The DDPO pipeline of a family whose diffusers pipeline TRL does not wrap (SDXL, view-batched models): TRL's
`DDPOStableDiffusionPipeline` interface over a diffusers pipeline and the family's conditioner."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from trl import DDPOStableDiffusionPipeline
from trl.models.modeling_sd_base import DDPOPipelineOutput, DDPOSchedulerOutput, scheduler_step

from .conditioning import PromptConditioner
from .lora import save_unet_weights
from .mixin import Carve3DPipelineMixin
from .sampling import Generators, sample_prompts


class WrappedDDPOPipeline(Carve3DPipelineMixin, DDPOStableDiffusionPipeline):
    """A diffusers pipeline (`sd_pipeline`) behind TRL's DDPO pipeline interface, sampling with DDIM through the
    library's one loop. Subclasses call [`_load`] and set `conditioner`.

    LoRA checkpoints and `save_pretrained` folders are in the diffusers format of the wrapped pipeline's class
    (`<class>.load_lora_weights(folder)`).
    """

    conditioner: PromptConditioner

    def _load(
        self,
        pipeline_class: type,
        pretrained_model_name: str,
        revision: str,
        use_lora: bool,
        lora_options: tuple[int, int | None, tuple[str, ...]],
    ) -> None:
        """Load the diffusers pipeline with a DDIM scheduler and its frozen encoders and VAE; the UNet trains
        unless LoRA adapters do."""
        from diffusers import DDIMScheduler

        self._set_lora_options(*lora_options)
        self.pretrained_model = str(pretrained_model_name)
        self.pretrained_revision = revision
        self.use_lora = use_lora
        self.sd_pipeline = pipeline_class.from_pretrained(self.pretrained_model, revision=revision)
        self.sd_pipeline.scheduler = DDIMScheduler.from_config(self.sd_pipeline.scheduler.config)
        for name, component in self.sd_pipeline.components.items():
            if isinstance(component, torch.nn.Module) and name != "unet":
                component.requires_grad_(False)
        self.sd_pipeline.unet.requires_grad_(not use_lora)

    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | None = None,
        *,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        eta: float = 1.0,
        generator: Generators = None,
    ) -> DDPOPipelineOutput:
        """Sample one image (or one set of views) per prompt with DDIM, recording latents and log-probabilities.

        Returns:
            `DDPOPipelineOutput`: `images` `(B, 3, H, W)` in [0, 1] (`(B, V, 3, H, W)` for a view-batched model),
            `latents` (`T + 1` tensors of the latent shape) and `log_probs` (`T` tensors `(B,)`).
        """
        return sample_prompts(
            self,
            self.conditioner,
            prompt,
            negative_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            eta=eta,
            generator=generator,
        )

    def scheduler_step(self, *args, **kwargs) -> DDPOSchedulerOutput:
        """TRL's DDIM step with log-probability (`prev_sample=` scores a given `x_{t-1}`)."""
        return scheduler_step(self.sd_pipeline.scheduler, *args, **kwargs)

    @property
    def unet(self):
        return self.sd_pipeline.unet

    @property
    def vae(self):
        return self.sd_pipeline.vae

    @property
    def scheduler(self):
        return self.sd_pipeline.scheduler

    @property
    def tokenizer(self):
        return self.sd_pipeline.tokenizer

    @property
    def text_encoder(self):
        return self.sd_pipeline.text_encoder

    @property
    def autocast(self):
        """No autocast with LoRA (the frozen UNet runs in the inference dtype); the trainer's otherwise."""
        return contextlib.nullcontext if self.use_lora else None

    def set_progress_bar_config(self, *args, **kwargs) -> None:
        self.sd_pipeline.set_progress_bar_config(*args, **kwargs)

    def save_pretrained(self, output_dir: str | Path) -> None:
        """Write the trained weights: the LoRA as `pytorch_lora_weights.safetensors` (the family's diffusers
        format), or the full UNet under `unet/`."""
        save_unet_weights(self, Path(output_dir))
