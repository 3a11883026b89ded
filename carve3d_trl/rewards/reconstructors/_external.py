"""Helpers for adapters to reconstruction models used from a user's clone (never vendored: non-commercial licences)."""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import torch


def import_from_clone(module: str, project: str, clone_url: str) -> ModuleType:
    """Import `module` from a clone of `project` on `PYTHONPATH`, or raise an `ImportError` saying how to get it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        top_level = module.split(".")[0]
        if error.name is not None and error.name.split(".")[0] != top_level:
            raise ImportError(
                f"{project} was found but its dependency {error.name!r} is missing: install the requirements of "
                f"your {project} clone (pip install -r requirements.txt in it)."
            ) from error
        raise ImportError(
            f"{project} is not importable (no module {module!r}). It is not on PyPI: clone it with "
            f"`git clone {clone_url}`, install its requirements, and put the clone's root folder on PYTHONPATH "
            f"(export PYTHONPATH=/path/to/{clone_url.rstrip('/').split('/')[-1]}:$PYTHONPATH)."
        ) from error
    except ImportError as error:
        raise ImportError(
            f"{project} was found but does not import with the installed packages ({error}). Its code may need "
            f"versions other than this environment's (see `pip list`); please report it with this message."
        ) from error


@contextmanager
def patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    """Temporarily replace attribute `name` of `owner` by `value`."""
    original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def resolve_file(model: str | os.PathLike, filename: str, revision: str | None = None) -> Path:
    """`filename` in a local folder `model`, or downloaded (or read from the cache) from the Hub repo `model`."""
    folder = Path(model)
    if folder.is_dir():
        path = folder / filename
        if not path.is_file():
            raise FileNotFoundError(f"No {filename} in the model folder {folder}.")
        return path
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id=str(model), filename=filename, revision=revision))


def default_device(device: str | torch.device | None) -> torch.device:
    """`device`, or CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
