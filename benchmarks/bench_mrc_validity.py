"""MRC robustness study (Carve3D Sec. 5.1, reproduced on synthetic objects): MRC against controlled inconsistency.

Renders random procedural objects at the camera layout, distorts one view with increasing strength (rotation of the
object, recolouring, shift/scale, replaced patch), scores every set with MRC, and reports per distortion:
Spearman's rho between strength and inconsistency (mean over objects; 1 = MRC worsens monotonically; also the lowest
object's rho), the signed gap between level 0 and the first level (positive: MRC worse at the first level), and the
seed noise (std of MRC at level 0 across reconstructor seeds). Several metrics, and LPIPS with several random
trunks, are scored on the same reconstructions (each set is reconstructed once). Writes a JSON file and a PNG plot
per metric to --out.

`--reconstructor` picks the built-in reconstructor studied: `visual_hull` (the default, deterministic: every seed
gives the same renders, so the seed noise is 0 and `first_worse`, the share of objects whose MRC is worse at the
first level, is what separates that level from the consistent views), `radiance_field`, or `oracle`, a perfect
reconstruction (the renders of each set's true object) with which the study measures the metric alone: the best rho
any reconstructor can reach with it (MSE and LPIPS only: PSNR is infinite for identical views), or `true_geometry`,
the visual hull's painting (`--protocol`, `--reconstructor_kwargs`) on each object's true geometry instead of its
hull: what a perfect geometry would give. `--object_seed` draws other objects (tune on one seed, report on others).

    python benchmarks/bench_mrc_validity.py --metric lpips psnr
    python benchmarks/bench_mrc_validity.py --metric lpips --lpips_random   # random AlexNet trunk (no weights)
    python benchmarks/bench_mrc_validity.py --reconstructor radiance_field --metric lpips
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from carve3d_trl.rewards import (  # noqa: E402
    MRCReward,
    RadianceFieldReconstructor,
    VisualHullReconstructor,
    instant3d_layout,
)
from carve3d_trl.synthetic import (  # noqa: E402
    CAMERA_DISTORTIONS,
    DISTORTIONS,
    OracleReconstructor,
    TrueGeometryReconstructor,
    ValidityResult,
    consistent_views,
    object_depth,
    render_object,
    run_validity_study,
    study_objects,
)


class CachedReconstructor:
    """Reconstructs each distinct batch of views once, so several metrics score the same renders."""

    def __init__(self, inner: RadianceFieldReconstructor | VisualHullReconstructor):
        self.inner = inner
        self.cache: dict[str, torch.Tensor] = {}

    def reconstruct(self, views, layout):
        key = hashlib.sha1(views.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        if key not in self.cache:
            self.cache[key] = self.inner.reconstruct(views, layout)
        return self.cache[key]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metric", nargs="+", choices=["lpips", "mse", "psnr"], default=["psnr"])
    parser.add_argument("--lpips_random", action="store_true", help="LPIPS with a random trunk (meaningless scale)")
    parser.add_argument(
        "--lpips_seeds", type=int, nargs="+", default=[0], help="torch seeds of the random LPIPS trunks, one run each"
    )
    parser.add_argument(
        "--reconstructor", choices=["visual_hull", "radiance_field", "oracle", "true_geometry"], default="visual_hull"
    )
    parser.add_argument("--protocol", choices=["held_out", "same_view"], default="held_out")
    parser.add_argument("--objects", type=int, default=8)
    parser.add_argument("--levels", type=float, nargs="+", default=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    parser.add_argument(
        "--distortions",
        nargs="+",
        choices=DISTORTIONS + CAMERA_DISTORTIONS,
        default=list(DISTORTIONS),
        help="Default: the four object distortions; camera_elevation, camera_azimuth: a view from a wrong camera.",
    )
    parser.add_argument("--view_size", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--object_seed", type=int, default=0)
    parser.add_argument(
        "--reconstructor_kwargs", type=json.loads, default={}, help="JSON, e.g. '{\"own_view_penalty\": 5}'"
    )
    parser.add_argument(
        "--silhouette_weights",
        type=float,
        nargs="+",
        default=[None],
        help="weights of MRC's silhouette term, one run each on the same renders (default: MRCReward's, 10 with "
        "lpips, 0 with mse and psnr); each weight's files get the suffix _silhouette<weight>",
    )
    parser.add_argument(
        "--mse_weights",
        type=float,
        nargs="+",
        default=[None],
        help="weights of MRC's pixel (MSE) term, likewise (default: MRCReward's, 10 with lpips, 0 with mse and psnr; "
        "suffix _mse<weight>)",
    )
    parser.add_argument("--tag", default="", help="suffix of the output file names")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if args.reconstructor == "oracle" and "psnr" in args.metric:
        parser.error("--reconstructor oracle renders the untouched views exactly, where PSNR is infinite: use mse.")
    return args


def plot(result: ValidityResult, title: str, path: Path) -> None:
    kinds = list(result.mrc)
    figure, axes = plt.subplots(1, len(kinds), figsize=(3.2 * len(kinds), 3.0), squeeze=False)
    for axis, kind in zip(axes[0], kinds):
        values = result.mrc[kind]
        for row in values:
            axis.plot(result.levels, row.tolist(), color="0.75", linewidth=0.8)
        axis.plot(result.levels, values.mean(dim=0).tolist(), color="C0", linewidth=2, marker="o")
        axis.set_title(f"{kind} (rho {result.spearman[kind]:.2f})", fontsize=9)
        axis.set_xlabel("distortion strength")
    axes[0][0].set_ylabel("MRC")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def reward_factory(
    layout,
    reconstructors,
    metric: str,
    trunk: int | None,
    pretrained: bool,
    silhouette_weight: float | None,
    mse_weight: float | None,
):
    """`make_reward(seed)` for the study; `trunk` seeds a random LPIPS trunk, the same for every reconstructor seed."""

    def make_reward(seed: int) -> MRCReward:
        if trunk is not None:
            torch.manual_seed(trunk)
        return MRCReward(
            layout,
            reconstructors[seed],
            metric=metric,
            lpips_pretrained=pretrained,
            silhouette_weight=silhouette_weight,
            mse_weight=mse_weight,
        )

    return make_reward


def main() -> None:
    args = parse_args()
    layout = instant3d_layout()
    reconstructors: dict[int, OracleReconstructor | CachedReconstructor]
    if args.reconstructor == "oracle":
        oracle = OracleReconstructor(consistent_views(layout, args.objects, args.view_size, args.object_seed))
        reconstructors = {seed: oracle for seed in args.seeds}
    elif args.reconstructor == "true_geometry":
        objects = study_objects(args.objects, args.object_seed)
        consistent = torch.stack([render_object(obj, layout, args.view_size) for obj in objects])
        depths = torch.stack([object_depth(obj, layout, args.view_size) for obj in objects])
        painter = VisualHullReconstructor(args.protocol, **args.reconstructor_kwargs)
        truth = TrueGeometryReconstructor(consistent, depths, painter)
        reconstructors = {seed: truth for seed in args.seeds}
    elif args.reconstructor == "visual_hull":
        deterministic = CachedReconstructor(VisualHullReconstructor(args.protocol, **args.reconstructor_kwargs))
        reconstructors = {seed: deterministic for seed in args.seeds}
    else:
        kwargs = dict(args.reconstructor_kwargs, protocol=args.protocol)
        reconstructors = {
            seed: CachedReconstructor(RadianceFieldReconstructor(seed=seed, **kwargs)) for seed in args.seeds
        }
    setting = "oracle" if args.reconstructor == "oracle" else args.protocol
    prefix = {"visual_hull": "visual_hull_", "true_geometry": "true_geometry_"}.get(args.reconstructor, "")
    # (earlier files, without a prefix: the radiance field and the oracle)
    runs = []  # (metric, LPIPS trunk seed or None, name, (silhouette weight, MSE weight))
    for metric, silhouette, mse in itertools.product(args.metric, args.silhouette_weights, args.mse_weights):
        suffix = "" if silhouette is None else f"_silhouette{silhouette:g}"
        suffix += "" if mse is None else f"_mse{mse:g}"
        if metric == "lpips" and args.lpips_random:
            for trunk in args.lpips_seeds:
                name = "lpips-random-trunk" + (f"-seed{trunk}" if trunk else "")
                runs.append((metric, trunk, name + suffix, (silhouette, mse)))
        else:
            runs.append((metric, None, metric + suffix, (silhouette, mse)))
    args.out.mkdir(parents=True, exist_ok=True)
    for metric, trunk, metric_name, weights in runs:
        start = time.perf_counter()
        result = run_validity_study(
            reward_factory(layout, reconstructors, metric, trunk, not args.lpips_random, *weights),
            layout,
            num_objects=args.objects,
            levels=args.levels,
            distortions=args.distortions,
            view_size=args.view_size,
            seeds=args.seeds,
            object_seed=args.object_seed,
        )
        seconds = time.perf_counter() - start
        stem = f"mrc_validity_{prefix}{metric_name}_{setting}{args.tag}"
        title = (
            f"MRC ({args.reconstructor}, {metric_name}, {setting}) vs strength, {args.objects} objects, "
            f"{args.view_size}px views"
        )
        plot(result, title, args.out / f"{stem}.png")
        summary = {
            "metric": metric_name,
            "reconstructor": args.reconstructor,
            "protocol": setting,
            "distortions": args.distortions,
            "objects": args.objects,
            "object_seed": args.object_seed,
            "levels": result.levels,
            "view_size": args.view_size,
            "seeds": args.seeds,
            "reconstructor_kwargs": args.reconstructor_kwargs,
            "silhouette_weight": weights[0],
            "mse_weight": weights[1],
            "spearman": result.spearman,
            "spearman_per_object": {kind: rhos.tolist() for kind, rhos in result.spearman_per_object.items()},
            "first_gap": result.first_gap,
            "first_gap_se": result.first_gap_se,
            "first_worse": result.first_worse,
            "seed_std": result.seed_std,
            "mrc": {kind: values.tolist() for kind, values in result.mrc.items()},
            "seconds": seconds,
            "threads": torch.get_num_threads(),
        }
        (args.out / f"{stem}.json").write_text(json.dumps(summary, indent=1))

        print(f"metric {metric_name}, protocol {setting}, {args.objects} objects, {seconds:.0f} s")
        print(f"seed noise (std of MRC at level 0 over seeds {args.seeds}): {result.seed_std:.4g}")
        print(
            "| distortion | Spearman rho | lowest object's rho | gap level 0 -> first level | gap / seed noise "
            "| gap / its standard error over objects | objects worse at the first level |"
        )
        print("|---|---|---|---|---|---|---|")
        for kind in result.mrc:
            ratio = result.first_gap[kind] / result.seed_std if result.seed_std > 0 else float("inf")
            lowest = float(result.spearman_per_object[kind].min())
            print(
                f"| {kind} | {result.spearman[kind]:.3f} | {lowest:.2f} | {result.first_gap[kind]:.4g} | {ratio:.1f} "
                f"| {result.first_gap[kind] / result.first_gap_se[kind]:.1f} | {result.first_worse[kind]:.0%} |"
            )
        print(f"wrote {args.out / stem}.png and .json", flush=True)


if __name__ == "__main__":
    main()
