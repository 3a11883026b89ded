import pytest
from trl import DDPOConfig

from carve3d_trl import Carve3DConfig
from carve3d_trl.trainer import as_carve3d_config


def test_on_policy_derives_accumulation_so_train_total_equals_sample_total():
    config = Carve3DConfig(sample_batch_size=8, sample_num_batches_per_epoch=3, train_batch_size=2)
    assert config.train_gradient_accumulation_steps == 12
    assert config.train_batch_size * config.train_gradient_accumulation_steps == 8 * 3


def test_on_policy_off_keeps_ddpo_accumulation():
    config = Carve3DConfig(
        on_policy=False,
        sample_batch_size=4,
        sample_num_batches_per_epoch=2,
        train_batch_size=2,
        train_gradient_accumulation_steps=2,
    )
    assert config.train_gradient_accumulation_steps == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(sample_batch_size=3, train_batch_size=2), "set `train_batch_size` to one of [1, 3]"),
        (dict(train_num_inner_epochs=2), "set `on_policy=False`"),
        (
            dict(
                sample_batch_size=4,
                sample_num_batches_per_epoch=2,
                train_batch_size=2,
                train_gradient_accumulation_steps=3,
            ),
            "leave it unset (or set it to 4)",
        ),
        (
            dict(
                on_policy=False,
                sample_batch_size=2,
                sample_num_batches_per_epoch=3,
                train_batch_size=2,
                train_gradient_accumulation_steps=2,
            ),
            "train_gradient_accumulation_steps` to one of [1, 3]",
        ),
        (dict(train_timestep_fraction=0.0), "(0, 1]"),
        (dict(kl_normalized_coeff=-0.1), "`kl_normalized_coeff` must be >= 0"),
        (dict(kl_beta=-1.0), "`kl_beta` must be >= 0"),
        (dict(sample_batch_size=0), "`sample_batch_size` must be >= 1"),
        (dict(prompt_dataset_size=-1), "`prompt_dataset_size` must be >= 0"),
    ],
)
def test_invalid_settings_are_refused_with_a_fix(kwargs, message):
    with pytest.raises(ValueError) as error:
        Carve3DConfig(**kwargs)
    assert message in str(error.value)


def test_recipe_defaults():
    config = Carve3DConfig()
    assert config.kl_penalty and config.kl_in_reward and config.kl_per_prompt_stat_tracking
    assert (config.kl_normalized_coeff, config.kl_beta) == (0.2, 0.001)
    assert config.on_policy and config.warmup_first_epoch and config.per_prompt_stat_tracking


def test_plain_ddpo_config_maps_to_ddpo_behaviour():
    ddpo = DDPOConfig(sample_batch_size=4, train_batch_size=2, train_gradient_accumulation_steps=2, seed=7)
    config = as_carve3d_config(ddpo)
    assert isinstance(config, Carve3DConfig)
    assert not (config.on_policy or config.kl_penalty or config.kl_log or config.warmup_first_epoch)
    assert config.train_gradient_accumulation_steps == 2 and config.seed == 7
    assert config.per_prompt_stat_tracking is False  # DDPOConfig's own default


def test_config_parses_from_command_line():
    from transformers import HfArgumentParser

    (config,) = HfArgumentParser(Carve3DConfig).parse_args_into_dataclasses(
        ["--kl_normalized_coeff", "0.5", "--sample_batch_size", "4", "--train_batch_size", "2", "--no_kl_in_reward"]
    )
    assert config.kl_normalized_coeff == 0.5 and not config.kl_in_reward
    assert config.train_gradient_accumulation_steps == 2 * config.sample_num_batches_per_epoch
