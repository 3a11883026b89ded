"""Pool several `bench_replication.py` runs of one setting at other `--seed`s: the replication's claims over seeds.

One run is one draw of the training and validation captions, the noise and the batches, and a single run does not
decide a claim (RESULTS, issue 17, sixth part). This script reads runs that differ only in `--seed` and reports,
per source, each seed's paired MRC gain over the base, its mean over seeds (± s.e. over seeds), in how many seeds the
gain exceeds twice its own standard error, and the changes of the stronger reconstructor's MRC, of KL, diversity and
adherence; then the three claims over seeds.

    python benchmarks/pool_replication.py benchmarks/results/replication_fifth_view_batched.json \
        benchmarks/results/replication_sixth_view_batched_seed{1,2}.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

# this script's folder is on sys.path when it runs as `python benchmarks/<script>.py`
from harness import mean_and_se

import carve3d_trl
from carve3d_trl.pipelines import DEFAULT_LORA_TARGETS
from carve3d_trl.toy import toy_model_path

BASE = "base (short SFT)"
# Settings a run may differ in; every other setting must agree for runs to be pooled.
PER_RUN_SETTINGS = ("seed", "out")
PACKAGE_ROOT = Path(carve3d_trl.__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="JSON files written by bench_replication.py.")
    return parser.parse_args()


def comparable_settings(settings: dict) -> dict:
    """A run's settings without the per-run ones, with the defaults of options older runs did not record
    (`lora_target_modules`, `short_model`, `long_model`) and the shipped checkpoints named by family and variant
    wherever the run's clone was."""
    out = {key: value for key, value in settings.items() if key not in PER_RUN_SETTINGS}
    out["lora_target_modules"] = list(out.get("lora_target_modules") or DEFAULT_LORA_TARGETS)
    for variant in ("short", "long"):
        shipped = toy_model_path(variant, family=out["family"]).relative_to(PACKAGE_ROOT)
        path = out.get(f"{variant}_model")
        if path is None or Path(path).parts[-len(shipped.parts) :] == shipped.parts:
            out[f"{variant}_model"] = f"shipped {out['family']} {variant}"
    return out


def load_runs(paths: list[Path]) -> list[dict]:
    """The runs' JSON, checked to be at least two, of one setting (`comparable_settings`) and of distinct seeds."""
    if len(paths) < 2:
        raise ValueError(f"Got {len(paths)} run; pool at least two runs (other --seed) to estimate a spread.")
    runs = [json.loads(path.read_text()) for path in paths]
    first = comparable_settings(runs[0]["settings"])
    for path, run in zip(paths[1:], runs[1:]):
        settings = comparable_settings(run["settings"])
        for key in sorted(set(first) | set(settings)):
            if settings.get(key) != first.get(key):
                raise ValueError(
                    f"{path} has {key}={settings.get(key)!r} but {paths[0]} has {first.get(key)!r}; pool only runs "
                    "of the same settings (other --seed only)."
                )
    seeds = [run["settings"]["seed"] for run in runs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"Seeds repeat ({seeds}): a run would count twice; pass each seed's run once.")
    return runs


def over_seeds(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    """`mean ± s.e.` over seeds of `values` times `scale`."""
    mean, se = mean_and_se([scale * value for value in values])
    return f"{mean:+.{digits}f} ± {se:.{digits}f}"


def gain(run: dict, name: str) -> float:
    """The paired MRC gain of source `name` over the base in `run`."""
    return run["summary"][name]["mrc_change_mean"]


def source_rows(runs: list[dict]) -> list[str]:
    """One markdown row per source but the base: its gains and changes against the base, seed by seed and over
    seeds."""
    rows = []
    for name in runs[0]["summary"]:
        if name == BASE:
            continue
        stats = [run["summary"][name] for run in runs]
        bases = [run["summary"][BASE] for run in runs]
        gains = [gain(run, name) for run in runs]
        per_seed = ", ".join(f"{s['mrc_change_mean']:+.2f} ± {s['mrc_change_sem']:.2f}" for s in stats)
        significant = sum(s["mrc_change_mean"] > 2 * s["mrc_change_sem"] for s in stats)
        check = (
            over_seeds([s["mrc_check_change_mean"] for s in stats]) if all("mrc_check_change_mean" in s for s in stats)
            else "-"
        )  # fmt: skip
        kl = "-" if name == "data" else f"{statistics.fmean(s['kl_mean'] for s in stats):.3f}"
        changes = [
            over_seeds([s[key] - b[key] for s, b in zip(stats, bases)], scale=100, digits=1)
            for key in ("color_adherence_mean", "shape_adherence_mean")
        ]
        diversity = over_seeds([s["diversity_mean"] - b["diversity_mean"] for s, b in zip(stats, bases)], digits=4)
        rows.append(
            f"| {name} | {per_seed} | **{over_seeds(gains)}** | {significant} of {len(runs)} | {check} | {kl} | "
            f"{diversity} | {changes[0]} | {changes[1]} |"
        )
    return rows


def claims(runs: list[dict]) -> list[str]:
    """The replication's claims, each over seeds (only those whose sources the runs hold)."""
    names = set(runs[0]["summary"])
    lines = []
    if "RL + KL" in names:
        gains = [gain(run, "RL + KL") for run in runs]
        lines.append(
            f"1. RL (with the KL) improves MRC over the base: in {sum(g > 0 for g in gains)} of {len(runs)} seeds; "
            f"gain {over_seeds(gains)} over seeds."
        )
    if {"RL + KL", "RL, no KL"} <= names:
        kl = [(run["summary"]["RL + KL"]["kl_mean"], run["summary"]["RL, no KL"]["kl_mean"]) for run in runs]
        gaps = [gain(run, "RL + KL") - gain(run, "RL, no KL") for run in runs]
        lines.append(
            f"2. With the KL the KL to the base is lower than without: in {sum(a < b for a, b in kl)} of {len(runs)} "
            f"seeds; MRC gain with the KL minus without: {over_seeds(gaps)} over seeds."
        )
    if "long SFT" in names:
        for name in ("RL + KL", "RL, no KL"):
            if name in names:
                gaps = [gain(run, name) - gain(run, "long SFT") for run in runs]
                lines.append(f"3. {name} minus long SFT, MRC: {over_seeds(gaps)} over seeds.")
    return lines


def main() -> None:
    args = parse_args()
    runs = load_runs(args.runs)
    settings = runs[0]["settings"]
    seeds = ", ".join(str(run["settings"]["seed"]) for run in runs)
    arrow = "higher" if runs[0]["mrc_higher_is_better"] else "lower"
    print(f"{settings['family']} toy, {settings['metric']} ({arrow} is better), seeds {seeds}\n")
    print(
        "| source | MRC gain vs base per seed (paired, ± s.e.) | mean over seeds (± s.e.) | seeds above 2 s.e. "
        "| stronger reconstructor's gain | KL to base (mean) | diversity change | colour change (points) "
        "| shape change |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(source_rows(runs)))
    print("\n" + "\n".join(claims(runs)))


if __name__ == "__main__":
    main()
