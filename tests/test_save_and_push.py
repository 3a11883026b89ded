"""save_pretrained / push_to_hub: the folder layout for real, the diffusers LoRA round trip, the Hub patched."""

import json
from pathlib import Path
from unittest import mock

import pytest
import torch
from diffusers import StableDiffusionPipeline
from huggingface_hub import ModelCard

from carve3d_trl import Carve3DConfig, Carve3DStableDiffusionPipeline, Carve3DTrainer
from carve3d_trl.hub import HubUploadError

SMALL = dict(
    sample_num_steps=2,
    sample_batch_size=2,
    sample_num_batches_per_epoch=1,
    train_batch_size=2,
    mixed_precision="no",
    log_with=None,
    warmup_first_epoch=False,
    train_learning_rate=1e-2,
    save_freq=100,
)


def reward_with_renders(images, prompts, metadata):
    """A stand-in for the MRC reward: brightness, with per-view 'renders' and an 'mrc' value in the metadata."""
    b, _, h, w = images.shape
    views = images.reshape(b, 3, 2, h // 2, 2, w // 2).permute(0, 2, 4, 1, 3, 5).reshape(b, 4, 3, h // 2, w // 2)
    return images.mean(dim=(1, 2, 3)), {"renders": 1 - views, "mrc": torch.full((b,), 0.25)}


@pytest.fixture(scope="module")
def trained(tiny_model_path, tmp_path_factory):
    logdir = tmp_path_factory.mktemp("run")
    config = Carve3DConfig(**SMALL, logdir=str(logdir), prompt_dataset="", seed=1)
    prompts = iter(["a red cube", "a blue sphere"] * 10)
    trainer = Carve3DTrainer(
        config, reward_with_renders, lambda: (next(prompts), {}), Carve3DStableDiffusionPipeline(tiny_model_path)
    )
    trainer.train(epochs=2)
    return trainer


def test_folder_layout_and_model_card(trained, tmp_path):
    out = tmp_path / "model"
    trained.save_pretrained(out, model_card_kwargs={"license": "openrail"})
    names = {p.name for p in out.iterdir()}
    assert {"pytorch_lora_weights.safetensors", "README.md", "carve3d_config.json", "training_history.json"} <= names
    assert {"training_curves.png", "samples"} <= names
    assert not [n for n in names if n.startswith(".tmp")]
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "diffusers" and card.data.license == "openrail"
    assert {"carve3d", "ddpo", "lora", "text-to-image", "multi-view"} <= set(card.data.tags)
    assert "load_lora_weights" in card.text and "training_curves.png" in card.text
    assert "samples/sample_0.png" in card.text and "samples/sample_0_renders.png" in card.text
    assert "@inproceedings{xie2024carve3d" in card.text
    history = json.loads((out / "training_history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1] and history[1]["mrc_mean"] == pytest.approx(0.25)
    assert json.loads((out / "carve3d_config.json").read_text())["kl_normalized_coeff"] == 0.2
    assert len(list((out / "samples").glob("*.png"))) == 4  # 2 grids + 2 render grids


def test_saved_lora_reproduces_the_trained_unet_in_diffusers(trained, tiny_model_path, tmp_path):
    trained.save_pretrained(tmp_path / "model")
    base = StableDiffusionPipeline.from_pretrained(tiny_model_path)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    text = trained.sd_pipeline.text_encoder(
        trained.sd_pipeline.tokenizer(["a red cube"], return_tensors="pt").input_ids
    )[0]
    with torch.no_grad():
        before = base.unet(latents, 500, text).sample
        base.load_lora_weights(str(tmp_path / "model"))
        after = base.unet(latents, 500, text).sample
        trained_out = trained.sd_pipeline.unet(latents, 500, text).sample
    assert not torch.allclose(before, trained_out)  # training moved the model
    torch.testing.assert_close(after, trained_out, atol=1e-5, rtol=1e-5)


def test_saving_twice_replaces_the_folder(trained, tmp_path):
    out = tmp_path / "model"
    trained.save_pretrained(out)
    (out / "stale.txt").write_text("old")
    trained.save_pretrained(out)
    assert not (out / "stale.txt").exists() and (out / "README.md").exists()


def test_push_to_hub_saves_locally_then_uploads(trained):
    api = mock.MagicMock()
    api.upload_folder.return_value = mock.MagicMock(commit_url="https://hub/commit/1")
    with mock.patch("carve3d_trl.hub.HfApi", return_value=api):
        url = trained.push_to_hub("me/carve3d-tiny", private=True, token="t")
    folder = api.upload_folder.call_args.kwargs["folder_path"]
    assert api.create_repo.call_args.kwargs["private"] is True
    assert api.upload_folder.call_args.kwargs["repo_id"] == "me/carve3d-tiny"
    assert "pytorch_lora_weights.safetensors" in {p.name for p in Path(folder).iterdir()}
    assert url


def test_failed_upload_keeps_the_local_folder_and_says_where(trained):
    api = mock.MagicMock()
    api.upload_folder.side_effect = ConnectionError("network down")
    with (
        mock.patch("carve3d_trl.hub.HfApi", return_value=api),
        mock.patch("carve3d_trl.hub.time.sleep"),
        pytest.raises(HubUploadError) as error,
    ):
        trained.push_to_hub("me/carve3d-tiny")
    folder = trained.config.logdir + "/hub/me--carve3d-tiny"
    assert str(Path(folder).resolve()) in str(error.value)
    assert (Path(folder) / "pytorch_lora_weights.safetensors").exists()


def test_push_to_hub_refuses_unsupported_options_before_saving(trained):
    with pytest.raises(ValueError, match="create_pr"):
        trained.push_to_hub("me/x", create_pr=True)
