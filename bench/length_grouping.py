"""Random batches vs length-grouped batches (`TrainConfig.group_by_length`): phase-(a) step time of a tower
on its real cached rows, both orders in one run.

Reads the upstream artifacts of a finished pipeline run (README command 1) from NEXUS_HOME, like
bench/init_ablation.py: the tower's config, rows and carved init are the pipeline's own. Each arm trains
`--steps` phase-(a) steps from the same init and seed (no phase b, no validation passes), timing every step;
it prints the median and mean step time, the sequence positions a batch pays for (rows x its longest row)
against the real tokens in it, and the speed-up. Step time is a property of this machine: compare the two
arms of one run, not runs on different machines.

Run:
    .venv/bin/python bench/length_grouping.py --tower text --steps 60
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from init_ablation import _asset, upstream_paths  # noqa: E402


def main() -> None:
    from nexus_assets.core.paths import artifacts_root
    from nexus_assets.core.registry import load_registry
    from nexus_assets.probes.probe_data import read_probe_rows
    from nexus_assets.training.distill import anchoring_inputs, carved_init_state, tower_config_from_architecture
    from nexus_assets.training.loop_parts import batch_indices
    from nexus_assets.training.tower_data import load_tower_data
    from nexus_assets.training.train_loop import TrainHooks, cpu_train_config, train_tower

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tower", default="text")
    ap.add_argument("--steps", type=int, default=60, help="phase (a) steps timed per arm")
    args = ap.parse_args()

    root = artifacts_root()
    reg = load_registry()
    teachers = [t for t in reg.enabled_teachers() if t.tower == args.tower]
    arch = _asset(root, "student_architecture", args.tower)
    up = upstream_paths(root, teachers)
    feats, subs, imps, snaps, probes = (up[k] for k in ("feature_entries", "subspace_dirs", "importance_dirs",
                                                        "snapshot_dirs", "probe_dirs"))
    cfg = tower_config_from_architecture(args.tower, arch, reg.enabled_teachers(), feats, snaps)
    data = load_tower_data(cfg, feats, {d: read_probe_rows(p) for d, p in probes.items()}, splits=("train",))
    lengths = data.lengths()
    if lengths is None:
        raise SystemExit(f"tower {args.tower!r}: its rows have no sequence axis, so there is no padding to save")
    pca, importance = anchoring_inputs(cfg, subs, imps, 0.95)
    init_state = carved_init_state(cfg, snaps) if cfg.init == "carved" else None
    print(f"tower {args.tower}: {len(data)} train rows, lengths median {statistics.median(lengths)}, max {max(lengths)}")

    results = {}
    for grouped in (False, True):
        tc = cpu_train_config(args.tower, init=cfg.init, phase_a_steps=args.steps, phase_b_steps=0,
                              eval_every=10_000, checkpoint_every=10_000, log_every=10_000, group_by_length=grouped)
        gb = tc.batch_size
        batches = [batch_indices(len(data), gb, tc.seed, 0, s, lengths if grouped else None) for s in range(args.steps)]
        paid = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        real = sum(lengths[i] for b in batches for i in b)
        stamps: list[float] = [time.perf_counter()]
        with tempfile.TemporaryDirectory() as d:
            train_tower(cfg, data, None, tc, Path(d), pca=pca, importance=importance, log=lambda m: None,
                        init_state=init_state, hooks=TrainHooks(after_step=lambda g: stamps.append(time.perf_counter())))
        dt = [b - a for a, b in zip(stamps[1:], stamps[2:])]  # the first step pays for setup
        results[grouped] = (statistics.median(dt), statistics.mean(dt), paid, real)

    # the first steps of a grouped epoch are not a sample of it (its first mega-batch starts with the longest
    # row), so the fair figure is time per real token; an epoch holds the same tokens either way
    print(f"\n{args.steps} phase-(a) steps, batch {gb}, same init and seed")
    print(f"{'batches':16s} {'median s/step':>13s} {'mean s/step':>11s} {'positions paid':>14s} {'real tokens':>11s} "
          f"{'ms/real token':>13s}")
    per_token = {}
    for grouped, (med, mean, paid, real) in results.items():
        per_token[grouped] = 1000 * mean / (real / args.steps)  # mean step time over mean real tokens per batch
        print(f"{'length-grouped' if grouped else 'random':16s} {med:13.3f} {mean:11.3f} {paid:14,d} {real:11,d} "
              f"{per_token[grouped]:13.3f}")
    (_, _, p0, r0), (_, _, p1, r1) = results[False], results[True]
    print(f"speed-up of length-grouped batches per real token: {per_token[False] / per_token[True]:.2f}x; positions "
          f"paid per real token {p0 / r0:.2f} -> {p1 / r1:.2f}")


if __name__ == "__main__":
    main()
