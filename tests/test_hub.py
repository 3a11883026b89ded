import shlex
from importlib.metadata import distribution
from types import SimpleNamespace
from unittest import mock

import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

from carve3d_trl.hub import HubUploadError, push_folder_to_hub, upload_command, validate_repo_id

REPO = "me/carve3d-lora"
COMMIT_URL = f"https://huggingface.co/{REPO}/commit/abc123"


def http_error(status: int, headers: dict | None = None) -> HfHubHTTPError:
    response = SimpleNamespace(status_code=status, headers=headers or {}, request=None)
    return HfHubHTTPError(f"{status} Client Error", response=response)


def fake_api(upload_effects=(), create_effects=()) -> mock.Mock:
    """An HfApi double whose methods check their arguments against the installed HfApi signatures."""
    api = mock.create_autospec(HfApi, instance=True)
    api.create_repo.side_effect = [*create_effects, f"https://huggingface.co/{REPO}"]
    api.upload_folder.side_effect = [*upload_effects, SimpleNamespace(commit_url=COMMIT_URL)]
    return api


@pytest.fixture
def folder(tmp_path):
    path = tmp_path / "my run" / "final"
    path.mkdir(parents=True)
    (path / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
    return path


def push(folder, api, sleeps, **kwargs):
    return push_folder_to_hub(folder, REPO, api=api, sleep=sleeps.append, **kwargs)


def test_success_creates_repo_then_uploads(folder):
    api, sleeps = fake_api(), []
    url = push(folder, api, sleeps, token="hf_tok", private=True, commit_message="epoch 3")
    assert url == COMMIT_URL
    assert api.method_calls == [
        mock.call.create_repo(REPO, repo_type="model", exist_ok=True, private=True, token="hf_tok"),
        mock.call.upload_folder(
            repo_id=REPO,
            folder_path=folder,
            repo_type="model",
            revision=None,
            commit_message="epoch 3",
            ignore_patterns=[".tmp-*", "*/.tmp-*"],
            token="hf_tok",
        ),
    ]
    assert sleeps == []


def test_revision_creates_branch_and_uploads_there(folder):
    api, sleeps = fake_api(), []
    push(folder, api, sleeps, revision="v1")
    assert [c[0] for c in api.method_calls] == ["create_repo", "create_branch", "upload_folder"]
    api.create_branch.assert_called_once_with(REPO, branch="v1", repo_type="model", exist_ok=True, token=None)
    assert api.upload_folder.call_args.kwargs["revision"] == "v1"


@pytest.mark.parametrize(
    "error",
    [ConnectionError("reset"), TimeoutError("slow"), *(http_error(s) for s in (408, 429, 500, 502, 503, 504))],
    ids=lambda e: getattr(getattr(e, "response", None), "status_code", None) or type(e).__name__,
)
def test_transient_errors_are_retried_with_backoff(folder, error):
    api, sleeps = fake_api(upload_effects=[error, error]), []
    assert push(folder, api, sleeps) == COMMIT_URL
    assert api.upload_folder.call_count == 3
    assert api.create_repo.call_count == 1
    assert sleeps == [2.0, 4.0]


def test_http_client_transport_errors_are_retried(folder):
    httpx2 = pytest.importorskip("httpx2")  # the HTTP client of the installed huggingface_hub
    errors = [httpx2.ConnectError("refused"), httpx2.ReadTimeout("slow"), httpx2.RemoteProtocolError("dropped")]
    api, sleeps = fake_api(upload_effects=errors), []
    assert push(folder, api, sleeps) == COMMIT_URL
    assert api.upload_folder.call_count == 4


def test_transient_create_repo_error_is_retried(folder):
    api, sleeps = fake_api(create_effects=[http_error(502)]), []
    assert push(folder, api, sleeps, backoff_seconds=0.5) == COMMIT_URL
    assert api.create_repo.call_count == 2
    assert sleeps == [0.5]


def test_retry_after_header_is_honoured(folder):
    api, sleeps = fake_api(upload_effects=[http_error(429, {"Retry-After": "30"})]), []
    push(folder, api, sleeps)
    assert sleeps == [30.0]


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_permanent_error_fails_at_once_and_keeps_folder(folder, status):
    error = http_error(status)
    api, sleeps = fake_api(upload_effects=[error]), []
    with pytest.raises(HubUploadError) as info:
        push(folder, api, sleeps)
    assert api.upload_folder.call_count == 1
    assert sleeps == []
    message = str(info.value)
    assert "failed" in message and f"{status} Client Error" in message
    assert f"kept at {folder}" in message
    assert f"hf upload {REPO} {shlex.quote(str(folder))} ." in message
    assert info.value.__cause__ is error
    assert (folder / "pytorch_lora_weights.safetensors").read_bytes() == b"weights"


def test_offline_mode_is_not_retried(folder):
    api, sleeps = fake_api(upload_effects=[OfflineModeIsEnabled("HF_HUB_OFFLINE=1")]), []
    with pytest.raises(HubUploadError, match="HF_HUB_OFFLINE"):
        push(folder, api, sleeps)
    assert api.upload_folder.call_count == 1


def test_retries_exhausted(folder):
    api, sleeps = fake_api(upload_effects=[http_error(503)] * 3), []
    with pytest.raises(HubUploadError, match="503") as info:
        push(folder, api, sleeps, max_retries=2, backoff_seconds=1.0)
    assert api.upload_folder.call_count == 3
    assert sleeps == [1.0, 2.0]
    assert str(folder) in str(info.value)
    assert folder.is_dir()


def test_permanent_create_repo_error_skips_upload(folder):
    api, sleeps = fake_api(create_effects=[http_error(403)]), []
    with pytest.raises(HubUploadError, match="hf auth login"):
        push(folder, api, sleeps)
    api.upload_folder.assert_not_called()


@pytest.mark.parametrize(
    "repo_id", ["", "a/b/c", "/name", "ns/", "bad name", "-x", "x-", "x--y", "x..y", "ns/na$me", "é/x", "a" * 97]
)
def test_bad_repo_id_fails_before_any_call(folder, repo_id):
    api = fake_api()
    with pytest.raises(ValueError, match="Invalid Hugging Face Hub repo id"):
        push_folder_to_hub(folder, repo_id, api=api)
    assert api.method_calls == []


@pytest.mark.parametrize("repo_id", ["gpt2", "user/my-model_v1.0", "Org-1/x"])
def test_valid_repo_ids(repo_id):
    validate_repo_id(repo_id)


def test_missing_folder_fails_before_any_call(tmp_path):
    api = fake_api()
    with pytest.raises(NotADirectoryError):
        push_folder_to_hub(tmp_path / "missing", REPO, api=api)
    assert api.method_calls == []


def test_default_api_uses_token(folder):
    with mock.patch("carve3d_trl.hub.HfApi") as api_class:
        api_class.return_value.upload_folder.return_value = SimpleNamespace(commit_url=COMMIT_URL)
        assert push_folder_to_hub(folder, REPO, token="hf_tok") == COMMIT_URL
    api_class.assert_called_once_with(token="hf_tok")


def test_upload_command_uses_installed_cli(folder):
    assert "hf" in {ep.name for ep in distribution("huggingface_hub").entry_points}
    command = upload_command(REPO, folder, revision="v1")
    assert shlex.split(command) == ["hf", "upload", REPO, str(folder), ".", "--revision", "v1"]
