"""Run a frozen teacher once over its probe rows and cache what students learn from."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from nexus_assets.core.feature_store import cache_features, cache_key
from nexus_assets.core.registry import TeacherSpec
from nexus_assets.teachers.base import load_teacher
from nexus_assets.teachers.snapshot import verify_snapshot

INPUT_COLUMNS = {"text": ["text"], "vision": ["image"], "audio": ["wav"]}
# Bump when an adapter's output format or maths changes: it is part of every cache key.
# 3: compact cache (token top-k logits and hidden layers stored as float16, read back as float32).
FEATURE_CODE_VERSION = "3"
COMPACT_CACHE = True


def feature_cache_key(spec: TeacherSpec, snapshot_hash: str, data_hash: str) -> str:
    return cache_key(snapshot_hash, data_hash, spec.extraction.model_dump(), f"{spec.family}:{FEATURE_CODE_VERSION}")


def extract_teacher_features(
    spec: TeacherSpec,
    snapshot_dir: Path,
    probe_rows,  # pyarrow.Table
    data_hash: str,
    teacher_dir: Path,
    *,
    device: str = "cpu",
    memory_budget_bytes: int | None = None,
    log: Callable[[str], None] = print,
) -> tuple[Path, dict]:
    """Verify the snapshot, load the teacher, cache its outputs; resumes a killed run chunk by chunk."""
    t0 = time.time()
    snap = verify_snapshot(snapshot_dir)
    key = feature_cache_key(spec, snap["content_hash"], data_hash)
    entry = Path(teacher_dir) / key
    teacher = load_teacher(spec, snapshot_dir, device, memory_budget_bytes)
    streamed = getattr(teacher, "streamed", False)
    load_s = time.time() - t0
    log(f"[{spec.name}] loaded in {load_s:.1f} s ({teacher.num_parameters() / 1e6:.1f} M params"
        f"{', layer-streamed: weights exceed the memory budget' if streamed else ''}); cache key {key}")
    manifest = cache_features(
        teacher.forward, probe_rows, entry, teacher=spec.name,
        # a streamed teacher reads every block once per call: give it a whole chunk at once
        batch_size=spec.extraction.chunk_rows if streamed else spec.extraction.batch_size,
        chunk_rows=spec.extraction.chunk_rows,
        input_columns=INPUT_COLUMNS[spec.modality],
        compact=COMPACT_CACHE,
        manifest_extra={"cache_key": key, "snapshot_hash": snap["content_hash"], "data_hash": data_hash,
                        "extraction": spec.extraction.model_dump(), "teacher_params": teacher.num_parameters(),
                        "load_seconds": round(load_s, 2), "device": device, "layer_streamed": streamed},
        log=log,
    )
    return entry, manifest
