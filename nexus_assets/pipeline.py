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
    ap.add_argument("--only-stale", action="store_true",
                    help="materialize only missing or stale partitions (what the automation sensor would do)")
    ap.add_argument("--refresh-roots", action="store_true",
                    help="with --only-stale: re-read the roots (registry entries, probe data) first, as the "
                         "nightly schedules do; their content hashes decide what else is stale")
    args = ap.parse_args(argv)

    import dagster as dg

    from nexus_assets.definitions import defs

    instance = _instance()
    for run_id in release_orphaned_runs(instance):
        print(f"released run {run_id}: its pipeline process is gone (killed?), so its concurrency slots "
              f"are freed and the run is marked failed", flush=True)
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
            refresh = args.refresh_roots and key in ROOTS
            if args.only_stale and not refresh and not needs_update(defs, instance, key, p):
                continue
            t0 = time.time()
            label = f"{key}[{p}]" if p else key
            print(f"==> {label}", flush=True)
            result = dg.materialize(
                assets + checks, selection=[key], partition_key=p, instance=instance,
                resources=defs.resources, raise_on_error=False,
                tags={**SOURCE_TAGS, PID_TAG: str(os.getpid())},
            )
            dt = time.time() - t0
            status = "ok" if result.success else ("BLOCKED" if _gated_by_contracts(result) else "FAILED")
            timings.append((label, dt, status))
            print(f"<== {label}: {status} in {dt:.1f} s", flush=True)
            if status == "FAILED":
                for ev in result.all_events:
                    if ev.is_failure and ev.event_specific_data and getattr(ev.event_specific_data, "error", None):
                        print(ev.event_specific_data.error.to_string(), file=sys.stderr)
    print(f"\nTotal {time.time() - t_all:.1f} s. Artifacts under {artifacts_root()}; "
          f"runs recorded in DAGSTER_HOME={os.environ['DAGSTER_HOME']} (open the UI: bash scripts/ui.sh)")
    for label, dt, status in timings:
        print(f"  {status:8s} {dt:7.1f} s  {label}")
    print_retention(artifacts_root())
    # a retention contract that blocks the bundle is a result, not a crash: exit 0 and say so above
    return 1 if any(t[2] == "FAILED" for t in timings) else 0


ROOTS = ("teacher_config", "probe_dataset")  # cheap, content-hashed: re-reading them changes nothing unless edited


SOURCE_TAGS = {"nexus/source": "pipeline"}  # on every run this command starts; release_orphaned_runs filters on it
PID_TAG = "nexus/pid"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    return True


def release_orphaned_runs(instance) -> list[str]:
    """Runs this command started whose process is gone: marked failed, their concurrency slots freed.

    A pipeline killed by SIGKILL leaves its run STARTED and its `gpu` pool slot claimed, and the next
    pipeline's GPU steps then wait for it forever (seen: 23 minutes of "Step blocked by limit for pool gpu").
    There is no daemon here to run Dagster's run monitoring, so the command does it for its own runs.
    """
    from dagster._core.storage.dagster_run import DagsterRunStatus, RunsFilter

    released = []
    runs = instance.get_runs(filters=RunsFilter(statuses=[DagsterRunStatus.STARTED], tags=SOURCE_TAGS))
    for run in runs:
        pid = run.tags.get(PID_TAG, "")
        if not pid.isdigit() or _alive(int(pid)):
            continue
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        instance.report_run_failed(run, message=f"pipeline process {pid} is gone; released by a later pipeline")
        released.append(run.run_id)
    return released


def needs_update(defs, instance, key: str, partition: str | None) -> bool:
    """Missing, or stale by Dagster's data/code versions; checked in topological order, so an upstream
    recomputed earlier in this run has already moved the stale front down to `key`."""
    import dagster as dg
    from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
    from dagster._core.loader import LoadingContextForTest

    resolver = CachingStaleStatusResolver(instance, defs.resolve_asset_graph(), LoadingContextForTest(instance))
    return resolver.get_status(dg.AssetKey(key), partition) in (StaleStatus.STALE, StaleStatus.MISSING)


def _gated_by_contracts(result) -> bool:
    """True when the run failed only because a retention contract (blocking check or bundle gate) failed."""
    failures = []
    for ev in result.all_events:
        if ev.event_type_value == "ASSET_CHECK_EVALUATION":
            data = ev.event_specific_data
            if not data.passed and data.severity.value == "ERROR":
                failures.append("check")
        elif ev.is_step_failure:
            err = getattr(ev.event_specific_data, "error", None)
            chain = []
            while err is not None:
                chain.append(err.cls_name)
                err = err.cause
            failures.append("contract" if "ContractError" in chain or "DagsterAssetCheckFailedError" in chain
                            else "error")
    return bool(failures) and all(f in ("check", "contract") for f in failures)


def print_retention(root: Path) -> None:
    """The retention table of every tower and the state of the bundle, from the artifacts on disk."""
    import json

    reports = sorted((root / "validation_report").glob("*/report.json"))
    if not reports:
        return
    print("\nRetention (student / teacher, held-out split gates; ood = sources never trained on):")
    print(f"  {'capability':22s} {'split':8s} {'metric':28s} {'teacher':>8s} {'student':>8s} {'retention':>9s}  95% CI")
    blocking = []
    for path in reports:
        rep = json.loads(path.read_text())
        for cap, r in rep["capabilities"].items():
            for split, s in r["splits"].items():
                ci = s.get("ci95") or [None, None]
                fmt = lambda x: f"{x:.3f}" if isinstance(x, (int, float)) else "-"
                print(f"  {cap:22s} {split:8s} {str(s.get('metric', r.get('metric', '')))[:28]:28s} "
                      f"{fmt(s.get('teacher_score')):>8s} {fmt(s.get('student_score')):>8s} "
                      f"{fmt(s.get('retention')):>9s}  [{fmt(ci[0])}, {fmt(ci[1])}]")
        blocking += [f"{f['capability']}: {f['reason']}" for f in rep.get("failures", []) if f.get("tier") == 1]
    manifest = root / "quantized_bundle" / "default" / "manifest.json"
    if blocking:
        print("\nContracts that block the bundle:\n  " + "\n  ".join(blocking))
    if manifest.exists():
        m = json.loads(manifest.read_text())
        origin = "built earlier; the contracts above block a new one" if blocking else "current"
        print(f"\nBundle on disk ({origin}): {manifest.parent} (verified={m.get('verified')}); try: "
              f".venv/bin/nexus info --bundle {manifest.parent}")
    else:
        print("\nNo bundle was built (a failed contract blocks it; quantized_bundle's config "
              "override_failed_contracts: true builds one marked unverified).")


if __name__ == "__main__":
    sys.exit(main())
