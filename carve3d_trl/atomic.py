"""Crash-safe writes and deletions of files and folders, and the clean-up of what a killed writer left behind.

Every write goes to a temporary sibling whose name starts with `.tmp-` and is renamed into place only once it is
complete and fsynced, so a crash (exception, SIGKILL, power loss) never leaves a half-written file or a folder that
looks like a checkpoint. This module imports nothing from the rest of the package.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"
# Temporary names: ".tmp-<8 hex>.<kind>.<final name>"; kind is "new" (being written), "old" (the previous version
# moved aside during a replacement), "del" (being deleted) or "file" (a file being written).
_TMP_NAME = re.compile(r"^\.tmp-(?P<token>[0-9a-f]{8})\.(?P<kind>new|old|del|file)\.(?P<name>.+)$")


def _temp_sibling(path: Path, kind: str, token: str | None = None) -> Path:
    return path.parent / f"{TMP_PREFIX}{token or uuid.uuid4().hex[:8]}.{kind}.{path.name}"


def _fsync_dir(path: Path) -> None:
    """Persist a folder's entries (renames, creations); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            file_path = os.path.join(dirpath, name)
            if not os.path.islink(file_path):
                with open(file_path, "rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


@contextlib.contextmanager
def atomic_directory(final_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling folder of `final_dir` that is renamed to `final_dir` on clean exit.

    If `final_dir` already exists it keeps its content until the new folder is complete: the old folder is moved
    aside, the new one renamed into place, then the old one deleted. On an exception the temporary folder is removed
    and `final_dir` is left untouched. A process killed mid-way leaves only `.tmp-*` entries, which
    [`clean_stale_temp_dirs`] resolves.
    """
    final = Path(final_dir).absolute()
    if final.exists() and not final.is_dir():
        raise NotADirectoryError(f"{final} exists and is not a folder")
    final.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    tmp = _temp_sibling(final, "new", token)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        _rename_into_place(tmp, final, token)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _rename_into_place(tmp: Path, final: Path, token: str) -> None:
    if not final.exists():
        os.rename(tmp, final)
        _fsync_dir(final.parent)
        return
    old = _temp_sibling(final, "old", token)
    os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(old, final)
        raise
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` through a fsynced temporary file and `os.replace`; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path, "file")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Atomically write `text` to `path` (see [`atomic_write_bytes`])."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int = 2) -> Path:
    """Atomically write `obj` as JSON; an unserialisable `obj` fails before anything touches the disk."""
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def atomic_remove_directory(path: str | os.PathLike[str]) -> None:
    """Delete a folder, first renaming it to a `.tmp-` name, so an interrupted deletion never leaves a partial
    folder under its real name."""
    path = Path(path)
    trash = _temp_sibling(path, "del")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)
    _fsync_dir(path.parent)


def clean_stale_temp_dirs(root: str | os.PathLike[str]) -> list[Path]:
    """Resolve the `.tmp-*` leftovers of a killed writer in `root`; return the entries removed.

    A replacement interrupted between its two renames is completed (its new folder was already complete), so no
    committed data is lost; every other leftover is an incomplete write and is deleted. Do not call this while another
    process is writing into `root`.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    for entry in list(root.iterdir()):
        match = _TMP_NAME.match(entry.name)
        if match is None or match["kind"] != "old":
            continue
        final = root / match["name"]
        if not final.exists():
            new = _temp_sibling(final, "new", match["token"])
            os.rename(new if new.is_dir() else entry, final)
    removed = []
    for entry in list(root.iterdir()):
        if entry.name.startswith(TMP_PREFIX):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    if removed:
        _fsync_dir(root)
    return removed
