"""The contract gate through Dagster: validation_report + its blocking check + quantized_bundle, run with
materialize() on the tiny world, with stub upstream assets (tower_adapter, student_router,
teacher_features, probe_dataset) carrying the real asset keys and partitions.

The tiny towers have random weights, so every contract fails deliberately: the check must fail, the bundle
must refuse with a message naming the failing contracts, and the override must ship verified=false. A
contracts file with only tier-3 (non-blocking) contracts must let the bundle through verified.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest

from nexus_assets.defs.bundle import quantized_bundle, quantized_retention
from nexus_assets.defs.partitions import REGISTRY, dataset_partitions, teacher_partitions, tower_partitions
from nexus_assets.defs.validation import retention_contracts, validation_report
from nexus_assets_tests.runtime.tiny import build_world

warnings.filterwarnings("ignore", category=dg.PreviewWarning) if hasattr(dg, "PreviewWarning") else None
W: dict = {}


@dg.asset(partitions_def=tower_partitions)
def tower_adapter(context) -> dict:
    t = context.partition_key
    return {"path": str(W["tower_dirs"][t]), "tower": t, "capabilities": sorted(W["cfgs"][t].capabilities),
            "summary": {}}


@dg.asset
def student_router() -> dict:
    return {"path": str(W["router_dir"])}


@dg.asset(partitions_def=teacher_partitions)
def teacher_features(context) -> dict:
    t = context.partition_key
    return {"path": str(W["teacher_entries"][t]), "cache_key": f"k-{t}", "rows": 12, "teacher": t}


@dg.asset(partitions_def=dataset_partitions)
def probe_dataset(context) -> dict:
    d = context.partition_key
    return {"path": str(W["probe_dirs"][d]), "content_hash": f"h-{d}", "modality": REGISTRY.dataset(d).modality,
            "dataset": d}


ASSETS = [tower_adapter, student_router, teacher_features, probe_dataset, validation_report, retention_contracts,
          quantized_bundle, quantized_retention]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate")
    W.clear()
    W.update(build_world(root))
    W["probe_dirs"] = {}
    for name, table in W["probe_tables"].items():
        (root / "probe" / name).mkdir(parents=True)
        pq.write_table(table, root / "probe" / name / "rows.parquet")
        W["probe_dirs"][name] = root / "probe" / name
    io = dg.FilesystemIOManager(base_dir=str(root / "io"))
    inst = dg.DagsterInstance.ephemeral()
    for key in teacher_partitions.get_partition_keys():
        assert dg.materialize(ASSETS, selection=[teacher_features], partition_key=key, instance=inst,
                              resources={"io_manager": io}).success
    for key in dataset_partitions.get_partition_keys():
        assert dg.materialize(ASSETS, selection=[probe_dataset], partition_key=key, instance=inst,
                              resources={"io_manager": io}).success
    assert dg.materialize(ASSETS, selection=[student_router], instance=inst, resources={"io_manager": io}).success
    return {"io": io, "inst": inst, "root": root}


def _validate(upstream, contracts_file=""):
    checks = {}
    for key in tower_partitions.get_partition_keys():
        res = dg.materialize(ASSETS, selection=[tower_adapter, validation_report, retention_contracts],
                             partition_key=key, instance=upstream["inst"], resources={"io_manager": upstream["io"]},
                             run_config={"ops": {"validation_report": {"config": {
                                 "n_bootstrap": 50, "contracts_file": contracts_file}}}},
                             raise_on_error=False)
        assert [m.partition for m in res.asset_materializations_for_node("validation_report")] == [key]
        ev = res.get_asset_check_evaluations()[0]
        # a blocking check failing with ERROR severity fails the run (nothing downstream runs in it)
        assert res.success == (ev.passed or ev.severity == dg.AssetCheckSeverity.WARN), key
        checks[key] = ev
    return checks


def _bundle(upstream, **config):
    return dg.materialize(ASSETS, selection=[quantized_bundle, quantized_retention], instance=upstream["inst"],
                          resources={"io_manager": upstream["io"]},
                          run_config={"ops": {"quantized_bundle": {"config": {"n_bootstrap": 50, **config}}}},
                          raise_on_error=False)


def test_failing_contract_blocks_bundle_unless_overridden(upstream):
    checks = _validate(upstream)
    for tower, ev in checks.items():
        assert not ev.passed and ev.severity == dg.AssetCheckSeverity.ERROR, tower
    assert "text.generate" in checks["text"].metadata and "shortfall/text.generate" in checks["text"].metadata

    res = _bundle(upstream)
    assert not res.success
    err = next(e for e in res.all_events if e.event_type_value == "STEP_FAILURE").event_specific_data.error
    text = err.to_string()
    assert "retention contract(s) failed on the fp32 towers" in text
    for cap in ("text.generate", "vision.classify", "audio.transcribe"):
        assert cap in text

    res = _bundle(upstream, override_failed_contracts=True, quantization="int8")
    assert res.asset_materializations_for_node("quantized_bundle")  # shipped, but its own check fails the run
    assert not res.success
    value = res.output_for_node("quantized_bundle")
    assert value["verified"] is False
    import json
    m = json.loads((Path(value["path"]) / "manifest.json").read_text())
    assert m["verified"] is False and m["override_failed_contracts"] is True and m["failed_contracts"]["before_quantization"]
    ev = res.get_asset_check_evaluations()[0]
    assert not ev.passed


def test_non_blocking_contracts_let_the_bundle_through(upstream, tmp_path):
    import yaml

    from nexus_assets.core.contracts import load_contracts

    raw = load_contracts().to_json()
    for c in raw["capabilities"].values():
        c["tier"] = 3  # informational: failures are reported, nothing blocks
    f = tmp_path / "contracts.yaml"
    f.write_text(yaml.safe_dump({"default_min_retention": 0.97, "capabilities": raw["capabilities"]}))
    checks = _validate(upstream, str(f))
    assert all(not ev.passed and ev.severity == dg.AssetCheckSeverity.WARN for ev in checks.values())
    res = _bundle(upstream, contracts_file=str(f), quantization="int8")
    assert res.success
    assert res.output_for_node("quantized_bundle")["verified"] is True
