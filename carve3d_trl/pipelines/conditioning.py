"""What a model family feeds its UNet besides latents and timesteps, behind one interface the trainer uses.

A *conditioning* is a dict of batch-first tensors (for Stable Diffusion `{"prompt_embeds": (B, L, D)}`; SDXL adds
pooled embeddings and `add_time_ids`; a view-batched model its cameras `(B, V, 16)`). The trainer stores it with the
samples, shuffles and rebatches it like any other sample tensor, and hands it back to the conditioner to run the UNet,
so sampling, training and the KL reference share one code path for every family. The conditioner also knows the
shape of a sample's latents (`(C, h, w)` for an image, `(V, C, h, w)` for V views) and how the UNet sees them. Each
family's conditioner lives beside its pipeline (`stable_diffusion.py`, `stable_diffusion_xl.py`, `view_batched.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

Conditioning = dict[str, torch.Tensor]


@runtime_checkable
class PromptConditioner(Protocol):
    """Turns prompts into a [`Conditioning`] and a conditioning into the UNet's keyword arguments."""

    keys: tuple[str, ...]

    def encode(self, prompts: Sequence[str]) -> Conditioning:
        """The conditioning of `prompts`: a dict of `keys` to tensors `(len(prompts), ...)`."""
        ...

    def encode_negative(self, negative_prompt: str, batch_size: int) -> Conditioning:
        """The unconditional branch of classifier-free guidance, repeated to `batch_size`."""
        ...

    def unet_kwargs(self, conditioning: Conditioning) -> dict[str, Any]:
        """Keyword arguments of `unet(latents, timesteps, **kwargs)`."""
        ...

    def latent_shape(self, unet: torch.nn.Module, batch_size: int) -> tuple[int, ...]:
        """The shape of `batch_size` samples' latents: `(B, C, h, w)`, or `(B, V, C, h, w)` for V views."""
        ...

    def predict_noise(
        self, unet: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning
    ) -> torch.Tensor:
        """The UNet's noise prediction for `latents` of [`latent_shape`] at `timesteps` (scalar or `(B,)`)."""
        ...

    def to(self, device: torch.device | str, dtype: torch.dtype) -> None:
        """Move the (frozen) encoders to `device` and `dtype`."""
        ...


class ImageConditioner:
    """What the conditioners of image models share: one latent `(C, h, w)` per sample at the UNet's `sample_size`,
    and a plain UNet call. Subclasses define `keys`, `encode`, `encode_negative`, `unet_kwargs` and `to`."""

    def latent_shape(self, unet: torch.nn.Module, batch_size: int) -> tuple[int, ...]:
        size = unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (batch_size, unet.config.in_channels, height, width)

    def predict_noise(
        self, unet: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning
    ) -> torch.Tensor:
        return unet(latents, timesteps, **self.unet_kwargs(conditioning)).sample


def repeat_conditioning(conditioning: Conditioning, batch_size: int) -> Conditioning:
    """Repeat a batch-of-one conditioning to `batch_size` along the batch dimension."""
    return {k: v.expand(batch_size, *v.shape[1:]).contiguous() for k, v in conditioning.items()}


def concat_conditioning(first: Conditioning, second: Conditioning) -> Conditioning:
    """Concatenate two conditionings with the same keys along the batch dimension."""
    return {k: torch.cat([first[k], second[k]]) for k in first}


def split_conditioning(conditioning: Conditioning) -> tuple[Conditioning, Conditioning]:
    """Split a `[first; second]` conditioning into its two halves (the inverse of [`concat_conditioning`])."""
    halves = {k: v.chunk(2) for k, v in conditioning.items()}
    return {k: v[0] for k, v in halves.items()}, {k: v[1] for k, v in halves.items()}


def guided_noise(
    unet: torch.nn.Module,
    conditioner: PromptConditioner,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    conditioning: Conditioning,
    negative: Conditioning | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """The UNet's noise prediction for latents `(B, C, h, w)` (or `(B, V, C, h, w)`, as the conditioner's
    [`~PromptConditioner.latent_shape`]) at `timesteps` (scalar or `(B,)`), of the latents' shape.

    With `negative` (the unconditional conditioning, `(B, ...)` per key), both branches run in one batch and
    classifier-free guidance with `guidance_scale` combines them.
    """
    if negative is None:
        return conditioner.predict_noise(unet, latents, timesteps, conditioning)
    if timesteps.ndim:
        timesteps = torch.cat([timesteps, timesteps])
    both = concat_conditioning(negative, conditioning)
    noise_uncond, noise_text = conditioner.predict_noise(unet, torch.cat([latents, latents]), timesteps, both).chunk(2)
    return noise_uncond + guidance_scale * (noise_text - noise_uncond)
