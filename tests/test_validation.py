"""Every inconsistent setting fails up front, with one clear error naming the field(s) and a valid alternative."""

import pytest
import torch

from carve3d_trl import Carve3DConfig
from carve3d_trl.prompts import clean_prompts, load_prompts

CONFIG_CASES = [
    (dict(sample_batch_size=3, train_batch_size=2), "set `train_batch_size` to one of [1, 3]"),
    (
        dict(sample_batch_size=2, train_batch_size=4),
        "`sample_batch_size` (2) must be a multiple of `train_batch_size`",
    ),
    (dict(train_num_inner_epochs=2), "set `on_policy=False` for DDPO's multi-update"),
    (dict(sample_batch_size=4, train_batch_size=2, train_gradient_accumulation_steps=3), "set it to 4"),
    (
        dict(
            on_policy=False, sample_batch_size=2, sample_num_batches_per_epoch=3, train_gradient_accumulation_steps=4
        ),
        "`train_gradient_accumulation_steps` to one of [1, 2, 3, 6]",
    ),
    (dict(train_timestep_fraction=0.0), "`train_timestep_fraction` must be in (0, 1]"),
    (dict(train_timestep_fraction=1.5), "`train_timestep_fraction` must be in (0, 1]"),
    (dict(kl_normalized_coeff=-0.2), "`kl_normalized_coeff` must be >= 0"),
    (dict(kl_beta=-0.001), "`kl_beta` must be >= 0"),
    (dict(sample_batch_size=0), "`sample_batch_size` must be >= 1"),
    (dict(sample_num_steps=0), "`sample_num_steps` must be >= 1"),
    (dict(num_epochs=0), "`num_epochs` must be >= 1"),
    (dict(save_freq=0), "`save_freq` must be >= 1"),
    (dict(train_learning_rate=0.0), "`train_learning_rate` must be > 0"),
    (dict(train_clip_range=-1.0), "`train_clip_range` must be > 0"),
    (dict(sample_eta=0.0), "need a stochastic DDIM sampler"),
    (dict(mixed_precision="fp8"), "`mixed_precision` must be one of ('no', 'fp16', 'bf16')"),
    (dict(log_with="mlflow"), "`log_with` must be 'tensorboard', 'wandb' or unset"),
    (dict(sample_guidance_scale=1.0), "set `sample_guidance_scale` > 1 or `train_cfg=False`"),
    (
        dict(per_prompt_stat_tracking_min_count=32, per_prompt_stat_tracking_buffer_size=16),
        "statistics would never be used",
    ),
    (dict(prompt_dataset_size=-5), "`prompt_dataset_size` must be >= 0"),
    (dict(resume_from="/nonexistent/run"), "holds no Carve3D checkpoint"),
]


@pytest.mark.parametrize(("kwargs", "message"), CONFIG_CASES)
def test_bad_configuration_is_refused_with_a_fix(kwargs, message):
    with pytest.raises(ValueError) as error:
        Carve3DConfig(**kwargs)
    assert message in str(error.value)


def write_jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


PROMPT_CASES = [
    (lambda d: load_prompts(write_jsonl(d / "p.jsonl", [{"text": "a"}])), "has no column 'prompt'; its columns are"),
    (lambda d: load_prompts(write_jsonl(d / "p.jsonl", [{"prompt": "a"}, {"prompt": ""}])), "1 empty prompt(s)"),
    (lambda d: load_prompts(write_jsonl(d / "p.jsonl", [{"prompt": "x"}] * 3)), "all 3 prompts are the same"),
    (lambda d: clean_prompts([], source="prompts.txt"), "prompts.txt holds no prompts"),
    (lambda d: load_prompts(write_jsonl(d / "p.jsonl", [{"prompt": "a"}]), split="validation"), "only a 'train'"),
]


@pytest.mark.parametrize(("call", "message"), PROMPT_CASES)
def test_bad_prompt_sets_are_refused(tmp_path, call, message):
    with pytest.raises(ValueError) as error:
        call(tmp_path)
    assert message in str(error.value)


def test_bad_reward_settings_are_refused_before_any_work():
    from carve3d_trl.rewards import MRCReward, instant3d_layout, split_grid

    with pytest.raises(ValueError, match="radiance_field"):
        MRCReward(reconstructor="nerfstudio", metric="mse")
    with pytest.raises(ValueError, match="lpips"):
        MRCReward(metric="ssim")
    with pytest.raises(ValueError, match="2x2"):
        split_grid(torch.zeros(1, 3, 63, 64), instant3d_layout())
