"""Prompt adherence of toy samples: does each view show the captioned colour(s) and shape(s)?

A small CNN (`ViewClassifier`) trained on renders of the toy scenes from random cameras
(`carve3d_trl.toy.data.render_random_views`: elevations 0-40 degrees, any azimuth; blur, shifts, colour jitter,
faint coloured haze near the borders and noise added; empty or speckle-only images labelled empty) predicts, for one
32-px view, which of the 8 colours and which of the 4 shapes it shows. A view *adheres in colour* when the set of
colours it predicts (probability > 0.5) is exactly the caption's, likewise for shapes; a view that shows nothing
recognisable adheres in neither. `scripts/train_toy_adherence.py` trains the shipped classifier
(`weights/adherence/`) and checks it on renders of held-out scenes.

A view's silhouette *touches the border* when at least `min_pixels` pixels of its outermost ring differ from the
white background by more than 0.25 (`touches_border`): the reconstruction of MRC assumes a centred object.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..rewards.cameras import CameraLayout
from ..rewards.crop import foreground_mask
from .data import COLORS, SHAPES, Scene, random_scene

__all__ = [
    "ADHERENCE_WEIGHTS",
    "AdherenceResult",
    "ViewClassifier",
    "caption_labels",
    "labelled_scenes",
    "load_adherence_classifier",
    "measure_adherence",
    "save_adherence_classifier",
    "touches_border",
    "train_adherence_classifier",
]

ADHERENCE_WEIGHTS = Path(__file__).parent / "weights" / "adherence"
CLASSIFIER_VIEW_SIZE = 32
NUM_LABELS = len(COLORS) + len(SHAPES)
SILHOUETTE_THRESHOLD = 0.25
_WORD = re.compile(r"[a-z]+")


def caption_labels(caption: str) -> torch.Tensor:
    """The multi-hot labels `(12,)` of a toy caption: its colours (in `COLORS` order), then its shapes (`SHAPES`).

    Raises:
        ValueError: if the caption names no toy colour or no toy shape (it is not a toy caption).
    """
    words = set(_WORD.findall(caption.lower()))
    labels = torch.tensor([name in words for name in (*COLORS, *SHAPES)], dtype=torch.float32)
    if not labels[: len(COLORS)].any() or not labels[len(COLORS) :].any():
        raise ValueError(
            f"Caption {caption!r} names no toy colour ({', '.join(COLORS)}) or no toy shape ({', '.join(SHAPES)}); "
            "prompt adherence is defined for the toy data's captions only."
        )
    return labels


class ViewClassifier(nn.Module):
    """Which colours and shapes a view shows: four 3x3 convolutions (32 px -> 4 px), global average and max
    pooling, one linear layer.

    Forward: views `(N, 3, h, w)` in [0, 1] (resized to 32 px) -> logits `(N, 12)`: the 8 colours of `COLORS`, then
    the 4 shapes of `SHAPES`.
    """

    def __init__(self, width: int = 32):
        super().__init__()
        channels = (3, width, width, 2 * width, 2 * width)
        layers: list[nn.Module] = []
        for index, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:])):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=1 if index == 0 else 2, padding=1), nn.GroupNorm(8, c_out)]
            layers.append(nn.SiLU())
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(4 * width, NUM_LABELS)
        self.width = width

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        if views.shape[-2:] != (CLASSIFIER_VIEW_SIZE, CLASSIFIER_VIEW_SIZE):
            views = F.interpolate(views, size=CLASSIFIER_VIEW_SIZE, mode="bilinear", antialias=True)
        features = self.features(views * 2 - 1)
        return self.head(torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1))


def _augment(views: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur, shift, colour jitter, faint coloured haze near the borders and noise of views `(N, 3, h, w)` in [0, 1],
    each with its own random strength, so that the classifier also reads the blurrier, noisier views of a generative
    model (whose haze is no object: the labels stay)."""
    n, size = views.shape[0], views.shape[-1]

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, *shape, generator=generator)

    blurred = F.avg_pool2d(F.pad(views, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    views = torch.where(torch.rand(n, 1, 1, 1, generator=generator) < 0.4, blurred, views)
    shift = torch.randint(-3, 4, (2,), generator=generator).tolist()  # one shift per batch: a cheap roll
    views = F.pad(views, (3, 3, 3, 3), value=1.0).roll(shift, dims=(2, 3))[..., 3:-3, 3:-3]
    views = views.flip(-1) if torch.rand(1, generator=generator) < 0.5 else views
    views = (views * uniform(0.85, 1.1, 3, 1, 1) + uniform(-0.05, 0.05, 1, 1, 1)).clamp(0, 1)
    ramp = torch.arange(size, dtype=torch.float32)
    edge = (1 - torch.minimum(ramp, ramp.flip(0)) / 6).clamp_min(0)
    haze = F.interpolate(torch.rand(n, 1, 4, 4, generator=generator), size=size, mode="bilinear", align_corners=False)
    alpha = haze * torch.maximum(edge[:, None], edge[None]) * uniform(-0.3, 0.3, 1, 1, 1).clamp_min(0)  # half: none
    views = views * (1 - alpha) + torch.rand(n, 3, 1, 1, generator=generator) * alpha
    noise = torch.randn(views.shape, generator=generator) * uniform(0.0, 0.08, 1, 1, 1)
    return (views + noise).clamp(0, 1)


def _empty_views(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """`n` views `(n, 3, size, size)` that show no object: white, or white with coloured speckles."""
    speckles = torch.rand(n, 1, size, size, generator=generator) < 0.1 * torch.rand(n, 1, 1, 1, generator=generator)
    colours = torch.rand(n, 3, size, size, generator=generator)
    return torch.where(speckles, colours, torch.ones(n, 3, size, size))


def train_adherence_classifier(
    views: torch.Tensor,
    labels: torch.Tensor,
    steps: int = 6000,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    empty_rate: float = 0.05,
    width: int = 32,
    seed: int = 0,
    log_every: int = 0,
) -> ViewClassifier:
    """Train a `ViewClassifier` on rendered `views` `(M, 3, h, w)` in [0, 1] with their multi-hot `labels` `(M, 12)`
    (`caption_labels` of their scenes' captions), with augmentation (`_augment`) and a share `empty_rate` of empty
    views labelled all-zero. AdamW with cosine decay; deterministic in `seed`."""
    if views.ndim != 4 or labels.shape != (views.shape[0], NUM_LABELS):
        raise ValueError(
            f"Expected views (M, 3, h, w) and labels (M, {NUM_LABELS}), got {tuple(views.shape)} and "
            f"{tuple(labels.shape)}."
        )
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier = ViewClassifier(width)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    num_empty = round(empty_rate * batch_size)
    classifier.train()
    for step in range(1, steps + 1):
        index = torch.randint(len(views), (batch_size - num_empty,), generator=generator)
        batch = torch.cat([views[index], _empty_views(num_empty, views.shape[-1], generator)])
        targets = torch.cat([labels[index], torch.zeros(num_empty, NUM_LABELS)])
        loss = F.binary_cross_entropy_with_logits(classifier(_augment(batch, generator)), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if log_every and (step % log_every == 0 or step == 1):
            print(f"adherence classifier step {step}/{steps} loss {loss.item():.4f}", flush=True)
    return classifier.eval().requires_grad_(False)


def save_adherence_classifier(classifier: ViewClassifier, path: str | Path = ADHERENCE_WEIGHTS) -> None:
    """Write the classifier's weights (`classifier.safetensors`, fp16) and `config.json` to the folder `path`,
    atomically."""
    from safetensors.torch import save_file

    from ..atomic import atomic_directory

    with atomic_directory(path) as tmp:
        state = {k: v.to(torch.float16).contiguous() for k, v in classifier.state_dict().items()}
        save_file(state, str(Path(tmp) / "classifier.safetensors"))
        config = {"width": classifier.width, "labels": [*COLORS, *SHAPES], "view_size": CLASSIFIER_VIEW_SIZE}
        (Path(tmp) / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_adherence_classifier(path: str | Path = ADHERENCE_WEIGHTS) -> ViewClassifier:
    """The classifier saved in the folder `path` (default: the shipped one), in float32, in eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "classifier.safetensors").is_file():
        raise FileNotFoundError(
            f"No adherence classifier at {path}; train it with scripts/train_toy_adherence.py --output_dir {path}."
        )
    config = json.loads((path / "config.json").read_text())
    if config["labels"] != [*COLORS, *SHAPES]:
        raise ValueError(f"The classifier at {path} was trained for labels {config['labels']}, not the toy data's.")
    classifier = ViewClassifier(config["width"])
    classifier.load_state_dict({k: v.float() for k, v in load_file(str(path / "classifier.safetensors")).items()})
    return classifier.eval().requires_grad_(False)


def touches_border(views: torch.Tensor, min_pixels: int = 2, threshold: float = SILHOUETTE_THRESHOLD) -> torch.Tensor:
    """Whether the silhouette of each view `(..., 3, h, w)` (in [0, 1], on white) reaches its border: at least
    `min_pixels` pixels of the outermost ring of pixels differ from white by more than `threshold` in some channel
    (every lit toy solid does by more than 0.4; the faint haze some models paint near the borders does not).
    Returns a `BoolTensor` of shape `(...)`."""
    mask = foreground_mask(views, threshold=threshold)
    ring = mask.clone()
    ring[..., 1:-1, 1:-1] = False
    return ring.flatten(-2).sum(-1) >= min_pixels


@dataclass
class AdherenceResult:
    """Per-view results of `measure_adherence` for `N` samples of `V` views (`BoolTensor`s of shape `(N, V)`)."""

    color: torch.Tensor
    shape: torch.Tensor
    border: torch.Tensor

    def summary(self) -> dict[str, float]:
        """Shares over all views (`color`, `shape`, `both`), over samples whose every view adheres
        (`color_all_views`, `shape_all_views`), and of samples with a view touching the border (`border`)."""
        both = self.color & self.shape
        return {
            "color": self.color.float().mean().item(),
            "shape": self.shape.float().mean().item(),
            "both": both.float().mean().item(),
            "color_all_views": self.color.all(1).float().mean().item(),
            "shape_all_views": self.shape.all(1).float().mean().item(),
            "border": self.border.any(1).float().mean().item(),
        }


@torch.no_grad()
def measure_adherence(
    views: torch.Tensor,
    captions: Sequence[str],
    classifier: ViewClassifier | None = None,
    layout: CameraLayout | None = None,
    batch_size: int = 256,
) -> AdherenceResult:
    """Prompt adherence and border contact of samples.

    Args:
        views (`torch.Tensor`): Views `(N, V, 3, h, w)`, or grid images `(N, 3, H, W)` split by `layout`, in [0, 1].
        captions (`Sequence[str]`): One toy caption per sample.
        classifier (`ViewClassifier`, *optional*): Default: the shipped one (`load_adherence_classifier()`).
        layout (`CameraLayout`, *optional*): The grid layout of grid images (default: `instant3d_layout()`).

    Returns:
        `AdherenceResult`: per view, whether its predicted colour set and shape set equal the caption's, and
        whether it touches the border (`touches_border`).
    """
    from ..rewards.cameras import instant3d_layout, split_grid

    if views.ndim == 4:
        views = split_grid(views, layout or instant3d_layout())
    if views.ndim != 5 or len(captions) != views.shape[0]:
        raise ValueError(
            f"Expected views (N, V, 3, h, w) or grids (N, 3, H, W) and N captions, got {tuple(views.shape)} and "
            f"{len(captions)} captions."
        )
    classifier = classifier or load_adherence_classifier()
    flat = views.flatten(0, 1).float()
    logits = torch.cat([classifier(flat[i : i + batch_size]) for i in range(0, len(flat), batch_size)])
    predicted = (logits > 0).view(*views.shape[:2], NUM_LABELS)
    target = torch.stack([caption_labels(c) for c in captions]).bool()[:, None]
    split = len(COLORS)
    return AdherenceResult(
        color=(predicted[..., :split] == target[..., :split]).all(-1),
        shape=(predicted[..., split:] == target[..., split:]).all(-1),
        border=touches_border(views),
    )


def labelled_scenes(num_scenes: int, seed: int) -> tuple[list[Scene], torch.Tensor]:
    """`num_scenes` random scenes of seed `seed` (`random_scene`) and their labels `(N, 12)` (`caption_labels`)."""
    generator = torch.Generator().manual_seed(seed)
    scenes = [random_scene(generator) for _ in range(num_scenes)]
    return scenes, torch.stack([caption_labels(s.caption) for s in scenes])
