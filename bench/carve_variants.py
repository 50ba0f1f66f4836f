"""Retention of other text carves: the same data, steps and validation, a different carve setting each.

Re-plans the text tower's carve from a finished pipeline run's artifacts (NEXUS_HOME: SmolLM2's features and
snapshot) with the pipeline's carve settings updated by each `--variant` (JSON, TextCarveTarget fields), trains
it as `tower_adapter` does (the default steps, seeded) and validates it as `validation_report` does (every
held-out and never-seen row, 1,000 bootstrap resamples). Prints the blocks each carve kept, its parameters and
one row per capability and split. `--variant '{}'` re-plans the pipeline's own settings with this checkout's
carver: the baseline of the same run.

Run (README command 1 first):
    .venv/bin/python bench/carve_variants.py --variant '{}' --variant '{"block_selection": "nll"}'
    .venv/bin/python bench/carve_variants.py --seed 1 --variant '{}' --variant '{"heads_keep": 0.67}'
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.init_ablation import _asset, upstream_paths  # noqa: E402


def main() -> None:
    from nexus_assets.core.contracts import load_contracts
    from nexus_assets.core.paths import artifacts_root
    from nexus_assets.core.registry import load_registry
    from nexus_assets.defs.profiling import ArchitectureConfig
    from nexus_assets.probes.probe_data import read_probe_rows
    from nexus_assets.release.validation import validate_tower
    from nexus_assets.training.carving import CarveSettings, plan_tower_carve
    from nexus_assets.training.distill import train_tower_from_artifacts

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", action="append", required=True,
                    help="JSON object of text carve settings over the pipeline's (repeatable)")
    ap.add_argument("--out", default="", help="keep the towers here (default: a folder under NEXUS_HOME)")
    ap.add_argument("--seed", type=int, default=None,
                    help="training seed (model init, adapters, batch order); default: the pipeline's")
    args = ap.parse_args()
    variants = []
    for v in args.variant:
        try:
            variants.append(json.loads(v))
        except json.JSONDecodeError as e:
            raise SystemExit(f"--variant {v!r}: not JSON ({e})")
        if not isinstance(variants[-1], dict):
            raise SystemExit(f"--variant {v!r}: must be a JSON object of carve settings")

    root = artifacts_root()
    teachers = [t for t in load_registry().enabled_teachers() if t.tower == "text"]
    arch = _asset(root, "student_architecture", "text")
    if arch.get("init") != "carved":
        raise SystemExit("student_architecture[text] has no carve plan: run README command 1 first")
    up = upstream_paths(root, teachers)
    tables = {p.name: read_probe_rows(p) for p in up["probe_dirs"].values()}
    base = ArchitectureConfig().carve
    out = Path(args.out) if args.out else root / "bench" / "carve_variants"
    rows, shapes = [], []
    for i, v in enumerate(variants):
        settings = CarveSettings(**{**base, "text": {**base["text"], **v}})
        t0 = time.perf_counter()
        plan = plan_tower_carve("text", teachers, up["feature_entries"], up["snapshot_dirs"], settings,
                                log=lambda m: print(m, flush=True), probe_dirs=up["probe_dirs"])
        carve_s = time.perf_counter() - t0
        a = {**arch, "carve": plan}
        t0 = time.perf_counter()
        (out / f"variant_{i}").mkdir(parents=True, exist_ok=True)
        (out / f"variant_{i}" / "plan.json").write_text(json.dumps(plan))  # a carve can take minutes: keep it
        s = train_tower_from_artifacts("text", architecture=a, **up, anchor_variance=0.95,
                                       overrides={} if args.seed is None else {"seed": args.seed},
                                       out_dir=out / f"variant_{i}",
                                       log=lambda m: print(m, flush=True) if "step" in m and "/" in m and "00/" in m
                                       else None)
        train_s = time.perf_counter() - t0
        rep = validate_tower(Path(s["tower_dir"]), "text", sorted(s["capabilities"]), up["feature_entries"],
                             tables, load_contracts(), splits=("heldout", "ood"), n_bootstrap=1000, seed=0)
        shapes.append((json.dumps(v), plan["blocks"], plan["report"]["student_params"], carve_s, train_s))
        for cap, r in sorted(rep["capabilities"].items()):
            for split, x in sorted(r["splits"].items()):
                rows.append((i, cap, split, x.get("retention"), x.get("ci95") or (None, None)))
        print(f"variant {i} {v}: blocks {plan['blocks']}, carved in {carve_s / 60:.1f} min, trained in "
              f"{train_s / 60:.1f} min", flush=True)
    print("\ntext carve variants (the pipeline's settings updated by each)")
    for i, (v, blocks, n, cs, ts) in enumerate(shapes):
        print(f"  {i}: {v}  blocks {blocks}  {n / 1e6:.2f}M params  carve {cs / 60:.1f} min  train {ts / 60:.1f} min")
    f = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    print(f"{'variant':>7s} {'capability':22s} {'split':8s} {'retention':>9s} {'95% CI':>15s}")
    for i, cap, split, ret, ci in rows:
        print(f"{i:7d} {cap:22s} {split:8s} {f(ret):>9s} {f(ci[0]) + '-' + f(ci[1]):>15s}")


if __name__ == "__main__":
    main()
