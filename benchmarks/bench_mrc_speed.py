"""MRC reward time per sample against the number of views, the view resolution and the batch size, side by side.

Each row times `MRCReward.__call__` on a batch of synthetic grids with one built-in reconstructor (by default both,
the visual hull and the radiance field, timed one after the other on the same grids; held-out protocol), then the
same samples one call each, and reports the batch's time per sample and the
ratio (time of B single calls) / (time of one batch call): above 1, batching pays. Wall time and process CPU time
are both reported (the minimum over --repeats); CPU time is the robust one on a machine shared with other jobs.
With `--device cuda` the reward runs on the GPU (the grids are rendered on CPU, then moved there; every timed call
ends with the GPU's work done, since the reward returns CPU tensors) and the wall time is the one to read.

    python benchmarks/bench_mrc_speed.py
    python benchmarks/bench_mrc_speed.py --views 4 --sizes 64 --batches 1 8 --protocol same_view
    python benchmarks/bench_mrc_speed.py --reconstructors radiance_field \\
        --reconstructor_kwargs '{"radiance_field": {"steps": 200}}'
    python benchmarks/bench_mrc_speed.py --reconstructors visual_hull hull=visual_hull \\
        --reconstructor_kwargs '{"hull": {"surface": "hull"}}'   # two settings of one reconstructor, side by side
    python benchmarks/bench_mrc_speed.py --device cuda --views 4 --sizes 64 256 --batches 1 8 32 --objects 4
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

import torch

from carve3d_trl.rewards import MRCReward, instant3d_layout, make_reconstructor, tile_views, zero123pp_layout
from carve3d_trl.synthetic import random_object, render_object

LAYOUTS = {4: instant3d_layout, 6: zero123pp_layout}
RECONSTRUCTORS = ("visual_hull", "radiance_field")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--views", type=int, nargs="+", choices=sorted(LAYOUTS), default=[4, 6])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256], help="view side in pixels")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--protocol", choices=["held_out", "same_view"], default="held_out")
    parser.add_argument("--metric", choices=["lpips", "mse", "psnr"], default="lpips")
    parser.add_argument("--lpips_pretrained", action="store_true", help="default: random trunk (same cost)")
    parser.add_argument(
        "--reconstructors",
        nargs="+",
        default=list(RECONSTRUCTORS),
        help=f"names ({', '.join(RECONSTRUCTORS)}), or label=name to time one under several settings",
    )
    parser.add_argument(
        "--reconstructor_kwargs",
        type=json.loads,
        default={},
        help='JSON object of keyword arguments per name or label, e.g. \'{"radiance_field": {"steps": 200}}\'',
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="where the reward runs: cpu (default), cuda, cuda:1, ...")
    parser.add_argument(
        "--objects",
        type=int,
        default=None,
        help="distinct synthetic objects rendered, repeated to fill the largest batch (default: one per sample; "
        "rendering a 256 px object takes seconds of CPU)",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "mrc_speed.json")
    args = parser.parse_args()
    for entry in args.reconstructors:
        if entry.rpartition("=")[2] not in RECONSTRUCTORS:
            parser.error(f"--reconstructors: {entry!r} is none of {', '.join(RECONSTRUCTORS)} (as name or label=name)")
    return args


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work (nothing on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_times(reward: MRCReward, calls: list[torch.Tensor], repeats: int) -> tuple[float, float]:
    """Shortest (wall, CPU) times over `repeats` of scoring every batch in `calls`, one call each."""
    wall, cpu = [], []
    for _ in range(repeats):
        synchronize(calls[0].device)
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        for images in calls:
            reward(images)
        synchronize(calls[0].device)
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    return min(wall), min(cpu)


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"device {device} ({where}), threads {torch.get_num_threads()}, load average at start {os.getloadavg()[0]:.2f}"
    )
    print(
        "| reconstructor | views | view size | batch B | wall s/sample, one call | wall s/sample, B calls "
        "| CPU s/sample, one call | B calls / one call (wall) | (CPU) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for num_views in args.views:
        layout = LAYOUTS[num_views]()
        rewards = {}
        for entry in args.reconstructors:
            label, _, name = entry.rpartition("=")
            kwargs = args.reconstructor_kwargs.get(label or name, {})
            rewards[label or name] = MRCReward(
                layout,
                make_reconstructor(name, protocol=args.protocol, **kwargs),
                metric=args.metric,
                lpips_pretrained=args.lpips_pretrained,
            )
        for size in args.sizes:
            generator = torch.Generator().manual_seed(0)
            objects = [random_object(generator) for _ in range(args.objects or max(args.batches))]
            grids = tile_views(torch.stack([render_object(obj, layout, size) for obj in objects]), layout)
            repeat = -(-max(args.batches) // len(objects))  # ceil: enough copies for the largest batch
            grids = grids.repeat(repeat, 1, 1, 1)[: max(args.batches)].to(device)
            for reward in rewards.values():
                reward(grids[:1])  # warm-up (the visual hull caches its ray geometry per layout and size)
            for batch, (name, reward) in itertools.product(args.batches, rewards.items()):
                images = grids[:batch]
                batch_wall, batch_cpu = best_times(reward, [images], args.repeats)
                single_wall, single_cpu = best_times(reward, list(images.split(1)), args.repeats)
                row = dict(
                    reconstructor=name,
                    views=num_views,
                    view_size=size,
                    batch=batch,
                    wall_per_sample=batch_wall / batch,
                    wall_per_sample_single_calls=single_wall / batch,
                    cpu_per_sample=batch_cpu / batch,
                    singles_over_batch_wall=single_wall / batch_wall,
                    singles_over_batch_cpu=single_cpu / batch_cpu,
                )
                rows.append(row)
                print(
                    f"| {name} | {num_views} | {size} | {batch} | {row['wall_per_sample']:.2f} | "
                    f"{row['wall_per_sample_single_calls']:.2f} | {row['cpu_per_sample']:.2f} | "
                    f"{row['singles_over_batch_wall']:.2f} | {row['singles_over_batch_cpu']:.2f} |",
                    flush=True,
                )
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(
        device=str(device),
        device_name=where,
        objects=args.objects,
        protocol=args.protocol,
        reconstructors=args.reconstructors,
        reconstructor_kwargs=args.reconstructor_kwargs,
        metric=args.metric,
        threads=torch.get_num_threads(),
        repeats=args.repeats,
    )
    args.out.write_text(json.dumps(dict(meta, rows=rows), indent=1))


if __name__ == "__main__":
    main()
