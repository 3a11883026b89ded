"""SDXL vs SD (issue 5): the tiny SDXL against the tiny SD at matched sizes, trained by `Carve3DTrainer`.

Both models come from `carve3d_trl.testing` with the same `TinyPipelineSpec` and seed: the same UNet blocks, VAE,
scheduler and cross-attention width; SDXL adds its second text encoder, pooled embeddings and size ids (the UNet's
`text_time` added embedding). Both train the same LoRA with the same batches and the default Carve3D settings (KL in
the reward, so every epoch also runs the KL reference pass), so the comparison isolates what the SDXL code path costs.

Two measurements, printed as markdown tables:

1. Epoch time (sampling with CFG + KL reference pass + reward + one optimizer update). The two trainers live in one
   process and are interleaved: one untimed warm-up epoch each, then one epoch each per round for `--rounds` rounds
   (the order alternates). Wall and this process's CPU time are recorded, with the CPU time split into sampling, the
   KL reference pass and training; SDXL/SD ratios are paired per round, given as median (min-max).
2. Peak memory of one epoch, per family in a fresh subprocess, split into the sampling phase (sampling and the KL
   reference pass) and the training phase; the peak is reset before each phase and reported above the memory held
   when the phase starts. With CUDA, `torch.cuda.max_memory_allocated()`; on CPU the peak resident set size (`VmHWM`
   of `/proc/self/status`, reset through `/proc/self/clear_refs`), with glibc returning large blocks to the OS at
   once (`MALLOC_MMAP_THRESHOLD_`) so that the RSS follows the live tensors (see `bench_trainer.py`).

Every process uses one torch thread (see `bench_trainer.py`). Usage:
`python benchmarks/bench_sdxl.py [--rounds 5] [--image_size 64] [--vae_blocks 3] [--steps 10]` (`--help` for more).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# this script's folder is on sys.path when it runs as `python benchmarks/bench_sdxl.py`
from harness import (
    PHASES,
    TimedTrainer,
    add_workload_arguments,
    brightness_reward,
    common_config,
    current_rss_mb,
    environment_lines,
    log,
    peak_rss_mb,
    prompt_cycle,
    quiet_and_single_threaded,
    reset_peak_rss,
    run_memory_child,
    spread,
    stopwatch,
    synchronize,
    workload_flags,
)

FAMILIES = ("sd", "sdxl")
MEMORY_PHASES = {"sampling": "_generate_samples", "training": "_train_epoch"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; the hidden `--memory_family`/`--model_dir` run one memory measurement (subprocess)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_arguments(parser)
    parser.add_argument("--memory_family", choices=FAMILIES, help=argparse.SUPPRESS)
    parser.add_argument("--model_dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be >= 1.")
    return args


def save_models(root: Path, args: argparse.Namespace) -> dict[str, Path]:
    """Save the tiny SD and SDXL pipelines (random weights, seed 0, the same spec) under `root`."""
    from carve3d_trl.testing import TinyPipelineSpec, save_tiny_pipeline, save_tiny_sdxl_pipeline

    spec = TinyPipelineSpec(image_size=args.image_size, vae_blocks=args.vae_blocks)
    return {
        "sd": save_tiny_pipeline(root / "tiny-sd", spec, seed=0),
        "sdxl": save_tiny_sdxl_pipeline(root / "tiny-sdxl", spec, seed=0),
    }


def build_trainer(family: str, model_dir: Path, logdir: Path, args: argparse.Namespace) -> Any:
    """`Carve3DTrainer` with the defaults (KL in the reward), LoRA rank 4, on the `family` pipeline."""
    from carve3d_trl import Carve3DConfig, Carve3DTrainer, load_ddpo_pipeline

    config = Carve3DConfig(**common_config(args, logdir), warmup_first_epoch=False)
    pipeline = load_ddpo_pipeline(str(model_dir), family=family)
    pipeline.set_progress_bar_config(disable=True)
    return Carve3DTrainer(config, brightness_reward, prompt_cycle(), pipeline)


def parameter_counts(trainer: Any) -> dict[str, int]:
    """Parameters of the UNet (without LoRA) and of the text encoders."""
    unet = sum(p.numel() for n, p in trainer.sd_pipeline.unet.named_parameters() if "lora_" not in n)
    pipe = trainer.sd_pipeline.sd_pipeline
    encoders = [getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2")]
    text = sum(p.numel() for encoder in encoders if encoder is not None for p in encoder.parameters())
    return {"unet": unet, "text_encoders": text}


# ---------------------------------------------------------------------------------------------- epoch timing


def time_epochs(
    args: argparse.Namespace, models: dict[str, Path], logdir: Path
) -> tuple[list[TimedTrainer], list[float]]:
    """Warm each trainer up for one epoch, then time `--rounds` interleaved rounds; returns the trainers and the
    1-minute load average after each round."""
    timed = [TimedTrainer(f, build_trainer(f, models[f], logdir / f, args)) for f in FAMILIES]
    for entry in timed:
        log(f"warm-up {entry.name}: {entry.run_epoch(record=False):.2f} s")
    loads = []
    for round_index in range(args.rounds):
        for entry in timed if round_index % 2 == 0 else timed[::-1]:
            entry.run_epoch(record=True)
        loads.append(os.getloadavg()[0])
        times = ", ".join(f"{e.name} {e.wall[-1]:.2f} s ({e.cpu[-1]:.2f} s CPU)" for e in timed)
        log(f"round {round_index + 1}/{args.rounds}: {times}; load average {loads[-1]:.1f}")
    return timed, loads


def ratio_spread(values: list[float], baseline: list[float]) -> str:
    """`median (min-max)` of the per-round ratios `values / baseline`."""
    return spread([v / b for v, b in zip(values, baseline)], "{:.3f}")


def timing_table(sd: TimedTrainer, sdxl: TimedTrainer) -> str:
    """Median epoch and phase times (CPU seconds for the phases) and the SDXL/SD ratios paired per round."""
    rows = [
        "| | Wall s/epoch | CPU s/epoch | Sampling, CPU s | KL reference, CPU s | Training, CPU s |",
        "|---|---|---|---|---|---|",
    ]
    for entry in (sd, sdxl):
        phases = " | ".join(spread(entry.phases[p]) for p in PHASES[:3])
        rows.append(f"| tiny {entry.name.upper()} | {spread(entry.wall)} | {spread(entry.cpu)} | {phases} |")
    phase_ratios = " | ".join(ratio_spread(sdxl.phases[p], sd.phases[p]) for p in PHASES[:3])
    rows.append(
        f"| SDXL / SD | {ratio_spread(sdxl.wall, sd.wall)} | {ratio_spread(sdxl.cpu, sd.cpu)} | {phase_ratios} |"
    )
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------- memory


def record_peak(trainer: Any, method: str, phase: str, phases: dict[str, dict[str, float]]) -> None:
    """Shadow `trainer.<method>` so that each call resets the peak memory first and stores, under `phases[phase]`,
    the memory at its start and its peak (MB)."""
    import torch

    cuda = torch.cuda.is_available()
    original = getattr(trainer, method)

    def measured(*args: Any, **kwargs: Any) -> Any:
        gc.collect()
        synchronize()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated() / 2**20
        else:
            reset_peak_rss()
            start = current_rss_mb()
        result = original(*args, **kwargs)
        synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mb()
        phases[phase] = {"start_mb": start, "peak_mb": peak}
        return result

    setattr(trainer, method, measured)


def measure_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Build the `--memory_family` trainer in this (fresh) process, run one epoch and return each phase's peak."""
    import torch

    with tempfile.TemporaryDirectory() as logdir:
        trainer = build_trainer(args.memory_family, Path(args.model_dir), Path(logdir), args)
        phases: dict[str, dict[str, float]] = {}
        for phase, method in MEMORY_PHASES.items():
            record_peak(trainer, method, phase, phases)
        trainer.step(0, 0)
        cuda = torch.cuda.is_available()
        counts = parameter_counts(trainer)
    return {"family": args.memory_family, "kind": "CUDA allocated" if cuda else "RSS", "phases": phases, **counts}


def run_memory_subprocesses(args: argparse.Namespace, models: dict[str, Path]) -> list[dict[str, Any]]:
    """One fresh Python process per family (this script with `--memory_family`)."""
    results = []
    for family in FAMILIES:
        flags = [f"--memory_family={family}", *workload_flags(args), f"--model_dir={models[family]}"]
        results.append(run_memory_child(__file__, flags, family))
        log(f"memory {family}: {results[-1]['phases']}")
    return results


def memory_table(results: list[dict[str, Any]]) -> str:
    """Per family and phase: the memory at the phase's start, its peak, and the peak above the start; SDXL/SD."""
    kind = results[0]["kind"]
    rows = [
        f"| | UNet params | Text encoder params | Phase | {kind} at start, MB | Peak {kind}, MB | Peak - start, MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for phase, m in r["phases"].items():
            rows.append(
                f"| tiny {r['family'].upper()} | {r['unet']:,} | {r['text_encoders']:,} | {phase} "
                f"| {m['start_mb']:.0f} | {m['peak_mb']:.0f} | {m['peak_mb'] - m['start_mb']:.1f} |"
            )
    sd, sdxl = results
    for phase in MEMORY_PHASES:
        a, b = sd["phases"][phase], sdxl["phases"][phase]
        delta = (b["peak_mb"] - b["start_mb"]) / (a["peak_mb"] - a["start_mb"])
        rows.append(
            f"| SDXL / SD | {sdxl['unet'] / sd['unet']:.3f} | {sdxl['text_encoders'] / sd['text_encoders']:.3f} "
            f"| {phase} | {b['start_mb'] / a['start_mb']:.3f} | {b['peak_mb'] / a['peak_mb']:.3f} | {delta:.3f} |"
        )
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------- reporting


def report_lines(args: argparse.Namespace) -> Iterator[str]:
    """The harness's environment lines, for this workload and command."""
    for line in environment_lines(args):
        if line.startswith("- Workload"):
            line = line.replace("tiny SD pipeline", "tiny SD and SDXL pipelines (same spec)")
            line = line.replace("mean-brightness reward", "mean-brightness reward, KL in the reward")
        yield line


def main(argv: list[str] | None = None) -> None:
    """Print the environment, the epoch-time table and the memory table (or, in a child, one memory result)."""
    args = parse_args(argv)
    quiet_and_single_threaded()
    if args.memory_family:  # a child process: one measurement, printed as JSON on the last line
        print(json.dumps(measure_memory(args)))
        return
    with tempfile.TemporaryDirectory() as tmp, stopwatch("total"):
        models = save_models(Path(tmp), args)
        print("\n".join(report_lines(args)))
        if not args.skip_timing:
            with stopwatch("epoch timing"):
                (sd, sdxl), loads = time_epochs(args, models, Path(tmp) / "logs")
            print(f"\nEpoch time, {args.rounds} interleaved rounds after one warm-up epoch each, median (min-max):\n")
            print(timing_table(sd, sdxl))
            print(
                f"\nRatios are paired per round. 1-minute load average after the rounds: {spread(loads, '{:.1f}')} "
                "(other processes share the cores: wall times follow it, CPU times much less)."
            )
        if not args.skip_memory:
            with stopwatch("memory"):
                results = run_memory_subprocesses(args, models)
            print("\nPeak memory of one epoch, one fresh process per family, peak reset at each phase's start:\n")
            print(memory_table(results))


if __name__ == "__main__":
    main()
