"""Image distances MRC can use: LPIPS (AlexNet, the paper's), MSE and PSNR; and the silhouettes' disagreement."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .crop import foreground_mask

__all__ = ["ALEXNET_WEIGHTS", "ImageMetric", "alexnet_weights_path", "load_lpips", "silhouette_disagreement"]

ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"
ALEXNET_URL = f"https://download.pytorch.org/models/{ALEXNET_WEIGHTS}"
LPIPS_MIN_SIZE = 64  # AlexNet needs >= 31 px; smaller inputs are upsampled to this short side


def alexnet_weights_path() -> Path:
    """Where torchvision keeps the AlexNet weights: `torch.hub.get_dir()/checkpoints/alexnet-owt-7be5be79.pth`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_WEIGHTS


def load_lpips(pretrained: bool = True) -> nn.Module:
    """LPIPS with the AlexNet trunk, never touching the network.

    The linear calibration layers ship with the `lpips` package. The ImageNet AlexNet trunk is read from
    `alexnet_weights_path()`; when the file is missing a `FileNotFoundError` says where to put it.

    Args:
        pretrained (`bool`): `False` keeps a random trunk (tests only: the distance is then meaningless).
    """
    import lpips

    path = alexnet_weights_path()
    if pretrained and not path.is_file():
        raise FileNotFoundError(
            f"LPIPS needs the ImageNet AlexNet trunk weights '{ALEXNET_WEIGHTS}' in the folder '{path.parent}' "
            f"(torch.hub.get_dir()/checkpoints, set by $TORCH_HOME), and no file is at '{path}'. Download "
            f"{ALEXNET_URL} on a machine with network access and copy it there, or pass lpips_pretrained=False "
            "for a random trunk (for tests only: its distances are meaningless)."
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's deprecation of `pretrained=`
        model = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
    if pretrained:
        features = torch.load(path, map_location="cpu", weights_only=True)
        trunk = {}
        for slice_name, block in model.net.named_children():
            for index, _ in block.named_children():
                for param in ("weight", "bias"):
                    key = f"features.{index}.{param}"
                    if key in features:
                        trunk[f"{slice_name}.{index}.{param}"] = features[key]
        model.net.load_state_dict(trunk, strict=True)
    return model.eval().requires_grad_(False)


METRIC_NAMES = ("lpips", "mse", "psnr")


def metric_higher_is_better(name: str) -> bool:
    """Whether larger values of the metric `name` (one of `METRIC_NAMES`) mean closer images: PSNR only."""
    if name not in METRIC_NAMES:
        raise ValueError(f"Unknown metric {name!r}; valid metrics: {', '.join(map(repr, METRIC_NAMES))}.")
    return name == "psnr"


class ImageMetric(nn.Module):
    """A per-image distance or similarity between two image batches in [0, 1].

    `forward(x, y)` takes two `(N, 3, h, w)` tensors and returns an `(N,)` tensor. LPIPS upsamples inputs whose
    short side is below 64 px to a 64 px short side (bicubic) first: its AlexNet trunk cannot take less than 31 px.

    Args:
        name (`str`): `"lpips"` (lower is better), `"mse"` (lower is better) or `"psnr"` in dB (higher is better).
        lpips_pretrained (`bool`): See `load_lpips`.
    """

    def __init__(self, name: str, lpips_pretrained: bool = True):
        super().__init__()
        self.higher_is_better = metric_higher_is_better(name)
        self.name = name
        self.lpips = load_lpips(lpips_pretrained) if name == "lpips" else None

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.lpips is not None:
            height, width = x.shape[-2:]
            if min(height, width) < LPIPS_MIN_SIZE:
                scale = LPIPS_MIN_SIZE / min(height, width)
                size = (round(height * scale), round(width * scale))
                x, y = (F.interpolate(t, size=size, mode="bicubic").clamp(0, 1) for t in (x, y))
            return self.lpips(x, y, normalize=True).flatten()  # normalize: [0, 1] -> [-1, 1]
        mse = (x - y).square().flatten(1).mean(dim=1)
        if self.name == "mse":
            return mse
        return -10.0 * torch.log10(mse.clamp_min(1e-10))


def silhouette_disagreement(
    x: torch.Tensor, y: torch.Tensor, background: Sequence[float] = (1.0, 1.0, 1.0)
) -> torch.Tensor:
    """One minus the intersection over union of the foregrounds (`foreground_mask`) of two image batches.

    Args:
        x, y (`torch.Tensor` of shape `(N, 3, h, w)`): Images in [0, 1] on the `background`.

    Returns:
        `torch.Tensor` of shape `(N,)` in [0, 1]: 0 for the same silhouette (or none in either image), 1 for
        silhouettes that do not overlap.
    """
    a, b = foreground_mask(x, background), foreground_mask(y, background)
    union = (a | b).flatten(1).sum(dim=1)
    overlap = (a & b).flatten(1).sum(dim=1)
    return torch.where(union > 0, 1.0 - overlap.float() / union.clamp_min(1).float(), 0.0)
