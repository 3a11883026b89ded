"""The library's one denoising loop: DDIM sampling with per-step log-probabilities for any model family behind a
[`PromptConditioner`], the log-probabilities of given transitions under another UNet (the KL reference), and the
decode."""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor
from trl.models.modeling_sd_base import DDPOPipelineOutput, scheduler_step

from .conditioning import Conditioning, PromptConditioner, guided_noise

Generators = torch.Generator | list[torch.Generator] | None


@torch.no_grad()
def sample_with_log_probs(
    pipeline,
    conditioner: PromptConditioner,
    conditioning: Conditioning,
    negative: Conditioning | None = None,
    *,
    num_inference_steps: int,
    guidance_scale: float = 1.0,
    eta: float = 1.0,
    generator: Generators = None,
    latents: torch.Tensor | None = None,
) -> DDPOPipelineOutput:
    """Sample images with DDIM and record every latent and the log-probability of every step.

    Args:
        pipeline: Anything with a `unet`, a `vae` and a DDIM `scheduler`: a DDPO pipeline or a diffusers one.
        conditioner ([`PromptConditioner`]): Runs the UNet on `conditioning`.
        conditioning (`Conditioning`): The prompts' conditioning, `(B, ...)` per key.
        negative (`Conditioning`, *optional*): The unconditional branch, `(B, ...)` per key; guidance applies when
            given and `guidance_scale > 1`.
        num_inference_steps (`int`): DDIM steps `T`.
        guidance_scale (`float`, *optional*, defaults to 1.0): Classifier-free guidance weight.
        eta (`float`, *optional*, defaults to 1.0): DDIM stochasticity (DDPO needs `eta > 0` for finite
            log-probabilities).
        generator (`torch.Generator` or `list[torch.Generator]`, *optional*): One generator, or one per sample so that
            a sample's noise does not depend on the rest of its batch.
        latents (`torch.Tensor`, *optional*): The initial noise, of the conditioner's
            [`~PromptConditioner.latent_shape`]: `(B, C, h, w)`, or `(B, V, C, h, w)` for a view-batched model;
            drawn from `generator` when omitted.

    Returns:
        `DDPOPipelineOutput`: `images` `(B, 3, H, W)` in [0, 1] (`(B, V, 3, H, W)`: V views), `latents` (`T + 1`
        tensors of the latent shape, the initial noise first) and `log_probs` (`T` tensors `(B,)`: one action per
        sample, whatever its number of views).
    """
    unet, scheduler = pipeline.unet, pipeline.scheduler
    batch_size = next(iter(conditioning.values())).shape[0]
    dtype = next(iter(conditioning.values())).dtype
    device = unet.device
    if negative is not None and guidance_scale <= 1.0:
        negative = None

    scheduler.set_timesteps(num_inference_steps, device=device)
    shape = conditioner.latent_shape(unet, batch_size)
    if latents is None:
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    elif tuple(latents.shape) != tuple(shape):
        raise ValueError(f"`latents` must have the model's latent shape {tuple(shape)}, got {tuple(latents.shape)}.")
    latents = latents.to(device, dtype) * scheduler.init_noise_sigma
    all_latents, all_log_probs = [latents], []
    for timestep in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, timestep)
        noise_pred = guided_noise(unet, conditioner, model_input, timestep, conditioning, negative, guidance_scale)
        step = scheduler_step(scheduler, noise_pred, timestep, latents, eta, generator=generator)
        # TRL scores the sample before rounding it to the latents' dtype; score the stored (rounded) one, which the
        # KL reference and training score too (identical in float32)
        log_probs = scheduler_step(scheduler, noise_pred, timestep, latents, eta, prev_sample=step.latents).log_probs
        latents = step.latents
        all_latents.append(latents)
        all_log_probs.append(log_probs)
    return DDPOPipelineOutput(decode_latents(pipeline.vae, latents), all_latents, all_log_probs)


@torch.no_grad()
def sample_prompts(
    pipeline,
    conditioner: PromptConditioner,
    prompt: str | list[str],
    negative_prompt: str | None = None,
    *,
    num_images_per_prompt: int = 1,
    num_inference_steps: int,
    guidance_scale: float,
    eta: float,
    generator: Generators = None,
    latents: torch.Tensor | None = None,
) -> DDPOPipelineOutput:
    """[`sample_with_log_probs`] of `num_images_per_prompt` samples per prompt: what a pipeline's `__call__` does.

    The negative prompt (default `""`) is encoded only when guidance applies (`guidance_scale > 1`).
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
    conditioning = conditioner.encode(prompts)
    negative = conditioner.encode_negative(negative_prompt or "", len(prompts)) if guidance_scale > 1.0 else None
    return sample_with_log_probs(
        pipeline,
        conditioner,
        conditioning,
        negative,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        eta=eta,
        generator=generator,
        latents=latents,
    )


@torch.no_grad()
def transition_log_probs(
    pipeline,
    unet: torch.nn.Module,
    conditioner: PromptConditioner,
    timesteps: torch.Tensor,
    latents: torch.Tensor,
    next_latents: torch.Tensor,
    conditioning: Conditioning,
    negative: Conditioning | None = None,
    *,
    guidance_scale: float = 1.0,
    eta: float = 1.0,
) -> torch.Tensor:
    """Log-probability `(B, T)` of given DDIM transitions `x_t -> x_{t-1}` under `unet` (e.g. the base model).

    `unet` sees the same `x_t`, timestep, conditioning and classifier-free guidance as the sampler did, and the DDIM
    step of `pipeline`'s scheduler scores the `x_{t-1}` that was actually sampled.

    Args:
        pipeline: The pipeline that sampled (its DDIM `scheduler`).
        unet (`torch.nn.Module`): The UNet to score the transitions under.
        conditioner ([`PromptConditioner`]): Runs `unet` on the conditioning.
        timesteps (`torch.Tensor`): The schedule, `(T,)`, one for the whole batch.
        latents (`torch.Tensor`): `x_t` of every step, `(B, T, C, h, w)`.
        next_latents (`torch.Tensor`): The sampled `x_{t-1}`, `(B, T, C, h, w)`.
        conditioning, negative (`Conditioning`): As in [`sample_with_log_probs`].
        guidance_scale (`float`, *optional*, defaults to 1.0): Classifier-free guidance weight of the sampler.
        eta (`float`, *optional*, defaults to 1.0): DDIM stochasticity of the sampler.
    """
    if guidance_scale <= 1.0:
        negative = None
    log_probs = []
    for j, timestep in enumerate(timesteps):
        noise_pred = guided_noise(unet, conditioner, latents[:, j], timestep, conditioning, negative, guidance_scale)
        step = scheduler_step(
            pipeline.scheduler, noise_pred, timestep, latents[:, j], eta=eta, prev_sample=next_latents[:, j]
        )
        log_probs.append(step.log_probs)
    return torch.stack(log_probs, dim=1)


@torch.no_grad()
def decode_latents(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Decode latents `(B, C, h, w)` to images `(B, 3, H, W)` in [0, 1] (views `(B, V, C, h, w)` to
    `(B, V, 3, H, W)`); a half-precision VAE that asks for it (`force_upcast`, as SDXL's) decodes in float32."""
    if latents.ndim == 5:
        return decode_latents(vae, latents.flatten(0, 1)).unflatten(0, latents.shape[:2])
    upcast = vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    dtype = torch.float32 if upcast else vae.dtype
    if upcast:
        vae.to(torch.float32)
    try:
        images = vae.decode(latents.to(dtype) / vae.config.scaling_factor).sample
    finally:
        if upcast:
            vae.to(torch.float16)
    return (images / 2 + 0.5).clamp(0, 1)
