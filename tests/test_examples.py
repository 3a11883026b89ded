"""The example scripts evaluate_mrc.py and curate_prompts.py, the accelerate configs, and docs/examples.md."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError
from PIL import Image

from carve3d_trl import Carve3DStableDiffusionPipeline, evaluation, load_prompts
from carve3d_trl.hub import HubUploadError, push_folder_to_hub
from carve3d_trl.pipelines import Carve3DStableDiffusionXLPipeline, save_unet_weights
from carve3d_trl.rewards.arguments import MRCArguments, build_mrc_reward
from carve3d_trl.testing import TinyPipelineSpec, load_script, save_tiny_sdxl_pipeline

ROOT = Path(__file__).resolve().parents[1]
evaluate_mrc = load_script(ROOT / "examples" / "evaluate_mrc.py")
curate_prompts = load_script(ROOT / "examples" / "curate_prompts.py")

PROMPTS = ["a red cube", "a blue sphere", "a green cone", "a wooden chair"]
RECONSTRUCTOR = json.dumps({"samples_per_ray": 16, "refine_steps": 2})  # the default visual hull, cheaper
TINY_RUN = ["--num_inference_steps", "2", "--mrc_metric", "mse", "--mrc_reconstructor_kwargs", RECONSTRUCTOR]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def save_random_lora(pipeline, folder: Path) -> Path:
    """Give `pipeline`'s LoRA random (non-zero) weights, so that it changes the samples, and save it to `folder`."""
    pipeline.get_trainable_layers()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in pipeline.sd_pipeline.unet.named_parameters():
            if "lora_B" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    save_unet_weights(pipeline, folder)
    return folder


@pytest.fixture(scope="module")
def lora_dir(tiny_model_path, tmp_path_factory):
    """A random LoRA for the tiny model."""
    pipeline = Carve3DStableDiffusionPipeline(str(tiny_model_path), lora_rank=2)
    return save_random_lora(pipeline, tmp_path_factory.mktemp("lora"))


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if a script gets as far as loading a model or building the reward."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    for name in ("load_pipeline", "build_mrc_reward"):
        monkeypatch.setattr(evaluate_mrc, name, refuse)
        monkeypatch.setattr(curate_prompts, name, refuse)


# ---------------------------------------------------------------------------------------------- evaluate_mrc.py


def test_evaluate_writes_metrics_table_and_figure(tiny_model_path, lora_dir, prompt_file, tmp_path):
    out = tmp_path / "eval"
    args = ["--pretrained_model", str(tiny_model_path), "--lora", str(lora_dir), "--prompt_dataset", str(prompt_file)]
    args += [
        "--num_prompts",
        "3",
        "--num_seeds",
        "2",
        "--seed",
        "10",
        "--batch_size",
        "4",
        "--num_figure_prompts",
        "2",
    ]
    summary = evaluate_mrc.main([*args, *TINY_RUN, "--output_dir", str(out)])

    with open(out / "per_prompt.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["prompt"], int(r["seed"])) for r in rows] == [(p, s) for p in PROMPTS[:3] for s in (10, 11)]
    table = json.loads((out / "per_prompt.json").read_text())
    assert [set(r) for r in table] == [{"prompt", "seed", "mrc_base", "mrc_finetuned"}] * 6
    assert [float(r["mrc_base"]) for r in rows] == pytest.approx([r["mrc_base"] for r in table])
    base = np.array([r["mrc_base"] for r in table])
    tuned = np.array([r["mrc_finetuned"] for r in table])
    assert np.isfinite(base).all() and np.isfinite(tuned).all()
    assert not np.allclose(base, tuned)  # the LoRA changes the samples

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(summary))
    assert metrics["metric"] == "mse" and metrics["mrc_higher_is_better"] is False
    assert (metrics["num_prompts"], metrics["num_seeds"]) == (3, 2)
    assert metrics["base"] == pytest.approx({"mrc_mean": base.mean(), "mrc_std": base.std()})
    assert metrics["finetuned"] == pytest.approx({"mrc_mean": tuned.mean(), "mrc_std": tuned.std()})
    assert metrics["finetuned_more_consistent_fraction"] == pytest.approx(np.mean(tuned < base))
    assert metrics["settings"]["seeds"] == [10, 11] and metrics["settings"]["lora"] == str(lora_dir)

    with Image.open(out / "comparison.png") as figure:
        assert figure.format == "PNG" and figure.size[0] > figure.size[1] > 0
    assert not list(out.glob(".tmp-*"))


def test_evaluate_detects_an_sdxl_model_and_applies_its_lora(prompt_file, tmp_path):
    model = save_tiny_sdxl_pipeline(tmp_path / "tiny-sdxl", TinyPipelineSpec(image_size=32))
    lora = save_random_lora(Carve3DStableDiffusionXLPipeline(str(model), lora_rank=2), tmp_path / "lora")
    args = ["--pretrained_model", str(model), "--lora", str(lora), "--prompt_dataset", str(prompt_file)]
    args += ["--num_prompts", "2", "--num_seeds", "1", "--num_figure_prompts", "0"]
    summary = evaluate_mrc.main([*args, *TINY_RUN, "--output_dir", str(tmp_path / "eval")])

    table = json.loads((tmp_path / "eval" / "per_prompt.json").read_text())
    base = np.array([row["mrc_base"] for row in table])
    tuned = np.array([row["mrc_finetuned"] for row in table])
    assert len(table) == 2 and np.isfinite(base).all() and not np.allclose(base, tuned)
    assert summary["settings"]["pipeline_family"] == "auto"
    sampling = evaluation.SamplingArguments(device="cpu")
    for family in ("auto", "sdxl"):
        model_args = evaluation.ModelArguments(str(model), pipeline_family=family)
        assert type(evaluation.load_pipeline(model_args, sampling, "cpu")).__name__ == "StableDiffusionXLPipeline"


def test_evaluate_rejects_an_unknown_pipeline_family():
    with pytest.raises(ValueError, match="--pipeline_family must be one of"):
        evaluation.ModelArguments("some/model", pipeline_family="sd3")


def test_samples_depend_only_on_prompt_and_seed_not_on_the_batch(tiny_model_path):
    sampling = evaluation.SamplingArguments(num_inference_steps=2, device="cpu")
    pipe = evaluation.load_pipeline(evaluation.ModelArguments(str(tiny_model_path)), sampling, torch.device("cpu"))
    together = evaluation.sample_images(pipe, ["a red cube", "a blue sphere"], [3, 4], sampling)
    alone = evaluation.sample_images(pipe, ["a blue sphere"], [4], sampling)
    assert together.shape == (2, 3, 32, 32) and together.min() >= 0 and together.max() <= 1
    torch.testing.assert_close(together[1], alone[0], atol=1e-5, rtol=0)
    other_seed = evaluation.sample_images(pipe, ["a blue sphere"], [5], sampling)
    assert not torch.allclose(alone, other_seed)


def test_seeded_noise_is_fixed_per_seed_and_the_step_noise_is_not_the_latent(tiny_model_path):
    pipe = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(sample_size=16, in_channels=4)))
    latent, generator = evaluation.seeded_noise(pipe, 7)
    again, _ = evaluation.seeded_noise(pipe, 7)
    assert latent.shape == (4, 16, 16) and torch.equal(latent, again)
    assert not torch.equal(latent, evaluation.seeded_noise(pipe, 8)[0])
    assert not torch.allclose(torch.randn(latent.shape, generator=generator), latent)  # the generator moved on


def test_scoring_is_repeatable_so_base_and_finetuned_see_the_same_noise(tiny_model_path):
    sampling = evaluation.SamplingArguments(num_inference_steps=2, batch_size=2, device="cpu")
    mrc = MRCArguments(mrc_metric="mse", mrc_reconstructor_kwargs=RECONSTRUCTOR)
    reward = build_mrc_reward(mrc, 0, torch.device("cpu"))
    pipe = evaluation.load_pipeline(evaluation.ModelArguments(str(tiny_model_path)), sampling, torch.device("cpu"))
    first = evaluation.score_prompts(pipe, reward, PROMPTS[:2], [0], sampling, keep={(1, 0)})
    second = evaluation.score_prompts(pipe, reward, PROMPTS[:2], [0], sampling)
    np.testing.assert_array_equal(first.mrc, second.mrc)
    np.testing.assert_allclose(first.rewards, -first.mrc)
    assert set(first.kept) == {(1, 0)} and first.kept[1, 0]["renders"].shape[:2] == (4, 3)


@pytest.mark.parametrize(
    ("extra", "error", "match"),
    [
        (["--mrc_metric", "ssim"], ValueError, "--mrc_metric must be one of"),
        (["--mrc_layout", "octagon"], ValueError, "--mrc_layout must be one of"),
        (["--mrc_reconstructor", "nerfstudio"], ValueError, "--mrc_reconstructor must be one of"),
        (["--mrc_reconstructor_kwargs", "{steps: 3"], ValueError, "not valid JSON"),
        (["--mrc_silhouette_weight", "-1"], ValueError, "--mrc_silhouette_weight must be >= 0"),
        (["--mrc_mse_weight", "-0.5"], ValueError, "--mrc_mse_weight must be >= 0"),
        (["--num_seeds", "0"], ValueError, "--num_seeds must be >= 1"),
        (["--batch_size", "0"], ValueError, "--batch_size must be >= 1"),
        (["--mixed_precision", "fp8"], ValueError, "--mixed_precision must be one of"),
        (["--prompt_column", "text", "--prompt_dataset", "PROMPTS_JSONL"], ValueError, "has no column 'text'"),
    ],
)
def test_evaluate_rejects_bad_settings_before_loading_models(
    tiny_model_path, lora_dir, tmp_path, no_model_loads, extra, error, match
):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red cube"}\n')
    extra = [str(prompts) if e == "PROMPTS_JSONL" else e for e in extra]
    with pytest.raises(error, match=match):
        evaluate_mrc.main(["--pretrained_model", str(tiny_model_path), "--lora", str(lora_dir), *extra])


def test_evaluate_rejects_a_lora_folder_without_weights(tiny_model_path, tmp_path, no_model_loads):
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "README.md").write_text("card")
    with pytest.raises(FileNotFoundError, match="has no pytorch_lora_weights.safetensors"):
        evaluate_mrc.main(["--pretrained_model", str(tiny_model_path), "--lora", str(tmp_path / "lora")])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate_mrc.main(["--pretrained_model", str(tiny_model_path), "--lora", str(tmp_path / "missing" / "lora")])


def test_evaluate_rejects_a_model_folder_that_is_not_a_diffusers_model(lora_dir, tmp_path, no_model_loads):
    with pytest.raises(FileNotFoundError, match="without model_index.json"):
        evaluate_mrc.main(["--pretrained_model", str(tmp_path), "--lora", str(lora_dir)])
    with pytest.raises(ValueError, match="Invalid Hugging Face Hub repo id"):
        evaluate_mrc.main(["--pretrained_model", "no--such//model", "--lora", str(lora_dir)])


def test_a_hub_lora_is_downloaded_before_any_model_loads(lora_dir, monkeypatch):
    weights = lora_dir / evaluate_mrc.LORA_WEIGHT_NAME
    with mock.patch("huggingface_hub.hf_hub_download", return_value=str(weights)) as download:
        assert evaluation.resolve_lora("me/carve3d-lora", revision="v1") == weights
    download.assert_called_once_with("me/carve3d-lora", evaluate_mrc.LORA_WEIGHT_NAME, revision="v1")

    with (
        mock.patch("huggingface_hub.hf_hub_download", side_effect=OSError("offline")),
        pytest.raises(FileNotFoundError, match="could not be fetched from the Hub repo 'me/carve3d-lora'"),
    ):
        evaluation.resolve_lora("me/carve3d-lora")
    assert evaluation.resolve_lora(str(weights)) == weights  # the weights file itself


# ---------------------------------------------------------------------------------------------- curate_prompts.py


def fake_hub(upload_effects=()):
    api = mock.create_autospec(HfApi, instance=True)
    api.create_repo.return_value = "https://huggingface.co/datasets/me/prompts"
    api.upload_folder.side_effect = [*upload_effects, SimpleNamespace(commit_url="https://hf.co/commit/1")]
    return api


def test_curate_keeps_the_least_consistent_prompts_as_a_loadable_dataset(tiny_model_path, prompt_file, tmp_path):
    import datasets

    out = tmp_path / "curated"
    api = fake_hub()
    args = ["--pretrained_model", str(tiny_model_path), "--prompt_dataset", str(prompt_file), "--num_seeds", "2"]
    args += ["--keep", "2", "--validation_split", "--output_dir", str(out)]
    args += ["--push_to_hub", "--hub_dataset_id", "me/prompts", *TINY_RUN]
    ranked = curate_prompts.main(args, api=api)

    curation = json.loads((out / "curation.json").read_text())
    means = {c["prompt"]: c["mrc_mean"] for c in curation["candidates"]}
    assert sorted(means) == sorted(PROMPTS) and all(len(c["mrc"]) == 2 for c in curation["candidates"])
    worst_two = sorted(PROMPTS, key=means.get, reverse=True)[:2]  # MSE: the highest MRC is the least consistent
    assert load_prompts(str(out)) == worst_two == [c.prompt for c in ranked[:2]]
    assert load_prompts(str(out), split="validation") == sorted(set(PROMPTS) - set(worst_two), key=means.get)[::-1]

    dataset = datasets.load_dataset(str(out))
    assert set(dataset) == {"train", "validation"} and dataset["train"].column_names == [
        "prompt",
        "mrc_mean",
        "mrc_std",
    ]
    train = dataset["train"].to_list()
    assert [r["mrc_mean"] for r in train] == sorted((r["mrc_mean"] for r in train), reverse=True)
    for row in train:
        scores = next(c["mrc"] for c in curation["candidates"] if c["prompt"] == row["prompt"])
        assert row["mrc_mean"] == pytest.approx(np.mean(scores)) and row["mrc_std"] == pytest.approx(np.std(scores))
    assert (
        "least consistent first; the other 2 candidates form the `validation` split" in (out / "README.md").read_text()
    )

    api.create_repo.assert_called_once_with(
        "me/prompts", repo_type="dataset", exist_ok=True, private=False, token=None
    )
    upload = api.upload_folder.call_args.kwargs
    assert upload["repo_type"] == "dataset" and Path(upload["folder_path"]) == out.absolute()

    # curating again into the same folder replaces it, and loading it gives the new prompts (not a cached copy)
    curate_prompts.write_dataset(out, ranked[::-1], 3, False, curation["settings"])
    assert load_prompts(str(out)) == [c.prompt for c in ranked[::-1][:3]]
    assert not (out / "validation.jsonl").exists()


def test_dataset_push_retries_transient_errors_then_reports_the_local_folder(tmp_path):
    response = SimpleNamespace(status_code=503, headers={}, request=None)
    api, sleeps = fake_hub([HfHubHTTPError("503 Server Error", response=response)]), []
    url = push_folder_to_hub(tmp_path, "me/prompts", repo_type="dataset", api=api, sleep=sleeps.append)
    assert url == "https://hf.co/commit/1" and sleeps == [2.0] and api.upload_folder.call_count == 2

    forbidden = HfHubHTTPError("403 Forbidden", response=SimpleNamespace(status_code=403, headers={}, request=None))
    api = fake_hub([forbidden])
    with pytest.raises(HubUploadError, match="no write access") as info:
        push_folder_to_hub(tmp_path, "me/prompts", repo_type="dataset", api=api, sleep=sleeps.append)
    assert f"hf upload me/prompts {tmp_path.absolute()} . --repo-type dataset" in str(info.value)
    assert api.upload_folder.call_count == 1


@pytest.mark.parametrize(
    ("extra", "error", "match"),
    [
        (["--keep", "5"], ValueError, "more than the 4 candidate prompts"),
        (["--keep", "0"], ValueError, "--keep must be >= 1"),
        (["--push_to_hub"], ValueError, "needs --hub_dataset_id"),
        (["--push_to_hub", "--hub_dataset_id", "a/b/c"], ValueError, "Invalid Hugging Face Hub repo id"),
        (["--output_dir", "FOREIGN"], FileExistsError, "not a folder written by this script"),
    ],
)
def test_curate_rejects_bad_settings_before_loading_models(
    tiny_model_path, prompt_file, tmp_path, no_model_loads, extra, error, match
):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    extra = [str(foreign) if e == "FOREIGN" else e for e in extra]
    args = ["--pretrained_model", str(tiny_model_path), "--prompt_dataset", str(prompt_file)]
    with pytest.raises(error, match=match):
        curate_prompts.main([*args, "--output_dir", str(tmp_path / "out"), *extra])
    assert (foreign / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------- accelerate configs


CONFIGS = ROOT / "examples" / "accelerate"
EXPECTED = {
    "cpu.yaml": {"distributed_type": "NO", "num_processes": 1, "num_machines": 1, "mixed_precision": "no"},
    "cpu_2proc.yaml": {
        "distributed_type": "MULTI_GPU",
        "num_processes": 2,
        "num_machines": 1,
        "mixed_precision": "no",
    },
    "1gpu.yaml": {"distributed_type": "NO", "num_processes": 1, "num_machines": 1, "mixed_precision": "fp16"},
    "multi_gpu.yaml": {
        "distributed_type": "MULTI_GPU",
        "num_processes": 8,
        "num_machines": 1,
        "mixed_precision": "fp16",
    },
    "multi_node.yaml": {
        "distributed_type": "MULTI_GPU",
        "num_processes": 48,
        "num_machines": 6,
        "mixed_precision": "fp16",
    },
    "deepspeed_zero2.yaml": {"distributed_type": "DEEPSPEED", "num_processes": 8, "mixed_precision": "fp16"},
}


def test_every_accelerate_config_is_tested():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_configs_parse_with_the_expected_settings(name):
    from accelerate.commands.config.config_args import load_config_from_file

    text = (CONFIGS / name).read_text()
    config = yaml.safe_load(text)
    assert {k: config[k] for k in EXPECTED[name]} == EXPECTED[name]
    assert config["compute_environment"] == "LOCAL_MACHINE"
    assert config["use_cpu"] is name.startswith("cpu")
    assert f"--config_file examples/accelerate/{name}" in text  # the header shows how to launch it
    parsed = load_config_from_file(str(CONFIGS / name))  # accelerate itself accepts it
    assert parsed.num_processes == config["num_processes"]


def test_multi_node_and_deepspeed_specifics():
    multi_node = yaml.safe_load((CONFIGS / "multi_node.yaml").read_text())
    assert multi_node["machine_rank"] == 0 and multi_node["main_process_ip"] and multi_node["main_process_port"]
    assert multi_node["num_processes"] % multi_node["num_machines"] == 0
    deepspeed = yaml.safe_load((CONFIGS / "deepspeed_zero2.yaml").read_text())["deepspeed_config"]
    assert deepspeed["zero_stage"] == 2 and deepspeed["gradient_clipping"] == 1.0
    assert "gradient_accumulation_steps" not in deepspeed  # DeepSpeed must take the trainer's own accumulation


@pytest.mark.slow
def test_cpu_2proc_config_starts_two_cooperating_cpu_processes(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from accelerate import Accelerator\n"
        "from accelerate.utils import gather_object\n"
        "accelerator = Accelerator()\n"
        "ranks = gather_object([accelerator.process_index])\n"
        "line = f'{accelerator.process_index} {accelerator.num_processes} {accelerator.device.type} {ranks}'\n"
        "open(f'probe{accelerator.process_index}.txt', 'w').write(line)\n"  # one file per rank: stdout interleaves
        "accelerator.end_training()\n"  # destroys the process group: a rank may abort at exit without it
    )
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file"]
    command += [str(CONFIGS / "cpu_2proc.yaml"), str(probe)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [(tmp_path / f"probe{rank}.txt").read_text() for rank in (0, 1)]
    assert lines == ["0 2 cpu [0, 1]", "1 2 cpu [0, 1]"]


def test_docs_show_each_script_and_config():
    docs = (ROOT / "docs" / "examples.md").read_text()
    for name in EXPECTED:
        assert f"--config_file examples/accelerate/{name} examples/carve3d_train.py" in docs
    assert "python examples/evaluate_mrc.py" in docs and "python examples/curate_prompts.py" in docs
    assert "--machine_rank" in docs and "--main_process_ip" in docs


def test_view_batched_toy_config_samples_at_the_toys_guidance():
    from carve3d_trl.toy import TOY_GUIDANCE_SCALE

    config = yaml.safe_load((ROOT / "examples" / "configs" / "view_batched_toy.yaml").read_text())
    assert config["sample_guidance_scale"] == TOY_GUIDANCE_SCALE
