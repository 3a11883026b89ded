"""View-batched vs grid (issue 13): the same pixels as 4 views of 32x32 (MVDream's architecture) or one 64x64 grid of
2x2 views (Instant3D's), trained by `Carve3DTrainer`, with the KL off and on.

Both tiny models come from `carve3d_trl.testing` with the same UNet blocks, VAE, text encoder and seed; the
view-batched one adds the 16-input camera embedding and attends across the 4 views (its latents are 4 x 8x8 where the
grid's are one 16x16). Four trainers (family x KL off/on, LoRA rank 4, the same batches, KL in the reward) live in one
process and are interleaved: one untimed warm-up epoch each, then one epoch each per round for `--rounds` rounds, the
order rotating. Ratios are paired per round, median (min-max). Peak memory of one epoch (RSS on CPU, CUDA allocated
on a GPU) is measured per variant in a fresh subprocess, above the memory held before the epoch.

Usage: `python benchmarks/bench_view_batched.py [--rounds 5] [--steps 10]` (`--help` for more).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

# this script's folder is on sys.path when it runs as `python benchmarks/bench_view_batched.py`
from harness import (
    TimedTrainer,
    current_rss_mb,
    log,
    peak_rss_mb,
    prompt_cycle,
    quiet_and_single_threaded,
    reset_peak_rss,
    run_memory_child,
    spread,
    stopwatch,
    synchronize,
)

VARIANTS = ("grid, KL off", "grid, KL on", "view-batched, KL off", "view-batched, KL on")
VIEW_SIZE = 32  # one view; the grid is 2x2 views


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="Timed rounds (each times every variant once).")
    parser.add_argument("--steps", type=int, default=10, help="Sampling (DDIM) steps per sample.")
    parser.add_argument("--sample_batch_size", type=int, default=4, help="Samples (objects) per sampling batch.")
    parser.add_argument("--batches_per_epoch", type=int, default=2, help="Sampling batches per epoch.")
    parser.add_argument("--train_batch_size", type=int, default=4, help="Samples per train batch.")
    parser.add_argument("--skip_memory", action="store_true", help="Only measure epoch times.")
    parser.add_argument("--memory_variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--model_dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be >= 1.")
    return args


def brightness(images: Any, prompts: Any, metadata: Any) -> tuple[Any, dict]:
    """Mean brightness of each sample, a grid `(B, 3, H, W)` or views `(B, V, 3, h, w)`."""
    return images.flatten(1).mean(1), {}


def save_models(root: Path) -> dict[str, Path]:
    """The tiny grid SD (64x64, 2x2 views of 32) and the tiny view-batched model (4 views of 32), seed 0."""
    from carve3d_trl.testing import TinyPipelineSpec, save_tiny_pipeline, save_tiny_view_batched_pipeline

    return {
        "grid": save_tiny_pipeline(root / "grid", TinyPipelineSpec(image_size=2 * VIEW_SIZE, vae_blocks=3)),
        "view-batched": save_tiny_view_batched_pipeline(
            root / "view-batched", TinyPipelineSpec(image_size=VIEW_SIZE, vae_blocks=3)
        ),
    }


def build_trainer(variant: str, model_dir: Path, logdir: Path, args: argparse.Namespace) -> Any:
    from carve3d_trl import Carve3DConfig, Carve3DTrainer, load_ddpo_pipeline

    kl = {} if variant.endswith("KL on") else dict(kl_penalty=False, kl_log=False)
    config = Carve3DConfig(
        sample_num_steps=args.steps,
        sample_batch_size=args.sample_batch_size,
        sample_num_batches_per_epoch=args.batches_per_epoch,
        train_batch_size=args.train_batch_size,
        mixed_precision="no",
        log_with=None,
        save_freq=10**9,
        logdir=str(logdir),
        seed=0,
        warmup_first_epoch=False,
        **kl,
    )
    pipeline = load_ddpo_pipeline(str(model_dir))
    pipeline.set_progress_bar_config(disable=True)
    return Carve3DTrainer(config, brightness, prompt_cycle(), pipeline)


def time_epochs(args: argparse.Namespace, models: dict[str, Path], logdir: Path) -> list[TimedTrainer]:
    timed = [
        TimedTrainer(v, build_trainer(v, models[v.split(",")[0]], logdir / str(i), args))
        for i, v in enumerate(VARIANTS)
    ]
    for entry in timed:
        log(f"warm-up {entry.name}: {entry.run_epoch(record=False):.2f} s")
    for round_index in range(args.rounds):
        shift = round_index % len(timed)
        for entry in timed[shift:] + timed[:shift]:
            entry.run_epoch(record=True)
        log(f"round {round_index + 1}: " + ", ".join(f"{e.name} {e.cpu[-1]:.2f} s CPU" for e in timed))
    return timed


def ratio(a: TimedTrainer, b: TimedTrainer, kind: str = "cpu") -> str:
    return spread([x / y for x, y in zip(getattr(a, kind), getattr(b, kind))], "{:.3f}")


def timing_tables(timed: list[TimedTrainer]) -> str:
    by_name = {entry.name: entry for entry in timed}
    rows = [
        "| Variant | Wall s/epoch | CPU s/epoch | Sampling | KL reference | Training |",
        "|---|---|---|---|---|---|",
    ]
    for entry in timed:
        phases = " | ".join(spread(entry.phases[p]) for p in ("sampling", "kl_reference", "training"))
        rows.append(f"| {entry.name} | {spread(entry.wall)} | {spread(entry.cpu)} | {phases} |")
    ratios = ["", "| Ratio (CPU time, paired per round) | median (min-max) |", "|---|---|"]
    for label, a, b in (
        ("view-batched / grid, KL off", "view-batched, KL off", "grid, KL off"),
        ("view-batched / grid, KL on", "view-batched, KL on", "grid, KL on"),
        ("KL on / off, grid", "grid, KL on", "grid, KL off"),
        ("KL on / off, view-batched", "view-batched, KL on", "view-batched, KL off"),
    ):
        ratios.append(f"| {label} | {ratio(by_name[a], by_name[b])} |")
    return "\n".join(rows + ratios)


def measure_memory(args: argparse.Namespace) -> dict[str, Any]:
    """One epoch of `--memory_variant` in this fresh process: memory before the epoch and its peak (MB)."""
    import torch

    with tempfile.TemporaryDirectory() as logdir:
        trainer = build_trainer(args.memory_variant, Path(args.model_dir), Path(logdir), args)
        cuda = torch.cuda.is_available()
        synchronize()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated() / 2**20
        else:
            reset_peak_rss()
            start = current_rss_mb()
        trainer.step(0, 0)
        synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mb()
    return {"variant": args.memory_variant, "kind": "CUDA allocated" if cuda else "RSS", "start": start, "peak": peak}


def memory_table(args: argparse.Namespace, models: dict[str, Path]) -> str:
    shared = [f"--steps={args.steps}", f"--sample_batch_size={args.sample_batch_size}"]
    shared += [f"--batches_per_epoch={args.batches_per_epoch}", f"--train_batch_size={args.train_batch_size}"]
    results = {}
    for variant in VARIANTS:
        model = models[variant.split(",")[0]]
        flags = [f"--memory_variant={variant}", *shared, f"--model_dir={model}"]
        results[variant] = run_memory_child(__file__, flags, variant)
        log(f"memory {variant}: {results[variant]}")
    kind = next(iter(results.values()))["kind"]
    rows = [f"| Variant | {kind} before the epoch, MB | Peak {kind}, MB | Peak - before, MB |", "|---|---|---|---|"]
    for variant, r in results.items():
        rows.append(f"| {variant} | {r['start']:.0f} | {r['peak']:.0f} | {r['peak'] - r['start']:.0f} |")
    growth = {v: r["peak"] - r["start"] for v, r in results.items()}
    rows += [
        "",
        f"Peak - before, view-batched / grid: KL off {growth['view-batched, KL off'] / growth['grid, KL off']:.3f}, "
        f"KL on {growth['view-batched, KL on'] / growth['grid, KL on']:.3f}; KL on / off: grid "
        f"{growth['grid, KL on'] / growth['grid, KL off']:.3f}, view-batched "
        f"{growth['view-batched, KL on'] / growth['view-batched, KL off']:.3f}.",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet_and_single_threaded()
    if args.memory_variant:  # a child process: one measurement, printed as JSON on the last line
        print(json.dumps(measure_memory(args)))
        return
    import torch

    with tempfile.TemporaryDirectory() as tmp, stopwatch("total"):
        models = save_models(Path(tmp))
        print(
            f"- Date: {datetime.date.today().isoformat()}; {platform.machine()}, torch {torch.__version__}, 1 thread"
        )
        print(
            f"- Workload: {args.steps} DDIM steps, {args.batches_per_epoch} x {args.sample_batch_size} samples per "
            f"epoch, train batch {args.train_batch_size}, CFG 5, LoRA rank 4, fp32, mean-brightness reward"
        )
        print("- Command: `" + " ".join(["python benchmarks/bench_view_batched.py", *sys.argv[1:]]) + "`\n")
        with stopwatch("epoch timing"):
            print(timing_tables(time_epochs(args, models, Path(tmp) / "logs")))
        if not args.skip_memory:
            with stopwatch("memory"):
                print("\n" + memory_table(args, models))


if __name__ == "__main__":
    main()
