"""Sample images of each DDPO epoch for the experiment tracker: the grid, the renders of its reconstruction, captions.

`ImageSamplesLogger` is an `image_samples_hook` for `Carve3DTrainer` (and TRL's `DDPOTrainer`): it is called as
`hook(prompt_image_data, global_step, tracker)` with `prompt_image_data` a list of [`~carve3d_trl.batches.ScoredBatch`]
`(images (B, 3, H, W), prompts, prompt_metadata, rewards (B,), reward_metadata)`. It logs the first samples of
the epoch as panels, each the generated grid beside the renders of its reconstruction (the `renders` of the reward's
[`~carve3d_trl.rewards.RewardMetadata`] when it provides them, tiled in the grid's layout), captioned with the
prompt, the reward and the MRC:

- to TensorBoard (`tracker.name == "tensorboard"`): one image per sample (`<tag>/<i>`) and a caption table (text);
- to Weights & Biases (`tracker.name == "wandb"`): `tracker.log({tag: [wandb.Image(panel, caption=...)]}, step=...)`;
- to any other tracker with a `log_images(values, step)` method (accelerate's API): the panels, without captions;
- with `tracker=None` (no tracker, or a process other than the main one): nothing, unless the logger was built with
  `save_dir`, in which case every process writes its panels as PNGs (and the captions as JSON) there.

Example:

```python
from carve3d_trl.image_logging import ImageSamplesLogger

trainer = Carve3DTrainer(config, MRCReward(), sd_pipeline=pipeline, image_samples_hook=ImageSamplesLogger())
```
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .atomic import atomic_write_bytes, atomic_write_json
from .batches import ScoredBatch
from .rewards.metadata import RewardMetadata

logger = logging.getLogger(__name__)

__all__ = [
    "ImageSamplesLogger",
    "LoggedSample",
    "collect_samples",
    "grid_shape",
    "tile_renders_like",
    "tile_views_grid",
    "to_uint8_hwc",
]


@dataclass
class LoggedSample:
    """One sample as logged: its prompt, grid image `(3, H, W)` in [0, 1], tiled renders (or None) and scores."""

    prompt: str
    image: torch.Tensor
    renders: torch.Tensor | None
    reward: float
    mrc: float | None = None

    @property
    def caption(self) -> str:
        text = f"{self.prompt} | reward {self.reward:.4f}"
        return text if self.mrc is None else f"{text} | MRC {self.mrc:.4f}"

    def panel(self, gap: int = 2) -> torch.Tensor:
        """The grid image, and beside it (after a `gap`-pixel white strip) the tiled renders when present."""
        if self.renders is None:
            return self.image
        strip = torch.ones(3, self.image.shape[1], gap)
        return torch.cat([self.image, strip, self.renders], dim=2)


def grid_shape(num_views: int, height: int, width: int, view_height: int, view_width: int) -> tuple[int, int]:
    """Infer the `(rows, cols)` of a grid image of `num_views` views from the aspect ratio of one view.

    Among the factorisations `rows * cols == num_views` that divide the image evenly, pick the one whose tiles have the
    aspect ratio of a `view_height x view_width` render (ties: the most square grid).

    Raises:
        ValueError: no factorisation divides a `height x width` image.
    """
    target = math.log(view_height / view_width)
    candidates = []
    for rows in range(1, num_views + 1):
        cols = num_views // rows
        if rows * cols == num_views and height % rows == 0 and width % cols == 0:
            mismatch = abs(math.log((height / rows) / (width / cols)) - target)
            candidates.append((mismatch, abs(rows - cols), rows, cols))
    if not candidates:
        raise ValueError(f"{num_views} views do not tile a {height}x{width} image evenly.")
    _, _, rows, cols = min(candidates)
    return rows, cols


def tile_renders_like(
    renders: torch.Tensor,
    height: int,
    width: int,
    grid: tuple[int, int] | None = None,
    background: Sequence[float] = (1.0, 1.0, 1.0),
) -> torch.Tensor:
    """Tile per-view renders `(V, 3, h, w)` into a `(3, height, width)` image laid out like the generated grid.

    Each render is resized to the grid's view size (renders may be smaller than the views); views the reward did
    not evaluate (NaN renders) are painted with `background`. `grid` is `(rows, cols)`, inferred when None.
    """
    num_views, channels, h, w = renders.shape
    rows, cols = grid or grid_shape(num_views, height, width, h, w)
    if rows * cols != num_views or height % rows or width % cols:
        raise ValueError(f"{num_views} renders do not tile a {height}x{width} image as a {rows}x{cols} grid.")
    renders = renders.detach().float().cpu()
    fill = torch.tensor(list(background), dtype=torch.float32).view(1, channels, 1, 1).expand_as(renders)
    renders = torch.where(torch.isnan(renders), fill, renders)
    view_hw = (height // rows, width // cols)
    if (h, w) != view_hw:
        renders = F.interpolate(renders, size=view_hw, mode="bilinear", antialias=True, align_corners=False)
    tiles = renders.clamp(0, 1).reshape(rows, cols, channels, *view_hw)
    return tiles.permute(2, 0, 3, 1, 4).reshape(channels, height, width)


def tile_views_grid(views: torch.Tensor, cols: int | None = None) -> torch.Tensor:
    """Tile views `(B, V, 3, h, w)` row-major into grids `(B, 3, rows * h, cols * w)` for display; `cols` defaults
    to the most square layout (2x2 for 4 views, 1 x V for a prime V)."""
    batch, num_views, channels, height, width = views.shape
    cols = cols or min(c for c in range(math.isqrt(num_views), num_views + 1) if num_views % c == 0)
    if num_views % cols:
        raise ValueError(f"{num_views} views do not fill rows of {cols} columns.")
    rows = num_views // cols
    tiles = views.reshape(batch, rows, cols, channels, height, width)
    return tiles.permute(0, 3, 1, 4, 2, 5).reshape(batch, channels, rows * height, cols * width)


def _item(values: Any, index: int) -> float | None:
    if values is None:
        return None
    value = values[index]
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def collect_samples(
    prompt_image_data: Sequence[ScoredBatch],
    limit: int,
    grid: tuple[int, int] | None = None,
    background: Sequence[float] = (1.0, 1.0, 1.0),
) -> list[LoggedSample]:
    """The first `limit` samples of the scored batches (with the renders and MRC of a [`RewardMetadata`]).

    A grid image `(3, H, W)` is logged as it is; the views of a view-batched sample `(V, 3, h, w)` are tiled first
    ([`tile_views_grid`], or as `grid` when given), and its renders in the same layout.
    """
    samples: list[LoggedSample] = []
    for images, prompts, _, rewards, reward_metadata in prompt_image_data:
        metadata: RewardMetadata = reward_metadata if isinstance(reward_metadata, dict) else {}
        renders, mrc = metadata.get("renders"), metadata.get("mrc")
        for i in range(min(limit - len(samples), len(prompts))):
            image = images[i].detach().float().cpu().clamp(0, 1)
            if image.ndim == 4:  # views
                cols = grid[1] if grid is not None else None
                image = tile_views_grid(image[None], cols)[0]
            tiled = None
            if renders is not None:
                tiled = tile_renders_like(renders[i], image.shape[1], image.shape[2], grid, background)
            samples.append(LoggedSample(str(prompts[i]), image, tiled, _item(rewards, i), _item(mrc, i)))
        if len(samples) >= limit:
            break
    return samples


def to_uint8_hwc(image: torch.Tensor) -> np.ndarray:
    """A `(3, H, W)` image in [0, 1] as an `(H, W, 3)` uint8 array."""
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


class ImageSamplesLogger:
    """An `image_samples_hook` logging each epoch's first samples with their renders and rewards (module docstring).

    Args:
        num_samples (`int`): Samples logged per call (the first ones of the epoch on this process).
        tag (`str`): Name of the logged images (TensorBoard tag prefix, wandb key).
        save_dir (`str` or `Path`, *optional*): Also write the panels as PNGs here, on every process, named
            `step_<global_step>_rank<process>_<i>.png`, with the captions in `step_<global_step>_rank<process>.json`.
        grid (`tuple[int, int]`, *optional*): `(rows, cols)` of the generated grids, e.g. `(layout.rows,
            layout.cols)` of the reward's camera layout. Inferred from the renders' aspect ratio when None.
        background (`Sequence[float]`): RGB painted where a render is missing (NaN).
        process_index (`int`, *optional*): This process's rank for `save_dir` file names; read from accelerate's
            `PartialState` when None.
    """

    def __init__(
        self,
        num_samples: int = 4,
        tag: str = "images",
        save_dir: str | Path | None = None,
        grid: tuple[int, int] | None = None,
        background: Sequence[float] = (1.0, 1.0, 1.0),
        process_index: int | None = None,
    ):
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
        self.num_samples = num_samples
        self.tag = tag
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.grid = tuple(grid) if grid is not None else None
        self.background = tuple(background)
        self.process_index = process_index
        self._warned: set[str] = set()

    def __call__(self, prompt_image_data: Sequence[ScoredBatch], global_step: int, tracker: Any = None) -> None:
        if tracker is None and self.save_dir is None:
            return
        samples = collect_samples(prompt_image_data, self.num_samples, self.grid, self.background)
        if not samples:
            return
        if tracker is not None:
            self.log_to_tracker(samples, global_step, tracker)
        if self.save_dir is not None:
            self.save(samples, global_step)

    def log_to_tracker(self, samples: list[LoggedSample], global_step: int, tracker: Any) -> None:
        """Send the panels to `tracker` according to its `name` (see the module docstring)."""
        name = getattr(tracker, "name", None)
        if name == "tensorboard":
            self._log_tensorboard(samples, global_step, tracker)
        elif name == "wandb":
            self._log_wandb(samples, global_step, tracker)
        elif callable(getattr(tracker, "log_images", None)):
            try:
                tracker.log_images({self.tag: [to_uint8_hwc(s.panel()) for s in samples]}, step=global_step)
            except NotImplementedError:
                self._warn_once(str(name), f"Tracker {name!r} cannot log images; sample images are not logged.")
        else:
            self._warn_once(str(name), f"Tracker {name!r} has no image API; sample images are not logged.")

    def _log_tensorboard(self, samples: list[LoggedSample], global_step: int, tracker: Any) -> None:
        writer = getattr(tracker, "writer", None) or tracker.tracker
        rows = ["| # | prompt | reward | MRC |", "|---|---|---|---|"]
        for i, sample in enumerate(samples):
            writer.add_image(f"{self.tag}/{i}", sample.panel().numpy(), global_step, dataformats="CHW")
            mrc = "" if sample.mrc is None else f"{sample.mrc:.4f}"
            prompt = sample.prompt.replace("|", "\\|")
            rows.append(f"| {i} | {prompt} | {sample.reward:.4f} | {mrc} |")
        writer.add_text(f"{self.tag}/captions", "\n".join(rows), global_step)
        writer.flush()

    def _log_wandb(self, samples: list[LoggedSample], global_step: int, tracker: Any) -> None:
        try:
            import wandb
        except ImportError:
            self._warn_once("wandb", "The tracker is wandb but `wandb` cannot be imported; images are not logged.")
            return
        images = [wandb.Image(to_uint8_hwc(s.panel()), caption=s.caption) for s in samples]
        tracker.log({self.tag: images}, step=global_step)

    def save(self, samples: list[LoggedSample], global_step: int) -> list[Path]:
        """Write the panels as PNGs and their captions as JSON into `save_dir`; return the PNG paths."""
        from PIL import Image

        rank = self.process_index
        if rank is None:
            from accelerate import PartialState

            rank = PartialState().process_index
        stem = f"step_{global_step:06d}_rank{rank}"
        paths, captions = [], []
        for i, sample in enumerate(samples):
            buffer = io.BytesIO()
            Image.fromarray(to_uint8_hwc(sample.panel())).save(buffer, format="PNG")
            paths.append(atomic_write_bytes(self.save_dir / f"{stem}_{i}.png", buffer.getvalue()))
            captions.append(
                {"file": paths[-1].name, "prompt": sample.prompt, "reward": sample.reward, "mrc": sample.mrc}
            )
        atomic_write_json(self.save_dir / f"{stem}.json", captions)
        return paths

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)
