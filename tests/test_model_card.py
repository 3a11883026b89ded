import logging
from importlib.resources import files

import pytest
from huggingface_hub import ModelCard

from carve3d_trl.model_card import (
    BASE_TAGS,
    TRAINING_CURVES_FILENAME,
    ModelCardInfo,
    render_model_card,
    save_training_curves,
    write_model_card,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CONFIG = {
    "lora_rank": 4,
    "train_learning_rate": 3e-4,
    "num_epochs": 55,
    "sample_batch_size": 8,
    "train_batch_size": 8,
    "train_gradient_accumulation_steps": 1,
    "sample_num_steps": 100,
    "sample_guidance_scale": 5.0,
    "kl_penalty": True,
    "kl_in_reward": True,
    "kl_normalized_coeff": 0.2,
    "kl_beta": 0.001,
    "reconstructor": "openlrm-mix-base",
    "hub_token": "hf_secret",
    "unlisted_setting": "kept in the details block",
}
HISTORY = [
    {"epoch": 0, "reward_mean": -0.31, "reward_std": 0.05, "kl_mean": 0.0},
    {"epoch": 1, "reward_mean": -0.27, "kl_mean": 0.012, "mrc_mean": 0.27},
    {"epoch": 2, "reward_mean": -0.22, "reward_std": 0.04, "kl_mean": 0.02, "mrc_mean": 0.22},
]
SAMPLES = [
    {"prompt": "a red | chair", "image": "samples/0_views.png", "render": "samples/0_renders.png", "mrc": 0.2134},
    {"prompt": "a teapot", "image": "samples/1 views.png"},
]


def make_info(**overrides) -> ModelCardInfo:
    fields = dict(
        base_model="org/mv-base",
        repo_id="me/carve3d-lora",
        prompt_dataset="me/carve3d-prompts",
        training_config=CONFIG,
        history=HISTORY,
        samples=SAMPLES,
        extra_tags=["my-tag", "lora"],
    )
    return ModelCardInfo(**{**fields, **overrides})


def test_template_ships_in_package():
    assert "{{ card_data }}" in (files("carve3d_trl") / "model_card_template.md").read_text(encoding="utf-8")


def test_metadata_parses_back():
    card = ModelCard(render_model_card(make_info(license="creativeml-openrail-m")))
    data = card.data
    assert data.base_model == "org/mv-base"
    assert data.library_name == "diffusers"
    assert data.license == "creativeml-openrail-m"
    assert data.pipeline_tag == "text-to-image"
    assert data.datasets == ["me/carve3d-prompts"]
    assert data.tags == [*BASE_TAGS, "my-tag"]  # extra tags added once, in order


def test_defaults_and_optional_metadata():
    card = ModelCard(render_model_card(ModelCardInfo(base_model="org/mv-base")))
    assert card.data.license == "apache-2.0"
    assert card.data.datasets is None
    assert "# Carve3D LoRA" in card.text
    assert 'load_lora_weights("path/to/this/folder")' in card.text
    assert "No training configuration was recorded." in card.text
    assert "| Setting | Value |" not in card.text
    assert "## Samples" not in card.text


def test_local_base_model_is_kept_out_of_metadata(tmp_path):
    card = ModelCard(render_model_card(make_info(base_model=str(tmp_path))))
    assert card.data.base_model is None
    assert f'StableDiffusionPipeline.from_pretrained("{tmp_path}"' in card.text


def test_body_has_title_and_load_snippet():
    text = ModelCard(render_model_card(make_info())).text
    assert text.lstrip().startswith("# carve3d-lora")
    assert 'pipe = StableDiffusionPipeline.from_pretrained("org/mv-base", torch_dtype=torch.float16)' in text
    assert 'pipe.load_lora_weights("me/carve3d-lora")' in text
    assert "num_inference_steps=100, guidance_scale=5.0" in text
    assert "[org/mv-base](https://huggingface.co/org/mv-base)" in text


def test_config_table():
    text = render_model_card(make_info())
    for row in (
        "| LoRA rank | 4 |",
        "| Learning rate | 0.0003 |",
        "| Epochs | 55 |",
        "| Sample batch size (per device) | 8 |",
        "| Denoising steps | 100 |",
        "| KL penalty | yes |",
        "| KL coefficient (normalised, in reward) | 0.2 |",
        "| Reconstructor | openlrm-mix-base |",
    ):
        assert row in text
    assert "KL beta" not in text  # the in-loss coefficient is unused in in-reward mode
    assert '"unlisted_setting": "kept in the details block"' in text
    assert "hf_secret" not in text


def test_config_table_in_loss_and_without_kl():
    in_loss = render_model_card(make_info(training_config={**CONFIG, "kl_in_reward": False}))
    assert "| KL beta (in loss) | 0.001 |" in in_loss and "KL coefficient" not in in_loss
    no_kl = render_model_card(make_info(training_config={**CONFIG, "kl_penalty": False}))
    assert "| KL penalty | no |" in no_kl and "KL beta" not in no_kl and "KL coefficient" not in no_kl


def test_curves_and_epoch_summary_only_with_history():
    text = render_model_card(make_info())
    assert f"]({TRAINING_CURVES_FILENAME})" in text
    assert "| Metric | First epoch (0) | Last epoch (2) |" in text
    assert "| Reward mean | -0.31 | -0.22 |" in text
    assert "| MRC mean | – | 0.22 |" in text
    for history in ([], [{"epoch": 0}]):
        assert TRAINING_CURVES_FILENAME not in render_model_card(make_info(history=history))


def test_sample_rows():
    text = render_model_card(make_info())
    assert "| a red \\| chair | ![views](samples/0_views.png) | ![renders](samples/0_renders.png) | 0.2134 |" in text
    assert "| a teapot | ![views](samples/1%20views.png) | – | – |" in text


def test_citations():
    text = render_model_card(make_info())
    assert "@inproceedings{xie2024carve3d," in text
    assert "Carve3D: Improving Multi-view Reconstruction Consistency for Diffusion Models" in text
    assert "@inproceedings{black2024ddpo," in text
    assert "Training Diffusion Models with Reinforcement Learning" in text


def test_save_training_curves(tmp_path):
    assert save_training_curves([], tmp_path / "empty.png") is None
    assert save_training_curves([{"epoch": 0}], tmp_path / "empty.png") is None
    assert not (tmp_path / "empty.png").exists()
    path = save_training_curves(HISTORY, tmp_path / "curves.png")
    assert path == tmp_path / "curves.png"
    assert path.read_bytes().startswith(PNG_MAGIC)
    only_kl = save_training_curves([{"kl_mean": 0.1}, {"kl_mean": 0.2}], tmp_path / "kl.png")
    assert only_kl.read_bytes().startswith(PNG_MAGIC)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "kl.png"]


def test_write_model_card(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="carve3d_trl.model_card")
    folder = tmp_path / "final"
    (folder / "samples").mkdir(parents=True)
    for name in ("0_views.png", "0_renders.png"):
        (folder / "samples" / name).write_bytes(PNG_MAGIC)
    readme = write_model_card(folder, make_info())
    assert readme == folder / "README.md"
    assert ModelCard.load(readme).data.base_model == "org/mv-base"
    assert (folder / TRAINING_CURVES_FILENAME).read_bytes().startswith(PNG_MAGIC)
    assert "samples/1 views.png" in caplog.text  # the missing sample image is reported
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "samples", TRAINING_CURVES_FILENAME]


@pytest.mark.parametrize("history", [[], [{"epoch": 0}]])
def test_write_model_card_without_history(tmp_path, history):
    write_model_card(tmp_path, make_info(history=history, samples=[]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]
