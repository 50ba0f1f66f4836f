"""Which teacher a tower is carved from, and its carve plan: the one entry point `student_architecture` calls.

A tower is carved from the first of its teachers whose family has a carver here (the text tower from its
causal LM, the vision tower from its EfficientNet-Lite classifier, the audio tower from Whisper); the other
teachers of the tower are still distilled into it. A tower asked to be carved whose teachers have no
carvable family is refused, naming the families (init: random stays available).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from nexus_assets.core.registry import TeacherSpec

# registry family -> carver name (below)
CARVABLE_FAMILIES = {"causal_lm": "text", "causal_lm_gguf": "text", "efficientnet_lite": "vision", "whisper_ct2": "audio"}


@dataclass
class CarveSettings:
    """Per-family carve targets (each validated by its family's own target class).

    Attributes:
        text: TextCarveTarget fields (param_fraction, mlp_keep, vocab_mass, block_selection, ...).
        vision: the vision carver's settings (keep_fraction, ...).
        audio: the audio carver's settings (decoder_layers, vocab_mass, max_seconds, ...).
    """

    text: dict = field(default_factory=dict)
    vision: dict = field(default_factory=dict)
    audio: dict = field(default_factory=dict)


def carve_is_the_teacher(cfg) -> bool:
    """True when a carved tower is its teacher unchanged: an image-classifier carve that kept every channel
    and whose only head is the teacher's own classifier (BatchNorm folded, nothing else touched). Such a
    tower has nothing to heal; any step could only move it away from the function retention measures."""
    plan = cfg.carve or {}
    if cfg.init != "carved" or plan.get("family") != "efficientnet_lite":
        return False
    # the carver's parameter count falls with every dropped channel: a fraction of 1 means all were kept
    full = plan.get("report", {}).get("param_fraction", 0.0) >= 1.0
    return full and [h.kind for h in cfg.capabilities.values()] == ["classes"]


def carve_teacher(tower: str, teachers: Sequence[TeacherSpec]) -> TeacherSpec:
    """The teacher `tower` is carved from; ValueError naming the families when none can be carved."""
    mine = [t for t in teachers if t.tower == tower and t.enabled]
    for t in mine:
        if t.family in CARVABLE_FAMILIES:
            return t
    raise ValueError(f"tower {tower!r}: cannot be carved: its teachers' families "
                     f"{sorted({t.family for t in mine})} have no carver (carvable: {sorted(CARVABLE_FAMILIES)}); "
                     f"set student_architecture's init for {tower!r} to 'random'")


def _exit_blocks(plan: dict, carved: TeacherSpec, teachers: Sequence[TeacherSpec],
                 feature_entries: Mapping[str, Path], measure: Callable[[TeacherSpec, dict], dict]) -> None:
    """plan["exit_blocks"]: capability -> blocks read, for every embedding teacher of the tower other than
    the one it is carved from; measure(teacher, {train row_id: its embedding}) returns the measurement."""
    from nexus_assets.core.feature_store import column_matrix, read_features

    from .tower_spec import _columns

    exits, report = {}, {}
    for t in teachers:
        if t.name == carved.name or t.name not in feature_entries:
            continue
        entry = Path(feature_entries[t.name])
        if "embedding" not in _columns(entry, "items"):
            continue
        items = read_features(entry, "items", columns=["row_id", "embedding"], filter_splits=["train"])
        res = measure(t, dict(zip(items.column("row_id").to_pylist(), column_matrix(items.column("embedding")))))
        for cap in t.capabilities:
            exits[cap], report[cap] = res["blocks"], res
    plan["exit_blocks"] = exits
    plan["report"]["exit_blocks"] = report


def _text_exit_blocks(plan: dict, lm: TeacherSpec, teachers: Sequence[TeacherSpec], feature_entries: Mapping[str, Path],
                      model_dir: Path, token_rows: dict, log: Callable[[str], None]) -> None:
    """The text tower's embedding heads: blocks of the carved LM read, measured on the cached token rows."""
    from .carve_text import embedding_exit_block

    def measure(t: TeacherSpec, targets: dict) -> dict:
        res = embedding_exit_block(plan, model_dir, token_rows, targets, lm.extraction.max_length)
        log(f"[text carve] {t.capabilities} read {res['blocks']} of {len(plan['blocks'])} blocks "
            f"(ridge fold cosine per block {res['fold_cosine']} on {res['rows']} train rows)")
        return res

    _exit_blocks(plan, lm, teachers, feature_entries, measure)


def _audio_exit_blocks(plan: dict, asr: TeacherSpec, teachers: Sequence[TeacherSpec], feature_entries: Mapping[str, Path],
                       model_dir: Path, probe_dirs: Mapping[str, Path] | None, log: Callable[[str], None],
                       rows: int = 512) -> None:
    """The audio tower's embedding heads: encoder layers read, measured on the probe clips (the speaker
    embedding pools the shared encoder: measured, the first layer predicts GE2E best)."""
    import numpy as np

    from nexus_assets.probes.probe_data import read_probe_rows
    from nexus_assets.student.carved_whisper import whisper_log_mel
    from nexus_assets.student.transforms import decode_wav

    from .carve_text import seeded_subset
    from .carve_whisper import encoder_exit_block

    def measure(t: TeacherSpec, emb: dict) -> dict:
        if not probe_dirs or t.dataset not in probe_dirs:
            raise ValueError(f"tower 'audio' carve: the exit layer of {t.capabilities} needs the probe clips of "
                             f"dataset {t.dataset!r} (teacher {t.name!r}); probe_dirs has {sorted(probe_dirs or {})}")
        table = read_probe_rows(Path(probe_dirs[t.dataset]))
        wavs = dict(zip(table.column("row_id").to_pylist(), table.column("wav").to_pylist()))
        ids = sorted(r for r in emb if r in wavs)
        ids = seeded_subset(ids, rows)
        mels = [whisper_log_mel(decode_wav(wavs[r], r), int(plan["max_seconds"])) for r in ids]
        res = encoder_exit_block(plan, model_dir, mels, np.stack([emb[r] for r in ids]))
        log(f"[audio carve] {t.capabilities} read {res['blocks']} of {plan['hf_config']['encoder_layers']} encoder "
            f"layers (ridge fold cosine per layer {res['fold_cosine']} on {res['rows']} train clips)")
        return res

    _exit_blocks(plan, asr, teachers, feature_entries, measure)


def _unspoken_rows(t: TeacherSpec, probe_dirs: Mapping[str, Path] | None) -> set[str]:
    """Row ids of the teacher's probe clips whose transcript has no words (recorded voices that speak no
    sentence: the rule ASR targets and validation use); none when the probe is not given or has no
    transcript column."""
    if not probe_dirs or t.dataset not in probe_dirs:
        return set()
    from nexus_assets.core.metrics import normalize_transcript
    from nexus_assets.probes.probe_data import read_probe_rows

    table = read_probe_rows(Path(probe_dirs[t.dataset]), columns=["row_id", "transcript"])
    if "transcript" not in table.column_names:
        return set()
    ids, transcripts = table.column("row_id").to_pylist(), table.column("transcript").to_pylist()
    return {r for r, s in zip(ids, transcripts) if not normalize_transcript(s or "")}


def plan_tower_carve(tower: str, teachers: Sequence[TeacherSpec], feature_entries: Mapping[str, Path],
                     snapshot_dirs: Mapping[str, Path], settings: CarveSettings,
                     log: Callable[[str], None] = print, probe_dirs: Mapping[str, Path] | None = None) -> dict:
    """The carve plan (JSON-able, with "family", "teacher" and a "report") of `tower`."""
    t = carve_teacher(tower, teachers)
    if t.name not in feature_entries or t.name not in snapshot_dirs:
        raise ValueError(f"tower {tower!r}: carving from {t.name!r} needs its cached features and snapshot")
    kind = CARVABLE_FAMILIES[t.family]
    entry, snap = Path(feature_entries[t.name]), Path(snapshot_dirs[t.name])
    if kind == "text":
        from .carve_text import TextCarveTarget, plan_text_carve, token_rows_from_cache

        rows, topk, probs = token_rows_from_cache(entry)
        plan = plan_text_carve(snap / "hf", token_rows=rows, topk_ids=topk, topk_probs=probs,
                               target=TextCarveTarget(**settings.text), max_len=t.extraction.max_length, log=log)
        _text_exit_blocks(plan, t, teachers, feature_entries, snap / "hf", rows, log)
    elif kind == "vision":
        from .carve_vision import plan_vision_carve_from_artifacts

        plan = plan_vision_carve_from_artifacts(snap, entry, probe_dirs=probe_dirs, log=log, **settings.vision)
    else:
        from .carve_audio import plan_audio_carve_from_artifacts

        plan = plan_audio_carve_from_artifacts(snap, entry, log=log, unspoken_rows=_unspoken_rows(t, probe_dirs),
                                               **settings.audio)
        _audio_exit_blocks(plan, t, teachers, feature_entries, snap / "hf", probe_dirs, log)
    plan["teacher"] = t.name
    return plan
