"""The toy multi-view model (issue 7): its synthetic data, the shipped weights, and Carve3D fine-tuning of it."""

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from carve3d_trl import Carve3DConfig, Carve3DStableDiffusionPipeline, Carve3DTrainer
from carve3d_trl.rewards import MRCReward, RadianceFieldReconstructor, foreground_mask, instant3d_layout, split_grid
from carve3d_trl.toy import TOY_VARIANTS, load_toy_pipeline, random_scene, render_scenes, toy_model_path
from carve3d_trl.toy.data import COLORS, SHAPES, scene_dataset, turned_and_mirrored

ROOT = Path(__file__).resolve().parents[1]
WHITE = (1.0, 1.0, 1.0)
LAYOUT = instant3d_layout()
SOLID = rf"an? (?:(?:striped|checkered) )?(?:{'|'.join(COLORS)}) (?:{'|'.join(SHAPES)})"
CAPTION = re.compile(rf"{SOLID}(?: (?:on|next to) {SOLID})?")
CHEAP_RECONSTRUCTOR = {"fit_size": 8, "grid_resolution": 8, "samples_per_ray": 8, "steps": 10}
# A replication of seconds: 2 validation captions x 2 seeds of 2 DDIM steps, the visual hull, no second reconstructor.
TINY_EVALUATION = ["--samples_per_prompt", "2", "--val_prompts", "2", "--eval_seeds", "2", "--steps", "2"]
TINY_EVALUATION += ["--reconstructor", "visual_hull", "--check_reconstructor_kwargs", "none"]


def scene_with(relation: str, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    scene = random_scene(generator)
    while scene.relation != relation:
        scene = random_scene(generator)
    return scene


def test_scene_dataset_is_deterministic_captioned_2x2_grids_on_white():
    captions, grids = scene_dataset(4, seed=3)
    again_captions, again = scene_dataset(4, seed=3)
    other_captions, other = scene_dataset(4, seed=4)
    assert captions == again_captions and torch.equal(grids, again)
    assert captions != other_captions and not torch.equal(grids, other)
    assert grids.shape == (4, 3, 64, 64) and grids.min() >= 0 and grids.max() <= 1
    assert all(CAPTION.fullmatch(c) for c in captions), captions
    views = split_grid(grids, LAYOUT)
    assert torch.equal(views[..., 0, 0], torch.ones(4, 4, 3))  # white corners: the background
    mask = foreground_mask(views.flatten(0, 1), WHITE)
    assert mask.flatten(1).float().mean(1).min() > 0.02  # every view shows the scene


def test_captions_cover_the_vocabulary_and_relations():
    generator = torch.Generator().manual_seed(0)
    captions = [random_scene(generator).caption for _ in range(300)]
    assert all(CAPTION.fullmatch(c) for c in captions)
    text = " ".join(captions)
    for word in [*COLORS, *SHAPES, "striped", "checkered", " on ", " next to ", "an orange"]:
        assert word in text, word
    assert "a orange" not in text


def test_turning_a_scene_by_90_degrees_shifts_its_views_cyclically():
    scene = scene_with("next to")  # not symmetric under a quarter turn
    versions = turned_and_mirrored(render_scenes([scene]))
    assert versions.shape == (8, 3, 64, 64)
    for quarter in (1, 2, 3):
        turned = render_scenes([replace(scene, yaw=scene.yaw + 90 * quarter)])
        silhouettes = foreground_mask(split_grid(turned, LAYOUT)[0], WHITE)
        shifted = foreground_mask(split_grid(versions[quarter : quarter + 1], LAYOUT)[0], WHITE)
        assert torch.equal(silhouettes, shifted)  # the lights stay in the world, so only silhouettes agree exactly
    mirrored = split_grid(versions[4:5], LAYOUT)[0]
    original = split_grid(versions[:1], LAYOUT)[0]
    assert torch.equal(mirrored[0], original[0].flip(-1)) and torch.equal(mirrored[1], original[3].flip(-1))


@pytest.mark.parametrize("variant", TOY_VARIANTS)
def test_shipped_toy_model_loads_offline_and_generates_2x2_grids(variant, monkeypatch):
    from diffusers import StableDiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = toy_model_path(variant)
    assert path.parent == ROOT / "carve3d_trl" / "toy" / "weights"
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < 6e6  # a few MB
    pipe = StableDiffusionPipeline.from_pretrained(path)
    assert {m.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder)} == {torch.float32}
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    prompts = ["a red cube", "a blue sphere on a green cube"]
    images = pipe(prompts, num_inference_steps=4, generator=generator, output_type="pt").images
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()
    views = split_grid(images, LAYOUT)
    # trained on white backgrounds: the view corners are near white, unlike a random model's output
    assert views[..., :2, :2].mean() > 0.8


def test_load_toy_pipeline_and_unknown_variant():
    pipe = load_toy_pipeline("short")
    assert pipe.tokenizer.model_max_length == 64 and pipe.unet.config.sample_size == 16
    with pytest.raises(ValueError, match="valid variants: short, long"):
        toy_model_path("medium")


def test_carve3d_fine_tunes_the_toy_model_with_the_mrc_reward(tmp_path):
    reward = MRCReward(reconstructor=RadianceFieldReconstructor(**CHEAP_RECONSTRUCTOR, seed=0), metric="psnr")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue sphere on a green cube\n")
    config = Carve3DConfig(
        prompt_dataset=str(prompts),
        sample_num_steps=3,
        sample_batch_size=4,
        sample_num_batches_per_epoch=1,
        train_batch_size=4,
        mixed_precision="no",
        log_with=None,
        logdir=str(tmp_path / "logs"),
        train_learning_rate=1e-2,
        per_prompt_stat_tracking_min_count=2,
        seed=0,
    )
    pipeline = Carve3DStableDiffusionPipeline(str(toy_model_path("short")))
    trainer = Carve3DTrainer(config, reward, sd_pipeline=pipeline)
    before = torch.cat([p.detach().flatten().clone() for p in trainer.trainable_layers])
    trainer.train(epochs=3)  # the first epoch only fills the per-prompt statistics
    after = torch.cat([p.detach().flatten() for p in trainer.trainable_layers])
    assert not torch.equal(before, after) and torch.isfinite(after).all()
    assert [h["epoch"] for h in trainer.history] == [0, 1, 2]
    for h in trainer.history:  # PSNR in dB: reward = +MRC
        assert np.isfinite(h["mrc_mean"]) and 5 < h["mrc_mean"] < 60
        assert np.isfinite(h["kl_mean"])
        np.testing.assert_allclose(h["reward_mean"], h["mrc_mean"], rtol=1e-5)
    assert trainer.history[0]["kl_mean"] == pytest.approx(0.0, abs=1e-6)  # the LoRA starts as the base model


def run_script(script: str, *args: str) -> str:
    """Run a benchmark or script as its users do, in its own process (its logging and threads stay its own); its
    standard output."""
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args], check=True, capture_output=True, text=True, timeout=900
    ).stdout


@pytest.mark.parametrize("family, reconstructor", [("grid", "radiance_field"), ("view_batched", "visual_hull")])
def test_replication_benchmark_smoke(tmp_path, family, reconstructor):
    out = tmp_path / "replication"
    args = [
        "--family",
        family,
        "--epochs",
        "2",
        "--train_prompts",
        "2",
        "--samples_per_prompt",
        "2",
        "--val_prompts",
        "2",
    ]
    args += ["--eval_seeds", "2", "--steps", "2", "--reconstructor", reconstructor]
    if reconstructor == "radiance_field":
        args += ["--reconstructor_kwargs", json.dumps(CHEAP_RECONSTRUCTOR)]
    runs = ["RL + KL", "RL, no KL"] if family == "grid" else ["RL + KL"]
    if family == "view_batched":
        args += ["--runs", "kl", "--random_reward"]
    args += ["--check_reconstructor_kwargs", json.dumps({**CHEAP_RECONSTRUCTOR, "protocol": "same_view"})]
    run_script("benchmarks/bench_replication.py", *args, "--out", str(out))
    report = json.loads(Path(f"{out}.json").read_text())
    assert report["settings"]["reconstructor"] == reconstructor
    assert report["settings"]["random_reward"] == (family == "view_batched")
    assert json.loads(report["settings"]["reconstructor_kwargs"]) == (
        CHEAP_RECONSTRUCTOR if reconstructor == "radiance_field" else {}
    )
    assert list(report["summary"]) == ["data", "base (short SFT)", *runs, "long SFT"]
    assert not set(report["train_prompts"]) & set(report["val_prompts"])
    stats = report["summary"]
    assert stats["base (short SFT)"]["kl_mean"] == 0 and stats["base (short SFT)"]["mrc_change_mean"] == 0
    assert all(np.isfinite(s["mrc_mean"]) and np.isfinite(s["mrc_check_mean"]) for s in stats.values())
    assert all(s["diversity_mean"] > 0 for s in stats.values()) and stats["data"]["kl_mean"] == 0
    assert stats["long SFT"]["kl_mean"] != 0
    for s in stats.values():
        assert all(0 <= s[f"{k}_mean"] <= 1 for k in ("color_adherence", "shape_adherence", "border"))
    assert stats["data"]["color_adherence_mean"] >= 0.5  # renders of the captions' scenes
    assert list(report["histories"]) == runs
    for name in runs:
        assert len(report["histories"][name]) == 2 and "kl_mean" in report["histories"][name][0]
    for suffix in ("curves", "summary", "samples"):
        assert Path(f"{out}_{suffix}.png").stat().st_size > 0


def test_the_replication_evaluates_the_short_and_long_checkpoints_it_is_given(tmp_path):
    from carve3d_trl.toy import toy_model_path

    tiny = [*TINY_EVALUATION, "--epochs", "1", "--runs", "kl", "--train_prompts", "1"]
    swapped = ["--short_model", str(toy_model_path("long")), "--long_model", str(toy_model_path("short"))]
    run_script("benchmarks/bench_replication.py", *tiny, "--out", str(tmp_path / "shipped"))
    run_script("benchmarks/bench_replication.py", *tiny, *swapped, "--out", str(tmp_path / "swapped"))
    shipped, swapped = (json.loads((tmp_path / f"{n}.json").read_text())["per_sample"] for n in ("shipped", "swapped"))
    assert swapped["base (short SFT)"]["mrc"] == shipped["long SFT"]["mrc"]  # same noise, the other checkpoint
    assert swapped["long SFT"]["mrc"] == shipped["base (short SFT)"]["mrc"]
    assert swapped["base (short SFT)"]["mrc"] != shipped["base (short SFT)"]["mrc"]


def test_the_replications_are_pooled_over_seeds_and_only_runs_of_one_setting(tmp_path):
    tiny = [*TINY_EVALUATION, "--epochs", "2", "--train_prompts", "2"]
    paths = [tmp_path / f"seed{seed}.json" for seed in (0, 1)]
    for seed, path in zip((0, 1), paths):
        run_script("benchmarks/bench_replication.py", *tiny, "--seed", str(seed), "--out", str(path.with_suffix("")))
    runs = [json.loads(path.read_text()) for path in paths]
    assert runs[0]["val_prompts"] != runs[1]["val_prompts"]  # another seed, other captions

    table = run_script("benchmarks/pool_replication.py", *map(str, paths))
    for name in ("data", "RL + KL", "RL, no KL", "long SFT"):
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        gains = [run["summary"][name]["mrc_change_mean"] for run in runs]
        assert [float(g.split(" ± ")[0]) for g in cells[1].split(", ")] == pytest.approx(gains, abs=5e-3)
        assert float(cells[2].strip("*").split(" ± ")[0]) == pytest.approx(sum(gains) / 2, abs=5e-3)
        colour = [
            100
            * (r["summary"][name]["color_adherence_mean"] - r["summary"]["base (short SFT)"]["color_adherence_mean"])
            for r in runs
        ]
        assert float(cells[7].split(" ± ")[0]) == pytest.approx(sum(colour) / 2, abs=0.05)
    kl_lower = sum(r["summary"]["RL + KL"]["kl_mean"] < r["summary"]["RL, no KL"]["kl_mean"] for r in runs)
    assert f"lower than without: in {kl_lower} of 2 seeds" in table

    # a run of an older code, which recorded neither the LoRA targets nor the checkpoints, pools with a newer one
    # made in another clone; a run of another setting, or a repeated seed, does not
    older = json.loads(paths[0].read_text())
    for key in ("lora_target_modules", "short_model", "long_model"):
        del older["settings"][key]
    older_path = tmp_path / "older.json"
    older_path.write_text(json.dumps(older))
    elsewhere = json.loads(paths[1].read_text())
    elsewhere["settings"]["short_model"] = "/elsewhere/carve3d_trl/toy/weights/short"
    elsewhere_path = tmp_path / "elsewhere.json"
    elsewhere_path.write_text(json.dumps(elsewhere))
    assert "seeds 0, 1" in run_script("benchmarks/pool_replication.py", str(older_path), str(elsewhere_path))
    other = json.loads(paths[1].read_text())
    other["settings"]["kl_coeff"] = 0.2
    other_path = tmp_path / "other.json"
    other_path.write_text(json.dumps(other))
    for pair, message in (((paths[0], other_path), "has kl_coeff=0.2"), ((paths[0], paths[0]), "Seeds repeat")):
        with pytest.raises(subprocess.CalledProcessError) as error:
            run_script("benchmarks/pool_replication.py", *map(str, pair))
        assert message in error.value.stderr


def test_training_script_is_deterministic_writes_every_checkpoint_and_trains_stage_1_on_extra_scenes(tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    tiny = ["--num_scenes", "3", "--random_views", "1", "--vae_steps", "2", "--vae_batch_size", "4"]
    tiny += ["--pretrain_steps", "2", "--pretrain_batch_size", "4", "--batch_size", "4"]
    tiny += ["--short_steps", "1", "--grid_steps", "2", "--warmup_steps", "1"]
    for run in ("a", "b"):
        run_script("scripts/train_toy_model.py", *tiny, "--output_dir", str(tmp_path / run))
    run_script("scripts/train_toy_model.py", *tiny, "--pretrain_scenes", "5", "--output_dir", str(tmp_path / "more"))

    def weights(run: str, variant: str, part: str = "unet") -> dict[str, torch.Tensor]:
        name = "model.safetensors" if part == "text_encoder" else "diffusion_pytorch_model.safetensors"
        return load_file(tmp_path / run / variant / part / name)

    for variant in ("single_view", "short", "long"):
        first, second = weights("a", variant), weights("b", variant)
        assert all(torch.equal(first[k], second[k]) for k in first)  # the same seed gives the same weights
        assert {t.dtype for t in first.values()} == {torch.float16}
    single, short, long = (weights("a", v) for v in ("single_view", "short", "long"))
    more = weights("more", "single_view")  # two more scenes at random cameras change stage 1
    assert any(not torch.equal(single[k], more[k]) for k in single)
    assert any(not torch.equal(single[k], short[k]) for k in short)  # stage 2 starts from stage 1 and trains on
    assert any(not torch.equal(short[k], long[k]) for k in short)  # the long checkpoint trained further
    text = [weights("a", v, "text_encoder") for v in ("single_view", "short", "long")]
    assert all(torch.equal(text[0][k], t[k]) for t in text[1:] for k in t)  # stage 2 freezes the text encoder
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "a" / "long")
    assert pipe.vae.config.scaling_factor != 0.18215 and pipe.tokenizer.model_max_length == 64
    assert pipe.unet.config.sample_size == 16  # 64x64 grids
    assert StableDiffusionPipeline.from_pretrained(tmp_path / "a" / "single_view").unet.config.sample_size == 8
    assert not list(tmp_path.glob("*/.tmp-*")) and not list(tmp_path.glob("*/*/.tmp-*"))


def test_the_random_reward_control_keeps_the_metadata_and_replaces_the_rewards_by_seeded_noise(monkeypatch):
    from carve3d_trl.testing import load_script

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the script's `harness`
    module = load_script(Path(__file__).resolve().parents[1] / "benchmarks" / "bench_replication.py")

    def constant_reward(images, prompts, metadata):
        return torch.full((len(images),), 7.0), {"mrc": torch.full((len(images),), 3.0)}

    images, prompts, metadata = torch.zeros(4, 3, 8, 8), ("a",) * 4, ({},) * 4
    control = module.RandomReward(constant_reward, seed=0)
    first, info = control(images, prompts, metadata)
    second, _ = control(images, prompts, metadata)
    again, _ = module.RandomReward(constant_reward, seed=0)(images, prompts, metadata)
    assert info["mrc"].eq(3.0).all()  # the metadata (MRC, logged in the history) is the wrapped reward's
    assert not first.eq(7.0).any() and first.std() > 0
    assert torch.equal(first, again) and not torch.equal(first, second)  # seeded, and fresh at every call


def test_the_replication_can_adapt_only_the_cross_view_attention_and_refuses_unknown_lora_targets(monkeypatch):
    from carve3d_trl import load_ddpo_pipeline
    from carve3d_trl.pipelines import DEFAULT_LORA_TARGETS
    from carve3d_trl.testing import load_script
    from carve3d_trl.toy import toy_model_path

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the script's `harness`
    module = load_script(ROOT / "benchmarks" / "bench_replication.py")
    assert module.parse_args([]).lora_target_modules == tuple(DEFAULT_LORA_TARGETS)
    attn1 = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")
    args = module.parse_args(["--family", "view_batched", "--lora_target_modules", *attn1])
    path = str(toy_model_path("short", family="view_batched"))
    pipeline = load_ddpo_pipeline(path, lora_rank=4, lora_target_modules=args.lora_target_modules)
    adapted = {name for name, p in pipeline.get_trainable_layers().named_parameters() if p.requires_grad}
    assert adapted and all(".attn1." in name and "lora_" in name for name in adapted)
    default = load_ddpo_pipeline(path, lora_rank=4, lora_target_modules=module.parse_args([]).lora_target_modules)
    assert any(".attn2." in name for name, p in default.get_trainable_layers().named_parameters() if p.requires_grad)
    module.check_lora_targets(pipeline.unet, attn1)
    with pytest.raises(ValueError, match="--lora_target_modules attn9.to_q match no module"):
        module.check_lora_targets(pipeline.unet, ("attn9.to_q", "to_q"))


def test_the_replications_rl_runs_load_the_chosen_short_checkpoint_with_the_chosen_lora_targets(monkeypatch, tmp_path):
    import carve3d_trl
    from carve3d_trl.testing import load_script
    from carve3d_trl.toy import toy_model_path

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the script's `harness`
    module = load_script(ROOT / "benchmarks" / "bench_replication.py")
    other = toy_model_path("long", family="view_batched")
    args = module.parse_args(["--family", "view_batched", "--short_model", str(other)])
    args.lora_target_modules = ("attn1.to_q",)
    loaded = {}

    def record_and_stop(path, **kwargs):
        loaded.update(path=path, **kwargs)
        raise RuntimeError("stop before training")

    monkeypatch.setattr(carve3d_trl, "load_ddpo_pipeline", record_and_stop)
    with pytest.raises(RuntimeError, match="stop before training"):
        module.rl_run(args, ["a red cube", "a blue sphere"], kl=True, reward=None, workdir=tmp_path)
    assert loaded["path"] == str(other) and loaded["lora_target_modules"] == ("attn1.to_q",)


def test_the_replication_takes_other_checkpoints_of_its_family_and_refuses_the_wrong_family(monkeypatch, capsys):
    from carve3d_trl.testing import load_script
    from carve3d_trl.toy import toy_model_path

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the script's `harness`
    module = load_script(ROOT / "benchmarks" / "bench_replication.py")
    args = module.parse_args(["--family", "view_batched"])
    assert args.short_model == toy_model_path("short", family="view_batched")
    assert args.long_model == toy_model_path("long", family="view_batched")
    grid_long = toy_model_path("long", family="grid")
    assert module.parse_args(["--short_model", str(grid_long)]).short_model == grid_long
    with pytest.raises(SystemExit):
        module.parse_args(["--family", "view_batched", "--long_model", str(grid_long)])
    error = capsys.readouterr().err
    assert f"--long_model {grid_long} is a pipeline of family 'sd'; --family view_batched needs family" in error
    with pytest.raises(SystemExit):
        module.parse_args(["--short_model", str(grid_long / "unet")])
    assert "holds no model_index.json" in capsys.readouterr().err
