"""Where a run's checkpoints live and how `resume_from` finds one."""

from __future__ import annotations

import os
from pathlib import Path

from .atomic import list_checkpoints

TRAINER_STATE_NAME = "carve3d_trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint_"


def resolve_checkpoint(resume_from: str) -> Path:
    """A checkpoint folder, or the newest `checkpoint_<n>` in a folder of checkpoints or in a run's logdir."""
    path = Path(os.path.expanduser(resume_from))
    if (path / TRAINER_STATE_NAME).is_file():
        return path
    for root in (path, path / "checkpoints"):
        found = list_checkpoints(root, prefix=CHECKPOINT_PREFIX)
        if found:
            return found[-1]
    raise ValueError(
        f"`resume_from` '{resume_from}' holds no Carve3D checkpoint (a folder with {TRAINER_STATE_NAME}, or "
        "checkpoint_<epoch> folders); point it at a checkpoint, at the run's checkpoints folder or at its logdir."
    )
