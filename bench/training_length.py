"""Retention against training length: what a longer profile buys, on a finished pipeline run's artifacts.

Trains the carved tower (the pipeline's `student_architecture`, features, subspaces and probe data from
NEXUS_HOME) for each phase (a) step count given, with everything else the pipeline's default, then validates
it as the `validation_report` asset does (every held-out and never-seen row, 1,000 bootstrap resamples), and
prints one row per capability, split and length. A length equal to the default reproduces the pipeline's
report (training is seeded), which is the baseline of the same run.

Run (README command 1 first):
    .venv/bin/python bench/training_length.py --tower text --phase-a 2160 4320
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.init_ablation import _asset, upstream_paths  # noqa: E402


def main() -> None:
    from nexus_assets.core.contracts import load_contracts
    from nexus_assets.core.paths import artifacts_root
    from nexus_assets.core.registry import load_registry
    from nexus_assets.probes.probe_data import read_probe_rows
    from nexus_assets.release.validation import validate_tower
    from nexus_assets.training.distill import train_tower_from_artifacts

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tower", default="text")
    ap.add_argument("--phase-a", type=int, nargs="+", required=True, help="phase (a) step counts to train")
    ap.add_argument("--out", default="", help="keep the towers here (default: a folder under NEXUS_HOME)")
    args = ap.parse_args()
    if any(n < 1 for n in args.phase_a):
        raise SystemExit(f"--phase-a: step counts must be >= 1, got {args.phase_a}")

    root = artifacts_root()
    teachers = [t for t in load_registry().enabled_teachers() if t.tower == args.tower]
    if not teachers:
        raise SystemExit(f"no enabled teacher trains tower {args.tower!r}")
    arch = _asset(root, "student_architecture", args.tower)
    up = upstream_paths(root, teachers)
    tables = {p.name: read_probe_rows(p) for p in up["probe_dirs"].values()}
    out = Path(args.out) if args.out else root / "bench" / "training_length" / args.tower
    rows = []
    for steps in args.phase_a:
        t0 = time.perf_counter()
        s = train_tower_from_artifacts(args.tower, architecture=arch, **up, overrides={"phase_a_steps": steps},
                                       anchor_variance=0.95, out_dir=out / f"phase_a_{steps}",
                                       log=lambda m: print(m, flush=True) if "step" in m and "/" in m else None)
        train_s = time.perf_counter() - t0
        rep = validate_tower(Path(s["tower_dir"]), args.tower, sorted(s["capabilities"]), up["feature_entries"],
                             tables, load_contracts(), splits=("heldout", "ood"), n_bootstrap=1000, seed=0)
        for cap, r in sorted(rep["capabilities"].items()):
            for split, v in sorted(r["splits"].items()):
                ci = v.get("ci95") or (None, None)
                rows.append((cap, split, steps, v.get("retention"), ci, train_s))
        print(f"phase (a) {steps} steps: trained in {train_s / 60:.1f} min", flush=True)
    print(f"\ntraining length, tower {args.tower}")
    print(f"{'capability':22s} {'split':8s} {'steps':>6s} {'retention':>9s} {'95% CI':>15s} {'train min':>9s}")
    f = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    for cap, split, steps, ret, ci, sec in rows:
        print(f"{cap:22s} {split:8s} {steps:6d} {f(ret):>9s} {f(ci[0]) + '-' + f(ci[1]):>15s} {sec / 60:9.1f}")


if __name__ == "__main__":
    main()
