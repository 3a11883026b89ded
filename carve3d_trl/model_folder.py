"""The folder of a trained model, as `Carve3DTrainer.save_pretrained` writes it and `push_to_hub` uploads it: the
weights in the diffusers format, the training config and history, sample images and the model card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .atomic import atomic_directory, atomic_write_json
from .hub import push_folder_to_hub
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
    pipeline_class = type(ddpo_pipeline.sd_pipeline)
    atomic_write_json(folder / CONFIG_NAME, training_config)
    atomic_write_json(folder / HISTORY_NAME, history)
    info = ModelCardInfo(
        base_model=str(getattr(ddpo_pipeline, "pretrained_model", "")),
        pipeline_class=pipeline_class.__name__,  # the diffusers class that loads the LoRA
        pipeline_module="diffusers" if pipeline_class.__module__.startswith("diffusers") else "carve3d_trl.pipelines",
        view_batched=hasattr(ddpo_pipeline, "num_views"),
        repo_id=repo_id,
        prompt_dataset=prompt_dataset,
        training_config={**training_config, "lora_rank": getattr(ddpo_pipeline, "lora_rank", None)},
        history=history,
        samples=save_samples(samples, folder),
    )
    for key, value in (card_overrides or {}).items():
        setattr(info, key, value)
    write_model_card(folder, info)


class ModelFolderMixin:
    """`Carve3DTrainer.save_pretrained` and `push_to_hub`: the trained model's folder, written on the main process and
    uploaded to the Hub (TRL's versions crash). The trainer provides `accelerator`, `config`, `sd_pipeline`, `history`
    and `card_samples`."""

    def save_pretrained(
        self,
        save_directory: str | Path,
        *,
        config: dict | None = None,
        repo_id: str | None = None,
        push_to_hub: bool = False,
        model_card_kwargs: dict[str, Any] | None = None,
        **push_to_hub_kwargs,
    ) -> str | None:
        """Save the trained weights with a model card, atomically, into `save_directory` (TRL's crashes).

        The folder holds `pytorch_lora_weights.safetensors` (diffusers format; the full UNet under `unet/` without
        LoRA), `README.md` rendered from `model_card_template.md`, `carve3d_config.json` (the training config, or
        `config` when given), `training_history.json` (per-epoch reward/KL/MRC), `training_curves.png` and
        `samples/` (the last epoch's grids beside their renders). `model_card_kwargs` override `ModelCardInfo`
        fields (e.g. `license`, `prompt_dataset`). With `push_to_hub`, also uploads it to `repo_id` and returns the
        commit URL.
        """
        save_directory = Path(save_directory)
        if self.accelerator.is_main_process:
            with atomic_directory(save_directory) as tmp:
                write_model_folder(
                    tmp,
                    self.sd_pipeline,
                    training_config=config if config is not None else self.config.to_dict(),
                    history=self.history,
                    samples=self.card_samples,
                    repo_id=repo_id,
                    prompt_dataset=self.config.prompt_dataset or None,
                    card_overrides=model_card_kwargs,
                )
        self.accelerator.wait_for_everyone()
        if push_to_hub:
            if repo_id is None:
                raise ValueError("`push_to_hub=True` needs a `repo_id`.")
            return self._upload(save_directory, repo_id, **push_to_hub_kwargs)
        return None

    def push_to_hub(
        self,
        repo_id: str,
        *,
        config: dict | None = None,
        commit_message: str = "Upload Carve3D LoRA",
        private: bool | None = None,
        token: str | None = None,
        branch: str | None = None,
        create_pr: bool | None = None,
        allow_patterns: list[str] | str | None = None,
        ignore_patterns: list[str] | str | None = None,
        delete_patterns: list[str] | str | None = None,
        model_card_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """Save the model folder under `<logdir>/hub/<repo name>` and upload it to the Hub model repo `repo_id`.

        Transient network errors are retried; when the upload fails for good, `HubUploadError` says where the local
        folder is kept. Returns the commit URL. (`create_pr`, `allow_patterns`, `ignore_patterns` and
        `delete_patterns` are accepted for signature compatibility and not supported.)
        """
        unsupported = dict(create_pr=create_pr, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
        unsupported["delete_patterns"] = delete_patterns
        given = [name for name, value in unsupported.items() if value]
        if given:
            raise ValueError(f"push_to_hub does not support {given}; upload the saved folder yourself for those.")
        folder = Path(self.config.logdir) / "hub" / repo_id.replace("/", "--")
        self.save_pretrained(folder, config=config, repo_id=repo_id, model_card_kwargs=model_card_kwargs)
        return self._upload(
            folder, repo_id, commit_message=commit_message, private=private, token=token, branch=branch
        )

    def _upload(self, folder: Path, repo_id: str, branch: str | None = None, **kwargs) -> str:
        url = ""
        if self.accelerator.is_main_process:
            url = push_folder_to_hub(folder, repo_id, revision=branch, **kwargs)
        self.accelerator.wait_for_everyone()
        return url
