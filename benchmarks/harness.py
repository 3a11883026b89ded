"""What the benchmarks share: quiet single-threaded processes, the tiny timed workload (flags, config, reward,
prompts), epoch timing by phase, memory readings, and reporting helpers. The benchmark scripts import it from beside
them (`python benchmarks/<script>.py` puts this folder on `sys.path`)."""

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
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROMPTS = ("a red cube", "a blue sphere", "a green cone", "a yellow torus")


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the timed workload (tiny models, sampling and training sizes), shared with `bench_sdxl.py`."""
    parser.add_argument("--rounds", type=int, default=5, help="Timed rounds (each times every trainer once).")
    parser.add_argument("--image_size", type=int, default=64, help="Side of the tiny pipeline's images, pixels.")
    parser.add_argument(
        "--vae_blocks", type=int, default=3, help="VAE levels: the latent is image_size / 2**(vae_blocks - 1) wide."
    )
    parser.add_argument("--steps", type=int, default=10, help="Sampling (DDIM) steps per image.")
    parser.add_argument("--sample_batch_size", type=int, default=4, help="Images per sampling batch.")
    parser.add_argument("--batches_per_epoch", type=int, default=2, help="Sampling batches per epoch.")
    parser.add_argument("--train_batch_size", type=int, default=4, help="Samples per train batch.")
    parser.add_argument("--skip_timing", action="store_true", help="Only measure memory.")
    parser.add_argument("--skip_memory", action="store_true", help="Only measure epoch times.")


def workload_flags(args: argparse.Namespace) -> list[str]:
    """The image and batch flags of `add_workload_arguments` as given, for a child process of the same script."""
    names = ("image_size", "vae_blocks", "steps", "sample_batch_size", "batches_per_epoch", "train_batch_size")
    return [f"--{name}={getattr(args, name)}" for name in names]


def run_memory_child(script: str, flags: list[str], label: str) -> dict[str, Any]:
    """Run `script` with `flags` in a fresh Python process and return the JSON object its last output line holds.

    Large blocks come from mmap there (`MALLOC_MMAP_THRESHOLD_`) and go back to the OS when freed, so the RSS follows
    the live tensors (as CUDA's allocated bytes do) instead of glibc's free lists; without it, the same run's peak
    varies by +-10%. Raises `RuntimeError` with the end of the child's stderr when it fails.
    """
    env = {"MALLOC_MMAP_THRESHOLD_": "65536", **os.environ}
    done = subprocess.run(
        [sys.executable, str(Path(script).resolve()), *flags], capture_output=True, text=True, env=env
    )
    if done.returncode:
        raise RuntimeError(f"memory run {label} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def channel_list(text: str) -> tuple[int, ...]:
    """`"320,640,1280,1280"` -> `(320, 640, 1280, 1280)` (the `--unet_channels` flag)."""
    try:
        channels = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not channels or min(channels) < 1:
        raise argparse.ArgumentTypeError(f"expected positive widths, got {text!r}")
    return channels


# The model flags, their defaults being `TinyPipelineSpec`'s (the tiny CPU workload); `model_flags` passes them on.
MODEL_FLAGS = ("unet_channels", "layers_per_block", "cross_attention_blocks", "norm_num_groups", "text_hidden_size")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the model's size and of the precision. Their defaults give the tiny model of the CPU workload;
    Stable Diffusion 1.5's UNet is `--unet_channels 320,640,1280,1280 --layers_per_block 2 --cross_attention_blocks 3
    --norm_num_groups 32 --text_hidden_size 768` (the VAE and text encoder stay tiny)."""
    parser.add_argument(
        "--unet_channels", type=channel_list, default=(32, 64), help="UNet block widths, comma-separated."
    )
    parser.add_argument("--layers_per_block", type=int, default=1, help="ResNet/attention layers per UNet block.")
    parser.add_argument(
        "--cross_attention_blocks",
        type=int,
        default=None,
        help="UNet blocks with cross-attention (first going down, last going up); default: all.",
    )
    parser.add_argument("--norm_num_groups", type=int, default=8, help="Group-norm groups of the UNet.")
    parser.add_argument(
        "--text_hidden_size", type=int, default=32, help="Text encoder width (the UNet's cross-attention width)."
    )
    parser.add_argument(
        "--mixed_precision",
        choices=("no", "fp16", "bf16"),
        default="no",
        help="accelerate's mixed precision: frozen weights in half precision, LoRA in fp32 (fp16 needs a GPU).",
    )


def model_spec(args: argparse.Namespace) -> Any:
    """The `TinyPipelineSpec` of the workload: `--image_size`, `--vae_blocks` and the model flags (a script without
    `add_model_arguments` gets the spec's defaults)."""
    from carve3d_trl.testing import TinyPipelineSpec

    sizes = {name: getattr(args, name) for name in MODEL_FLAGS if hasattr(args, name)}
    return TinyPipelineSpec(image_size=args.image_size, vae_blocks=args.vae_blocks, **sizes)


def model_flags(args: argparse.Namespace) -> list[str]:
    """The model and precision flags of `args` as command-line arguments, for a child process of the same script."""
    flags = []
    for name in (*MODEL_FLAGS, "mixed_precision"):
        value = getattr(args, name, None)
        if value is not None:
            flags.append(f"--{name}={','.join(map(str, value)) if isinstance(value, tuple) else value}")
    return flags


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
        mixed_precision=getattr(args, "mixed_precision", "no"),
        log_with=None,
        save_freq=10**9,  # no checkpoint (TRL's `accelerator.save_state()` needs a project dir) during timing
        logdir=str(logdir),
        seed=0,
    )


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


def mean_and_se(values: list[float]) -> tuple[float, float]:
    """The mean of `values` and its standard error (the pooling scripts' estimate over objects or seeds)."""
    return statistics.fmean(values), statistics.stdev(values) / len(values) ** 0.5


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    """`median (min-max)` of `values`."""
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


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


def log(message: str) -> None:
    """Progress on stderr, so that stdout holds only the markdown report."""
    print(message, file=sys.stderr, flush=True)


def environment_lines(args: argparse.Namespace) -> Iterator[str]:
    """The facts a reader needs to reproduce or compare the numbers."""
    import torch
    import trl

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    latent = args.image_size // 2 ** (args.vae_blocks - 1)
    precision = getattr(args, "mixed_precision", "no")
    precision = "fp32" if precision == "no" else f"{precision} mixed precision (LoRA in fp32)"
    yield f"- Date: {datetime.date.today().isoformat()}; machine: {platform.machine()} {device}"
    yield (
        f"- torch {torch.__version__}, trl {trl.__version__}, python {platform.python_version()}; "
        f"torch.set_num_threads(1) (threads now: {torch.get_num_threads()})"
    )
    model = f"tiny SD pipeline {args.image_size}x{args.image_size} (latent {latent}x{latent})"
    spec = model_spec(args)
    if spec != type(spec)(image_size=args.image_size, vae_blocks=args.vae_blocks):  # not the tiny model's UNet
        down, _ = spec.unet_block_types
        model = (
            f"SD pipeline {args.image_size}x{args.image_size} (latent {latent}x{latent}) with a UNet of widths "
            f"{','.join(map(str, spec.unet_channels))}, {spec.layers_per_block} layer(s) per block, cross-attention "
            f"in {down.count('CrossAttnDownBlock2D')} of {len(down)} blocks, text width {spec.text_hidden_size} "
            "(random weights; the VAE and text encoder stay tiny)"
        )
    yield (
        f"- Workload: {model}, "
        f"{args.steps} DDIM steps, "
        f"{args.batches_per_epoch} x {args.sample_batch_size} samples per epoch, train batch {args.train_batch_size} "
        f"(one update per epoch), CFG 5.0 in sampling and training, LoRA rank 4, {precision}, mean-brightness reward"
    )
    yield "- Command: `" + " ".join([f"python benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]]) + "`"


@contextmanager
def stopwatch(label: str) -> Iterator[None]:
    """Log how long the block took."""
    start = time.perf_counter()
    yield
    log(f"{label}: {time.perf_counter() - start:.0f} s")
