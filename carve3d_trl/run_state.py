"""A run's resumable state on disk: numbered checkpoint folders (save, load, rotation) and how `resume_from` finds
one. Each checkpoint holds accelerate's state (weights in the diffusers format, optimizer, random states of every
process) and the trainer's own state (`carve3d_trainer_state.json`)."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from .atomic import atomic_directory, atomic_remove_directory, atomic_write_json, clean_stale_temp_dirs

logger = logging.getLogger(__name__)

TRAINER_STATE_NAME = "carve3d_trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint_"


def _checkpoint_number(path: Path, prefix: str) -> int | None:
    if not path.name.startswith(prefix):
        return None
    suffix = path.name[len(prefix) :]
    return int(suffix) if re.fullmatch(r"[0-9]+", suffix) and path.is_dir() else None


def list_checkpoints(root: str | os.PathLike[str], prefix: str = CHECKPOINT_PREFIX) -> list[Path]:
    """Folders `<root>/<prefix><int>` sorted by their number; temporary and unparsable entries are ignored."""
    root = Path(root)
    if not root.is_dir():
        return []
    numbered = [(n, p) for p in root.iterdir() if (n := _checkpoint_number(p, prefix)) is not None]
    return [p for _, p in sorted(numbered)]


def latest_checkpoint(root: str | os.PathLike[str], prefix: str = CHECKPOINT_PREFIX) -> Path | None:
    """The highest-numbered checkpoint folder under `root`, or None."""
    checkpoints = list_checkpoints(root, prefix)
    return checkpoints[-1] if checkpoints else None


def prune_checkpoints(root: str | os.PathLike[str], limit: int | None, prefix: str = CHECKPOINT_PREFIX) -> list[Path]:
    """Delete all but the newest `limit` checkpoints (`None` or `<= 0` keeps all); return the deleted paths.

    Each deletion is crash-safe ([`~carve3d_trl.atomic.atomic_remove_directory`]).
    """
    if limit is None or limit <= 0:
        return []
    doomed = list_checkpoints(root, prefix)[:-limit]
    for path in doomed:
        atomic_remove_directory(path)
    return doomed


def resolve_checkpoint(resume_from: str) -> Path:
    """A checkpoint folder, or the newest `checkpoint_<n>` in a folder of checkpoints or in a run's logdir."""
    path = Path(os.path.expanduser(resume_from))
    if (path / TRAINER_STATE_NAME).is_file():
        return path
    for root in (path, path / "checkpoints"):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise ValueError(
        f"`resume_from` '{resume_from}' holds no Carve3D checkpoint (a folder with {TRAINER_STATE_NAME}, or "
        "checkpoint_<epoch> folders); point it at a checkpoint, at the run's checkpoints folder or at its logdir."
    )


class RunCheckpoints:
    """The checkpoint folders of one run, `<directory>/checkpoint_<epoch>`, keeping the newest `limit`.

    Args:
        directory (`Path`): Where the run's checkpoints live (`<project_dir or logdir>/checkpoints`).
        limit (`int`): How many checkpoints to keep (`num_checkpoint_limit`).
    """

    def __init__(self, directory: Path, limit: int):
        self.directory = Path(directory)
        self.limit = limit

    def clean(self) -> None:
        """Resolve what a killed save left behind (call on the main process, before any save)."""
        clean_stale_temp_dirs(self.directory)

    def save(self, accelerator, epoch: int, trainer_state: dict[str, Any]) -> Path:
        """Save the run after `epoch` as `checkpoint_<epoch>`; every process must call it.

        Every process takes part (each saves its random states); the main process writes the rest into a temporary
        folder renamed into place once all are done, so an interrupted save never leaves a folder that looks like a
        checkpoint. Then only the newest `limit` checkpoints are kept.
        """
        from accelerate.utils import broadcast_object_list

        path = self.directory / f"{CHECKPOINT_PREFIX}{epoch}"

        def save_state(folder: Path | None) -> None:
            (target,) = broadcast_object_list([str(folder) if folder is not None else None])
            accelerator.save_state(target)
            accelerator.wait_for_everyone()

        if accelerator.is_main_process:
            with atomic_directory(path) as tmp:
                save_state(tmp)
                atomic_write_json(tmp / TRAINER_STATE_NAME, {"epoch": epoch, **trainer_state})
            prune_checkpoints(self.directory, self.limit)
        else:
            save_state(None)
        accelerator.wait_for_everyone()
        return path

    @staticmethod
    def load(accelerator, path: Path) -> dict[str, Any]:
        """Restore accelerate's state from the checkpoint `path`; returns the trainer state saved with it (with the
        `epoch` it was saved after)."""
        logger.info("Resuming from %s", path)
        accelerator.load_state(str(path))
        return json.loads((Path(path) / TRAINER_STATE_NAME).read_text())
