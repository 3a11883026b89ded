"""Measure the toy checkpoints' prompt adherence, border contact and MRC on held-out captions and seeds (CPU).

For `--num_prompts` captions of random scenes that are none of the toy training scenes' captions
(`scene_dataset(--train_scenes, seed 0)`; every one-solid caption is a training caption, so these are two-solid
captions) or, with `--captions single_solid`, of random one-solid scenes (trained captions, held-out seeds, yaws and
sizes), or, with `--captions trained_two_solid`, the first two-solid captions of the training scenes (trained
captions, held-out seeds, yaws and sizes: fitting apart from generalising), and `--num_seeds` seeds per caption,
every source is sampled from the same noise per (caption, seed) (DDIM `--steps` steps with eta `--eta`, guidance
`--guidance`, the replication's sampler) and measured:

- adherence (`carve3d_trl.toy.adherence.measure_adherence`, the shipped classifier): the share of views showing
  exactly the caption's colours, its shapes, both; the share of samples whose every view does;
- border: the share of samples with a view whose silhouette touches the view's border;
- MRC (PSNR, dB; the replication benchmark's cheap radiance field, `held_out` protocol) of multi-view sources.

Sources: `data` (renders of each caption's scene at seed-dependent yaw and sizes, at the grid cameras and at the
view-batched ones), and each `--models` entry `name=folder` (default: the shipped single-view, grid and view-batched
checkpoints). Writes `--out` (JSON of every summary and per-sample value) and prints a markdown table. Usage:

    OMP_NUM_THREADS=1 .venv/bin/python scripts/evaluate_toy_adherence.py [--models short=DIR ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

CAPTION_SETS = ("held_out", "single_solid", "trained_two_solid")


def default_models() -> dict[str, Path]:
    from carve3d_trl.toy import toy_model_path, toy_single_view_path

    models = {"single_view": toy_single_view_path()}
    for family in ("grid", "view_batched"):
        for variant in ("short", "long"):
            models[f"{family} {variant}"] = toy_model_path(variant, family=family)
    return models


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", help="name=folder entries (default: every shipped toy checkpoint).")
    parser.add_argument("--num_prompts", type=int, default=24, help="Held-out captions.")
    parser.add_argument("--num_seeds", type=int, default=2, help="Samples per caption.")
    parser.add_argument(
        "--captions",
        default="held_out",
        choices=CAPTION_SETS,
        help="Two-solid captions no training scene has (held_out), one-solid captions (all of them are training "
        "captions), or two-solid training captions (trained_two_solid).",
    )
    parser.add_argument("--train_scenes", type=int, default=1000, help="Toy training scenes whose captions to skip.")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps.")
    parser.add_argument("--eta", type=float, default=1.0, help="DDIM eta.")
    parser.add_argument(
        "--guidance", type=float, help="Classifier-free guidance scale (default: the toys', TOY_GUIDANCE_SCALE)."
    )
    parser.add_argument("--no_mrc", action="store_true", help="Skip MRC (adherence and border only).")
    parser.add_argument("--no_data", action="store_true", help="Skip the data source.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the held-out scenes and of the noise.")
    parser.add_argument("--out", type=Path, help="JSON to write.")
    parser.add_argument("--num_threads", type=int, default=1, help="torch CPU threads.")
    args = parser.parse_args(argv)
    if args.models:
        bad = [m for m in args.models if "=" not in m]
        if bad:
            parser.error(f"--models entries must be name=folder, got {bad}.")
        args.models = {m.split("=", 1)[0]: Path(m.split("=", 1)[1]) for m in args.models}
    if args.num_prompts < 1 or args.num_seeds < 1:
        parser.error(f"--num_prompts and --num_seeds must be >= 1, got {args.num_prompts} and {args.num_seeds}.")
    if args.guidance is None:
        from carve3d_trl.toy import TOY_GUIDANCE_SCALE

        args.guidance = TOY_GUIDANCE_SCALE
    return args


def evaluation_scenes(num: int, train_scenes: int, seed: int, captions: str = "held_out") -> list:
    """`num` scenes with distinct captions: random ones whose caption is none of the toy training scenes'
    (`"held_out"`), random one-solid ones (`"single_solid"`), or the first two-solid training scenes
    (`"trained_two_solid"`, the same for every `seed`)."""
    from carve3d_trl.toy.data import random_scene, random_scenes

    training = random_scenes(train_scenes) if captions != "single_solid" else []
    if captions == "trained_two_solid":
        two_solid: dict[str, object] = {}
        for scene in training:
            if scene.relation != "alone":
                two_solid.setdefault(scene.caption, scene)
        if len(two_solid) < num:
            raise ValueError(
                f"The {train_scenes} training scenes have {len(two_solid)} distinct two-solid captions, fewer than "
                f"--num_prompts {num}; lower --num_prompts."
            )
        return list(two_solid.values())[:num]
    trained = {scene.caption for scene in training}
    generator = torch.Generator().manual_seed((20_000 if captions == "held_out" else 30_000) + seed)
    scenes: dict[str, object] = {}
    while len(scenes) < num:
        scene = random_scene(generator)
        if scene.caption not in trained and (captions == "held_out" or scene.relation == "alone"):
            scenes.setdefault(scene.caption, scene)
    return list(scenes.values())


def varied(scenes: list, seeds: list[int]) -> list:
    """Each scene at a yaw and sizes drawn from the sample seed `1000 * scene index + seed` (the data distribution
    of its caption), scene-major."""
    out = []
    for index, scene in enumerate(scenes):
        for seed in seeds:
            generator = torch.Generator().manual_seed(1000 * index + seed)
            yaw, top, bottom = torch.rand(3, generator=generator).tolist()
            out.append(
                replace(
                    scene,
                    yaw=360.0 * yaw,
                    top=replace(scene.top, size=0.8 + 0.4 * top),
                    bottom=scene.bottom and replace(scene.bottom, size=0.8 + 0.4 * bottom),
                )
            )
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    from carve3d_trl.evaluation import sample_with_kl
    from carve3d_trl.pipelines import MultiViewDiffusionPipeline, detect_family
    from carve3d_trl.rewards import MRCReward, instant3d_layout, split_grid
    from carve3d_trl.toy import TOY_MRC_RECONSTRUCTOR, render_scene_views, toy_view_cameras
    from carve3d_trl.toy.adherence import load_adherence_classifier, measure_adherence
    from carve3d_trl.toy.view_batched import VIEW_SIZE

    diffusers_logging.disable_progress_bar()
    start = time.time()
    classifier = load_adherence_classifier()
    scenes = evaluation_scenes(args.num_prompts, args.train_scenes, args.seed, args.captions)
    seeds = [args.seed * 1000 + s for s in range(args.num_seeds)]
    captions = [s.caption for s in scenes for _ in seeds]
    sample_seeds = [1000 * i + s for i in range(len(scenes)) for s in seeds]
    layouts = {"grid": instant3d_layout(), "view_batched": toy_view_cameras().layout}
    rewards = {
        family: MRCReward(
            layout, "radiance_field", metric="psnr", seed=args.seed, reconstructor_kwargs=TOY_MRC_RECONSTRUCTOR
        )
        for family, layout in layouts.items()
    }

    def measure(name: str, views: torch.Tensor, family: str | None) -> dict:
        """Adherence and border of views `(N, V, 3, h, w)`; MRC when `family` names a multi-view layout."""
        result = measure_adherence(views, captions, classifier)
        entry = {"summary": result.summary(), "color": result.color.tolist(), "shape": result.shape.tolist()}
        entry["border"] = result.border.tolist()
        if family is not None and not args.no_mrc:
            mrc = torch.cat([rewards[family](views[i : i + 8])[1]["mrc"] for i in range(0, len(views), 8)])
            entry["mrc"] = mrc.tolist()
            entry["summary"].update(mrc_mean=mrc.mean().item(), mrc_std=mrc.std().item())
        rounded = {k: round(v, 3) for k, v in entry["summary"].items()}
        print(name, rounded, f"({time.time() - start:.0f} s)", flush=True)
        return entry

    results = {}
    if not args.no_data:
        data_scenes = varied(scenes, seeds)
        for family, layout in layouts.items():
            results[f"data ({family} cameras)"] = measure(
                f"data ({family})", render_scene_views(data_scenes, layout=layout), family
            )
    for name, path in (args.models or default_models()).items():
        family = "view_batched" if detect_family(str(path)) == "view_batched" else "grid"
        pipeline_class = MultiViewDiffusionPipeline if family == "view_batched" else StableDiffusionPipeline
        pipe = pipeline_class.from_pretrained(path, torch_dtype=torch.float32, local_files_only=True)
        images, _ = sample_with_kl(
            pipe, captions, sample_seeds, num_inference_steps=args.steps, guidance_scale=args.guidance, eta=args.eta
        )
        if images.ndim == 5:  # view-batched: (N, V, 3, h, w)
            views = images
        elif images.shape[-1] == 2 * VIEW_SIZE:  # a 2x2 grid
            views = split_grid(images, layouts["grid"])
        else:  # a single-view model
            views, family = images[:, None], None
        results[name] = measure(name, views, family)

    report = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "models"},
        "models": {name: str(path) for name, path in (args.models or default_models()).items()},
        "captions": [s.caption for s in scenes],
        "seeds": seeds,
        "results": results,
        "seconds": time.time() - start,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    print("\n| source | colour | shape | both | colour, all views | shape, all views | border | MRC (dB) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, entry in results.items():
        s = entry["summary"]
        mrc = f"{s['mrc_mean']:.2f} ± {s['mrc_std']:.2f}" if "mrc_mean" in s else "-"
        cells = " | ".join(f"{s[k]:.0%}" for k in ("color", "shape", "both", "color_all_views", "shape_all_views"))
        print(f"| {name} | {cells} | {s['border']:.0%} | {mrc} |")
    print(f"\n{len(captions)} samples per source; {time.time() - start:.0f} s")
    return report


if __name__ == "__main__":
    main()
