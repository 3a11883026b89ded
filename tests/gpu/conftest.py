"""Fixtures of the GPU tests (marked `gpu`; every module skips itself without CUDA): the tiny pipelines of every
model family (`FAMILIES`), built in-process, and the switches that make CUDA runs reproducible or exact.

Run them with `make test-gpu` (`pytest -m gpu`); the default run deselects them (`addopts` in pyproject.toml).
"""

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from carve3d_trl.pipelines import (
    Carve3DStableDiffusionPipeline,
    Carve3DStableDiffusionXLPipeline,
    Carve3DViewBatchedPipeline,
)
from carve3d_trl.testing import (
    TinyPipelineSpec,
    save_tiny_pipeline,
    save_tiny_sdxl_pipeline,
    save_tiny_view_batched_pipeline,
)

# Read when the first cuBLAS handle is made (the first CUDA matrix product, after collection): with it, cuBLAS's
# products are deterministic (see the `deterministic` fixture). It changes nothing on CPU.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

# The memory test's UNet: 66M parameters (126 MiB in fp16), so that a second UNet in memory would exceed the test's
# margin many times over.
MEDIUM_UNET = dict(unet_channels=(128, 256, 512), text_hidden_size=128, norm_num_groups=32)


@dataclass(frozen=True)
class Family:
    """A model family under test: how to save its tiny pipeline, which DDPO pipeline class trains it, and the sizes
    of the training tests' model (`tiny`) and of the memory test's (`medium`)."""

    name: str
    save: Callable[[Path, TinyPipelineSpec, int], Path]
    pipeline_class: type
    tiny: TinyPipelineSpec
    medium: TinyPipelineSpec

    def pipeline(self, path: Path, **kwargs):
        return self.pipeline_class(str(path), **kwargs)


# The parametrisation point: every GPU training test runs once per family here; a new family is one more entry.
FAMILIES = {
    # grids of 2x2 views: 32x32 (latent 16x16), as the CPU tests'; the memory test's 64x64 (latent 32x32)
    "sd": Family(
        "sd",
        save_tiny_pipeline,
        Carve3DStableDiffusionPipeline,
        TinyPipelineSpec(image_size=32),
        TinyPipelineSpec(image_size=64, **MEDIUM_UNET),
    ),
    "sdxl": Family(
        "sdxl",
        save_tiny_sdxl_pipeline,
        Carve3DStableDiffusionXLPipeline,
        TinyPipelineSpec(image_size=32),
        TinyPipelineSpec(image_size=64, **MEDIUM_UNET),
    ),
    # MVDream-like: the UNet takes the 4 views of an object as a batch; views of 16x16, as the CPU tests' (the same
    # latent pixels as the grids above), and of 32x32 for the memory test
    "view_batched": Family(
        "view_batched",
        save_tiny_view_batched_pipeline,
        Carve3DViewBatchedPipeline,
        TinyPipelineSpec(image_size=16),
        TinyPipelineSpec(image_size=32, **MEDIUM_UNET),
    ),
}


@dataclass(frozen=True)
class SavedModel:
    family: Family
    path: Path

    def pipeline(self, **kwargs):
        return self.family.pipeline(self.path, **kwargs)


def _save(tmp_path_factory, family_name: str, size: str) -> SavedModel:
    family = FAMILIES[family_name]
    folder = tmp_path_factory.mktemp(f"{size}-{family_name}")
    return SavedModel(family, family.save(folder / "model", getattr(family, size), 0))


@pytest.fixture(scope="session", params=list(FAMILIES))
def tiny_model(request, tmp_path_factory) -> SavedModel:
    """The tiny pipeline of each family, saved once per session (tests taking it run once per family)."""
    return _save(tmp_path_factory, request.param, "tiny")


@pytest.fixture(scope="session", params=list(FAMILIES))
def medium_model(request, tmp_path_factory) -> SavedModel:
    """The memory test's larger pipeline of each family."""
    return _save(tmp_path_factory, request.param, "medium")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """A fresh accelerate state around each test: the state is process-wide and keeps the first `mixed_precision`
    it was given (an `Accelerator` asking for another raises), and these tests train in fp16, bf16 and fp32."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def fp32_matmuls():
    """True fp32 matrix products and convolutions on CUDA (no TF32, which `Carve3DTrainer` switches on for matrix
    products through `DDPOConfig.allow_tf32`, and cuDNN allows by default): for comparisons with the CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def deterministic():
    """Deterministic CUDA kernels where PyTorch has them (a warning, not an error, for the others), so that two
    identical runs agree and a resumed run can be compared with an uninterrupted one."""
    saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.benchmark = benchmark
