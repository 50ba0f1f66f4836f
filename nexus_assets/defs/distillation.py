"""tower_adapter (per tower): a student tower distilled from cached features only; student_router."""
import dagster as dg
from pydantic import Field

from .automation import RECOMPUTE_WHEN_STALE
from .metadata import png_markdown, upstream
from .partitions import REGISTRY, dataset_to_towers, teacher_to_tower, tower_partitions
from .resources import NexusCompute



class TowerTrainingConfig(dg.Config):
    train: dict = Field(default_factory=dict, description=(
        "TrainConfig fields to change from the tower's CPU default (training/config.py documents each one: "
        "phase_a_steps, phase_b_steps, batch_size, lr, seed, temperature, w_anchor, ...); validated by "
        "TrainConfig, an unknown or bad field fails the run naming it"))
    anchor_variance: float = Field(0.95, description="protected subspace = PCA components up to this variance")


@dg.asset(
    partitions_def=tower_partitions,
    ins={
        "student_architecture": dg.AssetIn(),
        "teacher_features": dg.AssetIn(partition_mapping=teacher_to_tower),
        "activation_subspace": dg.AssetIn(partition_mapping=teacher_to_tower),
        "neuron_importance": dg.AssetIn(partition_mapping=teacher_to_tower),
        "teacher_snapshot": dg.AssetIn(partition_mapping=teacher_to_tower),
        "probe_dataset": dg.AssetIn(partition_mapping=dataset_to_towers),
    },
    code_version="19",
    automation_condition=RECOMPUTE_WHEN_STALE,
    group_name="distillation",
    kinds={"pytorch", "safetensors"},
    pool="gpu",
)
def tower_adapter(context: dg.AssetExecutionContext, config: TowerTrainingConfig, compute: NexusCompute,
                  student_architecture: dict, teacher_features: dict, activation_subspace: dict,
                  neuron_importance: dict, teacher_snapshot: dict, probe_dataset: dict) -> dg.Output[dict]:
    """Backbone + one LoRA adapter per capability, trained from cached teacher features; no teacher is loaded."""
    from pathlib import Path

    from nexus_assets.core.atomic import sha256_json
    from nexus_assets.training.distill import train_tower_from_artifacts
    from nexus_assets.core.paths import artifact_dir

    from nexus_assets.training.config import TrainConfig

    tower = context.partition_key
    unknown = sorted(set(config.train) - set(TrainConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"tower_adapter config train: unknown TrainConfig fields {unknown}")
    TrainConfig(**config.train)  # every value validated up front, naming the field
    compute.setup_torch()
    summary = train_tower_from_artifacts(
        tower,
        architecture=student_architecture,
        feature_entries={t: a.path for t, a in upstream(teacher_features, "teacher", "teacher_features").items()},
        subspace_dirs={t: a.path for t, a in upstream(activation_subspace, "teacher", "activation_subspace").items()},
        importance_dirs={t: a.path for t, a in upstream(neuron_importance, "teacher", "neuron_importance").items()},
        snapshot_dirs={t: a.path for t, a in upstream(teacher_snapshot, "teacher", "teacher_snapshot").items()},
        probe_dirs={d: a.path for d, a in upstream(probe_dataset, "dataset", "probe_dataset").items()},
        overrides=dict(config.train),
        anchor_variance=config.anchor_variance,
        out_dir=artifact_dir("tower_adapter", tower),
        device=compute.resolved_device(),
        log=context.log.info,
    )
    curve = Path(summary["out_dir"]) / "training_curve.png"
    return dg.Output(
        {"path": summary["tower_dir"], "tower": tower, "capabilities": summary["capabilities"],
         "summary": {k: v for k, v in summary.items() if k != "history"}},
        data_version=dg.DataVersion(summary["params_sha256"][:16]),
        metadata={
            "artifact_path": dg.MetadataValue.path(summary["tower_dir"]),
            "teachers": dg.MetadataValue.json(summary["teachers"]),
            "parameters": summary.get("num_parameters", 0),
            "final_val_losses": dg.MetadataValue.json(summary.get("final_val", {})),
            "final_train_losses": dg.MetadataValue.json(summary.get("final_train", {})),
            "data_left_out": dg.MetadataValue.json(summary.get("data_notes", {})),
            "rollbacks": summary.get("rollbacks", 0), "nan_skips": summary.get("nan_skips", 0),
            "seconds": summary.get("seconds", 0.0),
            "inputs_hash": sha256_json(summary["inputs"])[:16],
            "training_curve": png_markdown(curve) if curve.exists() else dg.MetadataValue.text("no curve"),
        },
    )


@dg.asset(
    ins={"tower_adapter": dg.AssetIn()},
    code_version="1",
    automation_condition=RECOMPUTE_WHEN_STALE,
    group_name="distillation",
    kinds={"safetensors"},
)
def student_router(context: dg.AssetExecutionContext, tower_adapter: dict) -> dg.Output[dict]:
    """Maps (modality, capability or auto) to a tower and adapter; the text `auto` classifier is learned."""
    from nexus_assets.core.atomic import sha256_json
    from nexus_assets.training.distill import build_router
    from nexus_assets.core.paths import artifact_dir

    towers = {t: a.value for t, a in upstream(tower_adapter, "tower", "tower_adapter").items()}
    out = artifact_dir("student_router", "all")
    info = build_router({t: v["path"] for t, v in towers.items()}, out)
    context.log.info(f"router: {info}")
    return dg.Output({"path": str(out), **info}, data_version=dg.DataVersion(sha256_json(info)[:16]),
                     metadata={"artifact_path": dg.MetadataValue.path(str(out)), "routes": dg.MetadataValue.json(info)})
