"""Trainer overhead (issue 2): `Carve3DTrainer` against TRL's `DDPOTrainer` on one tiny workload (CPU or GPU).

Two measurements, printed as markdown tables:

1. Epoch time (sampling + reward + training, one optimizer update per epoch) of TRL's `DDPOTrainer` and of
   `Carve3DTrainer` with the KL off and with the KL on (in-reward, the defaults), all with the same LoRA, batches and
   per-prompt statistics. The three trainers live in one process and are interleaved: one untimed warm-up epoch
   each, then one epoch each per round for `--rounds` rounds (the order rotates every round). Wall time and this
   process's CPU time are both recorded; ratios are paired per round (the Carve3D epoch over the DDPO epoch of the
   same round), given as median (min-max). The CPU time is also split into sampling, the KL reference pass and
   training, which shows where the KL cost lies.
2. Peak memory of `Carve3DTrainer` with the KL on against the KL off, in LoRA mode (the reference model is the
   UNet with its adapters disabled) and, as context, with full fine-tuning (which holds a frozen copy of the UNet).
   Each variant runs in a fresh subprocess of this script. With CUDA, `torch.cuda.max_memory_allocated()` is read.
   On CPU the peak RSS (`VmHWM`, reset after the trainer is built, so the peak is that of the epochs; `ru_maxrss`
   where `/proc` is missing) is read, with glibc told to return large blocks to the OS at once
   (`MALLOC_MMAP_THRESHOLD_`), so that the RSS follows the live tensors.

Every benchmark process calls `torch.set_num_threads(1)`: tiny models gain nothing from threads, and on a shared
2-core machine a second OpenMP thread stalls badly whenever another process holds the other core.

Usage: `python benchmarks/bench_trainer.py [--rounds 5] [--image_size 64] [--vae_blocks 3] [--steps 10]`
(`--help` lists the batch flags, `--skip_timing` and `--skip_memory`). The model flags (`--unet_channels`,
`--layers_per_block`, `--cross_attention_blocks`, `--norm_num_groups`, `--text_hidden_size`) and `--mixed_precision`
default to the tiny fp32 CPU workload; on a GPU, an SD-1.5-size UNet in fp16 (`benchmarks/gpu_check.sh` runs this):
`--image_size 256 --vae_blocks 4 --unet_channels 320,640,1280,1280 --layers_per_block 2 --cross_attention_blocks 3
--norm_num_groups 32 --text_hidden_size 768 --mixed_precision fp16`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

# this script's folder is on sys.path when it runs as `python benchmarks/bench_trainer.py`
from harness import (
    PHASES,
    TimedTrainer,
    add_model_arguments,
    add_workload_arguments,
    brightness_reward,
    common_config,
    current_rss_mb,
    environment_lines,
    log,
    model_flags,
    model_spec,
    peak_rss_mb,
    prompt_cycle,
    quiet_and_single_threaded,
    reset_peak_rss,
    run_memory_child,
    spread,
    stopwatch,
    unets_in_memory,
    workload_flags,
)

MEMORY_VARIANTS = ("lora-kl-off", "lora-kl-on", "full-kl-off", "full-kl-on")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; the hidden `--memory_variant`/`--model_dir` run one memory measurement (subprocess)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_arguments(parser)
    add_model_arguments(parser)
    parser.add_argument("--memory_epochs", type=int, default=1, help="Epochs run per memory measurement.")
    parser.add_argument("--memory_variant", choices=MEMORY_VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--model_dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or args.memory_epochs < 1:
        parser.error("--rounds, --steps and --memory_epochs must be >= 1.")
    return args


# ---------------------------------------------------------------------------------------------- set-up


def save_model(root: Path, args: argparse.Namespace) -> Path:
    """Save the pipeline of the model flags (random weights, seed 0) under `root`; returns its folder."""
    from carve3d_trl.testing import save_tiny_pipeline

    return save_tiny_pipeline(root / "tiny-sd", model_spec(args), seed=0)


def build_ddpo(args: argparse.Namespace, model_dir: Path, logdir: Path) -> Any:
    """TRL's `DDPOTrainer` with `DefaultDDPOStableDiffusionPipeline` (LoRA), batched as Carve3D's on-policy mode."""
    from accelerate import PartialState
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    PartialState()  # TRL's pipeline logs through accelerate at construction
    accumulation = args.sample_batch_size * args.batches_per_epoch // args.train_batch_size
    config = DDPOConfig(**common_config(args, logdir), train_gradient_accumulation_steps=accumulation)
    pipeline = DefaultDDPOStableDiffusionPipeline(str(model_dir), use_lora=True)
    return DDPOTrainer(config, brightness_reward, prompt_cycle(), pipeline)


def build_carve3d(args: argparse.Namespace, model_dir: Path, logdir: Path, *, kl: bool, use_lora: bool = True) -> Any:
    """`Carve3DTrainer` on the same workload; `kl=True` keeps the defaults (in-reward KL, logged)."""
    from carve3d_trl import Carve3DConfig, Carve3DStableDiffusionPipeline, Carve3DTrainer

    kl_fields = {} if kl else dict(kl_penalty=False, kl_log=False)
    config = Carve3DConfig(**common_config(args, logdir), warmup_first_epoch=False, **kl_fields)
    pipeline = Carve3DStableDiffusionPipeline(str(model_dir), use_lora=use_lora)
    return Carve3DTrainer(config, brightness_reward, prompt_cycle(), pipeline)


def silence_progress_bars(trainer: Any) -> None:
    """Disable the per-timestep tqdm bar the trainers switch on (identical cost for all, but noisy output)."""
    trainer.sd_pipeline.set_progress_bar_config(disable=True)


# ---------------------------------------------------------------------------------------------- epoch timing


def time_epochs(args: argparse.Namespace, model_dir: Path, logdir: Path) -> tuple[list[TimedTrainer], list[float]]:
    """Build the three trainers, warm each up for one epoch, then time `--rounds` interleaved rounds; returns the
    trainers and the 1-minute load average after each round."""
    timed = [
        TimedTrainer("TRL DDPOTrainer", build_ddpo(args, model_dir, logdir / "ddpo")),
        TimedTrainer("Carve3DTrainer, KL off", build_carve3d(args, model_dir, logdir / "kl-off", kl=False)),
        TimedTrainer("Carve3DTrainer, KL on", build_carve3d(args, model_dir, logdir / "kl-on", kl=True)),
    ]
    for entry in timed:
        silence_progress_bars(entry.trainer)
        log(f"warm-up {entry.name}: {entry.run_epoch(record=False):.2f} s")
    loads = []
    for round_index in range(args.rounds):
        # rotate the order every round, so that no trainer always runs first or last (load drifts within a round)
        for entry in timed[round_index % 3 :] + timed[: round_index % 3]:
            entry.run_epoch(record=True)
        times = ", ".join(f"{entry.wall[-1]:.2f} s ({entry.cpu[-1]:.2f} s CPU)" for entry in timed)
        loads.append(os.getloadavg()[0])
        log(f"round {round_index + 1}/{args.rounds}: {times}; load average {loads[-1]:.1f}")
    return timed, loads


def paired_ratios(entry: TimedTrainer, baseline: TimedTrainer, kind: str) -> str:
    """`median (min-max)` over rounds of `entry`'s epoch time over the baseline's epoch time in the same round."""
    ratios = [t / b for t, b in zip(getattr(entry, kind), getattr(baseline, kind))]
    return spread(ratios, "{:.3f}")


def timing_table(timed: list[TimedTrainer]) -> str:
    """Markdown table: median epoch times (wall and CPU) and their per-round ratios to TRL's DDPO."""
    baseline = timed[0]
    rows = [
        "| Trainer | Wall s/epoch | Wall ratio to DDPO | CPU s/epoch | CPU ratio to DDPO |",
        "|---|---|---|---|---|",
    ]
    for entry in timed:
        wall_ratio, cpu_ratio = (
            ("1", "1") if entry is baseline else (paired_ratios(entry, baseline, k) for k in ("wall", "cpu"))
        )
        rows.append(f"| {entry.name} | {spread(entry.wall)} | {wall_ratio} | {spread(entry.cpu)} | {cpu_ratio} |")
    return "\n".join(rows)


def phase_table(timed: list[TimedTrainer]) -> str:
    """Markdown table: median CPU seconds per epoch spent in each phase."""
    rows = [
        "| Trainer | Sampling (UNet with CFG + VAE decode) | KL reference pass | Training (fwd + bwd) | Other |",
        "|---|---|---|---|---|",
    ]
    for entry in timed:
        cells = [f"{statistics.median(entry.phases[p]):.2f}" for p in PHASES]
        rows.append(f"| {entry.name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------- memory


def measure_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Build one `--memory_variant` trainer in this (fresh) process, run `--memory_epochs` epochs, return memory."""
    import torch

    variant = args.memory_variant
    mode, _, kl = variant.partition("-")
    with tempfile.TemporaryDirectory() as logdir:
        trainer = build_carve3d(args, Path(args.model_dir), Path(logdir), kl=kl == "kl-on", use_lora=mode == "lora")
        silence_progress_bars(trainer)
        num_unets, unet_mb = unets_in_memory()
        cuda = torch.cuda.is_available()
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            baseline, peak_reset = torch.cuda.memory_allocated() / 2**20, True
        else:
            baseline, peak_reset = current_rss_mb(), reset_peak_rss()
        global_step = 0
        for epoch in range(args.memory_epochs):
            global_step = trainer.step(epoch, global_step)
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mb()
        has_reference_copy = trainer.reference_unet is not None
    return dict(
        variant=variant,
        kind="CUDA allocated" if cuda else "RSS",
        unets=num_unets,
        unet_mb=unet_mb,
        reference_copy=has_reference_copy,
        baseline_mb=baseline,
        peak_mb=peak,
        peak_reset=peak_reset,
    )


def run_memory_subprocesses(args: argparse.Namespace, model_dir: Path) -> list[dict[str, Any]]:
    """Run every memory variant in its own fresh Python process (this script with `--memory_variant`)."""
    shared = [
        *workload_flags(args),
        f"--memory_epochs={args.memory_epochs}",
        f"--model_dir={model_dir}",
        *model_flags(args),  # the children load the saved model; what they use of these is the precision
    ]
    results = []
    for variant in MEMORY_VARIANTS:
        results.append(run_memory_child(__file__, [f"--memory_variant={variant}", *shared], variant))
        log(f"memory {variant}: peak {results[-1]['peak_mb']:.0f} MB")
    return results


def memory_table(results: list[dict[str, Any]]) -> str:
    """Markdown table of the memory variants, with KL-on/KL-off ratios per fine-tuning mode."""
    kind = results[0]["kind"]
    by_variant = {r["variant"]: r for r in results}
    header = (
        f"| Variant | UNets in memory | UNet weights, MB | Baseline {kind}, MB | Peak {kind}, MB "
        "| Peak - baseline, MB | Peak ratio KL on / off | (Peak - baseline) ratio |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    rows = []
    for r in results:
        mode = r["variant"].split("-")[0]
        off = by_variant[f"{mode}-kl-off"]
        delta, off_delta = r["peak_mb"] - r["baseline_mb"], off["peak_mb"] - off["baseline_mb"]
        ratios = ["-", "-"]
        if r["variant"].endswith("kl-on"):
            ratios = [f"{r['peak_mb'] / off['peak_mb']:.3f}", f"{delta / off_delta:.3f}" if off_delta > 0 else "n/a"]
        kl_state = "on" if r["variant"].endswith("kl-on") else "off"
        name = f"{'LoRA' if mode == 'lora' else 'Full fine-tuning'}, KL {kl_state}"
        name += " (frozen reference copy)" if r["reference_copy"] else ""
        rows.append(
            f"| {name} | {r['unets']} | {r['unet_mb']:.1f} | {r['baseline_mb']:.0f} | {r['peak_mb']:.0f} "
            f"| {delta:.0f} | {ratios[0]} | {ratios[1]} |"
        )
    return "\n".join([header, *rows])


# ---------------------------------------------------------------------------------------------- reporting


def main(argv: list[str] | None = None) -> None:
    """Print the environment, the epoch-time tables and the memory table (or, in a child, one memory result)."""
    args = parse_args(argv)
    quiet_and_single_threaded()
    if args.memory_variant:  # a child process: one measurement, printed as JSON on the last line
        print(json.dumps(measure_memory(args)))
        return
    with tempfile.TemporaryDirectory() as tmp, stopwatch("total"):
        model_dir = save_model(Path(tmp), args)
        print("\n".join(environment_lines(args)))
        if not args.skip_timing:
            with stopwatch("epoch timing"):
                timed, loads = time_epochs(args, model_dir, Path(tmp) / "logs")
            print(f"\nEpoch time, {args.rounds} interleaved rounds after one warm-up epoch each, median (min-max):\n")
            print(timing_table(timed))
            print(
                f"\nRatios are paired per round. 1-minute load average after the rounds: {spread(loads, '{:.1f}')} "
                "(other processes share the cores: wall times follow it, CPU times much less)."
            )
            print("\nWhere the CPU time of an epoch goes (median seconds):\n")
            print(phase_table(timed))
        if not args.skip_memory:
            with stopwatch("memory"):
                results = run_memory_subprocesses(args, model_dir)
            reset = (
                "reset after construction" if all(r["peak_reset"] for r in results) else "NOT reset (whole process)"
            )
            print(f"\nMemory, one fresh process per variant, {args.memory_epochs} epoch(s) each, peak {reset}:\n")
            print(memory_table(results))


if __name__ == "__main__":
    main()
