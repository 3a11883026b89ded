"""Prompt adherence of toy samples (issue 17): the caption labels, the shipped classifier on the toy data itself and
on wrong renders, border contact, and the classifier's training."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from carve3d_trl.rewards import instant3d_layout, tile_views
from carve3d_trl.toy import TOY_GUIDANCE_SCALE, render_scene_views, toy_model_path, toy_view_cameras
from carve3d_trl.toy.adherence import (
    ViewClassifier,
    caption_labels,
    labelled_scenes,
    load_adherence_classifier,
    measure_adherence,
    save_adherence_classifier,
    touches_border,
    train_adherence_classifier,
)
from carve3d_trl.toy.data import COLORS, SHAPES

HELD_OUT_SEED = 424242  # neither the classifier's training scenes (seed 0) nor its check's (7919)
OTHER_SHAPE = {"sphere": "cube", "cube": "torus", "cylinder": "sphere", "torus": "cylinder"}


@pytest.fixture(scope="module")
def classifier() -> ViewClassifier:
    return load_adherence_classifier()


@pytest.fixture(scope="module")
def scenes() -> list:
    return labelled_scenes(16, HELD_OUT_SEED)[0]


def other_colour(solid, taken: set[str]):
    return replace(solid, color=next(c for c in COLORS if c not in taken))


def test_caption_labels_name_the_colours_then_the_shapes():
    labels = caption_labels("a striped red cube on a checkered blue sphere")
    names = [*COLORS, *SHAPES]
    assert [names[i] for i in labels.nonzero().flatten()] == ["red", "blue", "sphere", "cube"]
    assert caption_labels("an orange torus next to an orange torus").sum() == 2  # sets: one colour, one shape
    with pytest.raises(ValueError, match="names no toy colour .* or no toy shape"):
        caption_labels("a photo of a cat")


@pytest.mark.parametrize("cameras", ["grid", "view_batched"])
def test_the_rendered_data_adheres(classifier, scenes, cameras):
    layout = instant3d_layout() if cameras == "grid" else toy_view_cameras().layout
    views = render_scene_views(scenes, layout=layout)
    summary = measure_adherence(views, [s.caption for s in scenes], classifier).summary()
    assert summary["color"] >= 0.9 and summary["shape"] >= 0.8, summary
    assert summary["border"] == 0.0  # the scenes fit their views


def test_wrong_colours_and_wrong_shapes_score_low(classifier, scenes):
    captions = [s.caption for s in scenes]
    recoloured, reshaped = [], []
    for scene in scenes:
        taken = {scene.top.color, *([scene.bottom.color] if scene.bottom else [])}
        bottom = scene.bottom and other_colour(scene.bottom, taken)
        recoloured.append(replace(scene, top=other_colour(scene.top, taken), bottom=bottom))
        shapes = {scene.top.shape, *([scene.bottom.shape] if scene.bottom else [])}
        new = {s: next(o for o in SHAPES if o not in shapes and o != s) for s in shapes}
        bottom = scene.bottom and replace(scene.bottom, shape=new[scene.bottom.shape])
        reshaped.append(replace(scene, top=replace(scene.top, shape=new[scene.top.shape]), bottom=bottom))
    colour = measure_adherence(render_scene_views(recoloured), captions, classifier).summary()
    shape = measure_adherence(render_scene_views(reshaped), captions, classifier).summary()
    assert colour["color"] <= 0.1 and colour["shape"] >= 0.7, colour  # the shapes are still right
    assert shape["shape"] <= 0.1 and shape["color"] >= 0.8, shape
    blank = measure_adherence(torch.ones(2, 4, 3, 32, 32), captions[:2], classifier).summary()
    assert blank["color"] == blank["shape"] == 0.0  # nothing drawn: no adherence


def test_grids_are_split_by_the_layout(classifier, scenes):
    layout = instant3d_layout()
    views = render_scene_views(scenes[:4], layout=layout)
    captions = [s.caption for s in scenes[:4]]
    from_views = measure_adherence(views, captions, classifier)
    from_grids = measure_adherence(tile_views(views, layout), captions, classifier)
    assert torch.equal(from_views.color, from_grids.color) and torch.equal(from_views.shape, from_grids.shape)
    assert from_views.color.shape == (4, 4)
    with pytest.raises(ValueError, match="and N captions"):
        measure_adherence(views, captions[:3], classifier)


def test_touches_border():
    views = torch.ones(3, 3, 32, 32)
    views[0, :, 10:20, 10:20] = 0.2  # a centred object
    views[1, :, 10:20, 0:5] = 0.2  # cut by the left border
    views[2, :, 0, 7] = 0.2  # one stray pixel on the border: not a silhouette
    assert touches_border(views).tolist() == [False, True, False]
    assert touches_border(views, min_pixels=1).tolist() == [False, True, True]


def test_classifier_training_is_deterministic_and_the_classifier_round_trips(tmp_path):
    scenes, labels = labelled_scenes(6, seed=1)
    views = render_scene_views(scenes, view_size=16, layout=instant3d_layout()).flatten(0, 1)
    labels = labels.repeat_interleave(4, dim=0)
    first = train_adherence_classifier(views, labels, steps=30, batch_size=8, width=8, learning_rate=1e-2, seed=3)
    second = train_adherence_classifier(views, labels, steps=30, batch_size=8, width=8, learning_rate=1e-2, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    save_adherence_classifier(first, tmp_path / "clf")
    loaded = load_adherence_classifier(tmp_path / "clf")
    batch = views[:4]
    torch.testing.assert_close(loaded(batch), first(batch), atol=2e-2, rtol=0)  # saved in fp16
    with pytest.raises(ValueError, match=r"Expected views \(M, 3, h, w\) and labels \(M, 12\)"):
        train_adherence_classifier(views, labels[:-1], steps=1)
    with pytest.raises(FileNotFoundError, match="train_toy_adherence.py"):
        load_adherence_classifier(tmp_path / "missing")


def test_evaluation_script_measures_data_and_a_checkpoint(tmp_path):
    out = tmp_path / "adherence.json"
    args = ["--num_prompts", "2", "--num_seeds", "1", "--steps", "2", "--no_mrc", "--out", str(out)]
    args += ["--captions", "single_solid", "--models", f"short={toy_model_path('short', family='view_batched')}"]
    script = Path(__file__).resolve().parents[1] / "scripts" / "evaluate_toy_adherence.py"
    subprocess.run([sys.executable, str(script), *args], check=True, capture_output=True, timeout=300)
    report = json.loads(out.read_text())
    assert list(report["results"]) == ["data (grid cameras)", "data (view_batched cameras)", "short"]
    assert all(" on " not in c and " next to " not in c for c in report["captions"])  # one solid each
    assert report["results"]["data (grid cameras)"]["summary"]["color"] >= 0.75
    assert len(report["results"]["short"]["color"]) == 2 and len(report["results"]["short"]["color"][0]) == 4


ONE_SOLID = ["a red cube", "a blue sphere", "a green cylinder", "a yellow torus", "a striped purple cube"]
ONE_SOLID += ["a checkered orange sphere", "a pink cylinder", "a brown torus"]


@pytest.mark.parametrize("family", ["grid", "view_batched"])
@pytest.mark.parametrize("variant", ["short", "long"])
def test_shipped_checkpoints_draw_the_captioned_single_solid(classifier, family, variant):
    from carve3d_trl.evaluation import sample_with_kl
    from carve3d_trl.toy import load_toy_pipeline

    pipe = load_toy_pipeline(variant, family=family)
    images, _ = sample_with_kl(
        pipe, ONE_SOLID, list(range(8)), num_inference_steps=10, guidance_scale=TOY_GUIDANCE_SCALE
    )
    summary = measure_adherence(images, ONE_SOLID, classifier).summary()  # measured: colour 88-100%, shape 100%
    assert summary["color"] >= 0.8 and summary["shape"] >= 0.9, summary


def test_shipped_single_view_toy_draws_32_px_views(classifier):
    from diffusers import StableDiffusionPipeline

    from carve3d_trl.evaluation import sample_with_kl
    from carve3d_trl.toy import toy_single_view_path

    pipe = StableDiffusionPipeline.from_pretrained(toy_single_view_path())
    assert pipe.unet.config.sample_size == 8
    images, _ = sample_with_kl(
        pipe, ONE_SOLID, list(range(8)), num_inference_steps=10, guidance_scale=TOY_GUIDANCE_SCALE
    )
    assert images.shape == (8, 3, 32, 32)
    summary = measure_adherence(images[:, None], ONE_SOLID, classifier).summary()  # measured: 100%, 100%
    assert summary["color"] >= 0.8 and summary["shape"] >= 0.9, summary


def test_evaluation_caption_sets_separate_trained_from_held_out_captions():
    from carve3d_trl.testing import load_script
    from carve3d_trl.toy.data import random_scene

    script = load_script(Path(__file__).resolve().parents[1] / "scripts" / "evaluate_toy_adherence.py")
    generator = torch.Generator().manual_seed(0)  # the training scenes' draw (scene_dataset's), spelt out
    training = [random_scene(generator) for _ in range(200)]
    trained = {scene.caption for scene in training}
    held_out = script.evaluation_scenes(6, 200, seed=0, captions="held_out")
    assert all(s.caption not in trained for s in held_out)
    two_solid = script.evaluation_scenes(6, 200, seed=0, captions="trained_two_solid")
    first = list(dict.fromkeys(s.caption for s in training if s.relation != "alone"))[:6]
    assert [s.caption for s in two_solid] == first
    single = script.evaluation_scenes(6, 200, seed=0, captions="single_solid")
    assert all(s.relation == "alone" for s in single) and len({s.caption for s in single}) == 6
    with pytest.raises(ValueError, match="lower --num_prompts"):
        script.evaluation_scenes(500, 200, seed=0, captions="trained_two_solid")
