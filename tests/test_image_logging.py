"""ImageSamplesLogger: panels of grids beside tiled renders, to TensorBoard, wandb, other trackers, or PNG files."""

import json
import logging
import sys
import types

import numpy as np
import pytest
import torch
from accelerate.tracking import TensorBoardTracker
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from carve3d_trl.image_logging import ImageSamplesLogger, collect_samples, grid_shape, tile_renders_like

COLORS = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])


def coloured_renders(batch: int, size: int) -> torch.Tensor:
    """Renders `(B, 4, 3, size, size)`: view v of every sample is the constant colour COLORS[v]."""
    return COLORS[None, :, :, None, None].expand(batch, 4, 3, size, size).clone()


def epoch_data(batches=2, batch_size=2, image_size=32, render_size=8, with_renders=True):
    """`prompt_image_data` as the trainer passes it to the hook: `[images, prompts, metadata, rewards, meta]`."""
    data = []
    for b in range(batches):
        images = torch.rand(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(b))
        prompts = tuple(f"prompt {b}-{i}" for i in range(batch_size))
        rewards = torch.tensor([-0.1 * (b + 1) - 0.01 * i for i in range(batch_size)])
        meta = {}
        if with_renders:
            meta = {"mrc": -rewards, "renders": coloured_renders(batch_size, render_size)}
        data.append([images, prompts, tuple({} for _ in prompts), rewards, meta])
    return data


@pytest.mark.parametrize(
    ("views", "height", "width", "render_h", "render_w", "expected"),
    [
        (4, 32, 32, 8, 8, (2, 2)),  # Instant3D 2x2, renders smaller than the views
        (6, 960, 640, 320, 320, (3, 2)),  # Zero123++ 3 rows x 2 columns
        (4, 16, 64, 16, 16, (1, 4)),  # a horizontal strip
    ],
)
def test_grid_shape_is_inferred_from_the_render_aspect_ratio(views, height, width, render_h, render_w, expected):
    assert grid_shape(views, height, width, render_h, render_w) == expected


def test_grid_shape_rejects_views_that_cannot_tile_the_image():
    with pytest.raises(ValueError, match="do not tile"):
        grid_shape(5, 32, 32, 8, 8)


def test_renders_are_resized_tiled_row_major_and_missing_views_painted_with_the_background():
    renders = coloured_renders(1, 4)[0]
    renders[3] = float("nan")  # a view the reward did not evaluate
    tiled = tile_renders_like(renders, 16, 16, background=(0.5, 0.5, 0.5))
    assert tiled.shape == (3, 16, 16)
    assert torch.allclose(tiled[:, :8, :8], COLORS[0, :, None, None].expand(3, 8, 8))  # top left: view 0
    assert torch.allclose(tiled[:, :8, 8:], COLORS[1, :, None, None].expand(3, 8, 8))  # top right: view 1
    assert torch.allclose(tiled[:, 8:, :8], COLORS[2, :, None, None].expand(3, 8, 8))  # bottom left: view 2
    assert torch.allclose(tiled[:, 8:, 8:], torch.full((3, 8, 8), 0.5))  # bottom right: background


def test_collect_samples_takes_the_first_samples_across_batches_with_scores_and_renders():
    samples = collect_samples(epoch_data(batches=2, batch_size=2), limit=3)
    assert [s.prompt for s in samples] == ["prompt 0-0", "prompt 0-1", "prompt 1-0"]
    assert samples[2].reward == pytest.approx(-0.2) and samples[2].mrc == pytest.approx(0.2)
    assert samples[0].renders.shape == (3, 32, 32)
    assert samples[0].caption == "prompt 0-0 | reward -0.1000 | MRC 0.1000"
    panel = samples[0].panel()
    assert panel.shape == (3, 32, 32 + 2 + 32)
    assert torch.equal(panel[:, :, :32], samples[0].image)


def test_samples_without_renders_log_the_image_alone():
    samples = collect_samples(epoch_data(with_renders=False), limit=1)
    assert samples[0].renders is None and samples[0].mrc is None
    assert samples[0].panel().shape == (3, 32, 32)
    assert samples[0].caption == "prompt 0-0 | reward -0.1000"


def test_no_tracker_and_no_save_dir_does_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ImageSamplesLogger()(epoch_data(), 3, None) is None
    assert list(tmp_path.iterdir()) == []


def test_no_tracker_with_save_dir_writes_pngs_and_captions(tmp_path):
    hook = ImageSamplesLogger(num_samples=3, save_dir=tmp_path / "samples", process_index=1)
    hook(epoch_data(), 12, None)
    pngs = sorted(p.name for p in (tmp_path / "samples").glob("*.png"))
    assert pngs == [f"step_000012_rank1_{i}.png" for i in range(3)]
    with Image.open(tmp_path / "samples" / pngs[0]) as image:
        assert image.size == (32 + 2 + 32, 32)
    captions = json.loads((tmp_path / "samples" / "step_000012_rank1.json").read_text())
    assert [c["prompt"] for c in captions] == ["prompt 0-0", "prompt 0-1", "prompt 1-0"]
    assert captions[0]["file"] == pngs[0] and captions[0]["mrc"] == pytest.approx(0.1)


def test_tensorboard_tracker_writes_images_and_captions(tmp_path):
    tracker = TensorBoardTracker("run", tmp_path)
    tracker.start()
    ImageSamplesLogger(num_samples=2)(epoch_data(), 7, tracker)
    tracker.finish()
    run_dir = tmp_path / "run"
    assert list(run_dir.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == ["images/0", "images/1"]
    image_event = events.Images("images/0")[0]
    assert image_event.step == 7 and (image_event.width, image_event.height) == (66, 32)
    captions = events.Tensors("images/captions/text_summary")[0]
    text = captions.tensor_proto.string_val[0].decode()
    assert captions.step == 7 and "prompt 0-1" in text and "-0.1100" in text


@pytest.fixture
def fake_wandb(monkeypatch):
    """A stand-in `wandb` module (not installed here) whose `Image` records what it is given."""

    class FakeImage:
        def __init__(self, data, caption=None):
            self.data, self.caption = data, caption

    module = types.SimpleNamespace(Image=FakeImage)
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def test_wandb_tracker_gets_captioned_images_at_the_step(fake_wandb):
    calls = []
    tracker = types.SimpleNamespace(name="wandb", log=lambda values, step=None: calls.append((values, step)))
    ImageSamplesLogger(num_samples=3, tag="samples")(epoch_data(), 5, tracker)
    ((values, step),) = calls
    assert step == 5 and list(values) == ["samples"]
    images = values["samples"]
    assert len(images) == 3 and all(isinstance(i, fake_wandb.Image) for i in images)
    assert images[1].caption == "prompt 0-1 | reward -0.1100 | MRC 0.1100"
    assert images[0].data.dtype == np.uint8 and images[0].data.shape == (32, 66, 3)


def test_wandb_tracker_without_wandb_installed_warns_once(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    tracker = types.SimpleNamespace(name="wandb", log=lambda *a, **k: pytest.fail("must not log"))
    hook = ImageSamplesLogger()
    with caplog.at_level(logging.WARNING, logger="carve3d_trl.image_logging"):
        hook(epoch_data(), 1, tracker)
        hook(epoch_data(), 2, tracker)
    assert sum("wandb" in r.message for r in caplog.records) == 1


def test_other_trackers_use_log_images_or_are_skipped_with_a_warning(caplog):
    calls = []
    generic = types.SimpleNamespace(name="comet_ml", log_images=lambda values, step=None: calls.append((values, step)))
    ImageSamplesLogger(num_samples=1)(epoch_data(), 4, generic)
    ((values, step),) = calls
    assert step == 4 and values["images"][0].shape == (32, 66, 3)

    with caplog.at_level(logging.WARNING, logger="carve3d_trl.image_logging"):
        ImageSamplesLogger()(epoch_data(), 4, types.SimpleNamespace(name="mystery"))
    assert "mystery" in caplog.text


def test_the_trainer_calls_the_hook_with_mrc_renders_and_its_tensorboard_tracker(tiny_model_path, tmp_path):
    from carve3d_trl import Carve3DConfig, Carve3DStableDiffusionPipeline, Carve3DTrainer
    from carve3d_trl.rewards import MRCReward

    config = Carve3DConfig(
        num_epochs=1,
        sample_num_steps=2,
        sample_batch_size=2,
        sample_num_batches_per_epoch=1,
        train_batch_size=2,
        mixed_precision="no",
        log_with="tensorboard",
        logdir=str(tmp_path / "logs"),
        project_kwargs={"project_dir": str(tmp_path / "logs")},
        tracker_project_name="carve3d",
    )
    reward = MRCReward(metric="mse", reconstructor_kwargs={"samples_per_ray": 16, "refine_steps": 2})
    hook = ImageSamplesLogger(num_samples=2, save_dir=tmp_path / "samples")
    trainer = Carve3DTrainer(
        config, reward, lambda: ("a red cube", {}), Carve3DStableDiffusionPipeline(str(tiny_model_path)), hook
    )
    trainer.train()
    trainer.accelerator.end_training()
    events = EventAccumulator(str(tmp_path / "logs" / "carve3d"), size_guidance={"images": 0})
    events.Reload()
    assert {"images/0", "images/1"} <= set(events.Tags()["images"])
    captions = json.loads((tmp_path / "samples" / "step_000000_rank0.json").read_text())
    assert [c["prompt"] for c in captions] == ["a red cube"] * 2
    assert all(c["mrc"] is not None and np.isfinite(c["mrc"]) for c in captions)
