"""Pool the objects of several `bench_mrc_validity.py` runs (other `--object_seed`s, same settings) into one table.

Each run scores 8 objects; pooling the runs of distinct object seeds estimates each distortion's mean Spearman rho,
and the first level's gap over the consistent views, on many more objects, with standard errors over objects.

    python benchmarks/pool_mrc_validity.py \
        benchmarks/results/mrc_validity_visual_hull_lpips_held_out_objects{3,4,5}.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# this script's folder is on sys.path when it runs as `python benchmarks/<script>.py`
from harness import mean_and_se

from carve3d_trl.rewards import metric_higher_is_better

# Settings that must agree for objects of different runs to be pooled.
SHARED_SETTINGS = (
    "metric",
    "reconstructor",
    "protocol",
    "distortions",
    "levels",
    "view_size",
    "reconstructor_kwargs",
    "silhouette_weight",
    "mse_weight",
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="JSON files written by bench_mrc_validity.py.")
    parser.add_argument("--target", type=float, default=0.95, help="The rho each distortion's mean should reach.")
    return parser.parse_args()


def load_runs(paths: list[Path]) -> list[dict]:
    """The runs' JSON, checked to share `SHARED_SETTINGS` and to hold distinct object seeds."""
    runs = [json.loads(path.read_text()) for path in paths]
    for path, run in zip(paths[1:], runs[1:]):
        for key in SHARED_SETTINGS:
            if run.get(key) != runs[0].get(key):
                raise ValueError(
                    f"{path} has {key}={run.get(key)!r} but {paths[0]} has {runs[0].get(key)!r}; pool only runs of "
                    "the same settings (other --object_seed only)."
                )
    seeds = [run["object_seed"] for run in runs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"Object seeds repeat ({seeds}): each object would count twice; pass each run once.")
    return runs


def main() -> None:
    args = parse_args()
    runs = load_runs(args.runs)
    sign = 1.0 if metric_higher_is_better(runs[0]["metric"]) else -1.0
    seeds = ", ".join(str(run["object_seed"]) for run in runs)
    print(f"{runs[0]['metric']}, {runs[0]['reconstructor']} ({runs[0]['protocol']}), object seeds {seeds}\n")
    print(
        "| distortion | objects | mean rho ± s.e. | lowest object | objects at rho >= target | sets at mean >= target "
        "| first-level gap / s.e. | first level worse |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for kind in runs[0]["distortions"]:
        rhos = [rho for run in runs for rho in run["spearman_per_object"][kind]]
        gaps = [sign * (row[0] - row[1]) for run in runs for row in run["mrc"][kind]]
        rho_mean, rho_se = mean_and_se(rhos)
        gap_mean, gap_se = mean_and_se(gaps)
        at_target = sum(rho >= args.target for rho in rhos)
        sets_at_target = sum(run["spearman"][kind] >= args.target for run in runs)
        worse = sum(gap > 0 for gap in gaps)
        print(
            f"| {kind} | {len(rhos)} | {rho_mean:.3f} ± {rho_se:.3f} | {min(rhos):.2f} | {at_target} "
            f"({at_target / len(rhos):.0%}) | {sets_at_target} of {len(runs)} | {gap_mean / gap_se:.1f} | "
            f"{worse / len(gaps):.0%} |"
        )


if __name__ == "__main__":
    main()
