"""quantized_bundle: the deployable bundle, gated by the retention contracts, + its own check.

Unpartitioned: it reads every tower's validation_report and tower_adapter, the router, and (to re-measure
retention on the quantized files) every teacher's cached features and every probe dataset. A failed
blocking contract raises a clear error listing each one, unless `override_failed_contracts: true`, in
which case the manifest says verified=false.
"""

import dagster as dg

from .automation import RECOMPUTE_WHEN_STALE
from pydantic import Field

from .metadata import upstream
from .validation import validation_report


class BundleConfig(dg.Config):
    quantization: str = Field("auto", description="'auto' (nf4 with CUDA, int8 on CPU), 'int8', 'nf4' or 'none'")
    override_failed_contracts: bool = Field(
        False, description="ship even though a blocking contract failed; the manifest then says verified: false")
    n_bootstrap: int = Field(1000, description="bootstrap resamples of the re-measured retention CIs")
    seed: int = Field(0, description="bootstrap seed")
    max_rows: int = Field(0, description="rows per split for the re-measure (deterministic subset); 0 = all")
    contracts_file: str = Field("", description="contracts YAML; '' = data/retention_contracts.yaml")


@dg.asset(
    ins={
        "validation_report": dg.AssetIn(),
        "tower_adapter": dg.AssetIn(),
        "student_router": dg.AssetIn(),
        "teacher_features": dg.AssetIn(),
        "probe_dataset": dg.AssetIn(),
    },
    code_version="1",
    automation_condition=RECOMPUTE_WHEN_STALE,
    group_name="bundle",
    kinds={"safetensors", "json"},
)
def quantized_bundle(context: dg.AssetExecutionContext, config: BundleConfig, validation_report: dict,
                     tower_adapter: dict, student_router: dict, teacher_features: dict,
                     probe_dataset: dict) -> dg.Output[dict]:
    """Quantized towers + adapters + router + tokenizers + manifest.json (hashes, versions, retention)."""
    from pathlib import Path

    from nexus_assets.release.bundle import build_bundle
    from nexus_assets.core.contracts import load_contracts
    from nexus_assets.core.paths import artifact_dir
    from nexus_assets.probes.probe_data import read_probe_rows

    contracts = load_contracts(config.contracts_file or None)
    reports = {t: a.value["report"] for t, a in upstream(validation_report, "tower", "validation_report").items()}
    adapters = {t: a.value for t, a in upstream(tower_adapter, "tower", "tower_adapter").items()}
    missing = sorted(set(adapters) - set(reports))
    if missing:
        raise ValueError(f"quantized_bundle: towers {missing} have no validation_report")
    feats = {t: a.value for t, a in upstream(teacher_features, "teacher", "teacher_features").items()}
    probes = {d: a.value for d, a in upstream(probe_dataset, "dataset", "probe_dataset").items()}
    out = artifact_dir("quantized_bundle", "default")
    manifest = build_bundle(
        {t: Path(v["path"]) for t, v in adapters.items()}, Path(student_router["path"]), out,
        quantization=config.quantization, reports=reports, contracts=contracts,
        override=config.override_failed_contracts,
        teacher_entries={t: Path(v["path"]) for t, v in feats.items()},
        probe_tables={name: read_probe_rows(Path(v["path"])) for name, v in probes.items()},
        n_bootstrap=config.n_bootstrap, seed=config.seed, max_rows=config.max_rows or None, log=context.log.info)
    from nexus_assets.core.atomic import sha256_file

    manifest_sha = sha256_file(out / "manifest.json")
    retention = {}
    for cap, r in manifest["retention"].items():
        after = ((r.get("after_quantization") or {}).get("splits") or {}).get(r["gate_split"]) or {}
        if after.get("retention") is not None:
            retention[f"retention_after/{cap}"] = float(after["retention"])
    return dg.Output(
        {"path": str(out), "verified": manifest["verified"], "manifest_sha256": manifest_sha},
        data_version=dg.DataVersion(manifest_sha[:16]),
        metadata={"artifact_path": dg.MetadataValue.path(str(out)), "verified": manifest["verified"],
                  "quantization": manifest["quantization"]["scheme"],
                  "bytes": sum(t["bytes"] for t in manifest["towers"].values()),
                  "bytes_fp32": sum(t["bytes_fp32"] for t in manifest["towers"].values()),
                  "failed_contracts": dg.MetadataValue.json(manifest["failed_contracts"]), **retention},
    )


@dg.asset_check(asset=quantized_bundle, blocking=True,
                description="The retention re-measured on the quantized bundle meets every tier-1 contract")
def quantized_retention(context: dg.AssetCheckExecutionContext, quantized_bundle: dict) -> dg.AssetCheckResult:
    """Re-reads manifest.json from disk (the file users get) and judges its after-quantization retention."""
    import json
    from pathlib import Path

    m = json.loads((Path(quantized_bundle["path"]) / "manifest.json").read_text())
    failing = []
    meta = {"verified": bool(m["verified"])}
    for cap, r in m["retention"].items():
        after = ((r.get("after_quantization") or {}).get("splits") or {}).get(r["gate_split"]) or {}
        ret = after.get("retention")
        if ret is not None:
            meta[f"retention_after/{cap}"] = float(ret)
        if r["tier"] == 1 and (ret is None or ret < r["min_retention"]):
            failing.append(f"{cap}: {'unmeasured' if ret is None else f'{ret:.4f}'} < {r['min_retention']}")
    return dg.AssetCheckResult(passed=not failing and bool(m["verified"]),
                               description="; ".join(failing) or ("verified" if m["verified"] else "unverified"),
                               metadata=meta)
