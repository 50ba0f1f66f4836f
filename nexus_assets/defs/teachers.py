"""teacher_snapshot and teacher_features, partitioned per teacher; feature_catalog (DuckDB views)."""

import dagster as dg

from .automation import RECOMPUTE_WHEN_STALE
from .partitions import dataset_to_teachers, teacher_partitions
from .resources import NexusCompute


@dg.asset(partitions_def=teacher_partitions, ins={"teacher_config": dg.AssetIn()}, code_version="1",
          group_name="teachers", kinds={"safetensors"}, automation_condition=RECOMPUTE_WHEN_STALE)
def teacher_snapshot(context: dg.AssetExecutionContext, teacher_config: dict) -> dg.Output[dict]:
    """The teacher's weights, file by file, hashed and catalogued; its data version is the content hash,
    so downstream goes stale only when the weights really change."""
    from nexus_assets.core.paths import artifact_dir
    from nexus_assets.core.registry import TeacherSpec
    from nexus_assets.teachers.snapshot import CATALOG, build_snapshot

    spec = TeacherSpec.model_validate(teacher_config)
    out = artifact_dir("teacher_snapshot", spec.name)
    manifest = build_snapshot(spec, out, log=context.log.info)
    return dg.Output(
        {"path": str(out), "content_hash": manifest["content_hash"], "weight_bytes": manifest["weight_bytes"],
         "teacher": spec.name},
        data_version=dg.DataVersion(manifest["content_hash"][:16]),
        metadata={
            "artifact_path": dg.MetadataValue.path(str(out)),
            "catalog": dg.MetadataValue.path(str(out / CATALOG)),
            "content_hash": manifest["content_hash"],
            "files": len(manifest["files"]),
            "tensors": manifest["tensors"],
            "weight_mb": round(manifest["weight_bytes"] / 1e6, 1),
            "source": dg.MetadataValue.json(manifest["source"]),
            "seconds": manifest["seconds"],
        },
    )


@dg.asset(
    partitions_def=teacher_partitions,
    ins={
        "teacher_config": dg.AssetIn(),
        "teacher_snapshot": dg.AssetIn(),
        "probe_dataset": dg.AssetIn(partition_mapping=dataset_to_teachers),
    },
    code_version="1",
    group_name="teachers",
    kinds={"parquet", "pytorch"},
    pool="gpu",
    automation_condition=RECOMPUTE_WHEN_STALE,
)
def teacher_features(
    context: dg.AssetExecutionContext, compute: NexusCompute, teacher_config: dict, teacher_snapshot: dict,
    probe_dataset: dict,
) -> dg.Output[dict]:
    """The frozen teacher run once over its probe data; students train on this, never on a live teacher."""
    from pathlib import Path

    from nexus_assets.core.paths import artifact_dir
    from nexus_assets.probes.probe_data import read_probe_rows
    from nexus_assets.core.registry import TeacherSpec
    from nexus_assets.teachers.features import extract_teacher_features

    spec = TeacherSpec.model_validate(teacher_config)
    compute.setup_torch()
    rows = read_probe_rows(Path(probe_dataset["path"]))
    entry, m = extract_teacher_features(
        spec, Path(teacher_snapshot["path"]), rows, probe_dataset["content_hash"],
        artifact_dir("teacher_features", spec.name), device=compute.resolved_device(),
        memory_budget_bytes=compute.memory_budget_bytes(), log=context.log.info,
    )
    return dg.Output(
        {"path": str(entry), "cache_key": m["cache_key"], "rows": m["rows"], "teacher": spec.name},
        data_version=dg.DataVersion(m["cache_key"]),
        metadata={
            "artifact_path": dg.MetadataValue.path(str(entry)),
            "rows": m["rows"], "token_rows": m["token_rows"], "chunks": m["chunks"],
            "feature_mb": round(m["bytes"] / 1e6, 2), "bytes_per_row": round(m["bytes"] / max(m["rows"], 1)),
            "rows_computed_this_run": m["rows_computed_this_run"],
            "rows_per_s": round(m["rows_computed_this_run"] / max(m["seconds_this_run"], 1e-9), 1),
            "cache_key": m["cache_key"], "device": m["device"], "layer_streamed": m["layer_streamed"],
        },
    )


@dg.asset(
    deps=[teacher_features],
    code_version="1",
    group_name="teachers",
    kinds={"duckdb"},
    automation_condition=RECOMPUTE_WHEN_STALE,
)
def feature_catalog(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    """A DuckDB file with one view per teacher and feature table, so cached features answer SQL."""
    from nexus_assets.core.feature_views import build_feature_views
    from nexus_assets.core.paths import artifacts_root

    path, views = build_feature_views(artifacts_root() / "teacher_features", artifacts_root() / "features.duckdb")
    context.log.info(f"{len(views)} views in {path}")
    return dg.MaterializeResult(metadata={"artifact_path": dg.MetadataValue.path(str(path)),
                                          "views": dg.MetadataValue.json(views)})
