"""Per-prompt normalisation of rewards and KL values, and the advantages built from them."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

BATCH_STD_EPS = 1e-8
PROMPT_STD_EPS = 1e-6


class PromptStatTracker:
    """Normalises values per prompt, DDPO style, keyed on the prompt strings themselves.

    Each prompt keeps its last `buffer_size` values. Once the buffer holds at least `min_count` values, a value is
    normalised as `(v - mean_prompt) / (std_prompt + 1e-6)`; before that, with the mean and std of the whole batch.

    Args:
        buffer_size (`int`): Values kept per prompt.
        min_count (`int`): Values a prompt needs before its own statistics are used.
    """

    def __init__(self, buffer_size: int, min_count: int):
        if buffer_size < 1 or min_count < 0:
            raise ValueError(f"buffer_size must be >= 1 and min_count >= 0, got {buffer_size} and {min_count}.")
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict[str, deque[float]] = {}

    def update(self, prompts: Sequence[str], values: np.ndarray) -> np.ndarray:
        """Add `values` (shape `(N,)`, one per prompt in `prompts`) and return them normalised, shape `(N,)`."""
        values = np.asarray(values, dtype=np.float64)
        prompts = np.asarray(prompts, dtype=object)
        if values.shape != prompts.shape:
            raise ValueError(f"Got {len(prompts)} prompts for {values.size} values.")
        normalised = np.empty_like(values)
        for prompt in dict.fromkeys(prompts.tolist()):
            mask = prompts == prompt
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(values[mask].tolist())
            if len(buffer) < self.min_count:
                mean, std = values.mean(), values.std() + PROMPT_STD_EPS
            else:
                mean, std = np.mean(buffer), np.std(buffer) + PROMPT_STD_EPS
            normalised[mask] = (values[mask] - mean) / std
        return normalised

    def get_stats(self) -> dict[str, dict[str, float]]:
        """Mean, std and count of each prompt's buffer."""
        return {
            p: {"mean": float(np.mean(b)), "std": float(np.std(b)), "count": len(b)} for p, b in self.buffers.items()
        }

    def state_dict(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot, restored exactly by `load_state_dict`."""
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "buffers": {prompt: list(buffer) for prompt, buffer in self.buffers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the buffers saved by `state_dict` (the configured sizes are kept)."""
        self.buffers = {p: deque(v, maxlen=self.buffer_size) for p, v in state["buffers"].items()}


def normalize_batch(values: np.ndarray) -> np.ndarray:
    """`(v - mean) / (std + 1e-8)` over the whole batch, as DDPO does without per-prompt tracking."""
    values = np.asarray(values, dtype=np.float64)
    return (values - values.mean()) / (values.std() + BATCH_STD_EPS)


def compute_advantages(
    prompts: Sequence[str],
    rewards: np.ndarray,
    reward_tracker: PromptStatTracker | None,
    kl: np.ndarray | None = None,
    kl_tracker: PromptStatTracker | None = None,
    kl_coeff: float = 0.0,
) -> np.ndarray:
    """Carve3D's advantages, shape `(N,)`: `normalised_reward - kl_coeff * normalised_kl`.

    Samples whose reward (or KL) is NaN or infinite are left out: they neither enter the statistics nor the
    normalisation of the others, and their advantage is 0, so they contribute no policy gradient.

    Args:
        prompts (`Sequence[str]`): The prompt of each sample, length `N`.
        rewards (`np.ndarray`): Rewards, shape `(N,)`.
        reward_tracker (`PromptStatTracker` or `None`): Per-prompt normalisation of rewards; `None` normalises over
            the batch.
        kl (`np.ndarray`, *optional*): Per-sample KL estimates, shape `(N,)`; `None` leaves the KL out.
        kl_tracker (`PromptStatTracker` or `None`): Per-prompt normalisation of the KL; `None` normalises over
            the batch.
        kl_coeff (`float`): Weight of the normalised KL.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    valid = np.isfinite(rewards) if kl is None else np.isfinite(rewards) & np.isfinite(kl)
    advantages = np.zeros_like(rewards)
    if not valid.any():
        return advantages
    prompts = [p for p, ok in zip(prompts, valid) if ok]
    rewards = rewards[valid]
    valid_advantages = reward_tracker.update(prompts, rewards) if reward_tracker else normalize_batch(rewards)
    if kl is not None:
        kl = np.asarray(kl, dtype=np.float64)[valid]
        valid_advantages = valid_advantages - kl_coeff * (
            kl_tracker.update(prompts, kl) if kl_tracker else normalize_batch(kl)
        )
    advantages[valid] = valid_advantages
    return advantages
