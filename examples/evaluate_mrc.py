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

The argument groups, the checks, the sampling (the library's DDIM loop) and the scoring live in
`carve3d_trl.evaluation`, shared with `examples/curate_prompts.py`.
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

from carve3d_trl.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from carve3d_trl.evaluation import (
    ModelArguments,
    PromptArguments,
    SamplingArguments,
    Scores,
    check_model_source,
    check_sampling_args,
    load_eval_prompts,
    load_pipeline,
    resolve_device,
    resolve_lora,
    score_prompts,
)
from carve3d_trl.image_logging import tile_renders_like
from carve3d_trl.pipelines import LORA_WEIGHT_NAME, model_camera_layout
from carve3d_trl.rewards import MRCReward
from carve3d_trl.rewards.arguments import MRCArguments, build_mrc_reward, check_mrc_arguments

logger = logging.getLogger("evaluate_mrc")
EXAMPLE_PROMPTS = Path(__file__).parent / "prompts" / "toy_scenes.txt"


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
    parser.set_defaults(prompt_dataset=str(EXAMPLE_PROMPTS))
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
    cameras = model_camera_layout(model_args.pretrained_model, model_args.pretrained_revision)  # view-batched only
    reward = build_mrc_reward(mrc_args, sampling.seed, device, cameras)
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
