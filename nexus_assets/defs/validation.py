"""validation_report (per tower) + its blocking retention-contract check.

The asset runs `core.validation.validate_tower` on the tower_adapter folder through the runtime, with the
teachers' cached features (never a live teacher). The check fails (severity ERROR, blocking) when a
tier-1 contract fails, so nothing downstream of the report runs in that run; quantized_bundle also
re-checks the reports itself, because it may be materialized in a later run.
"""

import dagster as dg

from .automation import RECOMPUTE_WHEN_STALE
from .metadata import png_markdown, upstream
from pydantic import Field

from .partitions import REGISTRY, teacher_to_tower, tower_partitions

# probe dataset -> the towers whose teachers read it (speech-probe -> audio, ...)
dataset_to_tower = dg.StaticPartitionMapping(
    {d: sorted({t.tower for t in REGISTRY.enabled_teachers() if t.dataset == d})
     for d in sorted({t.dataset for t in REGISTRY.enabled_teachers()})}
)


class ValidationConfig(dg.Config):
    n_bootstrap: int = Field(1000, description="bootstrap resamples of each retention CI")
    seed: int = Field(0, description="bootstrap seed (CIs are reproducible)")
    splits: list[str] = Field(["heldout", "ood"], description="splits measured; each contract's gate split is always added")
    max_rows: int = Field(0, description="at most this many rows per split (deterministic subset); 0 = all")
    contracts_file: str = Field("", description="contracts YAML; '' = data/retention_contracts.yaml")




@dg.asset(
    partitions_def=tower_partitions,
    ins={
        "tower_adapter": dg.AssetIn(),
        "teacher_features": dg.AssetIn(partition_mapping=teacher_to_tower),
        "probe_dataset": dg.AssetIn(partition_mapping=dataset_to_tower),
    },
    code_version="1",
    automation_condition=RECOMPUTE_WHEN_STALE,
    group_name="validation",
    kinds={"json", "pytorch"},
)
def validation_report(context: dg.AssetExecutionContext, config: ValidationConfig, tower_adapter: dict,
                      teacher_features: dict, probe_dataset: dict) -> dg.Output[dict]:
    """Retention of each capability of the tower vs its teachers' cached features, with 95% CIs."""
    from pathlib import Path

    from nexus_assets.core.atomic import sha256_json
    from nexus_assets.core.contracts import load_contracts
    from nexus_assets.core.paths import artifact_dir
    from nexus_assets.probes.probe_data import read_probe_rows
    from nexus_assets.release.validation import report_markdown, validate_tower

    tower = context.partition_key
    contracts = load_contracts(config.contracts_file or None)
    feats = {t: a.value for t, a in upstream(teacher_features, "teacher", "teacher_features").items()}
    probes = {d: a.value for d, a in upstream(probe_dataset, "dataset", "probe_dataset").items()}
    out = artifact_dir("validation_report", tower)
    report = validate_tower(
        Path(tower_adapter["path"]), tower, tower_adapter["capabilities"],
        {t: Path(v["path"]) for t, v in feats.items()},
        {name: read_probe_rows(Path(v["path"])) for name, v in probes.items()},
        contracts, splits=config.splits, out_dir=out, n_bootstrap=config.n_bootstrap, seed=config.seed,
        max_rows=config.max_rows or None)
    for f in report["failures"]:
        context.log.warning(f"{f['capability']}: {f['reason']} (tier {f['tier']})")
    retention = {}
    for cap, r in report["capabilities"].items():
        for split, s in r["splits"].items():
            if s.get("retention") is not None:
                retention[f"retention/{cap}/{split}"] = float(s["retention"])
    value = {"path": str(out), "tower": tower, "passed": report["passed"], "failures": report["failures"],
             "report": report}
    version = sha256_json([tower_adapter.get("path"), tower_adapter.get("summary"),
                           sorted(v["cache_key"] for v in feats.values()),
                           sorted(v["content_hash"] for v in probes.values()),
                           contracts.to_json(), config.model_dump()])[:16]
    return dg.Output(
        value,
        data_version=dg.DataVersion(version),
        metadata={"artifact_path": dg.MetadataValue.path(str(out)), "passed": report["passed"],
                  "table": dg.MetadataValue.md(report_markdown(report)),
                  "plot": png_markdown(Path(out) / "retention.png"),
                  "failing": dg.MetadataValue.json([f["capability"] for f in report["failures"]]),
                  "seconds": report["seconds"], **retention},
    )


@dg.asset_check(asset=validation_report, blocking=True, partitions_def=tower_partitions,
                description="Every tier-1 retention contract of the tower passes on its gate split")
def retention_contracts(context: dg.AssetCheckExecutionContext, validation_report: dict) -> dg.AssetCheckResult:
    """Re-judges the stored report.json against the contracts file it was made with, and names each
    failing capability with its shortfall."""
    import json
    from pathlib import Path

    from nexus_assets.core.contracts import load_contracts
    from nexus_assets.release.validation import report_markdown

    from nexus_assets.core.contracts import evaluate

    report = json.loads((Path(validation_report["path"]) / "report.json").read_text())
    verdicts = evaluate(report, load_contracts(report["contracts_file"]))
    failing = [v for v in verdicts if not v["passed"]]
    blocking = [v for v in failing if v["blocking"]]
    meta = {v["capability"]: dg.MetadataValue.text(v["reason"]) for v in verdicts}
    meta.update({f"shortfall/{v['capability']}": float(v["shortfall"]) for v in failing if v["shortfall"] is not None})
    meta["table"] = dg.MetadataValue.md(report_markdown(report))
    return dg.AssetCheckResult(
        passed=not failing,
        severity=dg.AssetCheckSeverity.ERROR if blocking else dg.AssetCheckSeverity.WARN,
        description=("failing: " + "; ".join(f"{v['capability']} {v['reason']}" for v in failing)) if failing
        else "all contracts pass",
        metadata=meta,
    )
