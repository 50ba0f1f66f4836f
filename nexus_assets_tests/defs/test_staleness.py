"""Touch one teacher's registry entry: exactly that teacher's partitions and the tower it feeds go stale."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nexus_assets.core.paths import REPO_ROOT

STALE_REPORT = r'''
import json, sys
import dagster as dg
from dagster._core.definitions.data_version import CachingStaleStatusResolver
from dagster._core.loader import LoadingContextForTest
from nexus_assets.definitions import defs
graph = defs.resolve_asset_graph()
instance = dg.DagsterInstance.get()
resolver = CachingStaleStatusResolver(instance, graph, LoadingContextForTest(instance))
out = {}
for key, parts in json.loads(sys.argv[1]).items():
    for p in parts:
        out[f"{key}[{p}]"] = resolver.get_status(dg.AssetKey(key), p).value
print(json.dumps(out))
'''


def _run(args, env):
    res = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


@pytest.mark.slow
def test_touching_one_teacher_makes_exactly_its_partitions_and_tower_stale(tmp_path):
    shutil.copytree(REPO_ROOT / "data" / "registry", tmp_path / "data" / "registry")
    (tmp_path / "dh").mkdir()
    shutil.copy(REPO_ROOT / "dagster.yaml", tmp_path / "dh" / "dagster.yaml")
    env = {**os.environ, "NEXUS_DATA_DIR": str(tmp_path / "data"), "NEXUS_HOME": str(tmp_path / "home"),
           "NEXUS_PROFILE": "tiny", "DAGSTER_HOME": str(tmp_path / "dh"), "HF_HUB_OFFLINE": "1"}
    teachers = ["minilm-l6", "efficientnet-lite0"]
    _run(["-m", "nexus_assets.pipeline", "--select", "teacher_config", "probe_dataset", "teacher_snapshot",
          "teacher_features", "activation_subspace", "student_architecture",
          "--partition", "text-probe", "image-probe", "vision", *teachers], env)
    watched = {"teacher_snapshot": teachers, "teacher_features": teachers, "activation_subspace": teachers,
               "student_architecture": ["vision"]}
    before = json.loads(_run(["-c", STALE_REPORT, json.dumps(watched)], env).strip().splitlines()[-1])
    assert set(before.values()) == {"FRESH"}, before

    # nightly refresh with nothing changed: re-reading the registry changes no data version
    _run(["-m", "nexus_assets.pipeline", "--select", "teacher_config", "--partition", *teachers], env)
    again = json.loads(_run(["-c", STALE_REPORT, json.dumps(watched)], env).strip().splitlines()[-1])
    assert set(again.values()) == {"FRESH"}, again

    reg = tmp_path / "data" / "registry" / "teachers.yaml"
    text = reg.read_text()
    old = "      top_k: 1000\n      batch_size: 32\n"
    assert old in text
    reg.write_text(text.replace(old, "      top_k: 1000\n      batch_size: 16\n"))
    # Dagster marks the direct dependents stale; recomputing them moves the front down the graph. Walk the
    # front: at every step only efficientnet's partitions and the vision tower may be stale.
    _run(["-m", "nexus_assets.pipeline", "--select", "teacher_config", "--partition", *teachers], env)
    fronts = []
    for _ in range(4):
        status = json.loads(_run(["-c", STALE_REPORT, json.dumps(watched)], env).strip().splitlines()[-1])
        stale = sorted(k for k, v in status.items() if v == "STALE")
        if not stale:
            break
        fronts.append(stale)
        assets = sorted({k.split("[")[0] for k in stale})
        parts = sorted({k.split("[")[1][:-1] for k in stale})
        _run(["-m", "nexus_assets.pipeline", "--select", *assets, "--partition", *parts], env)
    assert fronts == [
        ["teacher_features[efficientnet-lite0]", "teacher_snapshot[efficientnet-lite0]"],
        # the snapshot's content hash is unchanged: only features move; the carved tower reads features directly
        ["activation_subspace[efficientnet-lite0]", "student_architecture[vision]"],
    ], fronts
