"""Train the toy prompt-adherence classifier shipped in `carve3d_trl/toy/weights/adherence/` (CPU, one thread).

1. Render `--num_scenes` captioned toy scenes (`carve3d_trl.toy.data`) from `--views_per_scene` cameras each at
   random azimuths and elevations 0-40 degrees (`carve3d_trl.toy.data.render_random_views`).
2. Train `ViewClassifier` (which colours and shapes a view shows) with augmentation and empty views
   (`train_adherence_classifier`).
3. Check it on `--num_val_scenes` scenes of another seed, rendered at the grid toy's cameras (`instant3d_layout()`)
   and at the view-batched toy's (`toy_view_cameras()`): the shares of views whose colour and shape sets it gets
   exactly right (the data's adherence) are printed and written to `<output_dir>/validation.json`.

Deterministic for a given `--seed` (and thread count). Usage:

    OMP_NUM_THREADS=1 .venv/bin/python scripts/train_toy_adherence.py [--output_dir DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from carve3d_trl.atomic import atomic_write_json
from carve3d_trl.rewards import instant3d_layout
from carve3d_trl.toy import render_scene_views, toy_view_cameras
from carve3d_trl.toy.adherence import (
    ADHERENCE_WEIGHTS,
    labelled_scenes,
    measure_adherence,
    save_adherence_classifier,
    train_adherence_classifier,
)
from carve3d_trl.toy.data import render_random_views

VALIDATION_SEED_OFFSET = 7919  # the held-out scenes' seed: --seed + this


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, default=ADHERENCE_WEIGHTS, help="Gets the classifier.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the scenes, cameras, weights and batches.")
    parser.add_argument("--num_scenes", type=int, default=3000, help="Rendered training scenes.")
    parser.add_argument("--views_per_scene", type=int, default=3, help="Random cameras per training scene.")
    parser.add_argument("--num_val_scenes", type=int, default=200, help="Held-out scenes of the check.")
    parser.add_argument("--steps", type=int, default=6000, help="Optimizer steps.")
    parser.add_argument("--batch_size", type=int, default=64, help="Views per step.")
    parser.add_argument("--learning_rate", type=float, default=2e-3, help="AdamW learning rate.")
    parser.add_argument("--num_threads", type=int, default=1, help="torch CPU threads.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    start = time.time()
    scenes, labels = labelled_scenes(args.num_scenes, args.seed)
    views = render_random_views(scenes, args.views_per_scene, torch.Generator().manual_seed(args.seed))
    print(f"rendered {views.shape[0] * views.shape[1]} views in {time.time() - start:.0f} s", flush=True)
    classifier = train_adherence_classifier(
        views.flatten(0, 1),
        labels.repeat_interleave(args.views_per_scene, dim=0),
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        log_every=250,
    )
    print(f"trained at {time.time() - start:.0f} s", flush=True)
    val_scenes, _ = labelled_scenes(args.num_val_scenes, args.seed + VALIDATION_SEED_OFFSET)
    captions = [s.caption for s in val_scenes]
    report = {}
    for name, layout in (("grid cameras", instant3d_layout()), ("view-batched cameras", toy_view_cameras().layout)):
        result = measure_adherence(render_scene_views(val_scenes, layout=layout), captions, classifier)
        report[name] = result.summary()
        print(name, {k: round(v, 4) for k, v in report[name].items()}, flush=True)
    save_adherence_classifier(classifier, args.output_dir)
    atomic_write_json(args.output_dir / "validation.json", report)
    print(f"saved {args.output_dir}; total {time.time() - start:.0f} s", flush=True)
    return report


if __name__ == "__main__":
    main()
