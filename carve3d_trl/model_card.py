"""Model card (`README.md`) and training-curve figure for a Carve3D LoRA folder."""

from __future__ import annotations

import io
import json
import logging
import math
import re
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import quote

from huggingface_hub import ModelCard, ModelCardData

from .atomic import atomic_write_bytes, atomic_write_text
from .hub import validate_repo_id
from .kl import KLMode

logger = logging.getLogger(__name__)

TRAINING_CURVES_FILENAME = "training_curves.png"
BASE_TAGS = ("carve3d", "ddpo", "lora", "text-to-image", "multi-view", "diffusers", "trl")

# (label, candidate keys in the training config); the first key present is shown.
_CONFIG_ROWS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("LoRA rank", ("lora_rank", "lora_r", "rank")),
    ("Learning rate", ("train_learning_rate", "learning_rate")),
    ("Epochs", ("num_epochs",)),
    ("Sample batch size (per device)", ("sample_batch_size",)),
    ("Sample batches per epoch", ("sample_num_batches_per_epoch",)),
    ("Train batch size (per device)", ("train_batch_size",)),
    ("Gradient accumulation steps", ("train_gradient_accumulation_steps",)),
    ("Pure on-policy", ("on_policy",)),
    ("Denoising steps", ("sample_num_steps",)),
    ("Guidance scale", ("sample_guidance_scale",)),
    ("DDIM eta", ("sample_eta",)),
    ("PPO clip range", ("train_clip_range",)),
    ("KL penalty", ("kl_penalty",)),
    ("KL in reward", ("kl_in_reward",)),
    ("KL coefficient (normalised, in reward)", ("kl_normalized_coeff",)),
    ("KL beta (in loss)", ("kl_beta",)),
    ("Per-prompt KL normalisation", ("kl_per_prompt_stat_tracking",)),
    ("Reward", ("reward", "reward_fn", "reward_name")),
    ("Reconstructor", ("reconstructor", "reconstruction_model")),
    ("Mixed precision", ("mixed_precision",)),
    ("Seed", ("seed",)),
)
_KL_DETAIL_KEYS = ("kl_in_reward", "kl_normalized_coeff", "kl_beta", "kl_per_prompt_stat_tracking")
# the KL settings a card hides because the run's KL mode does not use them
_UNUSED_KL_KEYS = {
    KLMode.OFF: set(_KL_DETAIL_KEYS),
    KLMode.LOGGED: set(_KL_DETAIL_KEYS),
    KLMode.IN_REWARD: {"kl_beta"},
    KLMode.IN_LOSS: {"kl_normalized_coeff", "kl_per_prompt_stat_tracking"},
}
# (panel title, mean key, std key) of the training-curve figure; (label, key) of the first/last epoch table.
_CURVES: tuple[tuple[str, str, str | None], ...] = (
    ("Reward", "reward_mean", "reward_std"),
    ("KL to the base model", "kl_mean", None),
    ("MRC", "mrc_mean", None),
)
_METRICS = (
    ("Reward mean", "reward_mean"),
    ("Reward std", "reward_std"),
    ("KL mean", "kl_mean"),
    ("MRC mean", "mrc_mean"),
)


@dataclass
class ModelCardInfo:
    """What the model card of a trained Carve3D LoRA says.

    Attributes:
        base_model (`str`): Hub id (or local path) of the multi-view diffusion model the LoRA applies to.
        repo_id (`str`, *optional*): Hub repo the card is for; used in the loading snippet and the title.
        prompt_dataset (`str`, *optional*): Hub dataset id or local file of the training prompts.
        license (`str`, *optional*, defaults to `"apache-2.0"`): License of the adapter; the base model's license
            also applies and may be stricter.
        training_config (`dict`, *optional*): Training settings, e.g. `Carve3DConfig(...).to_dict()`.
        history (`list[dict]`, *optional*): One dict per epoch with any of `epoch`, `reward_mean`, `reward_std`,
            `kl_mean`, `mrc_mean`.
        samples (`list[dict]`, *optional*): Dicts with `prompt`, `image` (path of the generated grid PNG relative to
            the card), optional `render` (path of the reconstruction renders PNG) and optional `mrc` (float).
        extra_tags (`list[str]`, *optional*): Hub tags added to [`BASE_TAGS`].
        pipeline_class (`str`, *optional*, defaults to `"StableDiffusionPipeline"`): The diffusers pipeline class that
            loads the base model and the LoRA in the usage snippet.
        pipeline_module (`str`, *optional*, defaults to `"diffusers"`): Where the snippet imports it from
            (`"carve3d_trl.pipelines"` for [`MultiViewDiffusionPipeline`]).
        view_batched (`bool`, *optional*, defaults to `False`): The model emits views `(V, 3, H, W)` rather than one
            grid image (the snippet saves them tiled).
        mrc_higher_is_better (`bool`, *optional*): The MRC metric's direction (PSNR: higher is better; LPIPS, MSE:
            lower), for the MRC curve's title; read from the history (reward = +MRC or -MRC) when not given.
    """

    base_model: str
    repo_id: str | None = None
    prompt_dataset: str | None = None
    license: str = "apache-2.0"
    training_config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    extra_tags: list[str] = field(default_factory=list)
    pipeline_class: str = "StableDiffusionPipeline"
    pipeline_module: str = "diffusers"
    view_batched: bool = False
    mrc_higher_is_better: bool | None = None


def _hub_id(name: str | None) -> str | None:
    """`name` when it can be a Hub repo id rather than a local path (the Hub rejects paths in metadata)."""
    if not name or Path(name).exists():
        return None
    try:
        validate_repo_id(name)
    except ValueError:
        return None
    return name


def _format(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _config_rows(config: dict[str, Any]) -> list[tuple[str, str]]:
    hidden = _UNUSED_KL_KEYS[KLMode.from_config(config)]
    rows = []
    for label, keys in _CONFIG_ROWS:
        key = next((k for k in keys if k in config and k not in hidden), None)
        if key is not None:
            rows.append((label, _format(config[key])))
    return rows


def _points(history: list[dict[str, Any]], *keys: str) -> list[tuple[float, ...]]:
    """`(epoch, value of each key)` for the epochs where every key has a value (epoch defaults to the index)."""
    return [
        (float(entry.get("epoch", i)), *(float(entry[key]) for key in keys))
        for i, entry in enumerate(history)
        if all(entry.get(key) is not None for key in keys)
    ]


def _has_curves(history: list[dict[str, Any]]) -> bool:
    return any(_points(history, key) for _, key, _ in _CURVES)


def mrc_direction(history: list[dict[str, Any]], higher_is_better: bool | None = None) -> bool | None:
    """Whether a higher MRC is better: `higher_is_better` when given, else read from the history (MRC rewards are
    +MRC for PSNR, -MRC for LPIPS and MSE); `None` when the history does not tell."""
    if higher_is_better is not None:
        return higher_is_better
    pairs = [(reward, mrc) for _, reward, mrc in _points(history, "reward_mean", "mrc_mean")]
    for sign, direction in ((1.0, True), (-1.0, False)):
        if pairs and all(math.isclose(reward, sign * mrc, rel_tol=1e-4, abs_tol=1e-8) for reward, mrc in pairs):
            return direction
    return None


def curve_titles(history: list[dict[str, Any]], mrc_higher_is_better: bool | None = None) -> dict[str, str]:
    """The title of each training-curve panel by its key; the MRC panel names the metric's direction."""
    titles = {key: title for title, key, _ in _CURVES}
    direction = mrc_direction(history, mrc_higher_is_better)
    if direction is not None:
        titles["mrc_mean"] += f" ({'higher' if direction else 'lower'} is better)"
    return titles


def save_training_curves(
    history: list[dict[str, Any]], path: str | Path, mrc_higher_is_better: bool | None = None
) -> Path | None:
    """Plot reward mean ± std, KL mean and MRC mean per epoch into a PNG at `path` (written atomically).

    Returns the path, or None (writing nothing) when `history` holds none of those metrics. The MRC panel's title
    says the metric's direction ([`mrc_direction`]).
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state
    from matplotlib.ticker import MaxNLocator

    titles = curve_titles(history, mrc_higher_is_better)
    panels = [(titles[key], key, std_key) for _, key, std_key in _CURVES if _points(history, key)]
    if not panels:
        return None
    fig = Figure(figsize=(4.5 * len(panels), 3.5), layout="constrained")
    for ax, (title, key, std_key) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        epochs, means = zip(*_points(history, key))
        ax.plot(epochs, means, marker="o" if len(epochs) <= 30 else None, label="mean")
        if std_key and (band := _points(history, key, std_key)):
            xs, ms, ss = zip(*band)
            lower, upper = [m - s for m, s in zip(ms, ss)], [m + s for m, s in zip(ms, ss)]
            ax.fill_between(xs, lower, upper, alpha=0.25, label="± std")
            ax.legend(loc="best")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return atomic_write_bytes(path, buffer.getvalue())


def _metric_rows(history: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [
        (label, _format(history[0].get(key)), _format(history[-1].get(key)))
        for label, key in _METRICS
        if _points(history, key)
    ]


def _sample_rows(samples: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [
        {
            "prompt": _format(sample["prompt"]),
            "image": quote(str(sample["image"])),
            "render": quote(str(sample["render"])) if sample.get("render") else "",
            "mrc": _format(None if sample.get("mrc") is None else float(sample["mrc"])),
        }
        for sample in samples
    ]


def render_model_card(info: ModelCardInfo) -> str:
    """Render the model card (YAML metadata and markdown body) from `model_card_template.md`.

    The body links `training_curves.png` when `info.history` holds reward, KL or MRC values; write the figure
    with [`save_training_curves`] (or use [`write_model_card`], which does both).
    """
    base_hub_id = _hub_id(info.base_model)
    dataset_hub_id = _hub_id(info.prompt_dataset)
    card_data = ModelCardData(
        base_model=base_hub_id,
        library_name="diffusers",
        license=info.license,
        tags=list(dict.fromkeys([*BASE_TAGS, *info.extra_tags])),
        datasets=[dataset_hub_id] if dataset_hub_id else None,
        pipeline_tag="text-to-image",
    )
    config = info.training_config
    visible_config = {k: v for k, v in config.items() if "token" not in k.lower()}
    has_curves = _has_curves(info.history)
    template = (files("carve3d_trl") / "model_card_template.md").read_text(encoding="utf-8")
    card = ModelCard.from_template(
        card_data,
        template_str=template,
        title=info.repo_id.split("/")[-1] if info.repo_id else "Carve3D LoRA",
        base_model=info.base_model,
        pipeline_class=info.pipeline_class,
        pipeline_module=info.pipeline_module,
        view_batched=info.view_batched,
        base_model_link=(
            f"[{base_hub_id}](https://huggingface.co/{base_hub_id})" if base_hub_id else f"`{info.base_model}`"
        ),
        lora_source=info.repo_id or "path/to/this/folder",
        num_inference_steps=config.get("sample_num_steps", 50),
        guidance_scale=config.get("sample_guidance_scale", 7.5),
        prompt_dataset=info.prompt_dataset,
        config_rows=_config_rows(config),
        config_json=json.dumps(visible_config, indent=2, sort_keys=True, default=str) if visible_config else "",
        curves_file=TRAINING_CURVES_FILENAME if has_curves else None,
        first_epoch=info.history[0].get("epoch", 0) if has_curves else None,
        last_epoch=info.history[-1].get("epoch", len(info.history) - 1) if has_curves else None,
        metric_rows=_metric_rows(info.history) if has_curves else [],
        samples=_sample_rows(info.samples),
    )
    return re.sub(r"\n{3,}", "\n\n", str(card))  # drop the blank lines left by the template's skipped blocks


def write_model_card(folder: str | Path, info: ModelCardInfo) -> Path:
    """Write `README.md` and, when there is a history, `training_curves.png` into `folder`; return the card path.

    Both files are written atomically. Sample images are not copied: their paths must exist relative to `folder`
    (a warning names the missing ones).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_training_curves(info.history, folder / TRAINING_CURVES_FILENAME, info.mrc_higher_is_better)
    for sample in info.samples:
        for key in ("image", "render"):
            if sample.get(key) and not (folder / sample[key]).is_file():
                logger.warning("Model card sample %s %s not found in %s", key, sample[key], folder)
    return atomic_write_text(folder / "README.md", render_model_card(info))
