"""The folder of a trained model, as `Carve3DTrainer.save_pretrained` writes it and `push_to_hub` uploads it: the
weights in the diffusers format, the training config and history, sample images and the model card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .atomic import atomic_write_json
from .image_logging import LoggedSample
from .model_card import ModelCardInfo, write_model_card
from .pipelines import save_unet_weights

CONFIG_NAME = "carve3d_config.json"
HISTORY_NAME = "training_history.json"
SAMPLES_DIR = "samples"


def save_samples(samples: list[LoggedSample], output_dir: Path) -> list[dict[str, Any]]:
    """Write sample grids, and the renders of their reconstructions when present, as PNGs under `samples/`.

    Returns:
        The model card's sample rows: `prompt`, `image` and `render` (paths relative to `output_dir`), `mrc`.
    """
    from torchvision.utils import save_image

    (output_dir / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)
    rows = []
    for i, sample in enumerate(samples):
        row: dict[str, Any] = {"prompt": sample.prompt, "image": f"{SAMPLES_DIR}/sample_{i}.png"}
        save_image(sample.image, output_dir / row["image"])
        if sample.renders is not None:
            row["render"] = f"{SAMPLES_DIR}/sample_{i}_renders.png"
            save_image(sample.renders, output_dir / row["render"])
        if sample.mrc is not None:
            row["mrc"] = sample.mrc
        rows.append(row)
    return rows


def write_model_folder(
    folder: Path,
    ddpo_pipeline: Any,
    *,
    training_config: dict[str, Any],
    history: list[dict[str, Any]],
    samples: list[LoggedSample],
    repo_id: str | None = None,
    prompt_dataset: str | None = None,
    card_overrides: dict[str, Any] | None = None,
) -> None:
    """Write a trained model's folder (write it inside [`~carve3d_trl.atomic.atomic_directory`] to be crash-safe).

    Args:
        folder (`Path`): The folder to fill.
        ddpo_pipeline: The trained DDPO pipeline (its LoRA or UNet, its base model, its diffusers class).
        training_config (`dict`): Written as `carve3d_config.json` and summarised in the card.
        history (`list[dict]`): Per-epoch statistics, written as `training_history.json` and plotted in the card.
        samples (`list[LoggedSample]`): The last epoch's samples shown in the card (`samples/`).
        repo_id (`str`, *optional*): The Hub repo the card is for.
        prompt_dataset (`str`, *optional*): The training prompts' dataset, named in the card.
        card_overrides (`dict`, *optional*): [`ModelCardInfo`] fields to override (e.g. `license`).
    """
    save_unet_weights(ddpo_pipeline, folder)
    atomic_write_json(folder / CONFIG_NAME, training_config)
    atomic_write_json(folder / HISTORY_NAME, history)
    info = ModelCardInfo(
        base_model=str(getattr(ddpo_pipeline, "pretrained_model", "")),
        pipeline_class=type(ddpo_pipeline.sd_pipeline).__name__,  # the diffusers class that loads the LoRA
        repo_id=repo_id,
        prompt_dataset=prompt_dataset,
        training_config={**training_config, "lora_rank": getattr(ddpo_pipeline, "lora_rank", None)},
        history=history,
        samples=save_samples(samples, folder),
    )
    for key, value in (card_overrides or {}).items():
        setattr(info, key, value)
    write_model_card(folder, info)
