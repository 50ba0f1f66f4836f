"""Random init vs carved init: the same tower, data, steps and seed, retention side by side, in one run.

Reads the upstream artifacts of a finished pipeline run (README command 1) from NEXUS_HOME: the cached
teacher features, subspaces, importance scores, snapshots, probe data and `student_architecture` (whose
carve plan is the carved arm; the random arm drops it). Both arms train with the carved arm's step
counts and batch size (so neither gets more compute), then run the same validation through the runtime.

Run:
    .venv/bin/python bench/init_ablation.py --tower text
    .venv/bin/python bench/init_ablation.py --tower vision --phase-a 100 --phase-b 20
"""
from __future__ import annotations

import argparse
import pickle
import tempfile
import time
from pathlib import Path


def _asset(root: Path, asset: str, partition: str):
    f = root / "_dagster_io" / asset / partition
    if not f.exists():
        raise SystemExit(f"{f}: missing; run README command 1 (the pipeline) first")
    return pickle.loads(f.read_bytes())


def upstream_paths(root: Path, teachers) -> dict[str, dict[str, Path]]:
    """The finished run's folders a tower trains from, per teacher (per dataset for probes): the keyword
    arguments of `train_tower_from_artifacts` (feature_entries, subspace_dirs, importance_dirs,
    snapshot_dirs, probe_dirs)."""
    per_teacher = {"feature_entries": "teacher_features", "subspace_dirs": "activation_subspace",
                   "importance_dirs": "neuron_importance", "snapshot_dirs": "teacher_snapshot"}
    out = {k: {t.name: Path(_asset(root, a, t.name)["path"]) for t in teachers} for k, a in per_teacher.items()}
    out["probe_dirs"] = {d: Path(_asset(root, "probe_dataset", d)["path"]) for d in sorted({t.dataset for t in teachers})}
    return out


def main() -> None:
    from nexus_assets.core.contracts import load_contracts
    from nexus_assets.core.paths import artifacts_root
    from nexus_assets.core.registry import load_registry
    from nexus_assets.probes.probe_data import read_probe_rows
    from nexus_assets.release.validation import validate_tower
    from nexus_assets.training.distill import train_tower_from_artifacts
    from nexus_assets.training.train_loop import cpu_train_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tower", default="text")
    ap.add_argument("--phase-a", type=int, default=0, help="0 = the carved CPU default")
    ap.add_argument("--phase-b", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=0)
    ap.add_argument("--max-rows", type=int, default=200, help="validation rows per split")
    args = ap.parse_args()

    root = artifacts_root()
    reg = load_registry()
    teachers = [t for t in reg.enabled_teachers() if t.tower == args.tower]
    arch = _asset(root, "student_architecture", args.tower)
    if arch.get("init") != "carved":
        raise SystemExit(f"student_architecture[{args.tower}] has no carve plan (init {arch.get('init')!r})")
    up = upstream_paths(root, teachers)
    feats, probes = up["feature_entries"], up["probe_dirs"]
    d = cpu_train_config(args.tower, init="carved")
    overrides = {"phase_a_steps": args.phase_a or d.phase_a_steps, "phase_b_steps": args.phase_b or d.phase_b_steps,
                 "batch_size": args.batch_size or d.batch_size}
    random_arch = {k: v for k, v in arch.items() if k not in ("init", "carve")}
    contracts = load_contracts()
    tables = {p.name: read_probe_rows(p) for p in probes.values()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, a, extra in (("random", random_arch, {}), ("carved", arch, {"lr": d.lr, "adapter_lr": d.adapter_lr})):
            t0 = time.perf_counter()
            # the random arm keeps its own learning rates (1e-3 / 2e-3 suit a fresh network)
            s = train_tower_from_artifacts(args.tower, architecture=a, **up, overrides={**overrides, **extra},
                                           anchor_variance=0.95,
                                           out_dir=Path(tmp) / name, log=lambda m: None)
            train_s = time.perf_counter() - t0
            rep = validate_tower(Path(s["tower_dir"]), args.tower, sorted(s["capabilities"]), feats, tables, contracts,
                                 splits=("heldout", "ood"), n_bootstrap=200, max_rows=args.max_rows)
            for cap, r in sorted(rep["capabilities"].items()):
                for split, v in sorted(r["splits"].items()):
                    rows.append((cap, split, name, v.get("retention"), v.get("student_score"), v.get("teacher_score"),
                                 s.get("num_parameters", 0), train_s))
    print(f"\ninit ablation, tower {args.tower}: same data, seed and steps {overrides}")
    print(f"{'capability':22s} {'split':8s} {'init':7s} {'retention':>9s} {'student':>8s} {'teacher':>8s} "
          f"{'params':>8s} {'train s':>8s}")
    for cap, split, name, ret, ss, ts, n, sec in rows:
        f = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
        print(f"{cap:22s} {split:8s} {name:7s} {f(ret):>9s} {f(ss):>8s} {f(ts):>8s} {n / 1e6:7.1f}M {sec:8.0f}")


if __name__ == "__main__":
    main()
