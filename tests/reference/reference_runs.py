"""Short seeded training runs whose LoRA, history and rewards are recorded, so that a refactor can prove it changed
no number (`test_reference_runs.py` compares a fresh run with the files recorded here).

Record (only when a change is *meant* to alter the numbers; say so in the commit):
`.venv/bin/python tests/reference/reference_runs.py`
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from carve3d_trl import Carve3DConfig, Carve3DTrainer, load_ddpo_pipeline
from carve3d_trl.rewards import MRCReward, RadianceFieldReconstructor
from carve3d_trl.testing import TinyPipelineSpec, save_tiny_sdxl_pipeline
from carve3d_trl.toy import toy_model_path

RECORD_DIR = Path(__file__).parent
RUNS = ("grid_sd_toy", "tiny_sdxl")
PROMPTS = ("a red cube", "a blue sphere on a green box")


def _prompt_cycle():
    state = {"i": 0}

    def prompt_fn():
        state["i"] += 1
        return PROMPTS[(state["i"] - 1) % len(PROMPTS)], {}

    return prompt_fn


def _reward(run: str):
    if run == "grid_sd_toy":  # the MRC reward, cheap settings: exercises the reward's metadata (mrc) end to end
        cheap = RadianceFieldReconstructor(fit_size=8, grid_resolution=8, samples_per_ray=8, steps=5, seed=0)
        return MRCReward(reconstructor=cheap, metric="mse", seed=0)

    def brightness(images, prompts, metadata):
        return images.mean(dim=(1, 2, 3)), {}

    return brightness


def run_reference(run: str, workdir: Path) -> dict:
    """Train `run` for three epochs (the first a warm-up), KL in the reward; return its LoRA, history, rewards."""
    if run == "grid_sd_toy":
        model = toy_model_path("short")
    else:
        model = save_tiny_sdxl_pipeline(workdir / "tiny-sdxl", TinyPipelineSpec(image_size=32), seed=0)
    config = Carve3DConfig(
        sample_num_steps=3,
        sample_batch_size=2,
        sample_num_batches_per_epoch=2,
        train_batch_size=2,
        num_epochs=3,
        train_learning_rate=3e-3,
        per_prompt_stat_tracking_min_count=2,
        mixed_precision="no",
        log_with=None,
        logdir=str(workdir / "logs"),
        seed=0,
    )
    rewards = []

    def record_rewards(prompt_image_data, global_step, tracker):
        rewards.append([float(r) for batch in prompt_image_data for r in batch[3]])

    pipeline = load_ddpo_pipeline(str(model))
    trainer = Carve3DTrainer(config, _reward(run), _prompt_cycle(), pipeline, image_samples_hook=record_rewards)
    trainer.train()
    lora = {
        name: p.detach().clone().contiguous()
        for name, p in trainer.sd_pipeline.unet.named_parameters()
        if p.requires_grad
    }
    return {"lora": lora, "history": trainer.history, "rewards": rewards}


def record(run: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        result = run_reference(run, Path(tmp))
    save_file(result["lora"], RECORD_DIR / f"{run}_lora.safetensors")
    summary = {"history": result["history"], "rewards": result["rewards"]}
    (RECORD_DIR / f"{run}.json").write_text(json.dumps(summary, indent=1) + "\n")


def load_record(run: str) -> dict:
    summary = json.loads((RECORD_DIR / f"{run}.json").read_text())
    return {"lora": load_file(RECORD_DIR / f"{run}_lora.safetensors"), **summary}


if __name__ == "__main__":
    torch.set_num_threads(1)
    for name in sys.argv[1:] or RUNS:
        record(name)
        print("recorded", name)
