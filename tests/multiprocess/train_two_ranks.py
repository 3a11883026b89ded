"""Run by test_multiprocess.py on 2 processes (and on 1): trains a tiny model (any family) with a global sample
batch of 4 and dumps what each rank saw."""

import json
import sys
from pathlib import Path

import torch

from carve3d_trl import Carve3DConfig, Carve3DTrainer, load_ddpo_pipeline
from carve3d_trl.distributed import ensure_process_state

GLOBAL_BATCH = 4
torch.set_num_threads(1)
model_path, prompts_path, out_dir = sys.argv[1:4]
per_process = GLOBAL_BATCH // ensure_process_state().num_processes
config = Carve3DConfig(
    sample_num_steps=2,
    sample_batch_size=per_process,
    sample_num_batches_per_epoch=1,
    train_batch_size=per_process,
    mixed_precision="no",
    log_with=None,
    seed=0,
    logdir=str(Path(out_dir) / "logs"),
    prompt_dataset=prompts_path,
    per_prompt_stat_tracking_min_count=2,
    train_learning_rate=1e-2,
)
# mean brightness of the grid image (B, 3, H, W) or of the views (B, V, 3, h, w): any family (read from the model)
trainer = Carve3DTrainer(
    config, lambda im, p, m: (im.flatten(1).mean(1), {}), sd_pipeline=load_ddpo_pipeline(model_path)
)
initial_lora = torch.cat([p.detach().flatten().clone() for p in trainer.trainable_layers])
trainer.train(epochs=3)
trainer.save_pretrained(Path(out_dir) / "model")
rank = trainer.accelerator.process_index
lora = torch.cat([p.detach().flatten() for p in trainer.trainable_layers])
Path(out_dir, f"rank{rank}.json").write_text(
    json.dumps(
        {
            "num_processes": trainer.accelerator.num_processes,
            "history": trainer.history,
            "reward_stats": trainer.stat_tracker.state_dict(),
            "kl_stats": trainer.kl_stat_tracker.state_dict(),
            "lora": lora.tolist(),
            "initial_lora": initial_lora.tolist(),
            "global_step": trainer.global_step,
        }
    )
)
trainer.accelerator.end_training()
