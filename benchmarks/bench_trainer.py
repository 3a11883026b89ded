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

Usage: `python benchmarks/bench_trainer.py [--rounds 5] [--image-size 64] [--vae-blocks 3] [--steps 10]`
(`--help` lists the batch flags, `--skip-timing` and `--skip-memory`).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MEMORY_VARIANTS = ("lora-kl-off", "lora-kl-on", "full-kl-off", "full-kl-on")
PROMPTS = ("a red cube", "a blue sphere", "a green cone", "a yellow torus")


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the timed workload (tiny models, sampling and training sizes), shared with `bench_sdxl.py`."""
    parser.add_argument("--rounds", type=int, default=5, help="Timed rounds (each times every trainer once).")
    parser.add_argument("--image-size", type=int, default=64, help="Side of the tiny pipeline's images, pixels.")
    parser.add_argument(
        "--vae-blocks", type=int, default=3, help="VAE levels: the latent is image-size / 2**(vae-blocks - 1) wide."
    )
    parser.add_argument("--steps", type=int, default=10, help="Sampling (DDIM) steps per image.")
    parser.add_argument("--sample-batch-size", type=int, default=4, help="Images per sampling batch.")
    parser.add_argument("--batches-per-epoch", type=int, default=2, help="Sampling batches per epoch.")
    parser.add_argument("--train-batch-size", type=int, default=4, help="Samples per train batch.")
    parser.add_argument("--skip-timing", action="store_true", help="Only measure memory.")
    parser.add_argument("--skip-memory", action="store_true", help="Only measure epoch times.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; the hidden `--memory-variant`/`--model-dir` run one memory measurement (subprocess)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_arguments(parser)
    parser.add_argument("--memory-epochs", type=int, default=1, help="Epochs run per memory measurement.")
    parser.add_argument("--memory-variant", choices=MEMORY_VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or args.memory_epochs < 1:
        parser.error("--rounds, --steps and --memory-epochs must be >= 1.")
    return args


# ---------------------------------------------------------------------------------------------- set-up


QUIET_LOGGERS = ("trl", "diffusers", "transformers", "accelerate", "peft", "carve3d_trl")


def quiet_and_single_threaded() -> None:
    """One intra-op thread (see the module docstring) and no deprecation/progress chatter from the libraries."""
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def save_model(root: Path, args: argparse.Namespace) -> Path:
    """Save the tiny pipeline (random weights, seed 0) under `root`; returns its folder."""
    from carve3d_trl.testing import TinyPipelineSpec, save_tiny_pipeline

    spec = TinyPipelineSpec(image_size=args.image_size, vae_blocks=args.vae_blocks)
    return save_tiny_pipeline(root / "tiny-sd", spec, seed=0)


def brightness_reward(images: Any, prompts: tuple[str, ...], metadata: tuple[Any, ...]) -> tuple[Any, dict]:
    """A cheap reward: mean brightness of each image `(B,)`."""
    return images.mean(dim=(1, 2, 3)), {}


def prompt_cycle() -> Callable[[], tuple[str, dict]]:
    """A prompt function cycling through `PROMPTS` (each trainer gets its own, so all see the same prompts)."""
    state = {"i": 0}

    def prompt_fn() -> tuple[str, dict]:
        prompt = PROMPTS[state["i"] % len(PROMPTS)]
        state["i"] += 1
        return prompt, {}

    return prompt_fn


def common_config(args: argparse.Namespace, logdir: Path) -> dict[str, Any]:
    """DDPOConfig fields shared by every trainer: the same batches, steps, stat tracking and no checkpoints."""
    return dict(
        sample_num_steps=args.steps,
        sample_batch_size=args.sample_batch_size,
        sample_num_batches_per_epoch=args.batches_per_epoch,
        train_batch_size=args.train_batch_size,
        per_prompt_stat_tracking=True,
        mixed_precision="no",
        log_with=None,
        save_freq=10**9,  # no checkpoint (TRL's `accelerator.save_state()` needs a project dir) during timing
        logdir=str(logdir),
        seed=0,
    )


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


def synchronize() -> None:
    """Wait for queued CUDA work (so that a GPU epoch is timed to its end); nothing on CPU."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


PHASES = ("sampling", "kl_reference", "training", "other")


@dataclass
class TimedTrainer:
    """A trainer being timed: its epoch counter and global step, and per recorded epoch its wall time, its CPU time
    (this process's, which other processes' load disturbs far less) and the CPU time of each phase (seconds)."""

    name: str
    trainer: Any
    epoch: int = 0
    global_step: int = 0
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    phases: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    _current: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def __post_init__(self):
        self._wrap("_generate_samples", "sampling")
        self._wrap("_train_batched_samples", "training")
        if hasattr(self.trainer, "reference_log_probs"):
            self._wrap("reference_log_probs", "kl_reference")

    def _wrap(self, method: str, phase: str) -> None:
        """Shadow `trainer.<method>` with an instance attribute that adds its CPU time to `phase`."""
        original = getattr(self.trainer, method)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                self._current[phase] += time.process_time() - start

        setattr(self.trainer, method, timed)

    def run_epoch(self, record: bool) -> float:
        """Run one epoch (`trainer.step`); returns its wall time and, with `record`, keeps its times."""
        gc.collect()
        self._current.clear()
        wall, cpu = time.perf_counter(), time.process_time()
        self.global_step = self.trainer.step(self.epoch, self.global_step)
        synchronize()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        self.epoch += 1
        if record:
            self.wall.append(wall)
            self.cpu.append(cpu)
            # the reference pass runs inside `_generate_samples`: count it apart from sampling
            self._current["sampling"] -= self._current.get("kl_reference", 0.0)
            self._current["other"] = cpu - sum(self._current.values())
            for phase in PHASES:
                self.phases[phase].append(self._current.get(phase, 0.0))
        return wall


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


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    """`median (min-max)` of `values`."""
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


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


def proc_status_mb(field_name: str) -> float | None:
    """A memory field of `/proc/self/status` (`VmRSS`, `VmHWM`) in MB, or `None` where there is no `/proc`."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(f"{field_name}:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def current_rss_mb() -> float:
    """This process's resident set size now, in MB (falls back to the peak where there is no `/proc`)."""
    rss = proc_status_mb("VmRSS")
    return peak_rss_mb() if rss is None else rss


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB: `VmHWM` where `/proc` has it, else `ru_maxrss`.

    `ru_maxrss` starts at the parent's RSS at `fork` time (Linux keeps it across `execve`) and survives a reset, so
    in a child of a big benchmark process it reads the parent's size; `VmHWM` belongs to this process's own memory.
    """
    peak = proc_status_mb("VmHWM")
    if peak is not None:
        return peak
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS (Linux >= 4.0: `/proc/self/clear_refs`), so that the peak is that of
    what runs next rather than of start-up and model loading; returns whether it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return peak_rss_mb() <= current_rss_mb() + 1


def unets_in_memory() -> tuple[int, float]:
    """Number of `UNet2DConditionModel` objects alive in this process and their weights (parameters and
    buffers, LoRA adapters included) in MB."""
    from diffusers import UNet2DConditionModel

    gc.collect()
    unets = [obj for obj in gc.get_objects() if isinstance(obj, UNet2DConditionModel)]
    nbytes = sum(t.numel() * t.element_size() for unet in unets for t in [*unet.parameters(), *unet.buffers()])
    return len(unets), nbytes / 2**20


def measure_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Build one `--memory-variant` trainer in this (fresh) process, run `--memory-epochs` epochs, return memory."""
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
    """Run every memory variant in its own fresh Python process (this script with `--memory-variant`)."""
    shared = [
        f"--image-size={args.image_size}",
        f"--vae-blocks={args.vae_blocks}",
        f"--steps={args.steps}",
        f"--sample-batch-size={args.sample_batch_size}",
        f"--batches-per-epoch={args.batches_per_epoch}",
        f"--train-batch-size={args.train_batch_size}",
        f"--memory-epochs={args.memory_epochs}",
        f"--model-dir={model_dir}",
    ]
    # Large blocks come from mmap and go back to the OS when freed, so the RSS follows the live tensors (as CUDA's
    # allocated bytes do) instead of glibc's free lists; without it, the same run's peak varies by +-10%.
    env = {"MALLOC_MMAP_THRESHOLD_": "65536", **os.environ}
    results = []
    for variant in MEMORY_VARIANTS:
        command = [sys.executable, str(Path(__file__).resolve()), f"--memory-variant={variant}", *shared]
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode:
            raise RuntimeError(f"memory variant {variant} failed:\n{done.stderr[-4000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
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


def log(message: str) -> None:
    """Progress on stderr, so that stdout holds only the markdown report."""
    print(message, file=sys.stderr, flush=True)


def environment_lines(args: argparse.Namespace) -> Iterator[str]:
    """The facts a reader needs to reproduce or compare the numbers."""
    import torch
    import trl

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    latent = args.image_size // 2 ** (args.vae_blocks - 1)
    yield f"- Date: {datetime.date.today().isoformat()}; machine: {platform.machine()} {device}"
    yield (
        f"- torch {torch.__version__}, trl {trl.__version__}, python {platform.python_version()}; "
        f"torch.set_num_threads(1) (threads now: {torch.get_num_threads()})"
    )
    yield (
        f"- Workload: tiny SD pipeline {args.image_size}x{args.image_size} (latent {latent}x{latent}), "
        f"{args.steps} DDIM steps, "
        f"{args.batches_per_epoch} x {args.sample_batch_size} samples per epoch, train batch {args.train_batch_size} "
        f"(one update per epoch), CFG 5.0 in sampling and training, LoRA rank 4, fp32, mean-brightness reward"
    )
    yield "- Command: `" + " ".join(["python benchmarks/bench_trainer.py", *sys.argv[1:]]) + "`"


@contextmanager
def stopwatch(label: str) -> Iterator[None]:
    """Log how long the block took."""
    start = time.perf_counter()
    yield
    log(f"{label}: {time.perf_counter() - start:.0f} s")


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
