"""Carve3D RL fine-tuning of a text-to-multi-view diffusion model with the MRC reward.

Runs with `python` or `accelerate launch`. With no arguments it fine-tunes the toy multi-view model shipped with the
package (`carve3d_trl.toy`, short-SFT checkpoint) on CPU in a few minutes and writes the LoRA, its model card, the logs
and the reward curve to `--output_dir`:

    python examples/carve3d_train.py --output_dir outputs/tiny-carve3d

A real model (one GPU, fp16; see README for multi-GPU, multi-node and DeepSpeed launch lines):

    accelerate launch --config_file examples/accelerate/1gpu.yaml examples/carve3d_train.py \
        --pretrained_model <multi-view SD model> --prompt_dataset <hub dataset or file> \
        --mixed_precision fp16 --sample_num_steps 100 --sample_batch_size 8 --train_batch_size 2 --num_epochs 55 \
        --mrc_metric lpips --output_dir outputs/carve3d --push_to_hub --hub_repo_id <user>/<repo>

A view-batched model (MVDream's architecture; its MRC layout is its own cameras), e.g. the view-batched toy:

    python examples/carve3d_train.py --pipeline_family view_batched --output_dir outputs/tiny-carve3d-views

A YAML file of flags (`--config`, command-line flags override it), e.g. an Instant3D-like SDXL model:

    accelerate launch --config_file examples/accelerate/1gpu.yaml examples/carve3d_train.py \
        --config examples/configs/instant3d_sdxl.yaml --pretrained_model <SDXL multi-view model> \
        --prompt_dataset <hub dataset or file>
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from trl import TrlParser

from carve3d_trl import Carve3DConfig, Carve3DTrainer, ImageSamplesLogger, load_ddpo_pipeline
from carve3d_trl.pipelines import FAMILIES, model_camera_layout
from carve3d_trl.rewards import MRCReward
from carve3d_trl.rewards.arguments import MRCArguments, build_mrc_reward
from carve3d_trl.toy import TOY_GUIDANCE_SCALE, toy_model_path

logger = logging.getLogger("carve3d_train")
EXAMPLE_PROMPTS = Path(__file__).parent / "prompts" / "toy_scenes.txt"
# Settings of the embedded CPU run; every one can be overridden on the command line.
CPU_DEFAULTS = dict(
    prompt_dataset=str(EXAMPLE_PROMPTS),
    num_epochs=6,
    sample_num_steps=10,
    sample_guidance_scale=TOY_GUIDANCE_SCALE,
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
        default="",
        metadata={"help": "Base model: Hub id or diffusers folder. Empty: the toy model shipped with the package."},
    )
    pretrained_revision: str = field(default="main", metadata={"help": "Revision of a Hub base model."})
    output_dir: str = field(default="outputs/carve3d", metadata={"help": "Where the LoRA, card and logs go."})
    use_lora: bool = field(default=True, metadata={"help": "Train LoRA adapters (else the full UNet)."})
    lora_rank: int = field(default=4, metadata={"help": "LoRA rank (the recipe uses 4)."})
    pipeline_family: str = field(
        default="auto",
        metadata={
            "help": "sd, sdxl (grid models), view_batched (MVDream's architecture), or auto: from the model's "
            "model_index.json. With no --pretrained_model, view_batched selects the view-batched toy."
        },
    )
    vae_slicing: bool = field(default=False, metadata={"help": "Decode sampled latents one image at a time."})
    vae_tiling: bool = field(default=False, metadata={"help": "Decode large images in tiles."})
    attention_slicing: str = field(
        default="", metadata={"help": "Sliced attention: auto, max or a slice size (empty: off; not for GPU SDPA)."}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute UNet activations in the backward pass (less memory, slower)."}
    )
    hub_repo_id: str = field(default="", metadata={"help": "Hub model repo for --push_to_hub."})
    num_threads: int = field(default=1, metadata={"help": "CPU threads per process for torch (0: torch's default)."})


def card_config(config: Carve3DConfig, mrc_args: MRCArguments, reward: MRCReward) -> dict:
    """The training configuration shown in the model card, with the reward actually used."""
    terms = f", silhouette weight {reward.silhouette_weight:g}, MSE weight {reward.mse_weight:g}"
    return {
        **config.to_dict(),
        "reward": f"MRC ({reward.metric.name}{terms})",
        "reconstructor": mrc_args.mrc_reconstructor,
    }


def build_parser() -> TrlParser:
    """Flags of the three argument dataclasses, with the CPU defaults; `--config <yaml>` sets flags from a file."""
    parser = TrlParser((ScriptArguments, MRCArguments, Carve3DConfig))
    parser.set_defaults(**CPU_DEFAULTS)
    return parser


def main() -> None:
    parser = build_parser()
    args, mrc_args, config = parser.parse_args_and_config()
    if config.push_to_hub and not args.hub_repo_id:
        parser.error("--push_to_hub needs --hub_repo_id <user>/<repo>.")
    if args.pipeline_family not in FAMILIES:
        parser.error(f"--pipeline_family must be one of {', '.join(FAMILIES)}, got '{args.pipeline_family}'.")
    if args.pipeline_family == "sdxl" and not args.pretrained_model:
        parser.error(
            "--pipeline_family sdxl needs --pretrained_model (the embedded toy models are SD and view-batched)."
        )
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    output_dir = Path(args.output_dir)
    if config.logdir == "logs":
        config.logdir = str(output_dir / "logs")
    config.project_kwargs.setdefault("project_dir", config.logdir)
    toy_family = "view_batched" if args.pipeline_family == "view_batched" else "grid"
    model = args.pretrained_model or str(toy_model_path("short", family=toy_family))
    # reads model_index.json only: bad reward settings (e.g. a grid layout for a view-batched model) fail before any
    # model loads
    reward = build_mrc_reward(mrc_args, config.seed, model_layout=model_camera_layout(model, args.pretrained_revision))
    pipeline = load_ddpo_pipeline(
        model,
        family=args.pipeline_family,
        pretrained_model_revision=args.pretrained_revision,
        use_lora=args.use_lora,
        lora_rank=args.lora_rank,
    )
    slicing = args.attention_slicing
    pipeline.enable_memory_savings(
        vae_slicing=args.vae_slicing,
        vae_tiling=args.vae_tiling,
        attention_slicing=int(slicing) if slicing.isdigit() else slicing or None,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    hook = ImageSamplesLogger(grid=(reward.layout.rows, reward.layout.cols))
    trainer = Carve3DTrainer(config, reward, sd_pipeline=pipeline, image_samples_hook=hook)
    trainer.train()
    trainer.save_pretrained(output_dir / "lora", config=card_config(config, mrc_args, reward))
    if config.push_to_hub:
        print("Pushed:", trainer.push_to_hub(args.hub_repo_id))
    if trainer.accelerator.is_main_process:
        print(f"LoRA, model card and reward curve: {output_dir / 'lora'}; logs and checkpoints: {config.logdir}")
    trainer.accelerator.end_training()  # close the trackers and the process group (a process may abort without it)


if __name__ == "__main__":
    main()
