"""Carve3DTrainer trains the tiny model with the MRC reward (issue 3's integration test)."""

import numpy as np
import torch

from carve3d_trl import Carve3DConfig, Carve3DStableDiffusionPipeline, Carve3DTrainer
from carve3d_trl.rewards import MRCReward, RadianceFieldReconstructor


def test_two_epochs_with_the_mrc_reward(tiny_model_path, tmp_path):
    cheap = RadianceFieldReconstructor(fit_size=8, grid_resolution=8, samples_per_ray=8, steps=10, seed=0)
    reward = MRCReward(reconstructor=cheap, lpips_pretrained=False, seed=0)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue sphere\n")
    config = Carve3DConfig(
        sample_num_steps=2,
        sample_batch_size=2,
        sample_num_batches_per_epoch=1,
        train_batch_size=2,
        mixed_precision="no",
        log_with=None,
        logdir=str(tmp_path / "logs"),
        prompt_dataset=str(prompts),
        warmup_first_epoch=False,
        train_learning_rate=1e-2,
        per_prompt_stat_tracking_min_count=2,
    )
    trainer = Carve3DTrainer(config, reward, sd_pipeline=Carve3DStableDiffusionPipeline(tiny_model_path))
    before = torch.cat([p.detach().flatten().clone() for p in trainer.trainable_layers])
    trainer.train(epochs=2)
    after = torch.cat([p.detach().flatten() for p in trainer.trainable_layers])
    assert not torch.equal(before, after) and torch.isfinite(after).all()
    for h in trainer.history:  # reward = -MRC, MRC = mean LPIPS over the 4 views
        assert np.isfinite(h["mrc_mean"]) and h["mrc_mean"] > 0
        np.testing.assert_allclose(h["reward_mean"], -h["mrc_mean"], rtol=1e-5)
    sample = trainer.card_samples[0]
    assert sample.renders.shape == sample.image.shape == (3, 32, 32)  # 8x8 renders tiled like the 2x2 grid
