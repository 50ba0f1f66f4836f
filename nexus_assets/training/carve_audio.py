"""The audio carve with a vocabulary that generalises: `carve_whisper.plan_whisper_carve` keeps the tokens
covering `vocab_mass` of the TRAIN transcripts, which on the embedded default's 257 train clips is 8,101
ids that cover only 91% of the held-out transcript tokens (86% out of domain): every other token becomes
the fallback and the carved student's transcripts drift from the teacher's before any training (WER vs
the teacher 0.18 at 10 s, against 0.04 with the whole vocabulary; measured on flite speech).

`plan_audio_carve` adds the ids below `prior_ids` (Whisper's English tokenizer is GPT-2's byte-level
BPE, whose ids follow merge order, i.e. roughly corpus frequency) to the train-covered ones, and reports
the coverage on the held-out transcripts next to the train split. The pipeline's default is
`DEFAULT_PRIOR_IDS` = 16,384: half the WER drift of train coverage alone for +4M parameters; 32,768
removes the drift but costs +9.6M (the tower would be 31M of the teacher's 39M). Measured (4 decoder layers, 10 s):
prior 16,384 -> 18,531 ids, held-out coverage 0.963, WER vs teacher 0.080; prior 32,768 -> 33,378 ids,
0.986, WER vs teacher 0.040 (= the whole vocabulary).

Reads the stock Whisper folder `<snapshot>/hf` only; imports no teacher package and no Dagster.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Collection, Sequence

import numpy as np
import torch

from .carve_whisper import carved_whisper_state, plan_whisper_carve


def plan_audio_carve(snapshot_dir: Path, *, transcripts_token_ids: Sequence[int] | np.ndarray,
                     decoder_layers: Sequence[int] | None = None, vocab_mass: float = 0.999,
                     max_seconds: int = 10, prior_ids: int = 0,
                     heldout_token_ids: Sequence[int] | np.ndarray | None = None,
                     topk_ids: np.ndarray | None = None, topk_probs: np.ndarray | None = None,
                     anchor_layers: Sequence[str] = ("encoder.2", "encoder.4"),
                     log: Callable[[str], None] = print) -> dict:
    """The audio tower's carve plan (JSON-able, `plan["report"]` included); see the module docstring.

    Args:
        snapshot_dir: the teacher snapshot (its converted stock model in `<snapshot_dir>/hf`).
        transcripts_token_ids: the teacher's transcript ids on the train split (original ids, any shape).
        decoder_layers: teacher decoder layers kept, in order; None = first and last (distil-whisper).
        vocab_mass: share of the train token mass the kept vocabulary covers, in (0, 1].
        max_seconds: encoder window in seconds (the teacher's is 30).
        prior_ids: also keep every id below this (0: train coverage only).
        heldout_token_ids: transcript ids of a held-out split, for the coverage report.
        topk_ids, topk_probs: optional teacher next-token top-k (N, k) on the train split (adds its mass).
    """
    ids = np.asarray(transcripts_token_ids, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        raise ValueError("tower 'audio' carve transcripts_token_ids: no train transcript token (empty train split?)")
    if not isinstance(prior_ids, int) or prior_ids < 0:
        raise ValueError(f"tower 'audio' carve prior_ids: must be an int >= 0, got {prior_ids!r}")
    tk_ids = np.zeros((0, 1), dtype=np.int64) if topk_ids is None else np.asarray(topk_ids)
    tk_p = np.zeros((0, 1)) if topk_probs is None else np.asarray(topk_probs)
    plan = plan_whisper_carve(Path(snapshot_dir) / "hf", transcript_ids=ids, topk_ids=tk_ids, topk_probs=tk_p,
                              decoder_layers=decoder_layers, vocab_mass=vocab_mass, max_seconds=max_seconds,
                              anchor_layers=anchor_layers, log=log)
    n_teacher = int(plan["teacher_vocab"])
    from_train = len(plan["vocab"])
    if prior_ids:
        plan["vocab"] = sorted(set(plan["vocab"]) | set(range(min(prior_ids, n_teacher))))
    vocab = np.asarray(plan["vocab"], dtype=np.int64)
    rep = plan["report"]
    d = int(plan["hf_config"]["d_model"])
    rep["student_params"] += (len(vocab) - from_train) * d  # the added embedding rows (tied output)
    rep["param_fraction"] = rep["student_params"] / rep["teacher_params"]
    rep.update(vocab_kept=len(vocab), vocab_from_train=from_train, vocab_prior_ids=int(prior_ids),
               fallback=len(vocab), train_transcript_coverage=float(np.isin(ids, vocab).mean()))
    if heldout_token_ids is not None:
        held = np.asarray(heldout_token_ids, dtype=np.int64).reshape(-1)
        rep["heldout_transcript_coverage"] = float(np.isin(held, vocab).mean()) if held.size else None
    log(f"[audio carve] vocabulary {len(vocab)}/{n_teacher} ({from_train} from train mass {vocab_mass}, ids < "
        f"{prior_ids}); held-out coverage {rep.get('heldout_transcript_coverage')}")
    return plan


def carved_audio_state(cfg, snapshot_dir: Path) -> dict[str, torch.Tensor]:
    """StudentTower state-dict entries ("backbone.encoder.*", "heads.<asr>.decoder.*") of a carved audio
    tower config (`carve_whisper.carved_whisper_config`) from the teacher snapshot's weights."""
    if cfg.init != "carved" or cfg.carve.get("family") != "whisper":
        raise ValueError(f"tower {cfg.name!r}: init {cfg.init!r}, carve family {cfg.carve.get('family')!r}: "
                         "not a carved Whisper tower")
    return carved_whisper_state(cfg.carve, Path(snapshot_dir) / "hf")


DEFAULT_PRIOR_IDS = 16384


def plan_audio_carve_from_artifacts(snapshot_dir: Path, entry: Path, *, log=print, prior_ids: int = DEFAULT_PRIOR_IDS,
                                    unspoken_rows: Collection[str] = (), **settings) -> dict:
    """`plan_audio_carve` on the teacher's snapshot and its cached transcripts / top-k: train split for the
    vocabulary, held-out split for the coverage report only.

    unspoken_rows: clips that speak no sentence (recorded syllables): Whisper's transcripts of them are
    guesses, and their tokens would widen the vocabulary with nothing a real transcript needs."""
    from nexus_assets.core.feature_store import column_matrix, read_features

    unspoken = set(unspoken_rows)

    def rows(split: str) -> set:
        items = read_features(Path(entry), "items", columns=["row_id"], filter_splits=[split])
        return set(items.column("row_id").to_pylist()) - unspoken

    train, held = rows("train"), rows("heldout")
    if unspoken:
        log(f"[audio carve] {len(unspoken)} clips without a spoken sentence left out of the vocabulary")
    tok = read_features(Path(entry), "tokens", columns=["row_id", "token_id", "topk_ids", "topk_logits", "logsumexp"])
    row_ids = tok.column("row_id").to_pylist()
    sel = np.fromiter((r in train for r in row_ids), dtype=bool, count=tok.num_rows)
    sel_held = np.fromiter((r in held for r in row_ids), dtype=bool, count=tok.num_rows)
    token_ids = tok.column("token_id").to_numpy()
    lse = tok.column("logsumexp").to_numpy()[sel]
    probs = np.exp(column_matrix(tok.column("topk_logits"))[sel].astype(np.float64) - lse[:, None])
    plan = plan_audio_carve(snapshot_dir, transcripts_token_ids=token_ids[sel], heldout_token_ids=token_ids[sel_held],
                            topk_ids=column_matrix(tok.column("topk_ids"))[sel], topk_probs=probs,
                            prior_ids=prior_ids, log=log, **settings)
    plan["report"]["unspoken_rows_left_out"] = len(unspoken)
    return plan
