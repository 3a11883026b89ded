"""Carve3D RL fine-tuning of a text-to-multi-view diffusion model with the MRC reward.

Runs with `python` or `accelerate launch`. With no arguments it fine-tunes the embedded tiny model on CPU in a few
minutes and writes the LoRA, its model card, the logs and the reward curve to `--output_dir`:

    python examples/carve3d_train.py --output_dir outputs/tiny-carve3d

A real model (one GPU, fp16; see README for multi-GPU, multi-node and DeepSpeed launch lines):

    accelerate launch --config_file examples/accelerate/1gpu.yaml examples/carve3d_train.py \
        --pretrained_model <multi-view SD model> --prompt_dataset <hub dataset or file> \
        --mixed_precision fp16 --sample_num_steps 100 --sample_batch_size 8 --train_batch_size 2 --num_epochs 55 \
        --mrc_metric lpips --output_dir outputs/carve3d --push_to_hub --hub_repo_id <user>/<repo>
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

from carve3d_trl import Carve3DConfig, Carve3DStableDiffusionPipeline, Carve3DTrainer, ImageSamplesLogger
from carve3d_trl.distributed import ensure_process_state
from carve3d_trl.rewards import MRCReward
from carve3d_trl.rewards.arguments import MRCArguments, build_mrc_reward
from carve3d_trl.testing import TinyPipelineSpec, save_tiny_pipeline

logger = logging.getLogger("carve3d_train")
EXAMPLE_PROMPTS = Path(__file__).parent / "prompts" / "objects.txt"
# Settings of the embedded CPU run; every one can be overridden on the command line.
CPU_DEFAULTS = dict(
    prompt_dataset=str(EXAMPLE_PROMPTS),
    num_epochs=6,
    sample_num_steps=10,
    sample_batch_size=6,
    sample_num_batches_per_epoch=1,
    train_batch_size=3,
    mixed_precision="no",
    log_with="tensorboard",
    save_freq=2,
    num_checkpoint_limit=2,
    per_prompt_stat_tracking_min_count=2,
    per_prompt_stat_tracking_buffer_size=6,
    train_learning_rate=3e-3,
    tracker_project_name="carve3d",
)


@dataclass
class ScriptArguments:
    pretrained_model: str = field(
        default="", metadata={"help": "Base model: Hub id or diffusers folder. Empty: the embedded tiny model."}
    )
    pretrained_revision: str = field(default="main", metadata={"help": "Revision of a Hub base model."})
    output_dir: str = field(default="outputs/carve3d", metadata={"help": "Where the LoRA, card and logs go."})
    use_lora: bool = field(default=True, metadata={"help": "Train LoRA adapters (else the full UNet)."})
    lora_rank: int = field(default=4, metadata={"help": "LoRA rank (the recipe uses 4)."})
    hub_repo_id: str = field(default="", metadata={"help": "Hub model repo for --push_to_hub."})
    num_threads: int = field(default=1, metadata={"help": "CPU threads per process for torch (0: torch's default)."})


def card_config(config: Carve3DConfig, mrc_args: MRCArguments, reward: MRCReward) -> dict:
    """The training configuration shown in the model card, with the reward actually used."""
    return {**config.to_dict(), "reward": f"MRC ({reward.metric.name})", "reconstructor": mrc_args.mrc_reconstructor}


def main() -> None:
    parser = HfArgumentParser((ScriptArguments, MRCArguments, Carve3DConfig))
    parser.set_defaults(**CPU_DEFAULTS)
    args, mrc_args, config = parser.parse_args_into_dataclasses()
    if config.push_to_hub and not args.hub_repo_id:
        parser.error("--push_to_hub needs --hub_repo_id <user>/<repo>.")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    output_dir = Path(args.output_dir)
    if config.logdir == "logs":
        config.logdir = str(output_dir / "logs")
    config.project_kwargs.setdefault("project_dir", config.logdir)
    reward = build_mrc_reward(mrc_args, config.seed)  # fails fast on bad reward settings, before any model loads

    model = args.pretrained_model
    if not model:
        model = str(output_dir / "base-model")
        with ensure_process_state().main_process_first():  # built once, then read by every process
            if not Path(model, "model_index.json").exists():
                save_tiny_pipeline(model, TinyPipelineSpec(image_size=64))
    pipeline = Carve3DStableDiffusionPipeline(
        model, pretrained_model_revision=args.pretrained_revision, use_lora=args.use_lora, lora_rank=args.lora_rank
    )
    hook = ImageSamplesLogger(grid=(reward.layout.rows, reward.layout.cols))
    trainer = Carve3DTrainer(config, reward, sd_pipeline=pipeline, image_samples_hook=hook)
    trainer.train()
    trainer.save_pretrained(output_dir / "lora", config=card_config(config, mrc_args, reward))
    if config.push_to_hub:
        print("Pushed:", trainer.push_to_hub(args.hub_repo_id))
    if trainer.accelerator.is_main_process:
        print(f"LoRA, model card and reward curve: {output_dir / 'lora'}; logs and checkpoints: {config.logdir}")


if __name__ == "__main__":
    main()
