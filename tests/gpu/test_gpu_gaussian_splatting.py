"""The plain-PyTorch Gaussian splatting renderer gives the CPU's images on CUDA. Marked `gpu`; skipped without CUDA.

Tolerance: `atol=1e-4` per pixel, with true fp32 matrix products (`fp32_matmuls`). The renderer has cut-offs (the
alpha threshold, the 3-sigma footprint, early termination), so rounding moves a few pixels by more than rounding:
measured on CPU with these Gaussians, a relative change of 1e-6 in their parameters moves pixels by at most 2e-5, one
of 1e-4 by up to 3e-3. TF32, which the trainer switches on for matrix products (`DDPOConfig.allow_tf32`), rounds to
10 mantissa bits: measured on an H200 with it on, pixels differed from the CPU's by up to 0.03 (benchmarks/RESULTS.md,
"GPU"), hence the fixture.
"""

import pytest
import torch

from carve3d_trl.rewards.cameras import multiview_cameras
from carve3d_trl.rewards.reconstructors.gaussian_splatting import render_gaussians

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU: run `make test-gpu` on a machine with one"
    ),
]


def test_cuda_renders_equal_cpu_renders(fp32_matmuls):
    torch.manual_seed(0)
    layout = multiview_cameras(4).layout
    gaussians = torch.rand(1, 500, 14)
    gaussians[..., :3] = gaussians[..., :3] * 2 - 1
    gaussians[..., 4:7] *= 0.05
    cpu, cpu_alpha = render_gaussians(gaussians, layout, 32, return_alpha=True)
    gpu, gpu_alpha = render_gaussians(gaussians.cuda(), layout, 32, return_alpha=True)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)
    torch.testing.assert_close(gpu_alpha.cpu(), cpu_alpha, atol=1e-4, rtol=0)
