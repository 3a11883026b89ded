"""Evaluate a Carve3D LoRA: MRC of the base model vs the fine-tuned model on validation prompts, from the same noise.

Every prompt is sampled with `--num_seeds` seeds; seed `s` fixes the initial latent and the DDIM noise of every step,
identically for the base and the fine-tuned model (the LoRA is loaded into the same pipeline after the base samples),
so the two models differ only by their weights. Both are scored with the same `MRCReward`. Written to `--output_dir`
(each file atomically):

- `metrics.json`: MRC mean and std per model (over all prompts and seeds), the fraction of samples the fine-tuned
  model made more consistent, and the settings;
- `per_prompt.csv`, `per_prompt.json`: one row per prompt and seed: `prompt`, `seed`, `mrc_base`, `mrc_finetuned`;
- `comparison.png`: for the first `--num_figure_prompts` prompts (first seed), the views beside the renders of their
  reconstruction, base and fine-tuned.

With the LPIPS metric MRC is a distance (lower: more consistent); with `psnr` it is higher for more consistent views.

    python examples/evaluate_mrc.py --lora outputs/tiny-carve3d/lora --prompt_dataset examples/prompts/toy_scenes.txt \
        --num_seeds 2 --num_inference_steps 10 --output_dir outputs/tiny-carve3d/eval

`examples/curate_prompts.py` reuses this file's argument groups and its sampling and scoring functions.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import HfArgumentParser

from carve3d_trl import load_prompts
from carve3d_trl.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from carve3d_trl.families import FAMILIES, resolve_family
from carve3d_trl.hub import validate_repo_id
from carve3d_trl.image_logging import tile_renders_like
from carve3d_trl.pipelines import LORA_WEIGHT_NAME
from carve3d_trl.rewards import MRCReward
from carve3d_trl.rewards.arguments import MRCArguments, build_mrc_reward, check_mrc_arguments
from carve3d_trl.toy import toy_model_path

logger = logging.getLogger("evaluate_mrc")
EXAMPLE_PROMPTS = Path(__file__).parent / "prompts" / "toy_scenes.txt"
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ModelArguments:
    pretrained_model: str = field(
        default="",
        metadata={"help": "Base multi-view model: Hub model id or local diffusers folder. Empty: the toy model."},
    )
    pretrained_revision: str = field(default="main", metadata={"help": "Revision of a Hub base model."})
    pipeline_family: str = field(
        default="auto",
        metadata={"help": "Model family: 'sd' (Stable Diffusion 1.x/2.x), 'sdxl', or 'auto' (read model_index.json)."},
    )

    def __post_init__(self):
        if not self.pretrained_model:
            self.pretrained_model = str(toy_model_path("short"))
        if self.pipeline_family not in FAMILIES:
            raise ValueError(f"--pipeline_family must be one of {FAMILIES}, got {self.pipeline_family!r}.")


@dataclass
class PromptArguments:
    prompt_dataset: str = field(
        default=str(EXAMPLE_PROMPTS),
        metadata={"help": "Hub dataset id, or a local txt/json/jsonl/csv/parquet file or dataset folder."},
    )
    prompt_split: str = field(default="train", metadata={"help": "Split to read (a single file has only 'train')."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompts."})
    prompt_revision: str | None = field(default=None, metadata={"help": "Revision of a Hub prompt dataset."})
    num_prompts: int = field(default=0, metadata={"help": "Use only the first N prompts (0: all)."})


@dataclass
class SamplingArguments:
    num_inference_steps: int = field(default=50, metadata={"help": "DDIM sampling steps."})
    guidance_scale: float = field(default=5.0, metadata={"help": "Classifier-free guidance scale (the recipe's 5)."})
    eta: float = field(default=1.0, metadata={"help": "DDIM eta (1.0 as in DDPO sampling; 0: deterministic DDIM)."})
    seed: int = field(default=0, metadata={"help": "First seed; the seeds are seed, seed+1, ..."})
    batch_size: int = field(default=4, metadata={"help": "Images sampled and scored per batch."})
    mixed_precision: str = field(default="no", metadata={"help": "Pipeline precision: no (fp32), fp16 or bf16."})
    device: str = field(default="", metadata={"help": "Device (e.g. cuda, cuda:1, cpu). Empty: cuda if available."})


@dataclass
class EvalArguments:
    lora: str = field(
        metadata={"help": f"Fine-tuned LoRA: a local folder holding {LORA_WEIGHT_NAME}, or a Hub model repo id."}
    )
    lora_revision: str | None = field(default=None, metadata={"help": "Revision of a Hub LoRA repo."})
    num_seeds: int = field(default=4, metadata={"help": "Samples (seeds) per prompt, the same for both models."})
    num_figure_prompts: int = field(default=4, metadata={"help": "Prompts shown in comparison.png (0: no figure)."})
    output_dir: str = field(default="outputs/evaluate_mrc", metadata={"help": "Where the results are written."})
    num_threads: int = field(default=1, metadata={"help": "CPU threads for torch (0: torch's default)."})


@dataclass
class Scores:
    """MRC and reward of each (prompt, seed) sample, and the images of the samples kept for a figure."""

    mrc: np.ndarray  # (num_prompts, num_seeds)
    rewards: np.ndarray  # (num_prompts, num_seeds)
    kept: dict[tuple[int, int], dict[str, torch.Tensor]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- input validation


def check_sampling_args(sampling: SamplingArguments) -> None:
    """Raise `ValueError` for sampling settings that cannot work."""
    if sampling.num_inference_steps < 1:
        raise ValueError(f"--num_inference_steps must be >= 1, got {sampling.num_inference_steps}.")
    if sampling.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {sampling.batch_size}.")
    if sampling.mixed_precision not in DTYPES:
        raise ValueError(f"--mixed_precision must be one of {', '.join(DTYPES)}, got '{sampling.mixed_precision}'.")


def check_model_source(source: str, what: str = "--pretrained_model") -> None:
    """A local folder must hold `model_index.json`; anything else must look like a Hub repo id."""
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(
                f"{what} '{source}' is a local path without model_index.json (not a diffusers model)."
            )
        return
    if source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{what} '{source}' does not exist.")
    validate_repo_id(source)


def resolve_lora(source: str, revision: str | None = None) -> Path:
    """The local path of the LoRA's `pytorch_lora_weights.safetensors`, downloading it from the Hub if needed.

    `source` is a local folder holding the file, the file itself, or a Hub model repo id. Run before any model loads
    so that a wrong LoRA fails at once.
    """
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"--lora '{source}' is a file but not a .safetensors LoRA.")
        return path
    if path.is_dir():
        weights = path / LORA_WEIGHT_NAME
        if not weights.is_file():
            found = sorted(p.name for p in path.iterdir())[:10]
            raise FileNotFoundError(
                f"--lora folder '{source}' has no {LORA_WEIGHT_NAME} (it holds {found}). Point --lora at the folder "
                "written by `Carve3DTrainer.save_pretrained` (e.g. outputs/<run>/lora)."
            )
        return weights
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise FileNotFoundError(f"--lora '{source}' does not exist (and is not a Hub repo id).")
    validate_repo_id(source)
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(source, LORA_WEIGHT_NAME, revision=revision))
    except Exception as error:
        raise FileNotFoundError(
            f"--lora '{source}' is not a local folder, and {LORA_WEIGHT_NAME} could not be fetched from the Hub repo "
            f"'{source}' ({type(error).__name__}: {error})."
        ) from error


def load_eval_prompts(args: PromptArguments) -> list[str]:
    """The prompts named by the prompt arguments (`carve3d_trl.load_prompts`)."""
    if args.num_prompts < 0:
        raise ValueError(f"--num_prompts must be >= 0, got {args.num_prompts}.")
    return load_prompts(
        args.prompt_dataset,
        split=args.prompt_split,
        column=args.prompt_column,
        revision=args.prompt_revision,
        limit=args.num_prompts,
    )


# ---------------------------------------------------------------------------------------------- models


def resolve_device(name: str) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_pipeline(model: ModelArguments, sampling: SamplingArguments, device: torch.device):
    """A diffusers `StableDiffusionPipeline` (without a safety checker) or `StableDiffusionXLPipeline`, by the
    model's family, with a DDIM scheduler, on `device`."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    if resolve_family(model.pretrained_model, model.pipeline_family, model.pretrained_revision) == "sdxl":
        pipeline_class, extra = StableDiffusionXLPipeline, {}
    else:
        pipeline_class, extra = StableDiffusionPipeline, {"safety_checker": None, "requires_safety_checker": False}
    dtype = DTYPES[sampling.mixed_precision]
    pipe = pipeline_class.from_pretrained(
        model.pretrained_model, revision=model.pretrained_revision, torch_dtype=dtype, **extra
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


# ---------------------------------------------------------------------------------------------- sampling and scoring


def seeded_noise(pipe, seed: int) -> tuple[torch.Tensor, torch.Generator]:
    """The initial latent `(C, h, w)` of `seed` and the CPU generator, advanced past it, for the DDIM step noise.

    Both depend on the seed only (not on the prompt, the batch or the device), so the same seed gives the same
    noise to every prompt and to both models.
    """
    height, width = latent_size(pipe)
    generator = torch.Generator("cpu").manual_seed(seed)
    latent = torch.randn((pipe.unet.config.in_channels, height, width), generator=generator, dtype=torch.float32)
    return latent, generator


def latent_size(pipe) -> tuple[int, int]:
    """The UNet's native latent `(height, width)` (its `sample_size`, an int or a pair)."""
    size = pipe.unet.config.sample_size
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


@torch.no_grad()
def sample_images(pipe, prompts: Sequence[str], seeds: Sequence[int], sampling: SamplingArguments) -> torch.Tensor:
    """Grid images `(B, 3, H, W)` in [0, 1] (float32, CPU), one per `(prompt, seed)` pair."""
    noise = [seeded_noise(pipe, seed) for seed in seeds]
    latents = torch.stack([latent for latent, _ in noise]).to(pipe.device, pipe.unet.dtype)
    height, width = latent_size(pipe)
    output = pipe(
        list(prompts),
        height=height * pipe.vae_scale_factor,
        width=width * pipe.vae_scale_factor,
        num_inference_steps=sampling.num_inference_steps,
        guidance_scale=sampling.guidance_scale,
        eta=sampling.eta,
        latents=latents,
        generator=[generator for _, generator in noise],
        output_type="pt",
    )
    return output.images.float().cpu().clamp(0, 1)


def score_prompts(
    pipe,
    reward: MRCReward,
    prompts: Sequence[str],
    seeds: Sequence[int],
    sampling: SamplingArguments,
    keep: set[tuple[int, int]] = frozenset(),
    label: str = "model",
) -> Scores:
    """Sample every `(prompt, seed)` pair in batches of `sampling.batch_size` and score it with `reward`.

    Pairs are visited in the same order and batches for every model, so the reward's own randomness (e.g. the
    radiance field's initialisation) is matched too. The images, renders and MRC of the `(prompt index, seed index)`
    pairs in `keep` are returned in `Scores.kept`.
    """
    pairs = [(p, s) for p in range(len(prompts)) for s in range(len(seeds))]
    scores = Scores(np.full((len(prompts), len(seeds)), np.nan), np.full((len(prompts), len(seeds)), np.nan))
    for start in range(0, len(pairs), sampling.batch_size):
        batch = pairs[start : start + sampling.batch_size]
        batch_prompts = [prompts[p] for p, _ in batch]
        images = sample_images(pipe, batch_prompts, [seeds[s] for _, s in batch], sampling)
        rewards, metadata = reward(images, batch_prompts, [{} for _ in batch])
        for i, (p, s) in enumerate(batch):
            scores.mrc[p, s] = float(metadata["mrc"][i])
            scores.rewards[p, s] = float(rewards[i])
            if (p, s) in keep:
                scores.kept[p, s] = {"image": images[i], "renders": metadata["renders"][i], "mrc": scores.mrc[p, s]}
        logger.info("%s: scored %d/%d samples", label, start + len(batch), len(pairs))
    return scores


# ---------------------------------------------------------------------------------------------- outputs


def summarize(mrc: np.ndarray) -> dict[str, float]:
    """Mean and (population) standard deviation of the MRC values, ignoring NaN."""
    return {"mrc_mean": float(np.nanmean(mrc)), "mrc_std": float(np.nanstd(mrc))}


def per_prompt_rows(prompts: Sequence[str], seeds: Sequence[int], base: Scores, tuned: Scores) -> list[dict]:
    return [
        {"prompt": prompt, "seed": seed, "mrc_base": float(base.mrc[p, s]), "mrc_finetuned": float(tuned.mrc[p, s])}
        for p, prompt in enumerate(prompts)
        for s, seed in enumerate(seeds)
    ]


def write_rows(output_dir: Path, rows: list[dict]) -> None:
    """`per_prompt.csv` and `per_prompt.json`, atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["prompt", "seed", "mrc_base", "mrc_finetuned"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(output_dir / "per_prompt.csv", buffer.getvalue())
    atomic_write_json(output_dir / "per_prompt.json", rows)


def comparison_figure(
    prompts: Sequence[str], base: Scores, tuned: Scores, reward: MRCReward, metric: str, num_prompts: int
) -> bytes:
    """PNG bytes: one row per prompt (first seed): base views, base renders, fine-tuned views, fine-tuned renders."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layout = reward.layout
    rows = min(num_prompts, len(prompts))
    figure = Figure(figsize=(12, 3.2 * rows))
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, 4, squeeze=False)
    for p in range(rows):
        for column, (name, scores) in enumerate((("base", base), ("fine-tuned", tuned))):
            sample = scores.kept[p, 0]
            image = sample["image"]
            renders = tile_renders_like(
                sample["renders"], image.shape[1], image.shape[2], (layout.rows, layout.cols), layout.background
            )
            for offset, (picture, title) in enumerate(((image, f"{name} views"), (renders, f"{name} renders"))):
                axis = axes[p, 2 * column + offset]
                axis.imshow(picture.permute(1, 2, 0).numpy(), interpolation="nearest")
                axis.set_xticks([])
                axis.set_yticks([])
                axis.set_title(f"{title}, MRC ({metric}) {sample['mrc']:.4f}" if offset else title, fontsize=9)
        axes[p, 0].set_ylabel(_wrap(prompts[p], 28), fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])


def metrics_summary(base: Scores, tuned: Scores, reward: MRCReward, settings: dict[str, Any]) -> dict[str, Any]:
    higher_is_better = reward.metric.higher_is_better
    valid = ~(np.isnan(base.rewards) | np.isnan(tuned.rewards))
    improved = (tuned.rewards > base.rewards)[valid]
    return {
        "metric": reward.metric.name,
        "mrc_higher_is_better": higher_is_better,
        "num_prompts": int(base.mrc.shape[0]),
        "num_seeds": int(base.mrc.shape[1]),
        "base": summarize(base.mrc),
        "finetuned": summarize(tuned.mrc),
        "finetuned_more_consistent_fraction": float(improved.mean()) if improved.size else math.nan,
        "settings": settings,
    }


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None):
    parser = HfArgumentParser((ModelArguments, PromptArguments, SamplingArguments, MRCArguments, EvalArguments))
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the evaluation; returns the content of `metrics.json`."""
    model_args, prompt_args, sampling, mrc_args, eval_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if eval_args.num_threads:
        torch.set_num_threads(eval_args.num_threads)
    # Every input is checked before any model loads.
    check_sampling_args(sampling)
    check_mrc_arguments(mrc_args)
    if eval_args.num_seeds < 1:
        raise ValueError(f"--num_seeds must be >= 1, got {eval_args.num_seeds}.")
    check_model_source(model_args.pretrained_model)
    lora_weights = resolve_lora(eval_args.lora, eval_args.lora_revision)
    prompts = load_eval_prompts(prompt_args)
    seeds = [sampling.seed + i for i in range(eval_args.num_seeds)]
    output_dir = Path(eval_args.output_dir)

    device = resolve_device(sampling.device)
    reward = build_mrc_reward(mrc_args, sampling.seed, device)
    pipe = load_pipeline(model_args, sampling, device)
    keep = {(p, 0) for p in range(min(eval_args.num_figure_prompts, len(prompts)))}
    base = score_prompts(pipe, reward, prompts, seeds, sampling, keep, label="base")
    pipe.load_lora_weights(str(lora_weights.parent), weight_name=lora_weights.name)
    tuned = score_prompts(pipe, reward, prompts, seeds, sampling, keep, label="fine-tuned")

    settings = {
        **asdict(model_args),
        **asdict(prompt_args),
        **asdict(sampling),
        **asdict(mrc_args),
        "lora": eval_args.lora,
        "lora_revision": eval_args.lora_revision,
        "seeds": seeds,
        "device": str(device),
    }
    summary = metrics_summary(base, tuned, reward, settings)
    write_rows(output_dir, per_prompt_rows(prompts, seeds, base, tuned))
    if keep:
        figure = comparison_figure(prompts, base, tuned, reward, reward.metric.name, len(keep))
        atomic_write_bytes(output_dir / "comparison.png", figure)
    atomic_write_json(output_dir / "metrics.json", summary)
    better = "higher" if summary["mrc_higher_is_better"] else "lower"
    print(
        f"MRC ({summary['metric']}, {better} is more consistent) over {len(prompts)} prompts x {len(seeds)} seeds: "
        f"base {summary['base']['mrc_mean']:.4f} ± {summary['base']['mrc_std']:.4f}, "
        f"fine-tuned {summary['finetuned']['mrc_mean']:.4f} ± {summary['finetuned']['mrc_std']:.4f}. "
        f"Results: {output_dir}"
    )
    return summary


if __name__ == "__main__":
    main()
