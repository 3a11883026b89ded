"""The reward contract: what a reward returns beside its rewards is typed (`RewardMetadata`), every per-sample value
in it is logged as `<key>_mean`, and the batches reach the reward and the image hook as named tuples."""

import numpy as np
import pytest
import torch
from small_run import PROMPTS, SMALL

from carve3d_trl import Carve3DConfig, Carve3DStableDiffusionPipeline, Carve3DTrainer
from carve3d_trl.batches import SampledBatch, ScoredBatch
from carve3d_trl.rewards import RewardMetadata, per_sample_values


def test_per_sample_values_keeps_the_numbers_of_shape_batch():
    metadata: RewardMetadata = {"mrc": torch.tensor([0.1, 0.2]), "mrc_per_view": torch.zeros(2, 4)}
    extra = {"clip_score": np.array([1.0, 3.0]), "names": np.array(["a", "b"]), "count": 2, "one": torch.ones(3)}
    values = per_sample_values({**metadata, **extra}, batch_size=2)
    assert list(values) == ["mrc", "clip_score"]
    assert values["clip_score"].dtype == torch.float32 and values["clip_score"].tolist() == [1.0, 3.0]
    assert per_sample_values(["not", "a", "dict"], batch_size=2) == {}


def test_a_users_reward_metadata_is_logged_per_epoch(tiny_model_path, tmp_path):
    seen = {"reward": [], "hook": []}

    def clip_like_reward(images, prompts, metadata):
        seen["reward"].append((images.shape, prompts, metadata))
        score = images.mean(dim=(1, 2, 3))
        return score, {"clip_score": 10 * score, "note": "not logged"}

    def hook(batches, global_step, tracker):
        seen["hook"].append(batches)

    def prompt_fn(state={"i": 0}):  # noqa: B006
        state["i"] += 1
        return PROMPTS[state["i"] % 2], {"index": state["i"]}

    config = Carve3DConfig(**SMALL, logdir=str(tmp_path / "logs"), kl_penalty=False, kl_log=False)
    pipeline = Carve3DStableDiffusionPipeline(tiny_model_path)
    trainer = Carve3DTrainer(config, clip_like_reward, prompt_fn, pipeline, image_samples_hook=hook)
    trainer.train(epochs=1)

    (epoch,) = trainer.history
    assert epoch["clip_score_mean"] == pytest.approx(10 * epoch["reward_mean"], rel=1e-5)
    assert "note_mean" not in epoch
    shape, prompts, metadata = seen["reward"][0]
    assert shape == (2, 3, 32, 32) and len(prompts) == 2 and [m["index"] for m in metadata] == [1, 2]
    batches = seen["hook"][0]
    assert len(batches) == SMALL["sample_num_batches_per_epoch"] and isinstance(batches[0], ScoredBatch)
    images, prompts, prompt_metadata, rewards, reward_metadata = batches[0]  # TRL's positional layout
    assert batches[0].rewards is rewards and torch.allclose(reward_metadata["clip_score"], 10 * rewards)
    assert SampledBatch._fields == ScoredBatch._fields[:3]
