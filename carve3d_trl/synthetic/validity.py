"""Carve3D's robustness study of MRC, reproduced on synthetic objects: MRC against controlled inconsistency.

`run_validity_study` scores random objects with one view distorted at increasing strengths and measures how MRC
follows the strength; `OracleReconstructor` (a perfect reconstruction, with `consistent_views`) makes the study
measure the metric alone, `TrueGeometryReconstructor` (the visual hull's painting on the true geometry) what a
perfect geometry would give.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..rewards.cameras import CameraLayout
from ..rewards.mrc import MRCReward
from ..rewards.reconstructors.visual_hull import VisualHullReconstructor
from .distortions import DISTORTIONS, distort_views
from .objects import SyntheticObject, random_object, render_object

__all__ = [
    "OracleReconstructor",
    "TrueGeometryReconstructor",
    "ValidityResult",
    "consistent_views",
    "run_validity_study",
    "spearman",
    "study_objects",
]


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks from 0, ties sharing their mean rank."""
    order = values.argsort()
    ranks = torch.empty_like(values, dtype=torch.float64)
    ranks[order] = torch.arange(len(values), dtype=torch.float64)
    for value in values.unique():
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation of two equally long sequences (NaN when one of them is constant)."""
    rx, ry = _ranks(torch.as_tensor(x, dtype=torch.float64)), _ranks(torch.as_tensor(y, dtype=torch.float64))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


@dataclass
class ValidityResult:
    """Outcome of `run_validity_study`.

    Attributes:
        levels: Distortion strengths, from 0.
        mrc: `{distortion: (objects, levels) tensor}` of MRC values (the metric's own scale).
        spearman: `{distortion: mean over objects of Spearman's rho between strength and inconsistency}`, where
            inconsistency is -reward (so +1 means MRC worsens monotonically with strength for every metric).
        spearman_per_object: `{distortion: (objects,) tensor of each object's rho}`.
        seed_std: Mean over objects of the std of MRC at level 0 across reconstructor seeds.
        first_gap: `{distortion: mean over objects of how much worse MRC is at the first level > 0 than at level 0}`,
            in MRC's units and signed: positive when MRC worsens, negative when it improves.
        first_gap_se: `{distortion: standard error of first_gap's mean over objects}` (a deterministic
            reconstructor has no seed noise; the first level is told from the consistent views when the gap is
            several standard errors above 0).
        first_worse: `{distortion: share of objects whose MRC is worse at the first level > 0 than at level 0}`
            (what separates the first level from the consistent views when the reconstructor has no seed noise).
        higher_is_better: Whether larger MRC values mean more consistent views (PSNR).
    """

    levels: list[float]
    mrc: dict[str, torch.Tensor] = field(default_factory=dict)
    spearman: dict[str, float] = field(default_factory=dict)
    spearman_per_object: dict[str, torch.Tensor] = field(default_factory=dict)
    seed_std: float = float("nan")
    first_gap: dict[str, float] = field(default_factory=dict)
    first_gap_se: dict[str, float] = field(default_factory=dict)
    first_worse: dict[str, float] = field(default_factory=dict)
    higher_is_better: bool = False


def run_validity_study(
    make_reward: Callable[[int], MRCReward],
    layout: CameraLayout,
    *,
    num_objects: int = 4,
    levels: Sequence[float] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
    distortions: Sequence[str] = DISTORTIONS,
    view_size: int = 64,
    view_index: int = 0,
    seeds: Sequence[int] = (0, 1, 2),
    object_seed: int = 0,
) -> ValidityResult:
    """Score every object at every distortion strength and measure how MRC follows the strength.

    Args:
        make_reward: Builds the `MRCReward` to study for a reconstructor seed.
        layout: Cameras of the synthetic views.
        num_objects: Number of random objects (`random_object` with a generator seeded by `object_seed`).
        levels: Distortion strengths in [0, 1], the first being 0 (consistent views).
        distortions: Names from `DISTORTIONS` or `CAMERA_DISTORTIONS`.
        view_size: Side of each view in pixels.
        view_index: The view made inconsistent.
        seeds: Reconstructor seeds; the first scores every distorted set, all of them score the consistent sets.
        object_seed: Seed of the objects.
    """
    if levels[0] != 0.0:
        raise ValueError("The first level must be 0 (consistent views).")
    objects = study_objects(num_objects, object_seed)
    consistent = [render_object(obj, layout, view_size) for obj in objects]
    distorted = torch.stack(
        [
            distort_views(obj, layout, view_size, kind, level, view_index, views=views)
            for obj, views in zip(objects, consistent)
            for kind in distortions
            for level in levels[1:]
        ]
    )
    rewards = {seed: make_reward(seed) for seed in seeds}
    base_rewards, base_info = zip(*(rewards[seed].score_views(torch.stack(consistent)) for seed in seeds))
    _, info = rewards[seeds[0]].score_views(distorted)
    result = ValidityResult(levels=list(levels), higher_is_better=rewards[seeds[0]].metric.higher_is_better)
    sign = 1.0 if result.higher_is_better else -1.0
    per_object = info["mrc"].view(num_objects, len(distortions), len(levels) - 1)
    base = base_info[0]["mrc"]
    for d, kind in enumerate(distortions):
        mrc = torch.cat([base[:, None], per_object[:, d]], dim=1)
        result.mrc[kind] = mrc
        rhos = torch.tensor([spearman(levels, (-sign * row).tolist()) for row in mrc], dtype=torch.float64)
        result.spearman_per_object[kind] = rhos
        result.spearman[kind] = float(rhos.mean())
        gaps = sign * (mrc[:, 0] - mrc[:, 1]).double()
        result.first_gap[kind] = float(gaps.mean())
        result.first_gap_se[kind] = float(gaps.std() / len(gaps) ** 0.5) if len(gaps) > 1 else float("nan")
        result.first_worse[kind] = float((gaps > 0).double().mean())
    result.seed_std = float(torch.stack([i["mrc"] for i in base_info]).std(dim=0).mean()) if len(seeds) > 1 else 0.0
    return result


class OracleReconstructor:
    """A perfect reconstruction: the consistent views of each set's object, found by the views no distortion changes.

    Args:
        consistent (`torch.Tensor` of shape `(objects, V, 3, h, w)`): The undistorted views of every object.
        view_index (`int`): The view the study distorts.
    """

    def __init__(self, consistent: torch.Tensor, view_index: int = 0):
        self.consistent = consistent
        self.untouched = [v for v in range(consistent.shape[1]) if v != view_index]

    def match(self, views: torch.Tensor) -> torch.Tensor:
        """The index `(B,)` of the object whose untouched views equal those of each set `(B, V, 3, h, w)`.

        Raises `ValueError` when a set's untouched views match no object's.
        """
        untouched, reference = views[:, self.untouched], self.consistent[:, self.untouched]
        distance = torch.stack([(untouched - one).flatten(1).abs().amax(dim=1) for one in reference], dim=1)
        nearest, match = distance.min(dim=1)
        if nearest.max() > 1e-6:
            raise ValueError("A set's untouched views match no object's consistent views.")
        return match

    def reconstruct(self, views: torch.Tensor, layout: CameraLayout) -> torch.Tensor:
        """The consistent views `(B, V, 3, h, w)` of each set's object (`match`)."""
        return self.consistent[self.match(views)]


class TrueGeometryReconstructor(OracleReconstructor):
    """The visual hull's painting on each set's true geometry instead of its hull: what a reconstruction whose
    geometry were perfect would give (the views still paint it, distorted view included).

    Args:
        consistent (`torch.Tensor` of shape `(objects, V, 3, h, w)`): The undistorted views of every object.
        depths (`torch.Tensor` of shape `(objects, V, h * w)`): Each object's `object_depth` at the layout.
        view_index (`int`): The view the study distorts.
        painter (`VisualHullReconstructor`): Whose painting (protocol, colour settings) to use.
    """

    def __init__(
        self, consistent: torch.Tensor, depths: torch.Tensor, painter: VisualHullReconstructor, view_index: int = 0
    ):
        super().__init__(consistent, view_index)
        self.depths = depths
        self.painter = painter

    def reconstruct(self, views: torch.Tensor, layout: CameraLayout) -> torch.Tensor:
        """Renders `(B, V, 3, h, w)` of each set's views painted on its object's true geometry."""
        return self.painter.reconstruct(views, layout, depth=self.depths[self.match(views)])


def study_objects(num_objects: int, object_seed: int) -> list[SyntheticObject]:
    """The study's random objects (the draw of `run_validity_study`)."""
    generator = torch.Generator().manual_seed(object_seed)
    return [random_object(generator) for _ in range(num_objects)]


def consistent_views(layout: CameraLayout, num_objects: int, view_size: int, object_seed: int) -> torch.Tensor:
    """The undistorted views `(objects, V, 3, h, w)` of the study's objects (`study_objects`)."""
    return torch.stack([render_object(obj, layout, view_size) for obj in study_objects(num_objects, object_seed)])
