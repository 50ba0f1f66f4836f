"""Validation metrics: pure numpy functions, each tested on data with a known answer.

Retention (see data/retention_contracts.yaml) is student score / teacher score on the same held-out rows,
both scored against the ground truth where one exists; the teacher's score comes from its cached
features. Where only the teacher defines the answer (image classes), retention IS the agreement with
the teacher. No function here compares a thing with itself: retrieval and EER skip the diagonal (i, i).

Per-item forms (`*_per_item`, `pair_*`) exist so `bootstrap_ci` can resample items and recompute the
same statistic.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

import numpy as np

__all__ = [
    "next_token_hits", "transcripts_agree", "perplexity", "rankdata", "spearman", "recall_at_1_hits", "pairwise_upper",
    "eer", "speaker_pairs", "word_errors", "normalize_transcript", "wer", "topk_agreement",
    "retention", "bootstrap_ci", "ratio_of_sums",
]


# ---------------------------------------------------------------------------------------------------
# Language modelling
# ---------------------------------------------------------------------------------------------------


def next_token_hits(pred_ids: np.ndarray, next_ids: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Top-1 hits against the true next token.

    Args:
        pred_ids: (T,) argmax of the logits at each position (position t predicts token t+1).
        next_ids: (T,) the true token at t+1 (anything where `valid` is False).
        valid: (T,) bool, True where a next token exists.

    Returns (n_valid,) bool.
    """
    pred_ids, next_ids, valid = np.asarray(pred_ids), np.asarray(next_ids), np.asarray(valid, bool)
    return (pred_ids == next_ids)[valid]


def trimmed_vocabulary_positions(token_ids: np.ndarray, kept: np.ndarray, window: int = 8,
                                 read_as_itself: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Classes of the positions of one row by what a trimmed vocabulary hides there, to split a next-token
    score by them: a student that reads a dropped input token as its nearest kept one, and cannot name a
    dropped next token, loses most where these hold.

    Args:
        token_ids: (T,) the row's token ids in the teacher's vocabulary.
        kept: (V,) bool, True for ids the student's vocabulary keeps.
        window: how many input tokens back (the current one included) `recent_input_dropped` looks.
        read_as_itself: (V,) bool, True for ids the student READS as themselves (kept ids, and dropped ids
            with an input row of their own); None = `kept`. The two input classes use it, `next_dropped` `kept`.

    Returns:
        (T,) bool masks, position t predicting token t + 1 (the last position has no next token: False in
        `next_dropped`): `input_dropped` (token t is dropped), `recent_input_dropped` (one of tokens
        t - window + 1 .. t is), `next_dropped` (token t + 1 is).
    """
    ids = np.asarray(token_ids)
    if ids.ndim != 1:
        raise ValueError(f"token_ids: expected (T,), got shape {ids.shape}")
    if window < 1:
        raise ValueError(f"window: must be >= 1, got {window}")
    dropped = ~np.asarray(kept, dtype=bool)[ids]  # (T,)
    misread = dropped if read_as_itself is None else ~np.asarray(read_as_itself, dtype=bool)[ids]  # (T,)
    recent = np.convolve(misread.astype(np.int64), np.ones(window, dtype=np.int64))[:len(ids)] > 0
    nxt = np.zeros_like(dropped)
    nxt[:-1] = dropped[1:]
    return {"input_dropped": misread, "recent_input_dropped": recent, "next_dropped": nxt}


def perplexity(logprobs: np.ndarray) -> float:
    """exp(-mean log p) over per-token log-probs of the true next tokens (natural log)."""
    lp = np.asarray(logprobs, dtype=np.float64)
    if lp.size == 0:
        raise ValueError("perplexity: no tokens")
    return float(np.exp(-lp.mean()))


# ---------------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------------


def rankdata(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (scipy.stats.rankdata 'average')."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(x.size, dtype=np.float64)
    xs = x[order]
    i = 0
    while i < x.size:
        j = i
        while j + 1 < x.size and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation: Pearson correlation of the (tie-averaged) ranks."""
    x, y = np.asarray(x).ravel(), np.asarray(y).ravel()
    if x.size != y.size or x.size < 2:
        raise ValueError(f"spearman: need two equal-length arrays of >= 2 values, got {x.size} and {y.size}")
    rx, ry = rankdata(x) - (x.size + 1) / 2, rankdata(y) - (y.size + 1) / 2
    den = np.sqrt((rx**2).sum() * (ry**2).sum())
    if den == 0:
        raise ValueError("spearman: a constant input has no rank correlation")
    return float((rx * ry).sum() / den)


def _unit(emb: np.ndarray) -> np.ndarray:
    e = np.asarray(emb, dtype=np.float64)
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def pairwise_upper(emb: np.ndarray) -> np.ndarray:
    """Cosine similarity of every pair i < j (never i with itself): (N, D) -> (N*(N-1)/2,)."""
    u = _unit(emb)
    i, j = np.triu_indices(u.shape[0], k=1)
    return (u @ u.T)[i, j]


def recall_at_1_hits(emb: np.ndarray, groups: Sequence) -> np.ndarray:
    """Per query, whether its nearest OTHER row (cosine) is in its group.

    Args:
        emb: (N, D) embeddings.
        groups: (N,) group labels (e.g. the source document of each passage).

    Returns (Q,) bool for the Q queries whose group has at least one other member (a query with no
    possible right answer is not counted). The row itself is excluded from its own neighbours.
    """
    groups = np.asarray(groups)
    sim = _unit(emb) @ _unit(emb).T  # (N, N)
    np.fill_diagonal(sim, -np.inf)
    same = groups[:, None] == groups[None, :]
    np.fill_diagonal(same, False)
    has_pos = same.any(1)
    nn = sim.argmax(1)
    return (groups[nn] == groups)[has_pos]


# ---------------------------------------------------------------------------------------------------
# Speaker verification
# ---------------------------------------------------------------------------------------------------


def speaker_pairs(emb: np.ndarray, speakers: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Cosine scores and same-speaker labels of every pair i < j: ((P,), (P,) bool)."""
    speakers = np.asarray(speakers)
    i, j = np.triu_indices(len(speakers), k=1)
    return pairwise_upper(emb), speakers[i] == speakers[j]


def eer(scores: np.ndarray, same: np.ndarray) -> float:
    """Equal error rate of a verification score (higher = more likely the same speaker).

    Sweeps every threshold; FAR = share of different pairs accepted (score >= thr), FRR = share of
    same pairs rejected. Returns the mean of FAR and FRR where |FAR - FRR| is smallest (the usual
    discrete approximation). 0 = perfectly separated, 0.5 = chance.
    """
    scores, same = np.asarray(scores, np.float64), np.asarray(same, bool)
    n_pos, n_neg = int(same.sum()), int((~same).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"eer: needs same and different pairs, got {n_pos} same and {n_neg} different")
    # Accepting the top k scores for every k at which the score changes is the same sweep as every
    # threshold, in O(P log P) (bootstrap_ci calls this a thousand times).
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], same[order]
    tp = np.concatenate([[0], np.cumsum(y)])  # (P+1,) same pairs accepted when the top k are accepted
    fp = np.concatenate([[0], np.cumsum(~y)])
    cut = np.concatenate([[True], s[1:] != s[:-1], [True]])  # k valid only where no tie is split
    far, frr = fp[cut] / n_neg, 1.0 - tp[cut] / n_pos
    k = int(np.argmin(np.abs(far - frr)))
    return float((far[k] + frr[k]) / 2)


# ---------------------------------------------------------------------------------------------------
# Speech recognition
# ---------------------------------------------------------------------------------------------------


def normalize_transcript(text: str) -> str:
    """Lowercase, drop punctuation except in-word apostrophes, collapse spaces (probe transcripts are
    lowercase plain words; Whisper writes case and punctuation)."""
    t = text.lower().replace("’", "'")
    t = re.sub(r"[^a-z0-9' ]+", " ", t)
    t = re.sub(r"(?<![a-z0-9])'|'(?![a-z0-9])", " ", t)
    return " ".join(t.split())


def word_errors(ref: str, hyp: str) -> tuple[int, int]:
    """(substitutions + deletions + insertions, reference words) by word-level Levenshtein."""
    r, h = ref.split(), hyp.split()
    prev = list(range(len(h) + 1))
    for i in range(1, len(r) + 1):
        cur = [i] + [0] * len(h)
        for j in range(1, len(h) + 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r[i - 1] != h[j - 1]))
        prev = cur
    return prev[-1], len(r)


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus WER: total word errors / total reference words (can exceed 1 with many insertions)."""
    if len(refs) != len(hyps):
        raise ValueError(f"wer: {len(refs)} references but {len(hyps)} hypotheses")
    e = np.array([word_errors(r, h) for r, h in zip(refs, hyps)]).reshape(-1, 2)
    if e[:, 1].sum() == 0:
        raise ValueError("wer: the references have no words")
    return float(e[:, 0].sum() / e[:, 1].sum())


def transcripts_agree(refs: Sequence[str], hyps: Sequence[str], max_wer: float) -> tuple[np.ndarray, np.ndarray]:
    """Per utterance, whether the teacher's transcript `hyp` is within `max_wer` word error rate of the
    sentence that was spoken (both normalised): distil-whisper's pseudo-label filter, which keeps the
    student from learning the teacher's mistakes. Returns (keep (N,) bool, wer (N,) float64); an
    utterance whose reference has no words (a recording of unknown content) is left out: its pseudo-label
    cannot be checked; its WER is NaN."""
    if len(refs) != len(hyps):
        raise ValueError(f"transcripts_agree: {len(refs)} references but {len(hyps)} hypotheses")
    if not (isinstance(max_wer, (int, float)) and not isinstance(max_wer, bool) and max_wer >= 0):
        raise ValueError(f"transcripts_agree: max_wer must be a number >= 0, got {max_wer!r}")
    rates = np.full(len(refs), np.nan)
    for i, (r, h) in enumerate(zip(refs, hyps)):
        errors, words = word_errors(normalize_transcript(r or ""), normalize_transcript(h or ""))
        if words:
            rates[i] = errors / words
    return rates <= max_wer, rates


# ---------------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------------


def topk_agreement(student_logits: np.ndarray, teacher_top1: np.ndarray, k: int = 1) -> np.ndarray:
    """Per item, whether the teacher's top-1 class is among the student's top-k: (N, C), (N,) -> (N,) bool."""
    s = np.asarray(student_logits)
    top = np.argpartition(-s, kth=min(k, s.shape[1]) - 1, axis=1)[:, :k]  # (N, k), unordered
    return (top == np.asarray(teacher_top1)[:, None]).any(1)


# ---------------------------------------------------------------------------------------------------
# Retention and confidence intervals
# ---------------------------------------------------------------------------------------------------


def retention(student_score: float, teacher_score: float) -> float | None:
    """student / teacher; None when the teacher scores <= 0 (the ratio would mean nothing)."""
    if teacher_score is None or not np.isfinite(teacher_score) or teacher_score <= 0:
        return None
    return float(student_score / teacher_score)


def ratio_of_sums(num: np.ndarray, den: np.ndarray) -> float:
    d = float(np.sum(den))
    return float(np.sum(num) / d) if d > 0 else float("nan")


def bootstrap_ci(data: np.ndarray | Sequence[np.ndarray], stat_fn: Callable[..., float], n: int = 1000,
                 seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of `stat_fn` over items.

    Args:
        data: one array, or a tuple of arrays sharing their first axis (paired: every resample takes the
            same item indices from each, so student and teacher stay matched row by row).
        stat_fn: called as stat_fn(*resampled_arrays) -> float. Non-finite results (e.g. a resample
            whose denominator is 0) are dropped.
        n: resamples. seed: numpy Generator seed, so the CI is reproducible.

    Returns (low, high) at `level` (default the 95% interval: 2.5th and 97.5th percentiles).
    """
    arrays = (data,) if isinstance(data, np.ndarray) else tuple(np.asarray(a) for a in data)
    m = len(arrays[0])
    if any(len(a) != m for a in arrays):
        raise ValueError(f"bootstrap_ci: arrays differ in length {[len(a) for a in arrays]}")
    if m == 0:
        raise ValueError("bootstrap_ci: no items")
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n):
        idx = rng.integers(0, m, m)
        v = stat_fn(*(a[idx] for a in arrays))
        if v is not None and np.isfinite(v):
            stats.append(v)
    if not stats:
        return float("nan"), float("nan")
    a = (1 - level) / 2
    lo, hi = np.quantile(np.asarray(stats), [a, 1 - a])
    return float(lo), float(hi)
