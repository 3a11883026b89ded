"""Curate Carve3D training prompts: keep the candidates on which the base model is least multi-view consistent.

The Carve3D recipe trains on 30 prompts chosen with `curate_low_reward_prompts`: the candidates with the lowest MRC
reward under the base model, i.e. the least consistent ones, where RL has the most to improve (the prompt file was
never released; a third-party account says 30 of ~100 candidates were kept, which is unverified). This script scores
every candidate with `--num_seeds` samples from fixed seeds (the same seeds for every prompt), ranks the prompts by
mean reward and keeps the `--keep` lowest. With the LPIPS or MSE metric MRC is a distance, so these are the prompts
with the *highest* mean MRC; with `psnr` the lowest.

Written to `--output_dir` as a dataset, atomically (the folder is replaced as a whole):

- `train.jsonl`: the kept prompts, least consistent first, columns `prompt`, `mrc_mean`, `mrc_std`;
- `validation.jsonl` (with `--validation_split`): the other candidates, same columns and order;
- `README.md`: a dataset card; `curation.json`: every candidate's scores and the settings.
`datasets` finds the splits from the file names.

The folder loads with `carve3d_trl.load_prompts(folder)` and `datasets.load_dataset(folder)`, so it can be passed as
`--prompt_dataset` to `examples/carve3d_train.py`; `--push_to_hub --hub_dataset_id <user>/<name>` uploads it as a Hub
dataset repo.

    python examples/curate_prompts.py --pretrained_model <multi-view SD model> \
        --prompt_dataset candidates.txt --num_seeds 4 --keep 30 --validation_split \
        --output_dir outputs/carve3d-prompts --push_to_hub --hub_dataset_id <user>/carve3d-prompts

Sampling, scoring and their flags are shared with `examples/evaluate_mrc.py` (both from `carve3d_trl.evaluation`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from huggingface_hub import HfApi
from transformers import HfArgumentParser

from carve3d_trl.atomic import atomic_directory
from carve3d_trl.evaluation import (
    ModelArguments,
    PromptArguments,
    SamplingArguments,
    check_model_source,
    check_sampling_args,
    load_eval_prompts,
    load_pipeline,
    resolve_device,
    score_prompts,
)
from carve3d_trl.hub import push_folder_to_hub, validate_repo_id
from carve3d_trl.pipelines import model_camera_layout
from carve3d_trl.rewards.arguments import MRCArguments, build_mrc_reward, check_mrc_arguments

logger = logging.getLogger("curate_prompts")
EXAMPLE_PROMPTS = Path(__file__).parent / "prompts" / "toy_scenes.txt"
COLUMNS = ("prompt", "mrc_mean", "mrc_std")
CURATION_FILE = "curation.json"


@dataclass
class CurateArguments:
    keep: int = field(default=30, metadata={"help": "Number of prompts kept (the recipe's train_size is 30)."})
    num_seeds: int = field(default=4, metadata={"help": "Samples (fixed seeds) scored per candidate prompt."})
    validation_split: bool = field(
        default=False, metadata={"help": "Write the candidates not kept as a 'validation' split."}
    )
    output_dir: str = field(default="outputs/carve3d-prompts", metadata={"help": "The dataset folder written."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the folder as a Hub dataset repo."})
    hub_dataset_id: str = field(default="", metadata={"help": "Hub dataset repo for --push_to_hub (<user>/<name>)."})
    hub_private: bool = field(default=False, metadata={"help": "Create the Hub dataset repo as private."})
    num_threads: int = field(default=1, metadata={"help": "CPU threads for torch (0: torch's default)."})


@dataclass
class Candidate:
    """A candidate prompt and its scores over the seeds."""

    prompt: str
    mrc: list[float]
    rewards: list[float]

    @property
    def row(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "mrc_mean": float(np.mean(self.mrc)), "mrc_std": float(np.std(self.mrc))}


def check_curate_args(args: CurateArguments) -> None:
    """Raise `ValueError` for settings that cannot work, before anything loads."""
    if args.keep < 1:
        raise ValueError(f"--keep must be >= 1, got {args.keep}.")
    if args.num_seeds < 1:
        raise ValueError(f"--num_seeds must be >= 1, got {args.num_seeds}.")
    if args.push_to_hub:
        if not args.hub_dataset_id:
            raise ValueError("--push_to_hub needs --hub_dataset_id <user>/<name>.")
        validate_repo_id(args.hub_dataset_id)
    output_dir = Path(args.output_dir)
    if output_dir.is_file():
        raise NotADirectoryError(f"--output_dir '{output_dir}' is a file.")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not (output_dir / CURATION_FILE).is_file():
        raise FileExistsError(
            f"--output_dir '{output_dir}' exists and is not a folder written by this script (no {CURATION_FILE}); "
            "it would be replaced as a whole. Choose a new or empty folder."
        )


def rank_candidates(prompts: Sequence[str], mrc: np.ndarray, rewards: np.ndarray) -> list[Candidate]:
    """Candidates sorted by mean reward, lowest (least consistent) first; ties keep the input order."""
    candidates = [Candidate(p, mrc[i].tolist(), rewards[i].tolist()) for i, p in enumerate(prompts)]
    order = np.argsort(rewards.mean(axis=1), kind="stable")
    return [candidates[i] for i in order]


def dataset_card(num_train: int, num_validation: int, settings: dict[str, Any]) -> str:
    """The README.md of the curated dataset: tags and how it was made.

    The card names no `configs`: `datasets` then finds the splits from the file names (`train.jsonl`,
    `validation.jsonl`) and reloads them when they change. With `configs`, `datasets` caches a local folder by its name
    and the file patterns alone, and would serve the old prompts of a folder curated again.
    """
    lines = [
        "---",
        "tags:",
        "- carve3d",
        "- text-to-3d",
        "- prompts",
        "---",
        "",
        "# Carve3D training prompts",
        "",
        f"The {num_train} of {settings['num_candidates']} candidate prompts on which the base model "
        f"`{settings['pretrained_model']}` was least "
        f"multi-view consistent (lowest mean MRC reward over {settings['num_seeds']} samples per prompt from fixed "
        f"seeds, metric `{settings['metric']}`), least consistent first"
        + (f"; the other {num_validation} candidates form the `validation` split." if num_validation else "."),
        "",
        "Columns: `prompt`, `mrc_mean`, `mrc_std` (MRC over the samples of the prompt). Made with carve3d-trl's "
        "`examples/curate_prompts.py`; the settings and every candidate's scores are in `curation.json`.",
        "",
        "```python",
        "from carve3d_trl import load_prompts",
        "",
        'prompts = load_prompts("<this repo or folder>")',
        "```",
        "",
    ]
    return "\n".join(lines)


def write_dataset(
    output_dir: Path, ranked: list[Candidate], keep: int, validation: bool, settings: dict[str, Any]
) -> Path:
    """Write the curated dataset folder atomically (see the module docstring); return its path."""
    kept = ranked[:keep]
    rest = ranked[keep:] if validation else []
    with atomic_directory(output_dir) as tmp:
        (tmp / "train.jsonl").write_text("".join(json.dumps(c.row) + "\n" for c in kept), encoding="utf-8")
        if rest:
            (tmp / "validation.jsonl").write_text("".join(json.dumps(c.row) + "\n" for c in rest), encoding="utf-8")
        (tmp / "README.md").write_text(dataset_card(len(kept), len(rest), settings), encoding="utf-8")
        curation = {
            "settings": settings,
            "kept": len(kept),
            "candidates": [
                {**c.row, "mrc": c.mrc, "rewards": c.rewards, "kept": i < keep} for i, c in enumerate(ranked)
            ],
        }
        (tmp / CURATION_FILE).write_text(json.dumps(curation, indent=2) + "\n", encoding="utf-8")
    return output_dir


def parse_args(argv: Sequence[str] | None = None):
    parser = HfArgumentParser((ModelArguments, PromptArguments, SamplingArguments, MRCArguments, CurateArguments))
    parser.set_defaults(prompt_dataset=str(EXAMPLE_PROMPTS))
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: Sequence[str] | None = None, api: HfApi | None = None) -> list[Candidate]:
    """Score the candidates, write the dataset (and push it); returns the candidates ranked, least consistent first.

    `api` replaces the `HfApi` client of `--push_to_hub` (for tests).
    """
    model_args, prompt_args, sampling, mrc_args, args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    # Every input is checked before any model loads.
    check_sampling_args(sampling)
    check_mrc_arguments(mrc_args)
    check_curate_args(args)
    check_model_source(model_args.pretrained_model)
    prompts = load_eval_prompts(prompt_args)
    if args.keep > len(prompts):
        raise ValueError(f"--keep {args.keep} is more than the {len(prompts)} candidate prompts.")
    seeds = [sampling.seed + i for i in range(args.num_seeds)]

    device = resolve_device(sampling.device)
    cameras = model_camera_layout(model_args.pretrained_model, model_args.pretrained_revision)  # view-batched only
    reward = build_mrc_reward(mrc_args, sampling.seed, device, cameras)
    pipe = load_pipeline(model_args, sampling, device)
    scores = score_prompts(pipe, reward, prompts, seeds, sampling, label="candidates")
    ranked = rank_candidates(prompts, scores.mrc, scores.rewards)

    settings = {
        **asdict(model_args),
        **asdict(prompt_args),
        **asdict(sampling),
        **asdict(mrc_args),
        "metric": reward.metric.name,
        "mrc_higher_is_better": reward.metric.higher_is_better,
        "num_seeds": args.num_seeds,
        "seeds": seeds,
        "keep": args.keep,
        "num_candidates": len(prompts),
    }
    output_dir = write_dataset(Path(args.output_dir), ranked, args.keep, args.validation_split, settings)
    print(f"Kept {args.keep} of {len(prompts)} prompts (least consistent first) in {output_dir}")
    if args.push_to_hub:
        url = push_folder_to_hub(
            output_dir,
            args.hub_dataset_id,
            private=args.hub_private,
            repo_type="dataset",
            api=api,
            commit_message="Upload Carve3D curated prompts",
        )
        print("Pushed:", url)
    return ranked


if __name__ == "__main__":
    main()
