"""Writing a trained model folder: UNet weights in the diffusers format and sample images for the model card."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from .pipelines import LORA_WEIGHT_NAME

SAMPLES_DIR = "samples"


def save_unet_weights(sd_pipeline: Any, output_dir: Path) -> Path:
    """Write the trained UNet weights of a DDPO pipeline into `output_dir`.

    With LoRA: `pytorch_lora_weights.safetensors` in the diffusers format (`pipe.load_lora_weights(output_dir)`).
    Without: the full UNet as a diffusers `unet/` subfolder.
    """
    if getattr(sd_pipeline, "use_lora", False):
        from peft.utils import get_peft_model_state_dict
        from trl.models.sd_utils import convert_state_dict_to_diffusers

        state = convert_state_dict_to_diffusers(get_peft_model_state_dict(sd_pipeline.unet))
        type(sd_pipeline.sd_pipeline).save_lora_weights(
            save_directory=str(output_dir), unet_lora_layers=state, weight_name=LORA_WEIGHT_NAME
        )
        return output_dir / LORA_WEIGHT_NAME
    sd_pipeline.unet.save_pretrained(output_dir / "unet")
    return output_dir / "unet"


def tile_renders(renders: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Tile per-view renders `(V, 3, h, w)` row-major into the layout of their `(3, height, width)` grid image.

    Renders may be smaller than the views (reconstructors render at their own resolution); they are resized to the
    view size. The grid's rows follow from `rows * cols = V` and `(rows * h) / (cols * w) = height / width`.
    """
    views, channels, h, w = renders.shape
    rows = round(math.sqrt(views * height * w / (width * h)))
    cols = views // max(rows, 1)
    if rows < 1 or rows * cols != views or height % rows or width % cols:
        raise ValueError(f"{views} renders of {h}x{w} do not tile a {height}x{width} grid.")
    renders = torch.nn.functional.interpolate(renders, size=(height // rows, width // cols), mode="bilinear")
    view_h, view_w = renders.shape[-2:]
    return (
        renders.reshape(rows, cols, channels, view_h, view_w).permute(2, 0, 3, 1, 4).reshape(channels, height, width)
    )


def save_samples(samples: list[dict[str, Any]], output_dir: Path) -> list[dict[str, Any]]:
    """Write sample grids (and the renders of their reconstructions, when present) as PNGs under `samples/`.

    Args:
        samples: dicts with `prompt` (str), `image` `(3, H, W)` in [0, 1], and optionally `renders`
            `(V, 3, h, w)`, `reward` and `mrc` (floats).

    Returns:
        The model card's sample rows: `prompt`, `image` and `render` (paths relative to `output_dir`), `mrc`.
    """
    from torchvision.utils import save_image

    (output_dir / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)
    rows = []
    for i, sample in enumerate(samples):
        image = sample["image"].float().clamp(0, 1)
        row = {"prompt": sample["prompt"], "image": f"{SAMPLES_DIR}/sample_{i}.png"}
        save_image(image, output_dir / row["image"])
        if sample.get("renders") is not None:
            row["render"] = f"{SAMPLES_DIR}/sample_{i}_renders.png"
            grid = tile_renders(sample["renders"].float().clamp(0, 1).cpu(), image.shape[1], image.shape[2])
            save_image(grid, output_dir / row["render"])
        if sample.get("mrc") is not None:
            row["mrc"] = float(sample["mrc"])
        rows.append(row)
    return rows
