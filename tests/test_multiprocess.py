"""Two CPU processes under `accelerate launch` (gloo): gathering, identical statistics and weights, single writers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).parent / "multiprocess" / "train_two_ranks.py"


@pytest.fixture(scope="module")
def two_rank_run(tiny_model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("mp")
    prompts = out / "prompts.txt"
    prompts.write_text("a red cube\na blue sphere\n")
    # accelerate routes --cpu multi-process runs through MPI; torchrun-style workers join a gloo group instead when
    # ACCELERATE_USE_CPU is set (carve3d_trl.distributed.ensure_process_state honours it).
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29541",
        str(SCRIPT),
        str(tiny_model_path),
        str(prompts),
        str(out),
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_both_ranks_gather_the_whole_batch_and_agree_on_statistics(two_rank_run):
    _, (rank0, rank1) = two_rank_run
    assert rank0["num_processes"] == rank1["num_processes"] == 2
    assert rank0["reward_stats"] == rank1["reward_stats"]
    assert rank0["kl_stats"] == rank1["kl_stats"]
    # 3 epochs x 4 samples (2 per rank), dealt evenly over 2 prompts: 6 rewards per prompt
    assert {p: len(v) for p, v in rank0["reward_stats"]["buffers"].items()} == {"a red cube": 6, "a blue sphere": 6}
    assert rank0["history"] == rank1["history"]


def test_weights_stay_identical_across_ranks(two_rank_run):
    _, (rank0, rank1) = two_rank_run
    assert rank0["global_step"] == rank1["global_step"] == 2
    np.testing.assert_array_equal(rank0["lora"], rank1["lora"])


def test_checkpoints_and_model_folder_are_written_once(two_rank_run):
    out, _ = two_rank_run
    assert sorted(p.name for p in (out / "logs" / "checkpoints").iterdir()) == [
        "checkpoint_0",
        "checkpoint_1",
        "checkpoint_2",
    ]
    assert not list(out.rglob(".tmp-*"))
    checkpoint = out / "logs" / "checkpoints" / "checkpoint_2"
    assert {"random_states_0.pkl", "random_states_1.pkl", "pytorch_lora_weights.safetensors"} <= {
        p.name for p in checkpoint.iterdir()
    }
    assert (out / "model" / "pytorch_lora_weights.safetensors").is_file()
