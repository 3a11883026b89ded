"""Shared fixtures: a tiny pipeline saved once per session (a small trainer configuration: `small_run.py`)."""

import pytest
import torch

from carve3d_trl.testing import TinyPipelineSpec, save_tiny_pipeline

# Tiny models gain nothing from threads, and OpenMP threads stall badly when another process holds a core.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """A tiny SD pipeline (32x32 grid of 2x2 views) saved as a diffusers folder."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd", TinyPipelineSpec(image_size=32), seed=0)
