"""SDXL models (issue 5): the DDPO pipeline, its conditioning, training through Carve3DTrainer, the LoRA format."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DDIMScheduler, StableDiffusionXLPipeline
from small_run import PROMPTS, SMALL, brightness

from carve3d_trl import (
    Carve3DConfig,
    Carve3DStableDiffusionPipeline,
    Carve3DStableDiffusionXLPipeline,
    Carve3DTrainer,
    detect_family,
    load_ddpo_pipeline,
)
from carve3d_trl.pipelines import StableDiffusionXLConditioner, conditioner_of, guided_noise
from carve3d_trl.testing import TinyPipelineSpec, load_script, save_tiny_sdxl_pipeline

ROOT = Path(__file__).resolve().parents[1]


def cycle():
    state = {"i": 0}

    def prompt_fn():
        state["i"] += 1
        return PROMPTS[(state["i"] - 1) % len(PROMPTS)], {}

    return prompt_fn


def make_trainer(model_path, logdir, **overrides):
    config = Carve3DConfig(**{**SMALL, "logdir": str(logdir), **overrides})
    return Carve3DTrainer(config, brightness, cycle(), Carve3DStableDiffusionXLPipeline(model_path))


def lora_vector(trainer):
    return torch.cat([p.detach().flatten().clone() for p in trainer.trainable_layers])


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def tiny_sdxl_path(tmp_path_factory):
    """A tiny SDXL pipeline (32x32 grid of 2x2 views, as the tiny SD of conftest) saved as a diffusers folder."""
    return save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("models") / "tiny-sdxl", TinyPipelineSpec(image_size=32))


@pytest.fixture(scope="module")
def trained(tiny_sdxl_path, tmp_path_factory):
    """A trainer after a warm-up-free epoch 0 (KL 0) and one more epoch, checkpointed after each."""
    trainer = make_trainer(
        tiny_sdxl_path, tmp_path_factory.mktemp("run"), warmup_first_epoch=False, train_learning_rate=3e-3
    )
    trainer.train(epochs=2)
    return trainer


def test_the_pipeline_supplies_sdxl_conditioning(tiny_sdxl_path):
    pipeline = Carve3DStableDiffusionXLPipeline(tiny_sdxl_path)
    conditioner = conditioner_of(pipeline)
    assert conditioner is pipeline.conditioner and isinstance(conditioner, StableDiffusionXLConditioner)
    conditioning = conditioner.encode(PROMPTS)
    assert list(conditioning) == list(conditioner.keys)
    assert conditioning["prompt_embeds"].shape == (2, 32, 32)  # two encoders of width 16, concatenated
    assert conditioning["pooled_prompt_embeds"].shape == (2, 16)
    # (original size, crop top-left, target size) of the 32x32 grid
    assert conditioning["add_time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 2
    kwargs = conditioner.unet_kwargs(conditioning)
    assert kwargs["encoder_hidden_states"] is conditioning["prompt_embeds"]
    assert set(kwargs["added_cond_kwargs"]) == {"text_embeds", "time_ids"}


def test_negative_conditioning_is_zeros_or_the_empty_prompt(tiny_sdxl_path):
    zeros = Carve3DStableDiffusionXLPipeline(tiny_sdxl_path).conditioner  # the model's config: SDXL's zeros
    empty = Carve3DStableDiffusionXLPipeline(tiny_sdxl_path, force_zeros_for_empty_prompt=False).conditioner
    negative = zeros.encode_negative("", 3)
    assert not negative["prompt_embeds"].any() and not negative["pooled_prompt_embeds"].any()
    assert negative["prompt_embeds"].shape == (3, 32, 32) and negative["add_time_ids"].shape == (3, 6)
    encoded_empty = empty.encode([""] * 3)
    for key, value in empty.encode_negative("", 3).items():
        torch.testing.assert_close(value, encoded_empty[key])
    assert encoded_empty["prompt_embeds"].abs().sum() > 0
    blurry = zeros.encode(["blurry"])  # a negative prompt is encoded in both modes
    for key, value in zeros.encode_negative("blurry", 1).items():
        torch.testing.assert_close(value, blurry[key])


def test_sampling_matches_diffusers_sdxl_pipeline_and_has_ddpo_shapes(tiny_sdxl_path):
    pipeline = Carve3DStableDiffusionXLPipeline(tiny_sdxl_path)
    output = pipeline(PROMPTS, num_inference_steps=3, guidance_scale=5.0, eta=1.0, generator=seeded())
    assert output.images.shape == (2, 3, 32, 32)
    assert output.images.min() >= 0 and output.images.max() <= 1
    assert len(output.latents) == 4 and all(latent.shape == (2, 4, 16, 16) for latent in output.latents)
    assert len(output.log_probs) == 3 and all(lp.shape == (2,) and lp.isfinite().all() for lp in output.log_probs)

    # diffusers' own SDXL pipeline, with DDIM at eta 1 drawing from the same generator, makes the same images: the
    # conditioning (embeddings, pooled embeddings, size ids, zero negative) and the sampler agree with it
    reference = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    reference.scheduler = DDIMScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    expected = reference(
        PROMPTS, num_inference_steps=3, guidance_scale=5.0, eta=1.0, generator=seeded(), output_type="pt"
    ).images
    torch.testing.assert_close(output.images, expected, atol=1e-5, rtol=1e-5)


def test_the_recomputed_log_prob_equals_the_sampling_one(tiny_sdxl_path):
    pipeline = Carve3DStableDiffusionXLPipeline(tiny_sdxl_path)
    output = pipeline(PROMPTS, num_inference_steps=3, guidance_scale=5.0, generator=seeded(1))
    conditioner = pipeline.conditioner
    conditioning, negative = conditioner.encode(PROMPTS), conditioner.encode_negative("", 2)
    for j, timestep in enumerate(pipeline.scheduler.timesteps):
        with torch.no_grad():
            noise = guided_noise(pipeline.unet, conditioner, output.latents[j], timestep, conditioning, negative, 5.0)
        step = pipeline.scheduler_step(noise, timestep, output.latents[j], eta=1.0, prev_sample=output.latents[j + 1])
        torch.testing.assert_close(step.log_probs, output.log_probs[j], atol=1e-6, rtol=1e-6)


def test_the_trainer_recomputes_the_sampling_log_probs_with_cfg(tiny_sdxl_path, tmp_path):
    trainer = make_trainer(tiny_sdxl_path, tmp_path)
    (sample,), _ = trainer._generate_samples(iterations=1, batch_size=2)
    keys = ("prompt_embeds", "pooled_prompt_embeds", "add_time_ids")
    assert {*keys, *(f"negative_{k}" for k in keys)} <= set(sample)
    conditioning, negative = trainer._split_conditioning(sample)
    embeds = {k: torch.cat([negative[k], conditioning[k]]) for k in keys}
    for j in range(3):
        # at sampling time the ratio is 1, so the clipped loss is -mean(advantages) exactly when log p is recomputed
        loss, approx_kl, _ = trainer.calculate_loss(
            sample["latents"][:, j],
            sample["timesteps"][:, j],
            sample["next_latents"][:, j],
            sample["log_probs"][:, j],
            torch.ones(2),
            embeds,
        )
        torch.testing.assert_close(loss, torch.tensor(-1.0), atol=1e-5, rtol=0)
        assert approx_kl < 1e-10


def test_a_training_epoch_and_kl_zero_with_a_fresh_lora_then_positive(trained, tiny_sdxl_path):
    assert trained.history[0]["kl_mean"] == 0.0 and trained.history[1]["kl_mean"] > 0
    assert trained.global_step == 2  # one update per epoch
    lora_b = [p for name, p in trained.sd_pipeline.unet.named_parameters() if "lora_B" in name]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # every LoRA B started at zero and was trained
    (sample,), _ = trained._generate_samples(iterations=1, batch_size=2)
    assert (sample["log_probs"] - sample["ref_log_probs"]).mean() > 0

    # the reference is the base SDXL UNet: recompute it with a UNet loaded afresh
    base_unet = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path).unet
    conditioning, negative = trained._split_conditioning(sample)
    expected = []
    for j in range(3):
        t = sample["timesteps"][0, j]
        with torch.no_grad():
            noise = guided_noise(base_unet, trained.conditioner, sample["latents"][:, j], t, conditioning, negative, 5)
        out = trained.sd_pipeline.scheduler_step(
            noise, t, sample["latents"][:, j], eta=1.0, prev_sample=sample["next_latents"][:, j]
        )
        expected.append(out.log_probs)
    torch.testing.assert_close(sample["ref_log_probs"], torch.stack(expected, dim=1), atol=1e-5, rtol=1e-5)


def unet_outputs(unet, conditioner):
    latents = torch.randn(1, 4, 16, 16, generator=seeded())
    with torch.no_grad():
        return unet(latents, 500, **conditioner.unet_kwargs(conditioner.encode(["a red cube"]))).sample


def test_the_saved_lora_reproduces_the_trained_unet_in_diffusers(trained, tiny_sdxl_path, tmp_path):
    trained.save_pretrained(tmp_path / "model")
    trained.sd_pipeline.save_pretrained(tmp_path / "pipeline")
    assert (tmp_path / "pipeline" / "pytorch_lora_weights.safetensors").is_file()
    card = (tmp_path / "model" / "README.md").read_text()
    assert "from diffusers import StableDiffusionXLPipeline" in card
    trained_out = unet_outputs(trained.sd_pipeline.unet, trained.conditioner)
    for folder in ("model", "pipeline"):
        base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
        conditioner = StableDiffusionXLConditioner(base)
        before = unet_outputs(base.unet, conditioner)
        base.load_lora_weights(str(tmp_path / folder))
        assert not torch.allclose(before, trained_out)  # training moved the model
        torch.testing.assert_close(unet_outputs(base.unet, conditioner), trained_out, atol=1e-5, rtol=1e-5)


def test_resume_loads_an_sdxl_checkpoint_into_the_trained_adapter(trained, tiny_sdxl_path):
    resumed = make_trainer(tiny_sdxl_path, trained.config.logdir, resume_from=trained.config.logdir)
    assert resumed.first_epoch == 2 and resumed.global_step == trained.global_step
    torch.testing.assert_close(lora_vector(resumed), lora_vector(trained), atol=0, rtol=0)
    assert list(resumed.sd_pipeline.unet.peft_config) == ["default"]  # no second adapter (TRL's loader adds one)


def test_full_unet_training_checkpoints_and_resumes_the_sdxl_unet(tiny_sdxl_path, tmp_path):
    def run(**extra):
        config = Carve3DConfig(**SMALL, logdir=str(tmp_path), warmup_first_epoch=False, **extra)
        pipeline = Carve3DStableDiffusionXLPipeline(tiny_sdxl_path, use_lora=False)
        return Carve3DTrainer(config, brightness, cycle(), pipeline)

    trainer = run(train_learning_rate=1e-3)
    assert trainer.reference_unet is not None  # a frozen copy, since there are no adapters to disable
    trainer.train(epochs=2)
    assert trainer.history[0]["kl_mean"] == 0.0 and trainer.history[1]["kl_mean"] > 0
    assert (tmp_path / "checkpoints" / "checkpoint_1" / "unet" / "config.json").is_file()
    resumed = run(resume_from=str(tmp_path))
    assert resumed.first_epoch == 2
    for a, b in zip(resumed.sd_pipeline.unet.parameters(), trainer.sd_pipeline.unet.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_memory_options_leave_samples_and_gradients_unchanged(tiny_sdxl_path, tmp_path):
    def one_step(**memory):
        trainer = make_trainer(tiny_sdxl_path, tmp_path / str(len(memory)), kl_penalty=False, kl_log=False)
        trainer.sd_pipeline.enable_memory_savings(**memory)
        (sample,), (pair,) = trainer._generate_samples(iterations=1, batch_size=2)
        conditioning, negative = trainer._split_conditioning(sample)
        embeds = {k: torch.cat([negative[k], conditioning[k]]) for k in conditioning}
        trainer.sd_pipeline.unet.train()
        args = [sample[k][:, 0] for k in ("latents", "timesteps", "next_latents", "log_probs")]
        loss, _, _ = trainer.calculate_loss(*args, torch.ones(2), embeds)
        loss.backward()
        return pair[0], torch.cat([p.grad.flatten() for p in trainer.trainable_layers])

    images, grads = one_step()
    saving = dict(vae_slicing=True, vae_tiling=True, attention_slicing="max", gradient_checkpointing=True)
    images_saving, grads_saving = one_step(**saving)
    torch.testing.assert_close(images_saving, images, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads_saving, grads, atol=1e-5, rtol=1e-4)


def test_the_family_is_detected_from_the_model_index(tiny_sdxl_path, tiny_model_path):
    assert detect_family(tiny_sdxl_path) == "sdxl" and detect_family(tiny_model_path) == "sd"
    assert isinstance(load_ddpo_pipeline(str(tiny_sdxl_path), lora_rank=2), Carve3DStableDiffusionXLPipeline)
    pipeline = load_ddpo_pipeline(str(tiny_model_path))
    assert isinstance(pipeline, Carve3DStableDiffusionPipeline) and conditioner_of(pipeline).keys == ("prompt_embeds",)
    with pytest.raises(ValueError, match="Unknown pipeline family"):
        load_ddpo_pipeline(str(tiny_model_path), family="sd3")


@pytest.mark.parametrize("name", ["instant3d_sdxl.yaml", "sd_grid.yaml", "view_batched_toy.yaml", "mvdream_sd21.yaml"])
def test_example_configurations_parse_into_the_training_script(name):
    carve3d_train = load_script(ROOT / "examples" / "carve3d_train.py")
    path = ROOT / "examples" / "configs" / name
    settings = yaml.safe_load(path.read_text())
    args, mrc_args, config = carve3d_train.build_parser().parse_args_and_config(
        ["--config", str(path), "--pretrained_model", "some/model"]
    )
    assert args.pretrained_model == "some/model"
    assert args.pipeline_family == settings["pipeline_family"]
    for key, value in settings.items():
        holder = next(obj for obj in (args, mrc_args, config) if hasattr(obj, key))
        assert getattr(holder, key) == value, key
    assert json.dumps(config.to_dict())  # a valid, serialisable configuration
