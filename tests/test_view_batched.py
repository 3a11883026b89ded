"""The view-batched family (MVDream's architecture, issue 13): the model in diffusers form, its pipeline, and DDPO on
it through the one sampling path (tiny random model, 4 views of 16x16)."""

import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from trl.models.modeling_sd_base import scheduler_step

from carve3d_trl import Carve3DConfig, Carve3DTrainer, detect_family, load_ddpo_pipeline
from carve3d_trl.pipelines import (
    Carve3DViewBatchedPipeline,
    MultiViewAttnProcessor,
    MultiViewDiffusionPipeline,
    guided_noise,
    save_unet_weights,
)
from carve3d_trl.rewards import MRCReward, RadianceFieldReconstructor, instant3d_layout, multiview_cameras
from carve3d_trl.testing import (
    TinyPipelineSpec,
    build_tiny_view_batched_pipeline,
    load_script,
    save_tiny_view_batched_pipeline,
)

PROMPTS = ("a red cube", "a blue sphere")
SMALL = dict(
    sample_num_steps=3,
    sample_batch_size=2,
    sample_num_batches_per_epoch=2,
    train_batch_size=2,
    mixed_precision="no",
    log_with=None,
    seed=0,
)


def brightness(views, prompts, metadata):
    """Mean brightness of each object's views `(B, V, 3, h, w)` -> `(B,)`."""
    assert views.ndim == 5
    return views.mean(dim=(1, 2, 3, 4)), {}


def cycle():
    state = {"i": 0}

    def prompt_fn():
        state["i"] += 1
        return PROMPTS[(state["i"] - 1) % len(PROMPTS)], {}

    return prompt_fn


@pytest.fixture(scope="module")
def tiny_vb_path(tmp_path_factory):
    return save_tiny_view_batched_pipeline(
        tmp_path_factory.mktemp("models") / "tiny-vb", TinyPipelineSpec(image_size=16)
    )


def make_trainer(model_path, logdir, reward=brightness, **overrides):
    config = Carve3DConfig(**{**SMALL, "logdir": str(logdir), **overrides})
    return Carve3DTrainer(config, reward, cycle(), Carve3DViewBatchedPipeline(model_path))


def lora_vector(trainer):
    return torch.cat([p.detach().flatten().clone() for p in trainer.trainable_layers])


# ---------------------------------------------------------------------------------------------- the model


def test_the_camera_embedding_has_mvdreams_layer_shapes():
    with torch.device("meta"):  # SD 2.1-base's UNet with MVDream's camera input, without allocating it
        unet = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280, 1280),
            cross_attention_dim=1024,
            attention_head_dim=(5, 10, 20, 20),
            use_linear_projection=True,
            class_embed_type="projection",
            projection_class_embeddings_input_dim=16,
        )
    camera = unet.class_embedding  # MVDream: Linear(16, 1280) -> SiLU -> Linear(1280, 1280), added to the time emb.
    assert camera.linear_1.weight.shape == (1280, 16) and camera.linear_2.weight.shape == (1280, 1280)
    assert type(camera.act).__name__ == "SiLU" and unet.time_embedding.linear_2.out_features == 1280


def test_cross_view_attention_mixes_the_views_of_one_object_only(tiny_vb_path):
    pipe = MultiViewDiffusionPipeline.from_pretrained(tiny_vb_path)
    conditioner = pipe.conditioner
    conditioning = conditioner.encode(list(PROMPTS))
    latents = torch.randn(2, 4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    changed = latents.clone()
    changed[0, 2] += 1.0  # object 0, view 2

    def noise(x):
        with torch.no_grad():
            return conditioner.predict_noise(pipe.unet, x, torch.tensor([500, 500]), conditioning)

    before, after = noise(latents), noise(changed)
    assert not torch.allclose(before[0, 0], after[0, 0])  # view 0 sees view 2 of its object
    torch.testing.assert_close(before[1], after[1])  # the other object does not
    pipe.unet.set_attn_processor(AttnProcessor2_0())  # per-view attention: views stay independent
    torch.testing.assert_close(noise(latents)[0, 0], noise(changed)[0, 0])


def test_the_cross_view_attention_is_installed_on_loading_and_kept_with_a_lora(tiny_vb_path, tmp_path):
    pipe = MultiViewDiffusionPipeline.from_pretrained(tiny_vb_path)
    self_attention = {k: v for k, v in pipe.unet.attn_processors.items() if k.endswith("attn1.processor")}
    assert self_attention and all(isinstance(p, MultiViewAttnProcessor) for p in self_attention.values())
    assert not any(isinstance(p, MultiViewAttnProcessor) for k, p in pipe.unet.attn_processors.items() if "attn2" in k)
    assert detect_family(str(tiny_vb_path)) == "view_batched"
    assert pipe.config.num_views == 4 and pipe.camera_inputs().shape == (4, 16)
    torch.testing.assert_close(pipe.camera_inputs(), multiview_cameras(4, elevation=15.0).model_inputs)


def test_the_pipeline_returns_views_and_their_grid_with_several_images_per_prompt(tiny_vb_path):
    pipe = MultiViewDiffusionPipeline.from_pretrained(tiny_vb_path)
    out = pipe(
        list(PROMPTS), num_images_per_prompt=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0)
    )
    assert out.images.shape == (4, 4, 3, 16, 16) and out.grid.shape == (4, 3, 32, 32)
    assert out.images.min() >= 0 and out.images.max() <= 1
    torch.testing.assert_close(out.grid[:, :, :16, 16:], out.images[:, 1])  # row-major 2x2: view 1 top right
    assert not torch.allclose(out.images[0], out.images[1])  # two objects of one prompt differ


def test_a_grid_model_asked_for_as_view_batched_and_the_reverse_are_refused(tiny_vb_path, tiny_model_path):
    with pytest.raises(ValueError, match="is a view-batched model"):
        load_ddpo_pipeline(str(tiny_vb_path), family="sd")
    with pytest.raises(ValueError, match="is a grid model"):
        load_ddpo_pipeline(str(tiny_model_path), family="view_batched")
    unet = build_tiny_view_batched_pipeline(TinyPipelineSpec(image_size=16)).unet
    plain = UNet2DConditionModel(**{**unet.config, "class_embed_type": None})
    with pytest.raises(ValueError, match="needs a camera embedding"):
        MultiViewDiffusionPipeline(None, None, None, plain, None)


# ---------------------------------------------------------------------------------------------- DDPO on it


def test_sampling_through_the_trainer_equals_the_pipelines_own_call(tiny_vb_path, tmp_path):
    trainer = make_trainer(tiny_vb_path, tmp_path, kl_penalty=False, kl_log=False)
    generators = trainer._sample_generators(0, 2)
    (sample, _), (batch, _) = trainer._generate_samples(iterations=2, batch_size=2)
    assert sample["latents"].shape == (2, 3, 4, 4, 8, 8) and sample["log_probs"].shape == (2, 3)
    assert sample["camera"].shape == (2, 4, 16) and batch.images.shape == (2, 4, 3, 16, 16)
    own = trainer.sd_pipeline.sd_pipeline(
        list(batch.prompts), num_inference_steps=3, guidance_scale=5.0, eta=1.0, generator=generators
    )
    torch.testing.assert_close(own.images, batch.images)


def test_the_recomputed_log_prob_of_a_stored_step_equals_the_sampled_one(tiny_vb_path, tmp_path):
    trainer = make_trainer(tiny_vb_path, tmp_path, kl_penalty=False, kl_log=False)
    (sample,), _ = trainer._generate_samples(iterations=1, batch_size=2)
    conditioning, negative = trainer._split_conditioning(sample)
    for j in range(3):
        with torch.no_grad():
            noise = guided_noise(
                trainer.sd_pipeline.unet,
                trainer.conditioner,
                sample["latents"][:, j],
                sample["timesteps"][:, j],
                conditioning,
                negative,
                5.0,
            )
        step = scheduler_step(
            trainer.sd_pipeline.scheduler,
            noise,
            sample["timesteps"][:, j],
            sample["latents"][:, j],
            eta=1.0,
            prev_sample=sample["next_latents"][:, j],
        )
        torch.testing.assert_close(step.log_probs, sample["log_probs"][:, j], atol=1e-4, rtol=1e-5)


def test_kl_is_zero_with_a_fresh_lora_then_positive_with_one_unet(tiny_vb_path, tmp_path):
    gc.collect()
    unets_before = sum(isinstance(o, UNet2DConditionModel) for o in gc.get_objects())
    trainer = make_trainer(tiny_vb_path, tmp_path, warmup_first_epoch=False, train_learning_rate=3e-2)
    gc.collect()
    assert sum(isinstance(o, UNet2DConditionModel) for o in gc.get_objects()) == unets_before + 1
    assert trainer.reference_unet is None
    trainer.train(epochs=2)
    assert trainer.history[0]["kl_mean"] == 0.0
    assert trainer.history[1]["kl_mean"] > 0.0


def test_every_view_of_an_object_trains_at_the_same_timestep(tiny_vb_path, tmp_path, monkeypatch):
    trainer = make_trainer(tiny_vb_path, tmp_path, warmup_first_epoch=False, kl_penalty=False, kl_log=False)
    seen = []
    original = trainer.calculate_loss

    def spy(latents, timesteps, *args, **kwargs):
        seen.append((latents.shape, timesteps.shape))
        return original(latents, timesteps, *args, **kwargs)

    monkeypatch.setattr(trainer, "calculate_loss", spy)
    trainer.train(epochs=1)
    assert seen and all(shape == ((2, 4, 4, 8, 8), (2,)) for shape in seen)  # one timestep per object, its 4 views


def test_a_resumed_run_reaches_the_same_lora_as_an_uninterrupted_one(tiny_vb_path, tmp_path):
    settings = dict(warmup_first_epoch=False, train_learning_rate=3e-2)
    full = make_trainer(tiny_vb_path, tmp_path / "full", **settings)
    full.train(epochs=2)
    first = make_trainer(tiny_vb_path, tmp_path / "split", **settings)
    first.train(epochs=1)
    resumed = make_trainer(tiny_vb_path, tmp_path / "split", resume_from=str(tmp_path / "split" / "checkpoints"))
    assert resumed.first_epoch == 1
    resumed.train(epochs=2)
    torch.testing.assert_close(lora_vector(resumed), lora_vector(full), atol=0, rtol=0)
    assert resumed.history == full.history


def test_the_saved_lora_loads_into_the_diffusers_pipeline(tiny_vb_path, tmp_path):
    trainer = make_trainer(tiny_vb_path, tmp_path, warmup_first_epoch=False, train_learning_rate=3e-2)
    trainer.train(epochs=1)
    trainer.save_pretrained(tmp_path / "lora")
    card = (tmp_path / "lora" / "README.md").read_text()
    assert "from carve3d_trl.pipelines import MultiViewDiffusionPipeline" in card and "output.grid[0]" in card
    pipe = MultiViewDiffusionPipeline.from_pretrained(tiny_vb_path)
    pipe.load_lora_weights(tmp_path / "lora")
    assert any(isinstance(p, MultiViewAttnProcessor) for p in pipe.unet.attn_processors.values())
    latents = torch.randn(1, 4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    conditioning = pipe.conditioner.encode(["a red cube"])
    with torch.no_grad():
        loaded = pipe.conditioner.predict_noise(pipe.unet, latents, torch.tensor([300]), conditioning)
        trained = trainer.conditioner.predict_noise(
            trainer.sd_pipeline.unet, latents, torch.tensor([300]), conditioning
        )
        pipe.unload_lora_weights()
        base = pipe.conditioner.predict_noise(pipe.unet, latents, torch.tensor([300]), conditioning)
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(loaded, base)


def test_mrc_scores_the_views_at_the_models_cameras_and_a_grid_layout_is_refused(tiny_vb_path, tmp_path):
    cheap = dict(fit_size=8, grid_resolution=8, samples_per_ray=8, steps=3, seed=0)
    pipeline = Carve3DViewBatchedPipeline(tiny_vb_path)
    reward = MRCReward(pipeline.camera_layout(), RadianceFieldReconstructor(**cheap), metric="mse")
    config = Carve3DConfig(**SMALL, logdir=str(tmp_path / "logs"), kl_penalty=False, kl_log=False)
    trainer = Carve3DTrainer(config, reward, cycle(), pipeline)
    trainer.train(epochs=1)
    assert trainer.history[0]["mrc_mean"] > 0 and trainer.card_samples[0].renders.shape == (3, 32, 32)
    grid_reward = MRCReward(instant3d_layout(), RadianceFieldReconstructor(**cheap), metric="mse")
    with pytest.raises(ValueError, match="camera_layout"):
        Carve3DTrainer(config, grid_reward, cycle(), Carve3DViewBatchedPipeline(tiny_vb_path))


# ---------------------------------------------------------------------------------------------- the example scripts

ROOT = Path(__file__).resolve().parents[1]
CHEAP_MRC = ["--mrc_metric", "mse", "--mrc_reconstructor_kwargs", '{"samples_per_ray": 16, "refine_steps": 2}']


@pytest.fixture(scope="module")
def vb_lora(tiny_vb_path, tmp_path_factory):
    """A random (non-zero) LoRA of the tiny view-batched model, saved in the diffusers format."""
    pipeline = Carve3DViewBatchedPipeline(tiny_vb_path, lora_rank=2)
    pipeline.get_trainable_layers()
    with torch.no_grad():
        for name, param in pipeline.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    folder = tmp_path_factory.mktemp("vb-lora")
    save_unet_weights(pipeline, folder)
    return folder


def test_evaluate_scores_a_view_batched_lora_at_the_models_cameras(tiny_vb_path, vb_lora, tmp_path):
    evaluate_mrc = load_script(ROOT / "examples" / "evaluate_mrc.py")
    (tmp_path / "prompts.txt").write_text("a red cube\na blue sphere\n")
    args = ["--pretrained_model", str(tiny_vb_path), "--lora", str(vb_lora), "--prompt_dataset"]
    args += [str(tmp_path / "prompts.txt"), "--num_seeds", "1", "--num_inference_steps", "2", "--num_figure_prompts"]
    summary = evaluate_mrc.main([*args, "1", *CHEAP_MRC, "--output_dir", str(tmp_path / "eval")])
    assert summary["num_prompts"] == 2 and summary["base"]["mrc_mean"] > 0
    assert summary["base"]["mrc_mean"] != summary["finetuned"]["mrc_mean"]
    assert (tmp_path / "eval" / "comparison.png").stat().st_size > 0
    with pytest.raises(ValueError, match="is a grid layout, but the model is view-batched"):
        evaluate_mrc.main([*args, "1", *CHEAP_MRC, "--mrc_layout", "instant3d", "--output_dir", str(tmp_path / "x")])


def test_the_training_script_fine_tunes_a_view_batched_model(tiny_vb_path, tmp_path):
    (tmp_path / "prompts.txt").write_text("a red cube\na blue sphere\n")
    command = [sys.executable, str(ROOT / "examples" / "carve3d_train.py"), "--pretrained_model", str(tiny_vb_path)]
    command += ["--prompt_dataset", str(tmp_path / "prompts.txt"), "--num_epochs", "2", "--sample_num_steps", "2"]
    command += ["--sample_batch_size", "2", "--train_batch_size", "2", *CHEAP_MRC]
    command += ["--output_dir", str(tmp_path / "run")]
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    folder = tmp_path / "run" / "lora"
    history = json.loads((folder / "training_history.json").read_text())
    assert len(history) == 2 and all(epoch["mrc_mean"] > 0 for epoch in history)
    assert "MultiViewDiffusionPipeline" in (folder / "README.md").read_text()
    assert (folder / "pytorch_lora_weights.safetensors").is_file() and (folder / "samples" / "sample_0.png").is_file()


def test_the_model_cards_loading_snippet_runs_for_the_family(tiny_vb_path, tmp_path, monkeypatch):
    trainer = make_trainer(tiny_vb_path, tmp_path, kl_penalty=False, kl_log=False)
    trainer.train(epochs=1)
    trainer.save_pretrained(tmp_path / "lora")
    card = (tmp_path / "lora" / "README.md").read_text()
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    assert str(tiny_vb_path) in snippet and "path/to/this/folder" in snippet  # no repo id: the folder to fill in
    cpu = snippet.replace("torch.float16", "torch.float32").replace('.to("cuda")', '.to("cpu")')  # no GPU here
    cpu = cpu.replace("path/to/this/folder", str(tmp_path / "lora"))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(cpu, "model_card_snippet", "exec"), namespace)  # noqa: S102 - the card's own code
    assert namespace["views"].shape == (4, 3, 16, 16) and (tmp_path / "views.png").is_file()


def test_cameras_the_model_was_not_trained_for_are_flagged(tiny_vb_path, tmp_path, caplog):
    components = MultiViewDiffusionPipeline.from_pretrained(tiny_vb_path).components
    with caplog.at_level("WARNING", logger="carve3d_trl.pipelines.view_batched"):
        MultiViewDiffusionPipeline(**components, elevation=15.0)
        assert not caplog.records
        MultiViewDiffusionPipeline(**components, elevation=45.0)
    assert "outside the 0-30 degrees" in caplog.text
    six_views = MRCReward(multiview_cameras(6).layout, RadianceFieldReconstructor(steps=1), metric="mse")
    config = Carve3DConfig(**SMALL, logdir=str(tmp_path / "logs"))
    with pytest.raises(ValueError, match=r"\(6 views, 1x6\) is not this view-batched model's cameras \(4 views"):
        Carve3DTrainer(config, six_views, cycle(), Carve3DViewBatchedPipeline(tiny_vb_path))
