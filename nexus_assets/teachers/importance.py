"""NIWT neuron importance per capability: needs the live teacher (gradients), on a small probe sample."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from nexus_assets.core.atomic import atomic_path, write_json
from nexus_assets.core.importance import importance_table, neuron_importance
from nexus_assets.core.registry import TeacherSpec
from nexus_assets.teachers.base import load_teacher


def profile_importance(spec: TeacherSpec, snapshot_dir: Path, rows: list[dict], out_dir: Path, *, mass: float,
                       device: str = "cpu", log: Callable[[str], None] = print) -> dict:
    """For each capability and cached layer: ranked scores as Parquet and the protected set covering `mass`."""
    import pyarrow.parquet as pq

    teacher = load_teacher(spec, snapshot_dir, device, dtype="float32")  # gradients: full precision
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict = {"teacher": spec.name, "mass": mass, "sample_rows": len(rows), "capabilities": {}}
    for cap in spec.capabilities:
        per_layer = {}
        for layer in spec.extraction.layers:
            isp = teacher.importance_spec(cap, rows)
            isp.model.eval()  # dropout would make the scores noisy
            scores = neuron_importance(isp.model, isp.layers[layer], isp.batches, isp.objective)
            table = importance_table(scores, mass)
            path = out_dir / f"{cap}__{layer}.parquet"
            with atomic_path(path) as tmp:
                pq.write_table(table, tmp)
            n_prot = int(sum(table["protected"].to_pylist()))
            per_layer[layer] = {"file": path.name, "width": len(scores), "protected": n_prot,
                                "protected_share": round(n_prot / len(scores), 4)}
            log(f"[{spec.name}] {cap} {layer}: {n_prot}/{len(scores)} neurons carry {mass:.0%} of the importance")
        summary["capabilities"][cap] = per_layer
    write_json(out_dir / "importance.json", summary)
    return summary
