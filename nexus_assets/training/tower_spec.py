"""One registry: a tower's heads are read from the registry entries and the cached features, never written
by hand. Enable another teacher for a tower and its head follows from what that teacher cached.

Per teacher of the tower (registry `tower:`), per capability it lists:
* head kind from what the cache holds: an item `embedding` column -> "embedding", an item `logits`
  column -> "classes", a per-token table with top-k -> "lm" (text) or "asr" (audio);
* out_dim from the same columns' widths, or, for sequence heads, the vocabulary in the teacher
  snapshot's config.json;
* anchor layers = the teacher's `extraction.layers`, each with the width of its cached `hidden.<layer>`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

from nexus_assets.core.feature_store import FeatureCacheError, column_matrix, read_features
from nexus_assets.core.registry import TeacherSpec
from nexus_assets.student.config import HeadSpec, TowerConfig


def _snapshot_vocab(snapshot_dir: Path, teacher: str) -> int:
    for cfg in (snapshot_dir / "hf" / "config.json", snapshot_dir / "config.json"):
        if cfg.exists():
            v = json.loads(cfg.read_text()).get("vocab_size")
            if isinstance(v, int) and v > 1:
                return v
    raise FeatureCacheError(f"teacher {teacher!r}: no vocab_size in {snapshot_dir}/hf/config.json or config.json "
                            "(a sequence head needs the teacher's vocabulary)")


def _columns(entry: Path, kind: str) -> list[str]:
    import pyarrow.parquet as pq

    files = sorted(Path(entry).glob(f"{kind}-*.parquet"))
    return pq.read_schema(files[0]).names if files else []


def _width(entry: Path, column: str, teacher: str) -> int:
    t = read_features(entry, "items", columns=[column]).slice(0, 1)
    if t.num_rows == 0:
        raise FeatureCacheError(f"teacher {teacher!r}: no cached rows in {entry}")
    return int(column_matrix(t.column(column)).shape[1])


def head_spec(teacher: TeacherSpec, entry: Path, snapshot_dir: Path | None) -> HeadSpec:
    """The head a student needs to imitate `teacher`, from its cached feature entry."""
    entry = Path(entry)
    items = _columns(entry, "items")
    if not items:
        raise FeatureCacheError(f"teacher {teacher.name!r}: {entry}: no items chunks")
    if "embedding" in items:
        kind, out = "embedding", _width(entry, "embedding", teacher.name)
    elif "logits" in items:
        kind, out = "classes", _width(entry, "logits", teacher.name)
    else:
        tokens = _columns(entry, "tokens")
        if "topk_ids" not in tokens:
            raise FeatureCacheError(f"teacher {teacher.name!r}: its cache {entry} holds no embedding, logits or "
                                    f"per-token top-k; no student head can imitate it")
        if teacher.modality not in ("text", "audio"):
            raise FeatureCacheError(f"teacher {teacher.name!r}: per-token outputs of a {teacher.modality} teacher "
                                    "have no student head")
        kind = "lm" if teacher.modality == "text" else "asr"
        if snapshot_dir is None:
            raise FeatureCacheError(f"teacher {teacher.name!r}: a sequence head needs its snapshot (vocabulary)")
        out = _snapshot_vocab(Path(snapshot_dir), teacher.name)
    anchors = {layer: _width(entry, f"hidden.{layer}", teacher.name) for layer in teacher.extraction.layers
               if f"hidden.{layer}" in items}
    return HeadSpec(kind, out, teacher.name, anchors)


def tower_config_from_registry(tower: str, teachers: Sequence[TeacherSpec], feature_entries: Mapping[str, Path],
                               snapshot_dirs: Mapping[str, Path], **sizes) -> TowerConfig:
    """The tower's TowerConfig: its teachers' heads (see the module docstring) plus `sizes` (width, depth,
    n_heads, lora rank per capability via `lora_rank=int`, ...). LoRA rank defaults to 8."""
    mine = [t for t in teachers if t.tower == tower and t.enabled]
    if not mine:
        raise ValueError(f"tower {tower!r}: no enabled teacher in the registry names it")
    modalities = {t.modality for t in mine}
    if len(modalities) != 1:
        raise ValueError(f"tower {tower!r}: its teachers mix modalities {sorted(modalities)}")
    modality = modalities.pop()
    caps: dict[str, HeadSpec] = {}
    for t in mine:
        if t.name not in feature_entries:
            raise ValueError(f"tower {tower!r}: teacher {t.name!r} has no cached features")
        spec = head_spec(t, feature_entries[t.name], snapshot_dirs.get(t.name))
        for cap in t.capabilities:
            if cap in caps:
                raise ValueError(f"tower {tower!r}: capability {cap!r} is claimed by two teachers")
            caps[cap] = spec
    rank = sizes.pop("lora_rank", 8)
    extra = {}
    lm = [t for t in mine if caps[t.capabilities[0]].kind == "lm"]
    if lm:
        extra["vocab_size"] = caps[lm[0].capabilities[0]].out_dim
        extra["max_len"] = lm[0].extraction.max_length or 64
    return TowerConfig(name=tower, modality=modality, capabilities=caps,
                       lora_rank={c: int(rank) for c in caps}, **{**extra, **sizes})
