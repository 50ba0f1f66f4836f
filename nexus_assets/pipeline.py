"""Materialize the whole asset graph on the embedded default, partition by partition, recording every run
in the Dagster instance (DAGSTER_HOME, default data/dagster_home) so the UI shows it afterwards.

    .venv/bin/python -m nexus_assets.pipeline              # everything, in dependency order
    .venv/bin/python -m nexus_assets.pipeline --select teacher_features --partition minilm-l6
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from nexus_assets.core.paths import REPO_ROOT, artifacts_root


def _instance():
    import dagster as dg

    home = Path(os.environ.setdefault("DAGSTER_HOME", str(REPO_ROOT / "data" / "dagster_home")))
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        (home / "dagster.yaml").write_text((REPO_ROOT / "dagster.yaml").read_text())
    return dg.DagsterInstance.get()


def plan(defs) -> list[tuple[str, list[str | None]]]:
    """(asset key, partitions) in topological order; unpartitioned assets get [None]."""
    graph = defs.resolve_asset_graph()
    order = []
    for level in graph.toposorted_asset_keys_by_level:
        for key in sorted(level, key=lambda k: k.to_user_string()):
            node = graph.get(key)
            if not node.is_materializable:
                continue
            pdef = node.partitions_def
            order.append((key.to_user_string(), pdef.get_partition_keys() if pdef else [None]))
    return order


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--select", nargs="*", help="asset keys to materialize (default: all)")
    ap.add_argument("--partition", nargs="*", help="partition keys to restrict to")
    args = ap.parse_args(argv)

    import dagster as dg

    from nexus_assets.definitions import defs

    instance = _instance()
    assets = list(defs.assets)
    checks = list(defs.asset_checks or [])
    t_all = time.time()
    timings = []
    for key, partitions in plan(defs):
        if args.select and key not in args.select:
            continue
        for p in partitions:
            if args.partition and p is not None and p not in args.partition:
                continue
            t0 = time.time()
            label = f"{key}[{p}]" if p else key
            print(f"==> {label}", flush=True)
            result = dg.materialize(
                assets + checks, selection=[key], partition_key=p, instance=instance,
                resources=defs.resources, raise_on_error=False,
                tags={"nexus/source": "pipeline"},
            )
            dt = time.time() - t0
            timings.append((label, dt, result.success))
            print(f"<== {label}: {'ok' if result.success else 'FAILED'} in {dt:.1f} s", flush=True)
            if not result.success:
                for ev in result.all_events:
                    if ev.is_failure and ev.event_specific_data and getattr(ev.event_specific_data, "error", None):
                        print(ev.event_specific_data.error.to_string(), file=sys.stderr)
    print(f"\nTotal {time.time() - t_all:.1f} s. Artifacts under {artifacts_root()}; "
          f"runs recorded in DAGSTER_HOME={os.environ['DAGSTER_HOME']} (open the UI: bash scripts/ui.sh)")
    failed = [t for t in timings if not t[2]]
    for label, dt, ok in timings:
        print(f"  {'ok    ' if ok else 'FAILED'} {dt:7.1f} s  {label}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
