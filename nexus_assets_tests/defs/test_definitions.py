"""The code location loads fast, lists every asset family, and materializes a real teacher partition."""
from __future__ import annotations

import subprocess
import sys

import pytest

DEFAULT_TEACHERS = ["smollm2-135m", "minilm-l6", "efficientnet-lite0", "ge2e-speaker", "whisper-tiny-en"]


def test_definitions_list_every_asset_and_the_registry_partitions():
    from nexus_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {"teacher_config", "teacher_snapshot", "probe_dataset", "tower_adapter", "student_router", "teacher_features", "feature_catalog", "activation_subspace",
            "neuron_importance", "student_architecture"} <= keys
    import dagster as dg
    for key in ("teacher_snapshot", "teacher_features", "activation_subspace", "neuron_importance"):
        assert graph.get(dg.AssetKey(key)).partitions_def.get_partition_keys() == DEFAULT_TEACHERS
    assert graph.get(dg.AssetKey("probe_dataset")).partitions_def.get_partition_keys() == [
        "image-probe", "speech-probe", "text-probe"]
    assert set(graph.get(dg.AssetKey("student_architecture")).partitions_def.get_partition_keys()) == {
        "text", "vision", "audio"}
    for key in keys:
        assert graph.get(dg.AssetKey(key)).code_version, f"{key} needs a code_version for staleness"


def test_definitions_snapshot():
    """The sorted asset keys, checks, schedules and sensors: a change to the graph shows up here."""
    from nexus_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    assert sorted(k.to_user_string() for k in graph.get_all_asset_keys()) == [
        "activation_subspace", "feature_catalog", "neuron_importance", "probe_dataset", "quantized_bundle",
        "student_architecture", "student_router", "teacher_config", "teacher_features", "teacher_snapshot",
        "tower_adapter", "validation_report"]
    assert sorted(c.to_user_string() for c in graph.asset_check_keys) == [
        "quantized_bundle:quantized_retention", "validation_report:retention_contracts"]
    assert sorted(s.name for s in defs.schedules) == ["nightly_probe_dataset_refresh", "nightly_teacher_config_refresh"]
    assert sorted(s.name for s in defs.sensors) == ["nexus_recompute_stale"]


def test_loading_the_code_location_imports_no_heavy_library():
    code = ("import sys, nexus_assets.definitions; "
            "heavy=[m for m in ('torch','transformers','peft','bitsandbytes','pyarrow') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"heavy imports at load: {out.stdout}"


@pytest.mark.slow
def test_materialize_one_real_teacher_partition(tmp_path, monkeypatch):
    """probe_dataset[text-probe] -> teacher_snapshot + teacher_features[minilm-l6], in a temp DAGSTER_HOME."""
    import dagster as dg
    import numpy as np

    monkeypatch.setenv("NEXUS_PROFILE", "tiny")
    from nexus_assets.core.feature_store import read_features
    from nexus_assets.defs import data, registry_entries, teachers
    from nexus_assets.defs.resources import default_resources

    assets = [registry_entries.teacher_config, data.probe_dataset, teachers.teacher_snapshot,
              teachers.teacher_features]
    (tmp_path / "dh").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dh")) as instance:
        resources = default_resources()
        r1 = dg.materialize(assets, selection=["probe_dataset"], partition_key="text-probe", instance=instance,
                            resources=resources)
        assert r1.success
        r2 = dg.materialize(assets, selection=["teacher_config", "teacher_snapshot", "teacher_features"],
                            partition_key="minilm-l6",
                            instance=instance, resources=resources)
        assert r2.success
        out = r2.output_for_node("teacher_features")
        mats = r2.get_asset_materialization_events()
        meta = {e.asset_key.to_user_string(): e.materialization.metadata for e in mats}
        assert meta["teacher_features"]["rows"].value == 48
        items = read_features(out["path"]).to_pydict()
        emb = np.array(items["embedding"])
        assert emb.shape == (48, 384)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
        record = instance.get_latest_materialization_event(dg.AssetKey("teacher_snapshot"))
        assert record.asset_materialization.tags["dagster/data_version"] == out_snapshot_hash(r2)


def out_snapshot_hash(result) -> str:
    return result.output_for_node("teacher_snapshot")["content_hash"][:16]


def test_nightly_schedules_run_by_default_and_refresh_only_the_cheap_roots():
    import datetime

    import dagster as dg

    from nexus_assets.definitions import defs
    from nexus_assets.defs.schedules import automation_sensor, nightly_schedules

    assert automation_sensor.default_status == dg.DefaultSensorStatus.RUNNING
    targets = []
    for schedule in nightly_schedules:
        assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
        ctx = dg.build_schedule_context(scheduled_execution_time=datetime.datetime(2026, 11, 26, 2, 0),
                                        repository_def=defs.get_repository_def())
        requests = schedule.evaluate_tick(ctx).run_requests
        assert len({r.run_key for r in requests}) == len(requests)
        job = defs.resolve_job_def(schedule.job_name)
        assets = sorted(k.to_user_string() for k in job.asset_layer.selected_asset_keys)
        targets += [(a, r.partition_key) for r in requests for a in assets]
    assert sorted(targets) == sorted([("teacher_config", t) for t in DEFAULT_TEACHERS]
                                     + [("probe_dataset", d) for d in ("image-probe", "speech-probe", "text-probe")])
