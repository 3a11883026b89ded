"""The named structures of a sampled batch, as the reward function and the image hook see it. Both are tuples laid
out as in TRL's `DDPOTrainer`, so code that unpacks them by position keeps working."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch


class SampledBatch(NamedTuple):
    """One sampled batch, as the reward function takes it: `reward_fn(*batch)`.

    Attributes:
        images (`torch.Tensor`): `(B, 3, H, W)` in [0, 1].
        prompts (`tuple[str, ...]`): The prompt of each image.
        prompt_metadata (`tuple[Any, ...]`): The prompt function's metadata of each image.
    """

    images: torch.Tensor
    prompts: tuple[str, ...]
    prompt_metadata: tuple[Any, ...]


class ScoredBatch(NamedTuple):
    """One sampled batch with its rewards, as the image hook receives it (a list of them per epoch).

    Attributes:
        images, prompts, prompt_metadata: As in [`SampledBatch`].
        rewards (`torch.Tensor`): `(B,)`.
        reward_metadata (`Any`): What the reward returned beside the rewards (for `MRCReward`, a
            [`~carve3d_trl.rewards.RewardMetadata`]).
    """

    images: torch.Tensor
    prompts: tuple[str, ...]
    prompt_metadata: tuple[Any, ...]
    rewards: torch.Tensor
    reward_metadata: Any
