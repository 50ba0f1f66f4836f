"""Full pipeline time vs the incremental time after touching one teacher, measured in one run.

    .venv/bin/python bench/incremental.py                       # tiny data profile, touches efficientnet-lite0
    .venv/bin/python bench/incremental.py --profile default --teacher minilm-l6

Both runs use a private copy of the registry, NEXUS_HOME and DAGSTER_HOME under a temp folder. "Touch" =
edit the teacher's extraction settings (its batch size), a real registry change; the incremental run is
what the nightly schedule + automation sensor do: re-read every registry entry, then materialize only the
missing or stale partitions (`python -m nexus_assets.pipeline --only-stale`). Prints the ratio (goal <= 0.3).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(args: list[str], env: dict) -> float:
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "nexus_assets.pipeline", *args], cwd=REPO, env=env,
                         capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"pipeline {args} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    done = [line for line in res.stdout.splitlines() if line.startswith("<== ")]
    print(f"  {' '.join(args) or '(full)'}: {len(done)} partitions in {time.time() - t0:.1f} s")
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--teacher", default="efficientnet-lite0")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="nexus-incremental-"))
    shutil.copytree(REPO / "data" / "registry", tmp / "data" / "registry")
    shutil.copy(REPO / "data" / "retention_contracts.yaml", tmp / "data" / "retention_contracts.yaml")
    (tmp / "dh").mkdir()
    shutil.copy(REPO / "dagster.yaml", tmp / "dh" / "dagster.yaml")
    env = {**os.environ, "NEXUS_DATA_DIR": str(tmp / "data"), "NEXUS_HOME": str(tmp / "home"),
           "NEXUS_PROFILE": args.profile, "DAGSTER_HOME": str(tmp / "dh"), "HF_HUB_OFFLINE": "1"}
    print(f"profile {args.profile}, touching {args.teacher}, work dir {tmp}")
    full = run([], env)

    reg = tmp / "data" / "registry" / "teachers.yaml"
    text = reg.read_text()
    block = re.search(rf"- name: {re.escape(args.teacher)}\n(.*?)(?=\n  - name:|\Z)", text, re.S)
    if not block or "batch_size:" not in block.group(0):
        sys.exit(f"{reg}: teacher {args.teacher!r} has no extraction.batch_size to touch")
    touched = re.sub(r"batch_size: (\d+)", lambda m: f"batch_size: {int(m.group(1)) + 1}", block.group(0), count=1)
    reg.write_text(text.replace(block.group(0), touched))

    incremental = run(["--select", "teacher_config"], env) + run(["--only-stale"], env)
    print(f"full {full:.1f} s, incremental {incremental:.1f} s, ratio {incremental / full:.3f} (goal <= 0.3)")


if __name__ == "__main__":
    main()
