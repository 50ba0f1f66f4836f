"""Retention of the text tower on prose no training source resembles: the State of the Union addresses and
Moby-Dick (npm @stdlib datasets, `sotu` and `moby_dick`), per source and together.

Reads a finished pipeline run (README command 1) from NEXUS_HOME like bench/init_ablation.py. Builds a
probe of `--items` passages from the two sources (all in the never-seen split), runs the text tower's
teachers over it once (cached under NEXUS_HOME/never_seen_prose/, keyed like every feature cache, so a
second run only validates), then validates the pipeline's text tower, or `--tower DIR`, through the
runtime with no teacher loaded.

Run:
    .venv/bin/python bench/never_seen_prose.py [--items 1600] [--tower DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from init_ablation import _asset  # noqa: E402

SOURCES = ["sotu", "moby_dick"]


def main() -> None:
    import pyarrow.compute as pc

    from nexus_assets.core.contracts import load_contracts
    from nexus_assets.core.paths import artifacts_root
    from nexus_assets.core.registry import DatasetSpec, load_registry
    from nexus_assets.probes.probe_data import SUMMARY_FILE, build_probe_dataset, read_probe_rows
    from nexus_assets.release.validation import validate_tower
    from nexus_assets.teachers.features import extract_teacher_features

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=1600, help="passages, split evenly between the two sources")
    ap.add_argument("--tower", default=None, help="a trained text tower folder (default: the pipeline's)")
    args = ap.parse_args()

    root = artifacts_root()
    reg = load_registry()
    teachers = [t for t in reg.enabled_teachers() if t.tower == "text"]
    tower = Path(args.tower) if args.tower else Path(_asset(root, "tower_adapter", "text")["path"])
    spec = reg.dataset(teachers[0].dataset).model_dump()
    spec.update(name="never-seen-prose", sources=SOURCES, heldout_sources=SOURCES,
                sizes={**spec["sizes"], "default": {"items": args.items}})
    out = root / "never_seen_prose" / str(args.items)
    summary = build_probe_dataset(DatasetSpec.model_validate(spec), "default", out / "probe")
    if summary["empty_sources"]:
        raise SystemExit(f"sources {summary['empty_sources']} gave no passage: {summary['notes']} "
                         "(scripts/setup.sh installs the npm @stdlib datasets)")
    table = read_probe_rows(out / "probe")
    content = json.loads((out / "probe" / SUMMARY_FILE).read_text())["content_sha256"]
    entries = {}
    for t in teachers:
        t0 = time.perf_counter()
        entries[t.name], m = extract_teacher_features(t, Path(_asset(root, "teacher_snapshot", t.name)["path"]),
                                                      table, content, out / "features" / t.name)
        print(f"{t.name}: {m['rows']} rows of features ({time.perf_counter() - t0:.0f} s)")
    caps = sorted({c for t in teachers for c in t.capabilities})
    print(f"\ntext tower {tower}\n{'source':10s} {'capability':14s} {'retention':>9s} {'95% CI':>15s} "
          f"{'student':>8s} {'teacher':>8s} {'n':>5s}")
    for src in SOURCES + ["both"]:
        rows = table if src == "both" else table.filter(pc.equal(table.column("source"), src))
        rep = validate_tower(tower, "text", caps, entries, {teachers[0].dataset: rows}, load_contracts(),
                             splits=("ood",))
        for cap, r in sorted(rep["capabilities"].items()):
            x = r["splits"]["ood"]
            ci = x.get("ci95") or [None, None]
            print(f"{src:10s} {cap:14s} {_fmt(x.get('retention')):>9s} {_fmt(ci[0]):>7s}-{_fmt(ci[1]):<7s} "
                  f"{_fmt(x.get('student_score')):>8s} {_fmt(x.get('teacher_score')):>8s} {x.get('n_units', 0):>5}")


def _fmt(v) -> str:
    """A figure to three places, or n/a where the split had none."""
    return "n/a" if v is None else f"{v:.3f}"


if __name__ == "__main__":
    main()
