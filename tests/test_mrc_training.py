"""Carve3DTrainer trains the tiny model with the MRC reward (issue 3's integration test)."""

import numpy as np
import torch

from carve3d_trl import Carve3DConfig, Carve3DStableDiffusionPipeline, Carve3DTrainer
from carve3d_trl.rewards import MRCReward, RadianceFieldReconstructor


def test_two_epochs_with_the_mrc_reward(tiny_model_path, tmp_path):
    cheap = RadianceFieldReconstructor(fit_size=8, plane_resolution=8, samples_per_ray=8, steps=10, seed=0)
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
    renders = trainer.card_samples[0]["renders"]
    assert renders.shape == (4, 3, 8, 8)  # the four views, rendered back at the fit size


def test_renders_tile_like_their_grid_whatever_their_size():
    from carve3d_trl.export import tile_renders

    views = torch.arange(6, dtype=torch.float32).reshape(6, 1, 1, 1).expand(6, 3, 4, 4)  # view i is constant i
    grid = tile_renders(views, height=24, width=16)  # a 3x2 grid of 8x8 views (Zero123++-like), renders at 4x4
    assert grid.shape == (3, 24, 16)
    assert [grid[0, 8 * r, 8 * c].item() for r in range(3) for c in range(2)] == [0, 1, 2, 3, 4, 5]
