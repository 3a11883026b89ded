"""The view-batched toy model (issue 13): its views of the toy scenes, their augmentation, the shipped checkpoints and
the script that trains them."""

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from carve3d_trl import load_ddpo_pipeline
from carve3d_trl.pipelines import Carve3DViewBatchedPipeline, MultiViewDiffusionPipeline
from carve3d_trl.rewards import foreground_mask, multiview_cameras
from carve3d_trl.synthetic.objects import SyntheticObject, render_object
from carve3d_trl.toy import TOY_VARIANTS, load_toy_pipeline, random_scene, scene_dataset, toy_model_path
from carve3d_trl.toy.view_batched import (
    mirrored_views,
    render_scene_views,
    scene_view_dataset,
    toy_view_cameras,
    turned_and_mirrored_views,
    turned_views,
)

ROOT = Path(__file__).resolve().parents[1]
WHITE = (1.0, 1.0, 1.0)
LAYOUT = multiview_cameras(4, elevation=15.0).layout


def scene_with(relation: str, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    scene = random_scene(generator)
    while scene.relation != relation:
        scene = random_scene(generator)
    return scene


def silhouettes(views: torch.Tensor) -> torch.Tensor:
    return foreground_mask(views, WHITE)


def test_the_views_are_the_grid_toys_scenes_at_the_families_cameras():
    cameras = toy_view_cameras()
    assert cameras.elevation == 15.0 and cameras.azimuths == (0.0, 90.0, 180.0, 270.0)
    assert torch.equal(cameras.layout.cam2world, LAYOUT.cam2world)
    captions, views = scene_view_dataset(3, seed=5)
    assert captions == scene_dataset(3, seed=5)[0]  # the same scenes as the grid toy
    assert views.shape == (3, 4, 3, 32, 32) and views.min() >= 0 and views.max() <= 1
    assert torch.equal(views[..., 0, 0], torch.ones(3, 4, 3))  # white background
    assert silhouettes(views).flatten(2).float().mean(-1).min() > 0.02  # every view shows the scene
    again = scene_view_dataset(3, seed=5)[1]
    assert torch.equal(views, again)


def test_a_quarter_turn_of_the_scene_is_a_cyclic_shift_of_the_views():
    scene = scene_with("next to")  # two different solids side by side: no quarter-turn symmetry
    views = render_scene_views([scene])[0]
    obj = scene.to_object()
    for quarter in (1, 2, 3):
        turned = render_object(replace(obj, yaw=obj.yaw + 90.0 * quarter), LAYOUT, 32)
        # the lights stay in the world, so only the silhouettes agree exactly
        assert torch.equal(silhouettes(turned), silhouettes(turned_views(views, quarter)))
        assert not torch.equal(silhouettes(turned), silhouettes(views))  # the check can fail
    assert torch.equal(turned_views(views[None], 1)[0], turned_views(views, 1))  # batched alike


def test_mirroring_the_scene_flips_the_views_and_swaps_views_1_and_3():
    scene = scene_with("next to", seed=1)
    views = render_scene_views([scene])[0]
    obj = scene.to_object()
    # the scene mirrored across the plane x = 0 of cameras 0 (-Y) and 2 (+Y): x -> -x flips the primitives'
    # positions and the yaws (every toy solid is symmetric under its own local x -> -x)
    primitives = tuple(
        replace(p, center=(-p.center[0], *p.center[1:]), rotation=(p.rotation[0], -p.rotation[1], -p.rotation[2]))
        for p in obj.primitives
    )
    mirrored = render_object(SyntheticObject(primitives, yaw=-obj.yaw, scale=obj.scale), LAYOUT, 32)
    expected, got = silhouettes(mirrored), silhouettes(mirrored_views(views))
    assert (expected != got).float().mean() < 0.005  # up to a few edge pixels (rays mirrored in floating point)
    assert (silhouettes(views) != expected).float().mean() > 0.02  # the check can fail
    versions = turned_and_mirrored_views(views[None])
    assert versions.shape == (8, 4, 3, 32, 32)
    assert torch.equal(versions[0], views) and torch.equal(versions[3], turned_views(views, 3))
    assert torch.equal(versions[4], mirrored_views(views)) and torch.equal(versions[5], turned_views(versions[4], 1))


@pytest.mark.parametrize("variant", TOY_VARIANTS)
def test_shipped_view_batched_toy_loads_offline_and_samples_four_views(variant, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = toy_model_path(variant, family="view_batched")
    assert path == ROOT / "carve3d_trl" / "toy" / "weights" / "view_batched" / variant
    assert sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) < 6e6  # a few MB
    pipeline = load_ddpo_pipeline(str(path))  # the family is read from model_index.json
    assert isinstance(pipeline, Carve3DViewBatchedPipeline) and pipeline.num_views == 4
    assert torch.allclose(pipeline.camera_layout().cam2world, LAYOUT.cam2world)
    pipe = pipeline.sd_pipeline
    assert {m.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder)} == {torch.float32}
    assert pipe.unet.config.sample_size == 8 and pipe.unet.config.class_embed_type == "projection"
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    out = pipe(["a red cube", "a blue sphere on a green cube"], num_inference_steps=10, generator=generator)
    assert out.images.shape == (2, 4, 3, 32, 32) and torch.isfinite(out.images).all()
    assert out.images[..., :2, :2].mean() > 0.8  # trained on white backgrounds: near-white view corners


def test_load_toy_pipeline_by_family_and_unknown_family():
    pipe = load_toy_pipeline("long", family="view_batched")
    assert isinstance(pipe, MultiViewDiffusionPipeline) and pipe.config.elevation == 15.0
    grid = load_toy_pipeline("long")  # the grid family stays the default
    assert type(grid).__name__ == "StableDiffusionPipeline"
    assert pipe.vae.config.scaling_factor == grid.vae.config.scaling_factor  # both: the single-view toy's VAE
    with pytest.raises(ValueError, match="valid families: grid, view_batched"):
        toy_model_path("short", family="mvdream")
    with pytest.raises(ValueError, match="valid variants: short, long"):
        toy_model_path("medium", family="view_batched")


def test_training_script_is_deterministic_and_writes_short_and_long_checkpoints(tmp_path):
    from safetensors.torch import load_file

    from carve3d_trl.toy.model import SINGLE_VIEW_SIZE, build_toy_pipeline
    from carve3d_trl.toy.training import save_pipeline

    save_pipeline(build_toy_pipeline(seed=0, image_size=SINGLE_VIEW_SIZE), tmp_path / "base")
    tiny = ["--num_scenes", "2", "--batch_size", "2", "--short_steps", "1", "--unet_steps", "2", "--warmup_steps", "1"]
    tiny += ["--base", str(tmp_path / "base")]
    for run in ("a", "b"):
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "scripts" / "train_toy_view_batched.py"),
                *tiny,
                "--output_dir",
                str(tmp_path / run),
            ],
            check=True,
            capture_output=True,
            timeout=300,
        )

    def unet(run: str, variant: str) -> dict[str, torch.Tensor]:
        return load_file(tmp_path / run / variant / "unet" / "diffusion_pytorch_model.safetensors")

    for variant in ("short", "long"):
        first, second = unet("a", variant), unet("b", variant)
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
        assert {t.dtype for t in first.values()} == {torch.float16}
        assert "class_embedding.linear_2.weight" in first
    short, long = unet("a", "short"), unet("a", "long")
    assert any(not torch.equal(short[k], long[k]) for k in short)  # the long checkpoint trained further
    pipe = MultiViewDiffusionPipeline.from_pretrained(tmp_path / "a" / "long")
    assert pipe.config.num_views == 4 and pipe.unet.config.sample_size == 8
    base = load_file(tmp_path / "base" / "unet" / "diffusion_pytorch_model.safetensors")
    assert base.keys() < long.keys() and any(not torch.equal(base[k], long[k]) for k in base)  # from base, trained
    assert not list(tmp_path.glob("*/.tmp-*")) and not list(tmp_path.glob("*/*/.tmp-*"))
