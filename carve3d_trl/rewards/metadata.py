"""The contract between a reward and the code that reads what it returns beside the rewards (trainer logs, image
hook, model card, evaluation)."""

from __future__ import annotations

from typing import Any, TypedDict

import numpy as np
import torch

__all__ = ["RewardMetadata", "per_sample_values"]


class RewardMetadata(TypedDict, total=False):
    """What `MRCReward` returns beside the rewards; a user's reward may return any dict.

    Keys:
        mrc (`torch.Tensor`): MRC of each sample, `(B,)` (logged by the trainer as `mrc_mean`).
        mrc_per_view (`torch.Tensor`): MRC of each view, `(B, V)`; NaN for views not evaluated.
        silhouette (`torch.Tensor`): `1 - IoU` of each view's and render's foregrounds, `(B, V)` (before weighting).
        renders (`torch.Tensor`): The reconstruction rendered at each view's camera, `(B, V, 3, h, w)` in [0, 1]
            (shown beside the samples by the image hook and the model card).
    """

    mrc: torch.Tensor
    mrc_per_view: torch.Tensor
    silhouette: torch.Tensor
    renders: torch.Tensor


def per_sample_values(metadata: Any, batch_size: int) -> dict[str, torch.Tensor]:
    """The per-sample numbers in a reward's metadata: every tensor or array of shape `(batch_size,)`, as float32 CPU
    tensors by key (MRC's `"mrc"`; a user's `"clip_score"`). Metadata that is not a dict gives none."""
    if not isinstance(metadata, dict):
        return {}
    values = {}
    for key, value in metadata.items():
        numeric = isinstance(value, torch.Tensor) or (isinstance(value, np.ndarray) and value.dtype.kind in "biuf")
        if numeric and tuple(value.shape) == (batch_size,):
            values[str(key)] = torch.as_tensor(value).detach().to("cpu", torch.float32)
    return values
