"""The toy models' shared training code (issue 17): the diffusion loop, its schedule, the VAE's training, encoding,
caption vocabularies and saving; tiny configurations."""

import pytest
import torch

from carve3d_trl.toy.model import SINGLE_VIEW_SIZE, build_toy_pipeline
from carve3d_trl.toy.training import (
    DenoiserSchedule,
    caption_vocabulary,
    encode_images,
    save_pipeline,
    token_ids,
    train_denoiser,
    train_vae,
)

SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def test_schedule_warms_up_then_decays_to_its_final_fraction():
    schedule = DenoiserSchedule(steps=100, batch_size=2, learning_rate=1e-3, warmup_steps=10, final_lr_fraction=0.1)
    factors = [schedule.learning_rate_factor(s) for s in range(101)]
    assert factors[0] == pytest.approx(0.1 * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(0.0)).item())))
    assert max(factors) == pytest.approx(factors[9]) and factors[9] > 0.95
    assert factors[100] == pytest.approx(0.1) and all(a >= b for a, b in zip(factors[9:], factors[10:]))
    with pytest.raises(ValueError, match="must be >= 1, got 0"):
        DenoiserSchedule(steps=0, batch_size=2, learning_rate=1e-3)
    with pytest.raises(ValueError, match=r"empty_caption_rate must be in \[0, 1\), got 1.0"):
        DenoiserSchedule(steps=1, batch_size=2, learning_rate=1e-3, empty_caption_rate=1.0)


def test_caption_vocabulary_ends_with_the_empty_caption():
    vocabulary, index = caption_vocabulary(["b", "a", "b"])
    assert vocabulary == ["a", "b", ""] and index.tolist() == [1, 0, 1]


def run_loop(seed: int, steps: int = 60):
    """A 1x1 convolution per caption learning to predict the noise of all-zero latents."""
    torch.manual_seed(0)
    model = torch.nn.Conv2d(4, 4, 1)
    torch.nn.init.zeros_(model.weight)
    bias = torch.nn.Parameter(torch.zeros(3, 4, 1, 1))  # one bias per caption id (the last: the empty caption)
    seen = []
    losses = train_denoiser(
        lambda noisy, timesteps, ids: model(noisy) + bias[ids],
        [*model.parameters(), bias],
        torch.zeros(5, 4, 4, 4),
        torch.tensor([0, 1, 0, 1, 0]),
        empty_index=2,
        scheduler_config=SCHEDULER,
        schedule=DenoiserSchedule(steps=steps, batch_size=4, learning_rate=3e-2, warmup_steps=5, snr_gamma=0),
        generator=torch.Generator().manual_seed(seed),
        on_step=seen.append,
    )
    return losses, seen, model


def test_denoiser_loop_is_deterministic_learns_and_calls_back():
    losses, seen, model = run_loop(seed=1)
    again, _, _ = run_loop(seed=1)
    other, _, _ = run_loop(seed=2)
    assert losses == again and losses != other
    assert seen == list(range(1, 61))
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])  # noise = noisy / sqrt(1 - alpha_bar): mostly learnable
    assert model.weight.abs().sum() > 0
    with pytest.raises(ValueError, match="5 latents but 4 caption ids"):
        train_denoiser(
            lambda *a: a[0], [], torch.zeros(5, 4), torch.zeros(4, dtype=torch.long), 0, SCHEDULER,
            DenoiserSchedule(steps=1, batch_size=1, learning_rate=1.0), torch.Generator(),
        )  # fmt: skip


def test_vae_training_encoding_and_saving(tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    pipeline = build_toy_pipeline(seed=0, image_size=SINGLE_VIEW_SIZE)
    assert pipeline.unet.config.sample_size == SINGLE_VIEW_SIZE // 4
    views = torch.ones(6, 3, 32, 32)
    views[:, :, 8:24, 8:24] = torch.rand(6, 3, 1, 1, generator=torch.Generator().manual_seed(0))
    before = [p.clone() for p in pipeline.vae.parameters()]
    train_vae(pipeline.vae, views, torch.Generator().manual_seed(0), steps=3, batch_size=2)
    assert not pipeline.vae.training and not any(p.requires_grad for p in pipeline.vae.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, pipeline.vae.parameters()))
    latents = encode_images(pipeline.vae, views.view(2, 3, 3, 32, 32), batch_size=4)
    assert latents.shape == (2, 3, 4, 8, 8)
    torch.testing.assert_close(latents[1, 2], encode_images(pipeline.vae, views[5:6])[0])
    ids = token_ids(pipeline.tokenizer, ["a red cube", ""])
    assert ids.shape == (2, pipeline.tokenizer.model_max_length)

    save_pipeline(pipeline, tmp_path / "model")
    unet = load_file(tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    text = load_file(tmp_path / "model" / "text_encoder" / "model.safetensors")
    assert {t.dtype for t in unet.values()} == {torch.float16} and {t.dtype for t in text.values()} == {torch.float32}
    assert pipeline.unet.dtype == torch.float32  # a copy was cast, not the pipeline
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "model")
    assert loaded.unet.config.sample_size == 8
    assert not list(tmp_path.glob(".tmp-*"))


def test_text_encoder_depth_changes_only_the_text_encoder():
    shipped = build_toy_pipeline(seed=0, image_size=SINGLE_VIEW_SIZE)
    deeper = build_toy_pipeline(seed=0, image_size=SINGLE_VIEW_SIZE, text_layers=4)
    assert shipped.text_encoder.config.num_hidden_layers == 2 and deeper.text_encoder.config.num_hidden_layers == 4
    for a, b in ((shipped.unet, deeper.unet), (shipped.vae, deeper.vae)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    ids = token_ids(deeper.tokenizer, ["a red cube on a blue sphere"])
    assert deeper.text_encoder(ids)[0].shape == shipped.text_encoder(ids)[0].shape


def test_unet_width_leaves_the_vae_and_is_refused_unless_multiples_of_8(capsys):
    from pathlib import Path

    from carve3d_trl.testing import load_script

    shipped = build_toy_pipeline(seed=0, image_size=SINGLE_VIEW_SIZE)
    wider = build_toy_pipeline(seed=0, image_size=SINGLE_VIEW_SIZE, unet_channels=(48, 96, 96))
    assert tuple(shipped.unet.config.block_out_channels) == (32, 64, 64)
    assert tuple(wider.unet.config.block_out_channels) == (48, 96, 96)
    vaes = shipped.vae.state_dict().values(), wider.vae.state_dict().values()
    assert all(torch.equal(x, y) for x, y in zip(*vaes, strict=True))
    latents = torch.randn(2, 4, 8, 8)
    text = torch.randn(2, 5, wider.text_encoder.config.hidden_size)
    assert wider.unet(latents, torch.tensor([10, 500]), text).sample.shape == latents.shape
    with pytest.raises(ValueError, match=r"unet_channels must be 3 block widths, each a multiple of 8, got \(32, 60"):
        build_toy_pipeline(unet_channels=(32, 60, 64))
    script = load_script(Path(__file__).resolve().parents[1] / "scripts" / "train_toy_model.py")
    assert script.parse_args([]).unet_channels == [32, 64, 64]
    with pytest.raises(SystemExit):
        script.parse_args(["--unet_channels", "32", "64", "4"])
    assert "--unet_channels must be multiples of 8 (group norms of 8), got [32, 64, 4]" in capsys.readouterr().err


def test_training_script_refuses_a_text_encoder_without_layers(capsys):
    from pathlib import Path

    from carve3d_trl.testing import load_script

    script = load_script(Path(__file__).resolve().parents[1] / "scripts" / "train_toy_model.py")
    assert script.parse_args([]).text_layers == 2
    with pytest.raises(SystemExit):
        script.parse_args(["--text_layers", "0"])
    assert "--text_layers must be >= 1, got 0" in capsys.readouterr().err


def test_training_script_takes_extra_stage_1_scenes_and_refuses_fewer_than_the_multi_view_ones(capsys):
    from pathlib import Path

    from carve3d_trl.testing import load_script

    script = load_script(Path(__file__).resolve().parents[1] / "scripts" / "train_toy_model.py")
    assert script.parse_args(["--num_scenes", "7"]).pretrain_scenes == 7  # default: the multi-view scenes only
    assert script.parse_args(["--pretrain_scenes", "3000"]).pretrain_scenes == 3000
    with pytest.raises(SystemExit):
        script.parse_args(["--pretrain_scenes", "999"])
    assert "--pretrain_scenes must be >= --num_scenes = 1000" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.parse_args(["--pretrain_scenes", "1001", "--random_views", "0"])
    assert "needs --random_views >= 1" in capsys.readouterr().err
