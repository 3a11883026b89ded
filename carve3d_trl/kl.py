"""The KL regularisation towards the base model: the one KL mode derived from the recipe's flags, and the reference
model whose log-probabilities the KL compares against."""

from __future__ import annotations

import contextlib
import copy
import enum
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from .pipelines import Conditioning, PromptConditioner, transition_log_probs


class KLMode(str, enum.Enum):
    """What the trainer does with the KL to the base model, derived once from `Carve3DConfig`'s flags.

    - `OFF`: no reference pass (`kl_penalty=False, kl_log=False`).
    - `LOGGED`: computed and logged, not penalised (`kl_penalty=False, kl_log=True`).
    - `IN_REWARD`: `advantage = normalised_reward - kl_normalized_coeff * normalised_kl` (`kl_in_reward=True`).
    - `IN_LOSS`: `loss += kl_beta * (log p_theta - log p_ref)` (`kl_in_reward=False`).
    """

    OFF = "off"
    LOGGED = "logged"
    IN_REWARD = "in_reward"
    IN_LOSS = "in_loss"

    @classmethod
    def from_config(cls, config: Any) -> KLMode:
        """The mode of a `Carve3DConfig` or of its dict (missing flags take `Carve3DConfig`'s defaults, all `True`)."""
        get = config.get if isinstance(config, Mapping) else lambda name, default: getattr(config, name, default)
        if get("kl_penalty", True):
            return cls.IN_REWARD if get("kl_in_reward", True) else cls.IN_LOSS
        return cls.LOGGED if get("kl_log", True) else cls.OFF

    @property
    def computes_reference(self) -> bool:
        """Whether sampling also scores every transition under the base model."""
        return self is not KLMode.OFF

    @property
    def penalises(self) -> bool:
        return self in (KLMode.IN_REWARD, KLMode.IN_LOSS)


class KLReference:
    """The base model of the KL: the trained UNet with its LoRA adapters disabled (no second UNet), or, for full
    fine-tuning, a frozen copy of the UNet taken before training.

    Args:
        pipeline: The DDPO pipeline being trained (its `unet` and `scheduler_step`).
        conditioner ([`PromptConditioner`]): Runs the UNet on stored conditioning.
        frozen_copy (`bool`): Keep a frozen copy of the UNet (full fine-tuning) instead of disabling adapters.
        dtype (`torch.dtype`): Precision of the frozen copy.
    """

    def __init__(self, pipeline, conditioner: PromptConditioner, *, frozen_copy: bool, dtype: torch.dtype):
        self.pipeline = pipeline
        self.conditioner = conditioner
        self.frozen_unet = None
        if frozen_copy:
            self.frozen_unet = copy.deepcopy(pipeline.unet).requires_grad_(False).eval().to(dtype=dtype)

    @contextlib.contextmanager
    def unet(self) -> Iterator[torch.nn.Module]:
        """Yield the base UNet: the frozen copy, or the trained UNet with its adapters disabled for the block."""
        if self.frozen_unet is not None:
            yield self.frozen_unet
            return
        unet = self.pipeline.unet
        unet.disable_adapters()
        try:
            yield unet
        finally:
            unet.enable_adapters()

    @torch.no_grad()
    def log_probs(
        self,
        timesteps: torch.Tensor,
        latents: torch.Tensor,
        next_latents: torch.Tensor,
        conditioning: Conditioning,
        negative: Conditioning,
        *,
        guidance_scale: float,
        eta: float,
        autocast: Callable[[], contextlib.AbstractContextManager],
    ) -> torch.Tensor:
        """Log-probability `(B, T)` of the sampled transitions `latents -> next_latents` (`(B, T, C, h, w)` each, at
        `timesteps` `(T,)`) under the base model, with the sampler's conditioning and guidance."""
        with self.unet() as unet, autocast():
            return transition_log_probs(
                self.pipeline,
                unet,
                self.conditioner,
                timesteps,
                latents,
                next_latents,
                conditioning,
                negative,
                guidance_scale=guidance_scale,
                eta=eta,
            )
