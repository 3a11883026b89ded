"""Miniature replication of Carve3D's claims (issue 7) with the toy model, on CPU.

1. RL fine-tuning of the short-SFT toy model with the MRC reward improves validation MRC over the base model.
2. With the KL penalty, the KL to the base model is lower than without it, at a comparable MRC gain.
3. Against the longer-SFT checkpoint: MRC, and diversity (mean pairwise pixel distance between the samples of one
   prompt), i.e. the distribution-shift trade-off.

`--family grid` (default) uses the grid toy; `--family view_batched` the view-batched toy (4 views at its own cameras,
which MRC reconstructs from); `--short_model` and `--long_model` replace the shipped checkpoints of that family by
others of it (e.g. a retrained toy). Two `Carve3DTrainer` runs fine-tune LoRA adapters of the short checkpoint on
`--train_prompts` captions with `MRCReward` (`--reconstructor`: the radiance field of the recorded runs, default
`held_out` protocol, fitted at 16 px with 50 steps to fit the CPU budget, or the library's default, the visual hull;
`--reconstructor_kwargs`; the same reward scores the evaluation, a stronger radiance field rescores it): one with
the KL penalty (the recipe's in-reward KL, `--kl_coeff`), one without (`kl_penalty=False`, the
KL still logged). Then five sources are evaluated on `--val_prompts` other captions x `--eval_seeds` seeds, each
(prompt, seed) starting from the same noise: the renders of the scenes themselves (data), the short-SFT base, both RL
models and the long-SFT checkpoint. Per sample: MRC, and the KL to the base model (mean over the DDIM steps of log
p_model - log p_base of the model's own transitions, the trainer's estimator; for the long-SFT model, its own text
encoder and UNet against the base's); prompt adherence (`carve3d_trl.toy.adherence`: the share of views showing
exactly the caption's colours, and its shapes) and whether a view's silhouette touches its border. Per prompt:
diversity. Writes a JSON of every value and PNG figures; prints a markdown table.

MRC uses `--metric psnr` by default (dB, higher is more consistent), as the recorded runs did; `lpips` needs the
pretrained trunk on disk (`scripts/fetch_lpips_trunk.py`). Every process uses one torch thread.

Usage: `OMP_NUM_THREADS=1 python benchmarks/bench_replication.py [--epochs 50] [--out benchmarks/results/replication]`
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import torch

# this script's folder is on sys.path when it runs as `python benchmarks/bench_replication.py`
from harness import quiet_and_single_threaded

RESULTS = Path(__file__).resolve().parent / "results"
SOURCES = ("data", "base (short SFT)", "RL + KL", "RL, no KL", "long SFT")
# A stronger reconstructor that rescores the evaluation: the default grid at 32 px with 24 samples per ray, the opaque
# start of the reward's (`carve3d_trl.toy.TOY_MRC_RECONSTRUCTOR`).
CHECK_RECONSTRUCTOR = {"fit_size": 32, "samples_per_ray": 24, "density_offset": -1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=50, help="RL epochs per run (the first only fills statistics).")
    parser.add_argument("--train_prompts", type=int, default=4, help="Training captions.")
    parser.add_argument("--samples_per_prompt", type=int, default=4, help="Samples of each training caption/epoch.")
    parser.add_argument("--val_prompts", type=int, default=12, help="Validation captions (none is a training one).")
    parser.add_argument("--eval_seeds", type=int, default=4, help="Samples per validation caption.")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps (eta 1, as in DDPO), training and eval.")
    parser.add_argument(
        "--guidance", type=float, help="Classifier-free guidance scale (default: the toys', TOY_GUIDANCE_SCALE)."
    )
    parser.add_argument(
        "--learning_rate", type=float, default=1.5e-3, help="LoRA learning rate (at 3e-3 the toys' colours drift)."
    )
    parser.add_argument(
        "--kl_coeff", type=float, default=0.5, help="kl_normalized_coeff of the KL run (the recipe's: 0.2)."
    )
    parser.add_argument(
        "--random_reward",
        action="store_true",
        help="A control: the RL runs train on seeded random rewards instead of MRC (how far RL's updates alone move "
        "the model); MRC still scores the evaluation.",
    )
    parser.add_argument(
        "--runs",
        nargs="+",
        default=["kl", "no_kl"],
        choices=("kl", "no_kl"),
        help="Which RL runs: with the KL penalty, without it (default: both).",
    )
    parser.add_argument("--metric", default="psnr", choices=("psnr", "mse", "lpips"), help="MRC's image metric.")
    parser.add_argument(
        "--reconstructor",
        default="radiance_field",
        choices=("radiance_field", "visual_hull"),
        help="The reward's built-in reconstructor (the recorded runs: radiance_field; the library's default: "
        "visual_hull).",
    )
    parser.add_argument(
        "--reconstructor_kwargs",
        default=None,
        help="JSON arguments of the reward's reconstructor (default: the cheap fit below for radiance_field, '{}' "
        "for visual_hull; '{}' for radiance_field is its defaults, 3-10x slower).",
    )
    parser.add_argument(
        "--check_reconstructor_kwargs",
        default=json.dumps(CHECK_RECONSTRUCTOR),
        help="JSON arguments of a second reconstructor, always the radiance field, that rescores every evaluation "
        "sample, to check that the gains are not specific to the reward's ('{}': its defaults; 'none': no check).",
    )
    parser.add_argument(
        "--lora_target_modules",
        nargs="+",
        default=None,
        help="UNet modules given LoRA adapters, by peft's matching of name endings (default: the library's, "
        "to_q, to_k, to_v and to_out.0 of every attention; e.g. attn1.to_q attn1.to_k attn1.to_v attn1.to_out.0 for "
        "the self-attention only, which attends across the views in the view-batched toy).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the runs and of the evaluation noise.")
    parser.add_argument(
        "--family",
        default="grid",
        choices=("grid", "view_batched"),
        help="Which toy: the grid toy (2x2 grids) or the view-batched one (4 views, MVDream's architecture).",
    )
    for variant in ("short", "long"):
        parser.add_argument(
            f"--{variant}_model",
            type=Path,
            default=None,
            help=f"A {variant}-SFT checkpoint folder of --family's pipeline (default: the shipped toy's).",
        )
    parser.add_argument("--out", type=Path, default=RESULTS / "replication", help="Prefix of the .json and .png.")
    args = parser.parse_args(argv)
    if args.reconstructor_kwargs is None:
        from carve3d_trl.toy import TOY_MRC_RECONSTRUCTOR

        args.reconstructor_kwargs = json.dumps(TOY_MRC_RECONSTRUCTOR if args.reconstructor == "radiance_field" else {})
    if min(args.epochs, args.train_prompts, args.samples_per_prompt, args.val_prompts, args.steps) < 1:
        parser.error("--epochs, --train_prompts, --samples_per_prompt, --val_prompts and --steps must be >= 1.")
    if args.eval_seeds < 2:
        parser.error("--eval_seeds must be >= 2 (diversity compares samples of one prompt).")
    if args.guidance is None:
        from carve3d_trl.toy import TOY_GUIDANCE_SCALE

        args.guidance = TOY_GUIDANCE_SCALE
    check_models(args, parser)
    if args.lora_target_modules is None:
        from carve3d_trl.pipelines import DEFAULT_LORA_TARGETS

        args.lora_target_modules = DEFAULT_LORA_TARGETS
    args.lora_target_modules = tuple(args.lora_target_modules)
    return args


def split_scenes(num_train: int, num_val: int, seed: int) -> tuple[list, list]:
    """Random scenes with distinct captions: `num_train` for training, `num_val` others for validation."""
    from carve3d_trl.toy.data import random_scene

    generator = torch.Generator().manual_seed(10_000 + seed)
    scenes: dict[str, Any] = {}
    while len(scenes) < num_train + num_val:
        scene = random_scene(generator)
        scenes.setdefault(scene.caption, scene)
    ordered = list(scenes.values())
    return ordered[:num_train], ordered[num_train:]


# ---------------------------------------------------------------------------------------------- evaluation


def diversity(images: torch.Tensor) -> float:
    """Mean pairwise RMS pixel distance between images `(S, 3, H, W)` in [0, 1] (samples of one prompt)."""
    return statistics.mean(float((a - b).pow(2).mean().sqrt()) for a, b in combinations(images, 2))


def data_samples(scenes: list, seeds: list[int], family: str = "grid") -> torch.Tensor:
    """Renders of each validation scene at a yaw and sizes drawn from the sample's seed (`1000 * scene index + seed`,
    as the models' noise): the data distribution of its caption."""
    from dataclasses import replace

    from carve3d_trl.toy import render_scene_views, render_scenes

    varied = []
    for index, scene in enumerate(scenes):
        for seed in seeds:
            generator = torch.Generator().manual_seed(1000 * index + seed)
            yaw, top, bottom = (float(x) for x in torch.rand(3, generator=generator))
            varied.append(
                replace(
                    scene,
                    yaw=360.0 * yaw,
                    top=replace(scene.top, size=0.8 + 0.4 * top),
                    bottom=scene.bottom and replace(scene.bottom, size=0.8 + 0.4 * bottom),
                )
            )
    return render_scenes(varied) if family == "grid" else render_scene_views(varied)


def evaluate(
    images: torch.Tensor, kl: torch.Tensor, rewards: dict, prompts: list[str], num_prompts: int, num_seeds: int
) -> dict:
    """Per sample `(prompt, seed)` the MRC of each of `rewards` (named by its key), the KL, the share of views that
    adhere to the prompt in colour and in shape and whether a view touches its border; per prompt the diversity; and
    the grids of the first seed (a view-batched sample's views tiled 2x2)."""
    from carve3d_trl.image_logging import tile_views_grid
    from carve3d_trl.toy.adherence import measure_adherence

    scores = {
        key: torch.cat([reward(images[i : i + 8])[1]["mrc"] for i in range(0, len(images), 8)])
        for key, reward in rewards.items()
    }
    adherence = measure_adherence(images, prompts)
    grids = images.view(num_prompts, num_seeds, *images.shape[1:])
    first = grids[:, 0] if images.ndim == 4 else tile_views_grid(grids[:, 0])
    return {
        **{key: mrc.view(num_prompts, num_seeds).tolist() for key, mrc in scores.items()},
        "kl": kl.view(num_prompts, num_seeds).tolist(),
        "color_adherence": adherence.color.float().mean(1).view(num_prompts, num_seeds).tolist(),
        "shape_adherence": adherence.shape.float().mean(1).view(num_prompts, num_seeds).tolist(),
        "border": adherence.border.any(1).float().view(num_prompts, num_seeds).tolist(),
        "diversity": [diversity(g) for g in grids],
        "first_seed_grids": first,
    }


# ---------------------------------------------------------------------------------------------- RL runs


class RandomReward:
    """A control reward: `reward`'s metadata (its MRC is still logged) with seeded standard-normal rewards, so the RL
    updates carry no signal."""

    def __init__(self, reward, seed: int):
        self.reward = reward
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, images, prompts, metadata):
        rewards, info = self.reward(images, prompts, metadata)
        return torch.randn(len(rewards), generator=self.generator), info


def check_models(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Fill `--short_model`/`--long_model` with the shipped toy's checkpoints, and refuse a folder that is not a
    diffusers pipeline of `--family`."""
    from carve3d_trl.pipelines import detect_family
    from carve3d_trl.toy import toy_model_path

    expected = detect_family(str(toy_model_path("short", family=args.family)))
    for variant in ("short", "long"):
        flag = f"--{variant}_model"
        path = getattr(args, f"{variant}_model") or toy_model_path(variant, family=args.family)
        if not (path / "model_index.json").is_file():
            parser.error(f"{flag} {path} holds no model_index.json; pass a diffusers pipeline folder.")
        found = detect_family(str(path))
        if found != expected:
            parser.error(
                f"{flag} {path} is a pipeline of family '{found}'; --family {args.family} needs family '{expected}' "
                "(or pass that checkpoint's --family)."
            )
        setattr(args, f"{variant}_model", path)


def check_lora_targets(unet: torch.nn.Module, targets: tuple[str, ...]) -> None:
    """Refuse, before any sampling, `--lora_target_modules` names that match no module of `unet` (by peft's own
    matching, as the adapters will be added)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    names = [name for name, _ in unet.named_modules()]
    missing = [
        t for t in targets if not any(check_target_module_exists(LoraConfig(target_modules=[t]), n) for n in names)
    ]
    if missing:
        raise ValueError(
            f"--lora_target_modules {' '.join(missing)} match no module of the toy UNet; use attention layer names "
            "such as to_q, attn1.to_q or attn2.to_out.0."
        )


def rl_run(args: argparse.Namespace, prompts: list[str], kl: bool, reward, workdir: Path):
    """Fine-tune LoRA adapters of the short-SFT model with Carve3D; returns the trainer (its pipeline and history)."""
    from carve3d_trl import Carve3DConfig, Carve3DTrainer, load_ddpo_pipeline

    prompt_file = workdir / "train_prompts.txt"
    prompt_file.write_text("\n".join(prompts) + "\n")
    samples = len(prompts) * args.samples_per_prompt
    batch = max(b for b in range(1, 9) if samples % b == 0)
    config = Carve3DConfig(
        prompt_dataset=str(prompt_file),
        num_epochs=args.epochs,
        sample_num_steps=args.steps,
        sample_guidance_scale=args.guidance,
        sample_batch_size=batch,
        sample_num_batches_per_epoch=samples // batch,
        train_batch_size=batch,
        train_learning_rate=args.learning_rate,
        per_prompt_stat_tracking_min_count=args.samples_per_prompt,
        per_prompt_stat_tracking_buffer_size=3 * args.samples_per_prompt,
        kl_penalty=kl,
        kl_log=True,
        kl_normalized_coeff=args.kl_coeff,
        mixed_precision="no",
        log_with=None,
        save_freq=10**9,
        logdir=str(workdir / ("kl" if kl else "no_kl")),
        seed=args.seed,
    )
    pipeline = load_ddpo_pipeline(str(args.short_model), lora_rank=4, lora_target_modules=args.lora_target_modules)
    trainer = Carve3DTrainer(config, reward, sd_pipeline=pipeline)
    trainer.sd_pipeline.set_progress_bar_config(disable=True)
    trainer.train()
    return trainer


# ---------------------------------------------------------------------------------------------- report


def summary(results: dict[str, dict[str, Any]], higher_is_better: bool) -> dict[str, dict[str, float]]:
    """Mean and std over (prompt, seed) of MRC (`mrc`, and `mrc_check` when present) and KL, over prompts of
    diversity; the mean adherence (share of views) in colour and in shape, and the share of samples touching a
    border; the paired MRC change to the base (sample by sample, same noise), signed so that a positive change is
    more consistent, and the fraction of samples it improves."""
    sign = 1.0 if higher_is_better else -1.0
    base = results["base (short SFT)"]
    keys = [key for key in ("mrc", "mrc_check") if key in base]
    out = {}
    for name, r in results.items():
        kl, div = np.array(r["kl"]), np.array(r["diversity"])
        out[name] = {}
        for key in keys:
            mrc = np.array(r[key])
            change = sign * (mrc - np.array(base[key]))
            out[name].update(
                {
                    f"{key}_mean": float(mrc.mean()),
                    f"{key}_std": float(mrc.std()),
                    f"{key}_change_mean": float(change.mean()),
                    f"{key}_change_sem": float(change.std(ddof=1) / np.sqrt(change.size)),
                    f"{key}_improved_fraction": float(np.mean(change > 0)),
                }
            )
        out[name].update(
            {
                **{f"{key}_mean": float(np.mean(r[key])) for key in ("color_adherence", "shape_adherence", "border")},
                "kl_mean": float(kl.mean()),
                "kl_std": float(kl.std()),
                "diversity_mean": float(div.mean()),
                "diversity_std": float(div.std()),
            }
        )
    return out


def markdown_table(stats: dict[str, dict[str, float]], higher_is_better: bool) -> str:
    arrow = "higher" if higher_is_better else "lower"
    keys = [key for key in ("mrc", "mrc_check") if f"{key}_mean" in next(iter(stats.values()))]
    titles = {"mrc": "MRC", "mrc_check": "MRC, check reconstructor"}
    header = [f"{titles[k]} ({arrow} is better) | gain vs base (paired, ± s.e.) | samples improved" for k in keys]
    header += ["KL to base | diversity | colour adherence | shape adherence | touches border"]
    lines = [f"| source | {' | '.join(header)} |", "|---" * (3 * len(keys) + 6) + "|"]
    for name, s in stats.items():
        cells = [
            f"{s[f'{k}_mean']:.3f} ± {s[f'{k}_std']:.3f} | {s[f'{k}_change_mean']:+.3f} ± {s[f'{k}_change_sem']:.3f} "
            f"| {s[f'{k}_improved_fraction']:.0%}"
            for k in keys
        ]
        kl = "-" if name == "data" else f"{s['kl_mean']:.5f} ± {s['kl_std']:.5f}"
        cells += [kl, f"{s['diversity_mean']:.4f} ± {s['diversity_std']:.4f}"]
        cells += [f"{s[k]:.0%}" for k in ("color_adherence_mean", "shape_adherence_mean", "border_mean")]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(lines)


def plot(results, histories, stats, prompts: list[str], metric: str, out: Path) -> None:
    """`<out>_curves.png` (training MRC and KL per epoch), `<out>_summary.png` (`plot_summary`) and
    `<out>_samples.png` (the first seed's grids of the first validation prompts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, history in histories.items():
        epochs = [h["epoch"] for h in history]
        axes[0].plot(epochs, [h["mrc_mean"] for h in history], marker=".", label=name)
        axes[1].plot(epochs, [h.get("kl_mean", np.nan) for h in history], marker=".", label=name)
    axes[0].set(xlabel="epoch", ylabel=f"training MRC ({metric})", title="MRC of each epoch's samples")
    axes[1].set(xlabel="epoch", ylabel="KL to base", title="KL of each epoch's samples")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(f"{out}_curves.png", dpi=110)
    plt.close(fig)

    plot_summary(stats, metric, Path(f"{out}_summary.png"))

    names = list(stats)
    shown = min(4, len(prompts))
    fig, axes = plt.subplots(shown, len(names), figsize=(2.2 * len(names), 2.3 * shown), squeeze=False)
    for row in range(shown):
        for col, name in enumerate(names):
            ax = axes[row, col]
            ax.imshow(results[name]["first_seed_grids"][row].permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9)
            if col == 0:
                ax.set_ylabel(prompts[row], fontsize=7, wrap=True)
    fig.tight_layout()
    fig.savefig(f"{out}_samples.png", dpi=110)
    plt.close(fig)


def plot_summary(stats: dict[str, dict[str, float]], metric: str, path: Path) -> None:
    """Validation MRC (mean ± std), KL to the base (log scale) and diversity of each source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(stats)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    mean, std = ([stats[n][f"mrc_{m}"] for n in names] for m in ("mean", "std"))
    axes[0].errorbar(range(len(names)), mean, yerr=std, fmt="o", capsize=4)
    axes[0].set_title(f"validation MRC ({metric}), mean ± std")
    with_kl = [n for n in names if stats[n]["kl_mean"] > 0]
    axes[1].bar(range(len(with_kl)), [stats[n]["kl_mean"] for n in with_kl])
    axes[1].set_yscale("log")
    axes[1].set_xticks(range(len(with_kl)), with_kl, rotation=25, ha="right")
    axes[1].set_title("KL to the base model (log scale)")
    mean, std = ([stats[n][f"diversity_{m}"] for n in names] for m in ("mean", "std"))
    axes[2].bar(range(len(names)), mean, yerr=std, capsize=4)
    axes[2].set_title("diversity: mean pairwise pixel RMS per prompt")
    for ax in (axes[0], axes[2]):
        ax.set_xticks(range(len(names)), names, rotation=25, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    quiet_and_single_threaded()
    from diffusers import StableDiffusionPipeline

    from carve3d_trl.evaluation import sample_with_kl
    from carve3d_trl.pipelines import MultiViewDiffusionPipeline
    from carve3d_trl.rewards import MRCReward, instant3d_layout
    from carve3d_trl.toy import toy_view_cameras

    start = time.time()
    timings: dict[str, float] = {}
    train_scenes, val_scenes = split_scenes(args.train_prompts, args.val_prompts, args.seed)
    train_prompts = [s.caption for s in train_scenes]
    val_prompts = [s.caption for s in val_scenes]

    def make_reward(reconstructor: str, kwargs_json: str) -> MRCReward:
        kwargs = json.loads(kwargs_json) or None
        layout = instant3d_layout() if args.family == "grid" else toy_view_cameras().layout
        return MRCReward(layout, reconstructor, metric=args.metric, seed=args.seed, reconstructor_kwargs=kwargs)

    reward = make_reward(args.reconstructor, args.reconstructor_kwargs)
    scorers = {"mrc": reward}
    if args.check_reconstructor_kwargs != "none":
        scorers["mrc_check"] = make_reward("radiance_field", args.check_reconstructor_kwargs)
    seeds = [args.seed * 1000 + s for s in range(args.eval_seeds)]
    prompts = [p for p in val_prompts for _ in seeds]
    sample_seeds = [1000 * i + s for i in range(len(val_prompts)) for s in seeds]
    num = (len(val_prompts), len(seeds))
    # DDIM with eta 1, as DDPO samples; sample i's initial latent and step noise come from seed `sample_seeds[i]`
    sampling = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, eta=1.0)
    results: dict[str, dict[str, Any]] = {}

    data = data_samples(val_scenes, seeds, args.family)
    results["data"] = evaluate(data, torch.zeros(len(prompts)), scorers, prompts, *num)
    pipeline_class = StableDiffusionPipeline if args.family == "grid" else MultiViewDiffusionPipeline
    base = pipeline_class.from_pretrained(args.short_model, torch_dtype=torch.float32)
    check_lora_targets(base.unet, args.lora_target_modules)
    long = pipeline_class.from_pretrained(args.long_model, torch_dtype=torch.float32)
    images, kl = sample_with_kl(base, prompts, sample_seeds, **sampling)
    results["base (short SFT)"] = evaluate(images, kl, scorers, prompts, *num)
    images, kl = sample_with_kl(long, prompts, sample_seeds, reference=base, **sampling)
    results["long SFT"] = evaluate(images, kl, scorers, prompts, *num)
    timings["evaluate data, base, long"] = time.time() - start

    histories = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {"kl": ("RL + KL", True), "no_kl": ("RL, no KL", False)}
        for name, use_kl in (runs[run] for run in dict.fromkeys(args.runs)):
            run_start = time.time()
            run_reward = make_reward(args.reconstructor, args.reconstructor_kwargs)
            if args.random_reward:
                run_reward = RandomReward(run_reward, args.seed)
            trainer = rl_run(args, train_prompts, use_kl, run_reward, Path(tmp))
            histories[name] = trainer.history
            timings[f"train {name}"] = time.time() - run_start
            pipe = trainer.sd_pipeline.sd_pipeline
            pipe.unet.eval()
            images, kl = sample_with_kl(pipe, prompts, sample_seeds, reference=pipe, **sampling)
            results[name] = evaluate(images, kl, scorers, prompts, *num)
            timings[f"evaluate {name}"] = time.time() - run_start - timings[f"train {name}"]
    results = {name: results[name] for name in SOURCES if name in results}
    higher = reward.metric.higher_is_better
    stats = summary(results, higher)
    timings["total"] = time.time() - start

    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(results, histories, stats, val_prompts, args.metric, args.out)
    report = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "train_prompts": train_prompts,
        "val_prompts": val_prompts,
        "eval_seeds": seeds,
        "mrc_higher_is_better": higher,
        "summary": stats,
        "per_sample": {n: {k: v for k, v in r.items() if k != "first_seed_grids"} for n, r in results.items()},
        "histories": histories,
        "timings_s": timings,
        "torch_threads": torch.get_num_threads(),
    }
    Path(f"{args.out}.json").write_text(json.dumps(report, indent=1))
    print(markdown_table(stats, higher))
    print(f"\nTotal {timings['total']:.0f} s; results in {args.out}.json and {args.out}_*.png")
    return report


if __name__ == "__main__":
    main()
