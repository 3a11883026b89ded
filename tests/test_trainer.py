"""Carve3DTrainer on a tiny CPU model: DDPO compatibility, on-policy batching, KL, advantages, learning, resume."""

import gc
import os
import signal

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from small_run import PROMPTS, SMALL, brightness
from trl import DDPOConfig, DefaultDDPOStableDiffusionPipeline
from trl.models.modeling_sd_base import scheduler_step

import carve3d_trl.trainer as trainer_module
from carve3d_trl import Carve3DConfig, Carve3DStableDiffusionPipeline, Carve3DTrainer
from carve3d_trl.stats import PromptStatTracker, normalize_batch


def cycle(prompts=PROMPTS):
    state = {"i": 0}

    def prompt_fn():
        state["i"] += 1
        return prompts[(state["i"] - 1) % len(prompts)], {}

    return prompt_fn


def make_trainer(model_path, tmp_path, reward=brightness, **overrides):
    config = Carve3DConfig(**{**SMALL, "logdir": str(tmp_path / "logs"), **overrides})
    return Carve3DTrainer(config, reward, cycle(), Carve3DStableDiffusionPipeline(model_path))


def count_optimizer_steps(trainer):
    """Count real parameter updates (the accelerate wrapper skips steps while accumulating)."""
    inner = trainer.optimizer.optimizer
    counter = {"n": 0}
    original = inner.step

    def step(*args, **kwargs):
        counter["n"] += 1
        return original(*args, **kwargs)

    inner.step = step
    return counter


def lora_vector(trainer):
    return torch.cat([p.detach().flatten().clone() for p in trainer.trainable_layers])


def test_a_ddpo_script_runs_unchanged_with_trls_pipeline(tiny_model_path, tmp_path):
    from accelerate import PartialState

    PartialState()  # TRL's own pipeline logs through accelerate at construction (REFERENCE §5)
    config = DDPOConfig(**SMALL, logdir=str(tmp_path / "logs"), train_gradient_accumulation_steps=2)
    trainer = Carve3DTrainer(config, brightness, cycle(), DefaultDDPOStableDiffusionPipeline(str(tiny_model_path)))
    samples, pairs = trainer._generate_samples(iterations=1, batch_size=2)
    assert len(samples) == 1 and len(pairs) == 1
    images, prompts, metadata = pairs[0]
    assert images.shape == (2, 3, 32, 32) and prompts == tuple(PROMPTS)
    sample = samples[0]
    assert sample["latents"].shape[:2] == (2, 3) and sample["log_probs"].shape == (2, 3)
    assert "ref_log_probs" not in sample  # a plain DDPOConfig has no KL
    embeds = torch.cat([sample["negative_prompt_embeds"], sample["prompt_embeds"]])
    loss, approx_kl, clipfrac = trainer.calculate_loss(
        sample["latents"][:, 0],
        sample["timesteps"][:, 0],
        sample["next_latents"][:, 0],
        sample["log_probs"][:, 0],
        torch.ones(2),
        embeds,
    )
    assert loss.ndim == approx_kl.ndim == clipfrac.ndim == 0
    # at sampling time the ratio is 1, so the clipped loss is -mean(advantages)
    torch.testing.assert_close(loss, torch.tensor(-1.0), atol=1e-4, rtol=0)
    assert trainer.loss(torch.tensor([2.0]), 0.1, torch.tensor([1.5])) == pytest.approx(-2.2)
    before = lora_vector(trainer)
    steps = count_optimizer_steps(trainer)
    trainer.train(epochs=2)
    assert steps["n"] == 2  # DDPO: 4 samples per epoch, train total 2 * 2
    assert not torch.equal(before, lora_vector(trainer))


def test_carve3d_pipeline_needs_no_prior_accelerate_state(tiny_model_path):
    from accelerate.state import PartialState

    PartialState._reset_state()
    pipeline = Carve3DStableDiffusionPipeline(str(tiny_model_path), lora_rank=2)
    pipeline.get_trainable_layers()
    ranks = {m.r["default"] for m in pipeline.unet.modules() if hasattr(m, "lora_A") and hasattr(m, "r")}
    assert ranks == {2}


@pytest.mark.parametrize(
    ("num_batches", "on_policy", "accumulation", "expected_steps"), [(2, True, 1, 1), (3, False, 1, 3)]
)
def test_updates_per_epoch(tiny_model_path, tmp_path, num_batches, on_policy, accumulation, expected_steps):
    trainer = make_trainer(
        tiny_model_path,
        tmp_path,
        sample_num_batches_per_epoch=num_batches,
        on_policy=on_policy,
        train_gradient_accumulation_steps=accumulation,
        warmup_first_epoch=False,
        kl_penalty=False,
        kl_log=False,
    )
    steps = count_optimizer_steps(trainer)
    trainer.train(epochs=1)
    assert steps["n"] == expected_steps
    assert trainer.global_step == expected_steps


def live_unets() -> int:
    """UNets still reachable; unreachable ones from earlier tests are collected first so the count is stable."""
    gc.collect()
    return sum(isinstance(o, UNet2DConditionModel) for o in gc.get_objects())


def test_kl_is_zero_with_a_fresh_lora_then_positive_and_matches_the_base_unet(tiny_model_path, tmp_path):
    unets_before = live_unets()
    trainer = make_trainer(tiny_model_path, tmp_path, warmup_first_epoch=False, train_learning_rate=3e-3)
    assert trainer.reference_unet is None
    assert live_unets() == unets_before + 1

    samples, _ = trainer._generate_samples(iterations=1, batch_size=2)
    assert torch.equal(samples[0]["log_probs"], samples[0]["ref_log_probs"])  # LoRA B starts at zero

    trainer.train(epochs=2)
    assert trainer.history[0]["kl_mean"] == 0.0
    samples, _ = trainer._generate_samples(iterations=1, batch_size=2)
    sample = samples[0]
    assert (sample["log_probs"] - sample["ref_log_probs"]).mean() > 0

    base = StableDiffusionPipeline.from_pretrained(tiny_model_path)
    base.scheduler = trainer.sd_pipeline.scheduler
    embeds = torch.cat([sample["negative_prompt_embeds"], sample["prompt_embeds"]])
    expected = []
    with torch.no_grad():
        for j in range(sample["timesteps"].shape[1]):
            t = sample["timesteps"][0, j]
            uncond, text = base.unet(torch.cat([sample["latents"][:, j]] * 2), t, embeds).sample.chunk(2)
            noise = uncond + 5.0 * (text - uncond)
            out = scheduler_step(
                base.scheduler, noise, t, sample["latents"][:, j], 1.0, prev_sample=sample["next_latents"][:, j]
            )
            expected.append(out.log_probs)
    torch.testing.assert_close(sample["ref_log_probs"], torch.stack(expected, dim=1), atol=1e-5, rtol=1e-5)


def test_full_unet_training_uses_a_frozen_reference_copy(tiny_model_path, tmp_path):
    config = Carve3DConfig(**SMALL, logdir=str(tmp_path / "logs"), warmup_first_epoch=False, train_learning_rate=1e-3)
    pipeline = Carve3DStableDiffusionPipeline(tiny_model_path, use_lora=False)
    trainer = Carve3DTrainer(config, brightness, cycle(), pipeline)
    assert trainer.reference_unet is not None and trainer.reference_unet is not pipeline.unet
    assert not any(p.requires_grad for p in trainer.reference_unet.parameters())
    assert pipeline.unet.dtype == torch.float32
    reference = [p.clone() for p in trainer.reference_unet.parameters()]
    trainer.train(epochs=2)
    assert all(torch.equal(a, b) for a, b in zip(reference, trainer.reference_unet.parameters()))
    assert trainer.history[0]["kl_mean"] == 0.0 and trainer.history[1]["kl_mean"] > 0


class Recorder:
    """Wraps `compute_advantages` and `calculate_loss` to capture what the trainer fed them."""

    def __init__(self, monkeypatch, trainer):
        self.inputs, self.outputs, self.loss_advantages, self.loss_refs = [], [], [], []
        original = trainer_module.compute_advantages

        def spy(prompts, rewards, reward_tracker, kl=None, kl_tracker=None, kl_coeff=0.0):
            self.inputs.append(
                dict(prompts=list(prompts), rewards=rewards.copy(), kl=None if kl is None else kl.copy())
            )
            out = original(prompts, rewards, reward_tracker, kl=kl, kl_tracker=kl_tracker, kl_coeff=kl_coeff)
            self.outputs.append(out)
            return out

        monkeypatch.setattr(trainer_module, "compute_advantages", spy)
        calculate_loss = trainer.calculate_loss

        def loss_spy(*args, ref_log_probs=None):
            self.loss_advantages.append(args[4].clone())
            self.loss_refs.append(ref_log_probs)
            return calculate_loss(*args, ref_log_probs=ref_log_probs)

        monkeypatch.setattr(trainer, "calculate_loss", loss_spy)


@pytest.mark.parametrize("per_prompt", [True, False])
def test_kl_in_reward_advantages_equal_hand_computed_values(tiny_model_path, tmp_path, monkeypatch, per_prompt):
    trainer = make_trainer(
        tiny_model_path,
        tmp_path,
        warmup_first_epoch=False,
        per_prompt_stat_tracking=per_prompt,
        kl_per_prompt_stat_tracking=per_prompt,
        per_prompt_stat_tracking_min_count=2,
        kl_normalized_coeff=0.5,
        train_learning_rate=3e-3,
    )
    recorder = Recorder(monkeypatch, trainer)
    trainer.train(epochs=2)
    reward_tracker, kl_tracker = PromptStatTracker(16, 2), PromptStatTracker(16, 2)
    for inputs, output in zip(recorder.inputs, recorder.outputs):
        prompts, rewards, kl = inputs["prompts"], inputs["rewards"], inputs["kl"]
        assert sorted(prompts) == sorted(PROMPTS * 2)
        if per_prompt:
            expected = reward_tracker.update(prompts, rewards) - 0.5 * kl_tracker.update(prompts, kl)
        else:
            expected = normalize_batch(rewards) - 0.5 * normalize_batch(kl)
        np.testing.assert_allclose(output, expected, rtol=1e-6)
    assert recorder.inputs[1]["kl"].std() > 0
    # epoch 2 trains two batches of 2 samples over 3 timesteps: calls -6 and -3 are timestep 0 of each batch
    used = torch.cat([recorder.loss_advantages[-6], recorder.loss_advantages[-3]])
    np.testing.assert_allclose(np.sort(used.numpy()), np.sort(recorder.outputs[1].astype(np.float32)), rtol=1e-6)
    assert all(ref is None for ref in recorder.loss_refs)


def test_kl_in_loss_leaves_advantages_alone_and_adds_beta_times_kl(tiny_model_path, tmp_path, monkeypatch):
    trainer = make_trainer(tiny_model_path, tmp_path, warmup_first_epoch=False, kl_in_reward=False, kl_beta=0.01)
    recorder = Recorder(monkeypatch, trainer)
    trainer.train(epochs=1)
    assert recorder.inputs[0]["kl"] is None
    assert all(ref is not None and ref.shape == (2,) for ref in recorder.loss_refs)
    samples, _ = trainer._generate_samples(iterations=1, batch_size=2)
    s = samples[0]
    embeds = torch.cat([s["negative_prompt_embeds"], s["prompt_embeds"]])
    args = (
        s["latents"][:, 0],
        s["timesteps"][:, 0],
        s["next_latents"][:, 0],
        s["log_probs"][:, 0],
        torch.ones(2),
        embeds,
    )
    with torch.no_grad():
        loss_0, _, _ = trainer.calculate_loss(*args, ref_log_probs=torch.zeros(2))
        loss_1, _, _ = trainer.calculate_loss(*args, ref_log_probs=torch.ones(2))
    torch.testing.assert_close(loss_0 - loss_1, torch.tensor(0.01), atol=1e-6, rtol=0)


def test_warmup_epoch_fills_statistics_without_updating(tiny_model_path, tmp_path):
    trainer = make_trainer(tiny_model_path, tmp_path)
    before = lora_vector(trainer)
    steps = count_optimizer_steps(trainer)
    trainer.train(epochs=1)
    assert steps["n"] == 0 and torch.equal(before, lora_vector(trainer))
    assert {p: s["count"] for p, s in trainer.stat_tracker.get_stats().items()} == {p: 2 for p in PROMPTS}
    assert set(trainer.kl_stat_tracker.get_stats()) == set(PROMPTS)


def test_training_moves_brightness_the_way_the_reward_asks(tiny_model_path, tmp_path):
    """Two runs from the same seed, one rewarded for bright images and one for dark ones.

    Sampling noise is seeded per sample, so both runs draw identical first-epoch images and the comparison is paired:
    any later difference comes from the updates. Measured (seeds 0, 1, 2): the bright run is brighter at every later
    epoch, by 0.013-0.020 at epoch 5, while a single run's own trend is within the noise (seed 0 gets darker).
    """

    def darkness(images, prompts, metadata):
        return -images.mean(dim=(1, 2, 3)), {}

    settings = dict(
        sample_batch_size=8,
        train_batch_size=8,
        sample_num_batches_per_epoch=1,
        warmup_first_epoch=False,
        per_prompt_stat_tracking=False,
        kl_penalty=False,
        kl_log=False,
        train_learning_rate=1e-2,
        train_clip_range=1.0,
        save_freq=100,
    )
    brightness_per_epoch = {}
    for name, reward in (("bright", brightness), ("dark", darkness)):
        trainer = make_trainer(tiny_model_path, tmp_path / name, reward=reward, **settings)
        trainer.train(epochs=4)
        brightness_per_epoch[name] = np.abs([h["reward_mean"] for h in trainer.history])
    bright, dark = brightness_per_epoch["bright"], brightness_per_epoch["dark"]
    assert bright[0] == pytest.approx(dark[0], abs=1e-6)  # the same first-epoch samples
    assert np.all(bright[1:] > dark[1:]), (bright, dark)
    assert bright[-1] - dark[-1] > 0.005, (bright, dark)


def test_async_rewards_and_an_image_hook_without_tracker(tiny_model_path, tmp_path):
    calls = []

    def hook(prompt_image_data, global_step, tracker):
        calls.append((len(prompt_image_data), global_step, tracker))
        images, prompts, _, rewards, _ = prompt_image_data[0]
        torch.testing.assert_close(rewards, images.mean(dim=(1, 2, 3)))

    config = Carve3DConfig(**SMALL, logdir=str(tmp_path / "logs"), async_reward_computation=True)
    trainer = Carve3DTrainer(config, brightness, cycle(), Carve3DStableDiffusionPipeline(tiny_model_path), hook)
    trainer.train(epochs=1)
    assert calls == [(2, 0, None)]
    assert trainer.history[0]["reward_mean"] > 0


def test_prompt_dataset_replaces_the_prompt_function(tiny_model_path, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red cube\na blue sphere\na green cone\na toy car\n")
    config = Carve3DConfig(**SMALL, logdir=str(tmp_path / "logs"), prompt_dataset=str(path), prompt_dataset_size=2)
    trainer = Carve3DTrainer(config, brightness, sd_pipeline=Carve3DStableDiffusionPipeline(tiny_model_path))
    trainer.train(epochs=1)
    assert sorted(trainer.stat_tracker.buffers) == ["a blue sphere", "a red cube"]
    with pytest.raises(ValueError, match="Pass a `prompt_function`, or set `prompt_dataset`"):
        Carve3DTrainer(Carve3DConfig(**SMALL), brightness, sd_pipeline=Carve3DStableDiffusionPipeline(tiny_model_path))


def test_resume_restores_global_step_statistics_and_epoch(tiny_model_path, tmp_path):
    trainer = make_trainer(tiny_model_path, tmp_path, warmup_first_epoch=False, num_checkpoint_limit=1)
    trainer.train(epochs=2)
    checkpoints = sorted(p.name for p in (tmp_path / "logs" / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint_1"]  # the limit removed checkpoint_0
    resumed = make_trainer(tiny_model_path, tmp_path, warmup_first_epoch=False, resume_from=str(tmp_path / "logs"))
    assert resumed.first_epoch == 2 and resumed.global_step == trainer.global_step == 2
    assert resumed.stat_tracker.state_dict() == trainer.stat_tracker.state_dict()
    assert resumed.kl_stat_tracker.state_dict() == trainer.kl_stat_tracker.state_dict()
    torch.testing.assert_close(lora_vector(resumed), lora_vector(trainer))
    resumed.train(epochs=3)
    assert resumed.global_step == 3 and [h["epoch"] for h in resumed.history] == [0, 1, 2]


def test_resume_from_a_folder_without_checkpoints_is_an_error(tiny_model_path, tmp_path):
    with pytest.raises(ValueError, match="holds no Carve3D checkpoint"):
        make_trainer(tiny_model_path, tmp_path, resume_from=str(tmp_path))


def test_a_resumed_run_reaches_the_same_lora_as_an_uninterrupted_one(tiny_model_path, tmp_path):
    """Exact resume: LoRA, optimizer, RNG states, statistics, prompt order, global step and epoch are restored."""
    path = tmp_path / "prompts.txt"
    path.write_text("a red cube\na blue sphere\n")
    settings = dict(prompt_dataset=str(path), train_learning_rate=3e-3, per_prompt_stat_tracking_min_count=2)

    def run(logdir, **extra):
        config = Carve3DConfig(**SMALL, **settings, logdir=str(logdir), **extra)
        return Carve3DTrainer(config, brightness, sd_pipeline=Carve3DStableDiffusionPipeline(tiny_model_path))

    uninterrupted = run(tmp_path / "a")
    uninterrupted.train(epochs=4)
    interrupted = run(tmp_path / "b")
    interrupted.train(epochs=2)  # warm-up epoch + one update, checkpoint_1 written
    del interrupted
    resumed = run(tmp_path / "b", resume_from=str(tmp_path / "b"))
    resumed.train(epochs=4)
    assert resumed.global_step == uninterrupted.global_step == 3
    torch.testing.assert_close(lora_vector(resumed), lora_vector(uninterrupted), atol=1e-6, rtol=0)
    assert [h["reward_mean"] for h in resumed.history] == [h["reward_mean"] for h in uninterrupted.history]


def test_nan_rewards_are_contained_counted_and_never_reach_the_lora(tiny_model_path, tmp_path):
    def flaky_reward(images, prompts, metadata):
        rewards = images.mean(dim=(1, 2, 3))
        rewards[0] = float("nan")  # e.g. an all-white view whose reconstruction failed
        return rewards, {}

    trainer = make_trainer(tiny_model_path, tmp_path, reward=flaky_reward, warmup_first_epoch=False)
    before = lora_vector(trainer)
    trainer.train(epochs=2)
    after = lora_vector(trainer)
    assert torch.isfinite(after).all() and not torch.equal(before, after)
    assert [h["reward_invalid"] for h in trainer.history] == [2, 2]  # one per batch of 2, two batches per epoch
    assert all(np.isfinite(h["reward_mean"]) for h in trainer.history)
    assert all(np.isfinite(v) for buffer in trainer.stat_tracker.buffers.values() for v in buffer)


def test_a_non_finite_gradient_skips_the_optimizer_step(tiny_model_path, tmp_path, monkeypatch):
    trainer = make_trainer(tiny_model_path, tmp_path, warmup_first_epoch=False)
    calculate_loss = trainer.calculate_loss

    def poisoned(*args, **kwargs):
        loss, approx_kl, clipfrac = calculate_loss(*args, **kwargs)
        return loss * float("nan"), approx_kl, clipfrac

    monkeypatch.setattr(trainer, "calculate_loss", poisoned)
    before = lora_vector(trainer)
    steps = count_optimizer_steps(trainer)
    trainer.train(epochs=1)
    assert steps["n"] == 0 and torch.equal(before, lora_vector(trainer))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_that_resumes_exactly(tiny_model_path, tmp_path, signum):
    path = tmp_path / "prompts.txt"
    path.write_text("a red cube\na blue sphere\n")
    settings = dict(prompt_dataset=str(path), train_learning_rate=3e-3, save_freq=100, warmup_first_epoch=False)
    calls = {"n": 0}

    def reward_then_signal(images, prompts, metadata):
        calls["n"] += 1
        if calls["n"] == 5:  # during epoch 2 (two reward calls per epoch)
            os.kill(os.getpid(), signum)
        return brightness(images, prompts, metadata)

    def run(logdir, reward, **extra):
        config = Carve3DConfig(**SMALL, **settings, logdir=str(logdir), **extra)
        return Carve3DTrainer(config, reward, sd_pipeline=Carve3DStableDiffusionPipeline(tiny_model_path))

    interrupted = run(tmp_path / "b", reward_then_signal)
    original_handler = signal.getsignal(signum)
    expected_exit = KeyboardInterrupt if signum == signal.SIGINT else SystemExit
    with pytest.raises(expected_exit):
        interrupted.train(epochs=4)
    assert [p.name for p in (tmp_path / "b" / "checkpoints").iterdir()] == ["checkpoint_1"]
    assert signal.getsignal(signum) is original_handler
    assert calls["n"] == 6  # stopped at the next safe point: after epoch 2's sampling, before its update

    uninterrupted = run(tmp_path / "a", brightness)
    uninterrupted.train(epochs=4)
    resumed = run(tmp_path / "b", brightness, resume_from=str(tmp_path / "b"))
    assert resumed.first_epoch == 2
    resumed.train(epochs=4)
    torch.testing.assert_close(lora_vector(resumed), lora_vector(uninterrupted), atol=1e-6, rtol=0)
    assert resumed.global_step == uninterrupted.global_step == 4
