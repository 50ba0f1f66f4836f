"""Validate one student tower against its teachers' cached features, through the runtime.

The student is loaded by `nexus_assets.runtime` (a bundle, or one tower folder before a bundle exists)
and called through the same methods users call, so what is validated is what ships. The teacher side is
read from the feature cache (`teacher_features` entries): no teacher is run and this module imports no
teacher code. Metric definitions: data/retention_contracts.yaml and nexus_assets.core.metrics.

Per capability and split the report holds the teacher score, the student score, retention, a bootstrap
95% CI of the retention (paired: rows / queries / pairs resampled together for student and teacher),
the number of rows, and whether the contract passes (only the contract's gate split is gated).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from nexus_assets.core import metrics as M
from nexus_assets.core.contracts import RetentionContracts, evaluate

__all__ = ["validate_tower", "write_report", "report_markdown", "item_group", "REPORT_FILES"]

REPORT_FILES = ("report.json", "report.md", "retention.png")
_PROBE_COLUMN = {"text": "text", "vision": "image", "audio": "wav"}


def item_group(source: str, item: str) -> str:
    """The source document of a probe item: passages are keyed '<doc>:<i>' (pydoc topic, man page,
    fortune file), so '<source>/<doc>' groups the passages of one document."""
    doc, sep, idx = item.rpartition(":")
    return f"{source}/{doc}" if sep and idx.isdigit() else f"{source}/{item}"


def _runtime_tower(student: Any, tower: str):
    from nexus_assets.runtime.bundle import MANIFEST, Bundle, TowerRuntime, load_tower_dir

    if isinstance(student, TowerRuntime):
        return student, "tower_runtime"
    if isinstance(student, Bundle):
        return student.tower(tower), "bundle"
    p = Path(student)
    if (p / MANIFEST).exists():
        return Bundle.load(p).tower(tower), "bundle"
    return load_tower_dir(p), "tower_dir"


def _probe_index(probe_tables: Mapping[str, Any], column: str, extra: Sequence[str]) -> dict[str, dict]:
    out = {}
    for table in probe_tables.values():
        if column not in table.column_names:
            continue
        cols = ["row_id", "source", "item", "split", column] + [c for c in extra if c in table.column_names]
        for row in table.select(cols).to_pylist():
            out[row["row_id"]] = row
    return out


def _subsample(ids: list[str], max_rows: int | None) -> list[str]:
    """Deterministic subset (by row_id hash), so reruns and the bundle re-measure read the same rows."""
    ids = sorted(ids)
    if max_rows is None or len(ids) <= max_rows:
        return ids
    return sorted(sorted(ids, key=lambda r: hashlib.sha256(r.encode()).hexdigest())[:max_rows])


def _ci(data, fn, n_boot, seed):
    lo, hi = M.bootstrap_ci(data, fn, n=n_boot, seed=seed)
    return [None if math.isnan(lo) else lo, None if math.isnan(hi) else hi]


def _ratio(s: float, t: float) -> float:
    return s / t if t > 0 else float("nan")


# ----------------------------------------------------------------------------------------------------
# One capability on one split
# ----------------------------------------------------------------------------------------------------


def _lm(rt, cap, entry: Path, ids: list[str], n_boot: int, seed: int) -> dict:
    """Next-token accuracy vs the TRUE next token on the teacher's own cached token ids."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from nexus_assets.core.feature_store import read_features

    tok = read_features(entry, "tokens", columns=["row_id", "position", "token_id", "topk_ids", "next_logprob",
                                                  "has_next"])
    tok = tok.filter(pc.is_in(tok.column("row_id"), value_set=pa.array(ids)))
    by_row: dict[str, list] = defaultdict(list)
    for r in tok.to_pylist():
        by_row[r["row_id"]].append(r)
    rows_of = []  # (row id, its token rows by position, their (T,) token ids)
    for rid in ids:
        if len(by_row.get(rid, [])) >= 2:
            rows = sorted(by_row[rid], key=lambda r: r["position"])
            rows_of.append((rid, rows, np.array([r["token_id"] for r in rows])))
    order = {rid: i for i, (rid, _, _) in enumerate(rows_of)}  # the bootstrap resamples rows in `ids` order
    rows_of.sort(key=lambda x: len(x[1]))  # equal lengths share a forward pass

    def row_log_probs(chunk: int = 32):  # (T, V) float32 per row: a chunk at a time, never all rows at once
        for c in range(0, len(rows_of), chunk):
            part = rows_of[c:c + chunk]
            yield from zip(part, rt.text_log_probs([token_ids.tolist() for _, _, token_ids in part]))

    per = {}  # row -> n, student hits, teacher hits, agreement, student logprob sum, teacher logprob sum
    for (rid, rows, token_ids), lp in row_log_probs():
        lp = lp.numpy()  # (Ts, V) student log-probs over the teacher's ids, Ts = min(T, max_len)
        ts = lp.shape[0]
        nxt = np.concatenate([token_ids[1:ts], [-1]])  # (Ts,) true next token
        valid = np.array([r["has_next"] for r in rows[:ts]]) & (np.arange(ts) + 1 < ts)
        pred = lp.argmax(-1)
        teacher_top1 = np.array([r["topk_ids"][0] for r in rows[:ts]])
        if not valid.any():
            continue
        per[rid] = [valid.sum(), M.next_token_hits(pred, nxt, valid).sum(),
                    M.next_token_hits(teacher_top1, nxt, valid).sum(), (pred == teacher_top1)[valid].sum(),
                    lp[np.arange(ts)[valid], nxt[valid]].astype(np.float64).sum(),
                    np.array([r["next_logprob"] for r in rows[:ts]])[valid].sum()]
    if not per:
        return {"n": 0, "retention": None, "note": "no rows with a next token"}
    a = np.asarray([per[r] for r in sorted(per, key=order.__getitem__)], dtype=np.float64)  # (N, 6)
    n, sh, th, ag, slp, tlp = a.T
    s_score, t_score = sh.sum() / n.sum(), th.sum() / n.sum()
    ppl_s, ppl_t = float(np.exp(-slp.sum() / n.sum())), float(np.exp(-tlp.sum() / n.sum()))
    return {"n": len(per), "n_units": int(n.sum()), "unit": "tokens",
            "teacher_score": float(t_score), "student_score": float(s_score),
            "retention": M.retention(s_score, t_score),
            "ci95": _ci((sh, th), lambda s, t: _ratio(s.sum(), t.sum()), n_boot, seed),
            "reported": {"top1_agreement_with_teacher": float(ag.sum() / n.sum()), "perplexity_student": ppl_s,
                         "perplexity_teacher": ppl_t, "perplexity_ratio_teacher_over_student": ppl_t / ppl_s}}


def _text_embed(rt, entry: Path, ids: list[str], probe: dict, n_boot: int, seed: int) -> dict:
    t_emb = _item_matrix(entry, "embedding", ids)  # (N, D_t)
    s_emb = rt.text_embed([probe[r]["text"] for r in ids])  # (N, D_s)
    groups = [item_group(probe[r]["source"], probe[r]["item"]) for r in ids]
    hs, ht = M.recall_at_1_hits(s_emb, groups), M.recall_at_1_hits(t_emb, groups)  # (Q,) each, same queries
    out: dict[str, Any] = {"n": len(ids), "n_units": int(hs.size), "unit": "queries"}
    if len(ids) >= 3:
        out["reported"] = {"spearman_pairwise_cosine_vs_teacher": M.spearman(M.pairwise_upper(s_emb),
                                                                             M.pairwise_upper(t_emb))}
    if hs.size == 0:
        return {**out, "retention": None, "note": "no query has another passage of its document in this split"}
    s_score, t_score = float(hs.mean()), float(ht.mean())
    return {**out, "teacher_score": t_score, "student_score": s_score, "retention": M.retention(s_score, t_score),
            "ci95": _ci((hs.astype(float), ht.astype(float)), lambda s, t: _ratio(s.mean(), t.mean()), n_boot, seed)}


def _classify(rt, entry: Path, ids: list[str], probe: dict, n_boot: int, seed: int) -> dict:
    """The teacher defines the answer: retention = top-1 agreement with the teacher's top-1 class."""
    teacher_top1 = _item_matrix(entry, "logits", ids).argmax(1)  # (N,)
    s_logits = rt.vision_logits([probe[r]["image"] for r in ids])  # (N, C)
    a1 = M.topk_agreement(s_logits, teacher_top1, 1).astype(float)
    a5 = M.topk_agreement(s_logits, teacher_top1, 5).astype(float)
    return {"n": len(ids), "n_units": len(ids), "unit": "images", "teacher_score": None,
            "student_score": float(a1.mean()), "retention": float(a1.mean()),
            "ci95": _ci(a1, np.mean, n_boot, seed),
            "reported": {"top5_agreement": float(a5.mean()),
                         "note": "no labels: the teacher's top-1 class is the answer, retention = agreement"}}


def _speaker(rt, entry: Path, ids: list[str], probe: dict, n_boot: int, seed: int) -> dict:
    t_emb = _item_matrix(entry, "embedding", ids)
    s_emb = np.stack([rt.audio_speaker_embed(probe[r]["wav"]) for r in ids])  # (N, D)
    spk = [probe[r]["speaker"] for r in ids]
    ss, same = M.speaker_pairs(s_emb, spk)  # (P,), (P,) pairs i < j
    st, _ = M.speaker_pairs(t_emb, spk)
    out = {"n": len(ids), "n_units": int(same.size), "unit": "pairs"}
    if same.all() or not same.any():
        return {**out, "retention": None, "note": f"needs same- and different-speaker pairs ({int(same.sum())} same)"}
    e_s, e_t = M.eer(ss, same), M.eer(st, same)

    def stat(a, b, y):
        if y.all() or not y.any():
            return float("nan")
        return _ratio(1 - M.eer(a, y), 1 - M.eer(b, y))

    return {**out, "teacher_score": 1 - e_t, "student_score": 1 - e_s, "retention": M.retention(1 - e_s, 1 - e_t),
            "ci95": _ci((ss, st, same), stat, n_boot, seed),
            "reported": {"eer_student": e_s, "eer_teacher": e_t, "speakers": len(set(spk)),
                         "ci_note": "bootstrap over pairs (pairs sharing an utterance are not independent)"}}


def _asr(rt, entry: Path, ids: list[str], probe: dict, n_boot: int, seed: int) -> dict:
    from nexus_assets.core.feature_store import read_features

    t = read_features(entry, "items", columns=["row_id", "transcript"]).to_pylist()
    t_text = {r["row_id"]: r["transcript"] for r in t}
    # a recording of unknown content (klettres: letters and syllables) has no reference to score against
    unscored = {r for r in ids if not M.normalize_transcript(probe[r]["transcript"] or "")}
    ids = [r for r in ids if r not in unscored]
    if not ids:
        return {"n": 0, "retention": None, "note": f"none of the {len(unscored)} utterances has a transcript"}
    per = []
    for r in ids:
        ref = M.normalize_transcript(probe[r]["transcript"])
        es, nw = M.word_errors(ref, M.normalize_transcript(rt.audio_transcribe(probe[r]["wav"])))
        et, _ = M.word_errors(ref, M.normalize_transcript(t_text[r]))
        per.append([es, et, nw])
    a = np.asarray(per, dtype=np.float64)
    es, et, nw = a.T
    if nw.sum() == 0:
        return {"n": len(ids), "retention": None, "note": "the references have no words"}
    wer_s, wer_t = es.sum() / nw.sum(), et.sum() / nw.sum()
    return {"n": len(ids), "n_units": int(nw.sum()), "unit": "reference words",
            "teacher_score": 1 - wer_t, "student_score": 1 - wer_s, "retention": M.retention(1 - wer_s, 1 - wer_t),
            "ci95": _ci((es, et, nw), lambda s, t, w: _ratio(1 - s.sum() / w.sum(), 1 - t.sum() / w.sum()),
                        n_boot, seed),
            "reported": {"wer_student": wer_s, "wer_teacher": wer_t, "without_transcript": len(unscored)}}


def _item_matrix(entry: Path, column: str, ids: list[str]) -> np.ndarray:
    from nexus_assets.core.feature_store import FeatureCacheError, column_matrix, read_features

    t = read_features(entry, "items", columns=["row_id", column])
    order = {r: i for i, r in enumerate(t.column("row_id").to_pylist())}
    missing = [r for r in ids if r not in order]
    if missing:
        raise FeatureCacheError(f"{entry}: column {column!r} lacks rows {missing[:3]}")
    return column_matrix(t.column(column))[[order[r] for r in ids]].astype(np.float64)


def _cached_rows(entry: Path, split: str) -> set[str]:
    from nexus_assets.core.feature_store import read_features

    return set(read_features(entry, "items", columns=["row_id", "split"], filter_splits=[split]).column("row_id").to_pylist())


# ----------------------------------------------------------------------------------------------------
# The tower
# ----------------------------------------------------------------------------------------------------


def validate_tower(
    student: Any,
    tower: str,
    capabilities: Sequence[str],
    teacher_entries: Mapping[str, str | os.PathLike],
    probe_tables: Mapping[str, Any],
    contracts: RetentionContracts,
    splits: Sequence[str] = ("heldout", "ood"),
    *,
    out_dir: str | os.PathLike | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    max_rows: int | None = None,
) -> dict:
    """Measure every capability of `tower` on `splits` and judge it against its contract.

    Args:
        student: a runtime.Bundle, a bundle folder, a tower folder, or a loaded runtime.TowerRuntime.
        tower: tower name ("text", "vision", "audio").
        capabilities: capabilities to validate (each needs a contract).
        teacher_entries: teacher name -> feature cache entry (teacher_features "path").
        probe_tables: dataset name -> pyarrow Table of probe rows.
        contracts: loaded contracts; each capability's gate split is always measured.
        splits: splits to measure (the gate split is added if missing).
        out_dir: if given, report.json / report.md / retention.png are written there atomically.
        n_bootstrap, seed: bootstrap resamples and seed of the CIs.
        max_rows: at most this many rows per split (deterministic subset); None = all.

    Returns the report dict (also `passed` and `failures` from `contracts.evaluate`).
    """
    t0 = time.perf_counter()
    rt, kind = _runtime_tower(student, tower)
    probe = _probe_index(probe_tables, _PROBE_COLUMN[rt.cfg.modality], ("transcript", "speaker"))
    if not probe:
        raise ValueError(f"tower {tower!r}: no probe table in {sorted(probe_tables)} has column "
                         f"{_PROBE_COLUMN[rt.cfg.modality]!r}")
    report: dict[str, Any] = {"tower": tower, "student": str(getattr(rt, "directory", student)), "loaded_from": kind,
                              "quantization": rt.scheme, "contracts_file": contracts.file, "n_bootstrap": n_bootstrap, "seed": seed,
                              "max_rows": max_rows, "capabilities": {}}
    for cap in capabilities:
        c = contracts.contract(cap)
        spec = rt.cfg.capabilities.get(cap)
        if spec is None:
            raise ValueError(f"tower {tower!r} has no capability {cap!r}; it has {rt.capabilities}")
        if spec.teacher not in teacher_entries:
            raise ValueError(f"capability {cap!r}: no cached features of its teacher {spec.teacher!r} "
                             f"(have {sorted(teacher_entries)})")
        entry = Path(teacher_entries[spec.teacher])
        out_splits = {}
        for split in dict.fromkeys([c.gate_split, *splits]):
            ids = _subsample([r for r in _cached_rows(entry, split) if r in probe], max_rows)
            if not ids:
                out_splits[split] = {"n": 0, "retention": None, "note": f"no {split} rows cached and in the probe data"}
                continue
            if spec.kind == "lm":
                res = _lm(rt, cap, entry, ids, n_bootstrap, seed)
            elif spec.kind == "classes":
                res = _classify(rt, entry, ids, probe, n_bootstrap, seed)
            elif spec.kind == "asr":
                res = _asr(rt, entry, ids, probe, n_bootstrap, seed)
            elif rt.cfg.modality == "text":
                res = _text_embed(rt, entry, ids, probe, n_bootstrap, seed)
            else:
                res = _speaker(rt, entry, ids, probe, n_bootstrap, seed)
            out_splits[split] = {"metric": c.metric, "gated": split == c.gate_split, **res}
        report["capabilities"][cap] = {"teacher": spec.teacher, "metric": c.metric, "reference": c.reference,
                                       "min_retention": c.min_retention, "tier": c.tier, "gate_split": c.gate_split,
                                       "splits": out_splits}
    verdicts = evaluate(report, contracts)
    for v in verdicts:
        report["capabilities"][v["capability"]]["passed"] = v["passed"]
        report["capabilities"][v["capability"]]["reason"] = v["reason"]
    report["failures"] = [v for v in verdicts if not v["passed"]]
    report["passed"] = not any(v["blocking"] for v in report["failures"])
    report["seconds"] = round(time.perf_counter() - t0, 2)
    if out_dir is not None:
        write_report(report, out_dir)
    return report


# ----------------------------------------------------------------------------------------------------
# Report files
# ----------------------------------------------------------------------------------------------------


def _f(x, nd=4):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def report_markdown(report: dict) -> str:
    """One row per capability and split; the teacher column says "defines the answer" where it does."""
    lines = [f"### {report['tower']} tower ({report['loaded_from']}, quantization {report['quantization']})", "",
             "| capability | split | metric | teacher | student | retention | 95% CI | n | min | tier | gate |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for cap, r in report["capabilities"].items():
        for split, s in r["splits"].items():
            ci = s.get("ci95") or [None, None]
            teacher = _f(s.get("teacher_score")) if r["reference"] == "ground_truth" else "defines the answer"
            gate = ("PASS" if r["passed"] else "FAIL") if s.get("gated") else "reported"
            lines.append(f"| {cap} | {split} | {r['metric']} | {teacher} | {_f(s.get('student_score'))} | "
                         f"{_f(s.get('retention'))} | [{_f(ci[0], 3)}, {_f(ci[1], 3)}] | {s.get('n', 0)} | "
                         f"{r['min_retention']} | {r['tier']} | {gate} |")
    lines.append("")
    for cap, r in report["capabilities"].items():
        for split, s in r["splits"].items():
            rep = {k: v for k, v in (s.get("reported") or {}).items()}
            if rep or s.get("note"):
                extras = ", ".join(f"{k} {_f(v) if isinstance(v, float) else v}" for k, v in rep.items())
                lines.append(f"- {cap} / {split}: {extras}{'; ' if extras and s.get('note') else ''}{s.get('note', '')}")
    return "\n".join(lines) + "\n"


def _plot(report: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 3.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    labels, vals, lo, hi, colours, mins = [], [], [], [], [], []
    for cap, r in report["capabilities"].items():
        for split, s in r["splits"].items():
            v = s.get("retention")
            ci = s.get("ci95") or [None, None]
            labels.append(f"{cap}\n{split}")
            vals.append(0.0 if v is None else v)
            lo.append(0.0 if v is None or ci[0] is None else max(v - ci[0], 0.0))
            hi.append(0.0 if v is None or ci[1] is None else max(ci[1] - v, 0.0))
            colours.append("#4c72b0" if split == r["gate_split"] else "#bbbbbb")
            mins.append(r["min_retention"])
    x = np.arange(len(labels))
    ax.bar(x, vals, color=colours, yerr=[lo, hi], capsize=3)
    for i, m in enumerate(mins):
        ax.hlines(m, i - 0.4, i + 0.4, colors="red", linestyles="--", lw=1)
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("retention (student / teacher)")
    ax.set_title(f"{report['tower']} tower: retention with 95% CI (red: contract; grey: not gated)", fontsize=9)
    ax.set_ylim(0, max([1.1] + [v + h + 0.05 for v, h in zip(vals, hi)]))
    fig.tight_layout()
    fig.savefig(path, format="png")


def write_report(report: dict, out_dir: str | os.PathLike) -> Path:
    """report.json + report.md + retention.png into `out_dir`, swapped in as one directory."""
    from nexus_assets.core.atomic import atomic_dir

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        (tmp / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=float))
        (tmp / "report.md").write_text(report_markdown(report))
        _plot(report, tmp / "retention.png")
    return out_dir
