import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import carve3d_trl.atomic as atomic
from carve3d_trl.atomic import (
    atomic_directory,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    clean_stale_temp_dirs,
)
from carve3d_trl.run_state import latest_checkpoint, list_checkpoints, prune_checkpoints

ATOMIC_PY = Path(atomic.__file__)


def _names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def _make_checkpoint(root: Path, name: str, content: str = "x") -> Path:
    path = root / name
    path.mkdir(parents=True)
    (path / "weights.bin").write_text(content)
    return path


# --- atomic_directory --------------------------------------------------------------------------------------------


def test_atomic_directory_commits_on_clean_exit(tmp_path):
    final = tmp_path / "checkpoint_1"
    with atomic_directory(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".tmp-")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.txt").write_text("hello")
        assert not final.exists()
    assert (final / "sub" / "a.txt").read_text() == "hello"
    assert _names(tmp_path) == ["checkpoint_1"]


def test_atomic_directory_exception_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), atomic_directory(tmp_path / "checkpoint_1") as tmp:
        (tmp / "a.txt").write_text("partial")
        raise RuntimeError("boom")
    assert _names(tmp_path) == []
    assert list_checkpoints(tmp_path) == []


def test_atomic_directory_replacement_keeps_old_until_complete(tmp_path):
    final = _make_checkpoint(tmp_path, "checkpoint_1", "old")
    (final / "stale.txt").write_text("only in old")
    with atomic_directory(final) as tmp:
        (tmp / "weights.bin").write_text("new")
        assert (final / "weights.bin").read_text() == "old"  # untouched while the new one is written
    assert (final / "weights.bin").read_text() == "new"
    assert not (final / "stale.txt").exists()
    assert _names(tmp_path) == ["checkpoint_1"]


def test_atomic_directory_failed_replacement_keeps_old(tmp_path):
    final = _make_checkpoint(tmp_path, "checkpoint_1", "old")
    with pytest.raises(KeyboardInterrupt), atomic_directory(final) as tmp:
        (tmp / "weights.bin").write_text("new")
        raise KeyboardInterrupt
    assert (final / "weights.bin").read_text() == "old"
    assert _names(tmp_path) == ["checkpoint_1"]


def test_atomic_directory_rolls_back_when_final_rename_fails(tmp_path, monkeypatch):
    final = _make_checkpoint(tmp_path, "checkpoint_1", "old")
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".tmp-") and ".new." in Path(src).name:
            raise OSError("disk gone")
        real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(OSError, match="disk gone"), atomic_directory(final) as tmp:
        (tmp / "weights.bin").write_text("new")
    assert (final / "weights.bin").read_text() == "old"
    assert _names(tmp_path) == ["checkpoint_1"]


def test_atomic_directory_rejects_existing_file(tmp_path):
    (tmp_path / "checkpoint_1").write_text("a file")
    with pytest.raises(NotADirectoryError), atomic_directory(tmp_path / "checkpoint_1"):
        pass


# --- killed processes ------------------------------------------------------------------------------------------

_CHILD = """
import importlib.util, os, sys, time
spec = importlib.util.spec_from_file_location("atomic_under_test", {module!r})
atomic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(atomic)
{body}
"""


def _run_child(body: str, root: Path) -> subprocess.Popen:
    # The module is loaded from its file so the child does not import the (heavy) package __init__.
    code = _CHILD.format(module=str(ATOMIC_PY), body=textwrap.dedent(body))
    return subprocess.Popen([sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE, text=True)


def _kill_when_ready(proc: subprocess.Popen) -> None:
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL


@pytest.mark.parametrize("existing", [False, True])
def test_sigkill_mid_write_leaves_no_checkpoint_and_old_intact(tmp_path, existing):
    if existing:
        _make_checkpoint(tmp_path, "checkpoint_1", "old")
    proc = _run_child(
        """
        with atomic.atomic_directory(os.path.join(sys.argv[1], "checkpoint_1")) as tmp:
            open(os.path.join(tmp, "weights.bin"), "w").write("new, half written")
            print("writing", flush=True)
            time.sleep(60)
        """,
        tmp_path,
    )
    _kill_when_ready(proc)
    if existing:
        assert list_checkpoints(tmp_path) == [tmp_path / "checkpoint_1"]
        assert (tmp_path / "checkpoint_1" / "weights.bin").read_text() == "old"
    else:
        assert list_checkpoints(tmp_path) == []
        assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".tmp-")] == []
    assert clean_stale_temp_dirs(tmp_path)  # the leftover temp folder is removed
    assert _names(tmp_path) == (["checkpoint_1"] if existing else [])


def test_sigkill_between_renames_is_completed_by_cleanup(tmp_path):
    _make_checkpoint(tmp_path, "checkpoint_1", "old")
    # The child dies right after moving the old folder aside, before renaming the new one into place.
    proc = _run_child(
        """
        real_rename = os.rename
        def rename(src, dst):
            real_rename(src, dst)
            if ".old." in os.path.basename(dst):
                print("writing", flush=True)
                time.sleep(60)
        atomic.os.rename = rename
        with atomic.atomic_directory(os.path.join(sys.argv[1], "checkpoint_1")) as tmp:
            open(os.path.join(tmp, "weights.bin"), "w").write("new")
        """,
        tmp_path,
    )
    _kill_when_ready(proc)
    assert list_checkpoints(tmp_path) == []
    clean_stale_temp_dirs(tmp_path)
    assert _names(tmp_path) == ["checkpoint_1"]
    assert (tmp_path / "checkpoint_1" / "weights.bin").read_text() == "new"


def test_sigkill_mid_file_write_keeps_old_file(tmp_path):
    target = tmp_path / "state.json"
    target.write_text('{"epoch": 1}')
    proc = _run_child(
        """
        real_fsync = os.fsync
        def fsync(fd):
            print("writing", flush=True)
            time.sleep(60)
        atomic.os.fsync = fsync
        atomic.atomic_write_json(os.path.join(sys.argv[1], "state.json"), {"epoch": 2})
        """,
        tmp_path,
    )
    _kill_when_ready(proc)
    assert json.loads(target.read_text()) == {"epoch": 1}
    clean_stale_temp_dirs(tmp_path)
    assert _names(tmp_path) == ["state.json"]


def test_clean_stale_temp_dirs_restores_old_when_new_is_missing(tmp_path):
    old = _make_checkpoint(tmp_path, ".tmp-0123abcd.old.checkpoint_3", "old")
    (tmp_path / ".tmp-deadbeef.file.x.json").write_text("partial")
    removed = clean_stale_temp_dirs(tmp_path)
    assert not old.exists()
    assert (tmp_path / "checkpoint_3" / "weights.bin").read_text() == "old"
    assert [p.name for p in removed] == [".tmp-deadbeef.file.x.json"]


def test_clean_stale_temp_dirs_missing_root(tmp_path):
    assert clean_stale_temp_dirs(tmp_path / "missing") == []


# --- atomic file writes ----------------------------------------------------------------------------------------


def test_atomic_writes_round_trip(tmp_path):
    assert atomic_write_bytes(tmp_path / "a" / "b.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    atomic_write_text(tmp_path / "t.txt", "héllo")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo"
    atomic_write_json(tmp_path / "s.json", {"epoch": 3})
    atomic_write_json(tmp_path / "s.json", {"epoch": 4})
    assert json.loads((tmp_path / "s.json").read_text()) == {"epoch": 4}
    assert _names(tmp_path) == ["a", "s.json", "t.txt"]


def test_atomic_write_failure_keeps_original(tmp_path, monkeypatch):
    target = tmp_path / "s.json"
    target.write_text("original")
    with pytest.raises(TypeError):
        atomic_write_json(target, {"bad": object()})

    def fail(*args):
        raise OSError("no space left")

    monkeypatch.setattr(atomic.os, "replace", fail)
    with pytest.raises(OSError, match="no space"):
        atomic_write_text(target, "new")
    assert target.read_text() == "original"
    assert _names(tmp_path) == ["s.json"]


# --- checkpoint bookkeeping ------------------------------------------------------------------------------------


def test_list_checkpoints_numeric_order_and_filtering(tmp_path):
    for n in (10, 2, 9, 1, 11):
        _make_checkpoint(tmp_path, f"checkpoint_{n}")
    _make_checkpoint(tmp_path, "checkpoint_x")
    _make_checkpoint(tmp_path, "checkpoint_")
    _make_checkpoint(tmp_path, "checkpoint_-3")
    _make_checkpoint(tmp_path, ".tmp-0123abcd.new.checkpoint_12")
    (tmp_path / "checkpoint_13").write_text("a file, not a folder")
    assert [p.name for p in list_checkpoints(tmp_path)] == [f"checkpoint_{n}" for n in (1, 2, 9, 10, 11)]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_11"
    assert [p.name for p in list_checkpoints(tmp_path, prefix="step-")] == []


def test_list_checkpoints_empty_or_missing(tmp_path):
    assert list_checkpoints(tmp_path / "missing") == []
    assert latest_checkpoint(tmp_path) is None


def test_prune_checkpoints_keeps_newest(tmp_path):
    for n in (1, 2, 9, 10, 11):
        _make_checkpoint(tmp_path, f"checkpoint_{n}")
    removed = prune_checkpoints(tmp_path, 2)
    assert [p.name for p in removed] == ["checkpoint_1", "checkpoint_2", "checkpoint_9"]
    assert _names(tmp_path) == ["checkpoint_10", "checkpoint_11"]


@pytest.mark.parametrize("limit", [None, 0, -1, 5])
def test_prune_checkpoints_keep_all(tmp_path, limit):
    for n in (1, 2, 3):
        _make_checkpoint(tmp_path, f"checkpoint_{n}")
    assert prune_checkpoints(tmp_path, limit) == []
    assert len(list_checkpoints(tmp_path)) == 3
