"""A fast version of the MRC robustness study (the full one: benchmarks/bench_mrc_validity.py)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from carve3d_trl.rewards import MRCReward, RadianceFieldReconstructor, VisualHullReconstructor, instant3d_layout
from carve3d_trl.synthetic import (
    CAMERA_DISTORTIONS,
    DISTORTIONS,
    OracleReconstructor,
    TrueGeometryReconstructor,
    consistent_views,
    distort_views,
    object_depth,
    run_validity_study,
    spearman,
    study_objects,
)


def test_spearman():
    assert spearman([0, 1, 2, 3], [1.0, 2.0, 5.0, 9.0]) == pytest.approx(1.0)
    assert spearman([0, 1, 2, 3], [4.0, 3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert spearman([0, 1, 2], [1.0, 1.0, 2.0]) == pytest.approx(math.sqrt(3) / 2)


def test_mrc_worsens_with_the_strength_of_every_distortion():
    layout = instant3d_layout()
    result = run_validity_study(
        lambda seed: MRCReward(layout, RadianceFieldReconstructor(seed=seed), metric="psnr"),
        layout,
        num_objects=2,
        levels=(0.0, 0.5, 1.0),
        view_size=64,
        seeds=(0, 1),
    )
    assert result.higher_is_better
    for kind in DISTORTIONS:
        assert result.mrc[kind].shape == (2, 3)
        assert result.spearman[kind] >= 0.95, (kind, result.mrc[kind])
        assert result.first_gap[kind] > 3 * result.seed_std, kind


def test_the_default_visual_hull_mrc_worsens_with_every_distortion_camera_errors_included():
    layout = instant3d_layout()
    result = run_validity_study(
        lambda seed: MRCReward(layout, VisualHullReconstructor(), metric="mse"),
        layout,
        num_objects=2,
        levels=(0.0, 0.5, 1.0),
        distortions=DISTORTIONS + CAMERA_DISTORTIONS,
        view_size=64,
        seeds=(0, 1),
    )
    assert result.seed_std == 0  # deterministic: no seed noise, every object must be worse at the first level
    for kind in DISTORTIONS + CAMERA_DISTORTIONS:
        assert result.spearman[kind] >= 0.95, (kind, result.mrc[kind])
        assert result.first_worse[kind] == 1.0, (kind, result.mrc[kind])
        gaps = (result.mrc[kind][:, 1] - result.mrc[kind][:, 0]).double()
        assert result.first_gap_se[kind] == pytest.approx(float(gaps.std() / math.sqrt(2)))


def test_the_silhouette_term_grows_with_a_wrong_cameras_error_and_counts_with_its_weight():
    # Seed 1's objects 2 and 7, whose painted colours alone (the hull's, pretrained LPIPS) scored better with one
    # view raised by up to 20 degrees (benchmarks/RESULTS.md): the silhouettes' disagreement grows with the error,
    # and MRC counts it with its weight.
    layout = instant3d_layout()
    objects = [study_objects(8, 1)[i] for i in (2, 7)]
    levels = (0.0, 0.4, 0.8)
    views = torch.stack(
        [distort_views(obj, layout, 64, "camera_elevation", level) for obj in objects for level in levels]
    )
    rewards = {}
    for weight in (0.0, 10.0):
        torch.manual_seed(0)  # the same random LPIPS trunk
        rewards[weight] = MRCReward(
            layout, VisualHullReconstructor(), lpips_pretrained=False, silhouette_weight=weight
        )
    _, info = rewards[10.0].score_views(views)
    silhouette = info["silhouette"].mean(dim=1).view(2, 3)
    assert (silhouette.diff(dim=1) > 0).all(), silhouette
    colours = rewards[0.0].score_views(views)[1]["mrc"].view(2, 3)
    torch.testing.assert_close(info["mrc"].view(2, 3), colours + 10.0 * silhouette)


def test_the_oracle_scores_consistent_views_as_perfect():
    # The perfect reconstruction of bench_mrc_validity's --reconstructor oracle, which measures the metric alone.
    layout = instant3d_layout()
    oracle = OracleReconstructor(consistent_views(layout, num_objects=2, view_size=32, object_seed=0))
    result = run_validity_study(
        lambda seed: MRCReward(layout, oracle, metric="mse"),
        layout,
        num_objects=2,
        levels=(0.0, 0.5, 1.0),
        view_size=32,
        seeds=(0,),
    )
    for kind in DISTORTIONS:
        assert result.mrc[kind][:, 0].abs().max() == 0, kind  # the oracle renders consistent views exactly
        assert (result.mrc[kind][:, 1:] > 0).all(), kind
        assert result.spearman[kind] == pytest.approx(1.0), (kind, result.mrc[kind])


def test_the_true_geometry_paints_consistent_views_closer_than_the_hull_and_ranks_every_distortion():
    # bench_mrc_validity's --reconstructor true_geometry: what a perfect geometry would give the visual hull's painting
    layout = instant3d_layout()
    objects = study_objects(2, object_seed=0)
    consistent = consistent_views(layout, num_objects=2, view_size=32, object_seed=0)
    depths = torch.stack([object_depth(obj, layout, 32) for obj in objects])
    truth = TrueGeometryReconstructor(consistent, depths, VisualHullReconstructor())
    hull_error = MRCReward(layout, VisualHullReconstructor(), metric="mse").score_views(consistent)[1]["mrc"]
    true_error = MRCReward(layout, truth, metric="mse").score_views(consistent)[1]["mrc"]
    assert (true_error < hull_error).all(), (true_error, hull_error)
    result = run_validity_study(
        lambda seed: MRCReward(layout, truth, metric="mse"),
        layout,
        num_objects=2,
        levels=(0.0, 0.5, 1.0),
        distortions=DISTORTIONS + CAMERA_DISTORTIONS,
        view_size=32,
        seeds=(0,),
    )
    for kind in DISTORTIONS + CAMERA_DISTORTIONS:
        assert result.spearman[kind] == pytest.approx(1.0), (kind, result.mrc[kind])


def test_pooling_validity_runs_gives_the_mean_over_every_objects_rho_and_refuses_a_repeated_seed(tmp_path):
    root = Path(__file__).resolve().parents[2]

    def bench(script: str, *args: str) -> str:
        command = [sys.executable, str(root / "benchmarks" / script), *args]
        return subprocess.run(command, check=True, capture_output=True, text=True, timeout=600).stdout

    tiny = ["--metric", "psnr", "--objects", "2", "--levels", "0", "0.5", "1", "--distortions", "rotate", "patch"]
    for seed in (0, 1):
        bench(
            "bench_mrc_validity.py",
            *tiny,
            "--seeds",
            "0",
            "--object_seed",
            str(seed),
            "--tag",
            f"_{seed}",
            "--out",
            str(tmp_path),
        )
    runs = [tmp_path / f"mrc_validity_visual_hull_psnr_held_out_{seed}.json" for seed in (0, 1)]
    table = bench("pool_mrc_validity.py", *map(str, runs))
    per_run = [json.loads(path.read_text()) for path in runs]
    for kind in ("rotate", "patch"):
        pooled = sum(run["spearman"][kind] for run in per_run) / 2  # equal objects per run: the mean of the means
        row = next(line for line in table.splitlines() if line.startswith(f"| {kind} |"))
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[1] == "4"
        assert float(cells[2].split(" ± ")[0]) == pytest.approx(pooled, abs=5e-4)
        gap = sum(run["first_gap"][kind] for run in per_run) / 2  # signed by the study: > 0 when MRC worsens
        assert math.copysign(1.0, float(cells[6])) == math.copysign(1.0, gap)
        worse = sum(run["first_worse"][kind] for run in per_run) / 2
        assert cells[7] == f"{worse:.0%}"

    with pytest.raises(subprocess.CalledProcessError) as error:
        bench("pool_mrc_validity.py", str(runs[0]), str(runs[0]))
    assert "Object seeds repeat" in error.value.stderr
