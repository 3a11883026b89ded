"""Writing a trained model folder: UNet weights in the diffusers format and sample images for the model card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .image_logging import LoggedSample

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
SAMPLES_DIR = "samples"


def save_unet_weights(sd_pipeline: Any, output_dir: Path) -> Path:
    """Write the trained UNet weights of a DDPO pipeline into `output_dir`.

    With LoRA: `pytorch_lora_weights.safetensors` in the diffusers format of the pipeline's family
    (`pipe.load_lora_weights(output_dir)` with `StableDiffusionPipeline` or `StableDiffusionXLPipeline`).
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
