"""Upload a saved folder to the Hugging Face Hub with retries, never touching the local copy."""

from __future__ import annotations

import functools
import importlib
import logging
import re
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

logger = logging.getLogger(__name__)

T = TypeVar("T")

_REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
_MAX_NAME_LENGTH = 96
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_MAX_RETRY_AFTER_SECONDS = 60.0
# Half-written leftovers of carve3d_trl.atomic are never uploaded.
_IGNORE_PATTERNS = [".tmp-*", "*/.tmp-*"]


class HubUploadError(RuntimeError):
    """The upload failed; the local folder is intact and its path is in the message."""


@functools.cache
def _network_error_types() -> tuple[type[BaseException], ...]:
    """Transport-level errors of the HTTP client in use (requests, httpx or httpx2, by huggingface_hub version)."""
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module_name in ("httpx2", "httpx"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        types += [module.TimeoutException, module.NetworkError, module.RemoteProtocolError]
    try:
        import requests
    except ImportError:
        pass
    else:
        types += [requests.exceptions.ConnectionError, requests.exceptions.Timeout]
    return tuple(types)


def validate_repo_id(repo_id: str) -> None:
    """Raise `ValueError` unless `repo_id` is `name` or `namespace/name` in the Hub's allowed characters."""
    parts = repo_id.split("/") if isinstance(repo_id, str) else []
    problem = None
    if not 1 <= len(parts) <= 2:
        problem = "it must be 'name' or 'namespace/name'"
    elif not all(_REPO_PART.fullmatch(part) for part in parts):
        problem = "each part must use only letters, digits, '-', '_' and '.', and start and end with a letter or digit"
    elif any("--" in part or ".." in part for part in parts):
        problem = "'--' and '..' are not allowed"
    elif len(parts[-1]) > _MAX_NAME_LENGTH:
        problem = f"the name is longer than {_MAX_NAME_LENGTH} characters"
    if problem:
        raise ValueError(f"Invalid Hugging Face Hub repo id {repo_id!r}: {problem} (e.g. 'username/carve3d-lora').")


def _status_code(err: BaseException) -> int | None:
    return getattr(getattr(err, "response", None), "status_code", None)


def _is_transient(err: BaseException) -> bool:
    if isinstance(err, OfflineModeIsEnabled):
        return False
    if isinstance(err, HfHubHTTPError):
        return _status_code(err) in _TRANSIENT_STATUS
    return isinstance(err, _network_error_types())


def _retry_delay(err: BaseException, attempt: int, backoff_seconds: float) -> float:
    """Exponential backoff, or the server's `Retry-After` (capped) when it asks for longer."""
    delay = backoff_seconds * 2**attempt
    headers = getattr(getattr(err, "response", None), "headers", None) or {}
    try:
        retry_after = float(headers.get("Retry-After", 0))
    except (TypeError, ValueError):
        retry_after = 0.0
    return max(delay, min(retry_after, _MAX_RETRY_AFTER_SECONDS))


def _with_retries(
    call: Callable[[], T], what: str, max_retries: int, backoff_seconds: float, sleep: Callable[[float], None]
) -> T:
    attempt = 0
    while True:
        try:
            return call()
        except Exception as err:
            if attempt >= max_retries or not _is_transient(err):
                raise
            delay = _retry_delay(err, attempt, backoff_seconds)
            attempt += 1
            logger.warning(
                "%s failed (%s: %s); retry %d/%d in %.1fs", what, type(err).__name__, err, attempt, max_retries, delay
            )
            sleep(delay)


def _describe(err: BaseException, repo_id: str) -> str:
    status = _status_code(err) if isinstance(err, HfHubHTTPError) else None
    reason = f"{type(err).__name__}: {err}"
    if status in (401, 403):
        reason += f" (no write access to {repo_id!r}: log in with `hf auth login` or pass a write token)"
    elif status == 404:
        reason += f" (repo or revision not found: check {repo_id!r} and the revision)"
    return reason


def upload_command(repo_id: str, folder: str | Path, revision: str | None = None, repo_type: str = "model") -> str:
    """The `hf` CLI command that uploads `folder` to the root of `repo_id`."""
    command = ["hf", "upload", repo_id, str(Path(folder).absolute()), "."]
    if repo_type != "model":
        command += ["--repo-type", repo_type]
    if revision:
        command += ["--revision", revision]
    return shlex.join(command)


def push_folder_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload Carve3D LoRA",
    repo_type: str = "model",
    max_retries: int = 3,
    backoff_seconds: float = 2.0,
    api: HfApi | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Create `repo_id` (if missing) and upload `folder` to its root; return the commit URL.

    `repo_type` is `"model"` (a LoRA) or `"dataset"` (e.g. curated prompts).

    Connection errors, timeouts, HTTP 408/429/5xx are retried up to `max_retries` times with exponential backoff
    (`backoff_seconds * 2**attempt`, passed to `sleep`); other errors fail at once. The folder is never modified.
    `.tmp-*` entries are not uploaded. `revision` names a branch, created if missing.

    Raises:
        ValueError: `repo_id` is malformed (checked before any network call).
        NotADirectoryError: `folder` is not a folder.
        HubUploadError: the upload failed; the message names the kept local folder and the command to retry.
    """
    validate_repo_id(repo_id)
    folder = Path(folder).absolute()
    if not folder.is_dir():
        raise NotADirectoryError(f"Cannot upload {folder} to the Hub: it is not a folder.")
    api = api if api is not None else HfApi(token=token)

    def retried(call: Callable[[], T], what: str) -> T:
        return _with_retries(call, what, max_retries, backoff_seconds, sleep)

    try:
        repo_url = retried(
            lambda: api.create_repo(repo_id, repo_type=repo_type, exist_ok=True, private=private, token=token),
            f"create_repo({repo_id})",
        )
        if revision:
            retried(
                lambda: api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True, token=token),
                f"create_branch({revision})",
            )
        commit = retried(
            lambda: api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                repo_type=repo_type,
                revision=revision,
                commit_message=commit_message,
                ignore_patterns=_IGNORE_PATTERNS,
                token=token,
            ),
            f"upload_folder({repo_id})",
        )
    except Exception as err:
        raise HubUploadError(
            f"Uploading {folder} to the Hub {repo_type} repo {repo_id!r} failed: {_describe(err, repo_id)}. "
            f"The local folder is kept at {folder}; upload it later with:\n"
            f"  {upload_command(repo_id, folder, revision, repo_type)}"
        ) from err
    return str(getattr(commit, "commit_url", None) or repo_url)
