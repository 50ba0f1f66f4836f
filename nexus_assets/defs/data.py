"""probe_dataset: the real, offline inputs every teacher is run over, split by content hash."""

import tempfile
from pathlib import Path

import dagster as dg

from .partitions import REGISTRY, dataset_partitions


@dg.asset(
    partitions_def=dataset_partitions,
    code_version="1",
    group_name="data",
    kinds={"parquet"},
)
def probe_dataset(context: dg.AssetExecutionContext) -> dg.Output[dict]:
    """Probe rows with a train / val / heldout / ood split column (ood = whole sources never trained on)."""
    from nexus_assets.core.paths import artifact_dir
    from nexus_assets.probes.probe_data import build_probe_dataset, read_probe_rows
    from nexus_assets.core.registry import active_profile

    spec = REGISTRY.dataset(context.partition_key)
    profile = active_profile()
    text_table = None
    if spec.text_dataset:  # speech is synthesized from the text dataset's sentences, rebuilt deterministically
        with tempfile.TemporaryDirectory() as tmp:
            build_probe_dataset(REGISTRY.dataset(spec.text_dataset), profile, Path(tmp))
            text_table = read_probe_rows(Path(tmp))
    out = artifact_dir("probe_dataset", spec.name)
    summary = build_probe_dataset(spec, profile, out, text_table=text_table)
    context.log.info(f"{spec.name}: {summary}")
    value = {"path": str(out), "content_hash": summary["content_sha256"], "modality": spec.modality,
             "dataset": spec.name}
    return dg.Output(
        value,
        data_version=dg.DataVersion(summary["content_sha256"][:16]),
        metadata={"artifact_path": dg.MetadataValue.path(str(out)), "profile": profile,
                  **{k: v for k, v in summary.items() if isinstance(v, (int, float, str))},
                  "summary": dg.MetadataValue.json(summary)},
    )
