"""Distillation losses for the NEXUS student, as small pure torch functions.

Nothing here imports dagster or the registry. Every function checks the shapes of its arguments and
raises ``ValueError`` naming the argument and its shape on a mismatch. Losses are computed in at
least float32 (half and bfloat16 inputs are upcast) and returned as 0-dim tensors that carry
gradient to the student inputs.

Run the tests with ``.venv/bin/python -m pytest nexus_assets_tests/core/test_losses.py``.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "topk_kd_loss",
    "sequence_kd_loss",
    "anchoring_loss",
    "token_state_loss",
    "gram_loss",
    "cosine_embedding_loss",
    "neighbour_kd_loss",
    "lwf_loss",
    "router_balance_loss",
    "router_entropy",
    "weighted_sum",
    "LWF_KINDS",
]

LWF_KINDS = ("logits", "embedding")
"""The head kinds `lwf_loss` knows: a KL for ``"logits"``, a cosine loss for ``"embedding"``."""

# How far the cached top-k mass may exceed 1 (in log space, i.e. about 1 %) before the cache is taken
# to be inconsistent with its logsumexp, rather than rounded (bf16/fp16 caches round by up to ~1 %).
_TOPK_MASS_LOG_TOLERANCE = 1e-2


def _shape_error(name: str, t: torch.Tensor, expected: str) -> ValueError:
    return ValueError(f"{name} must have shape {expected}, got {tuple(t.shape)}")


def _check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _f32(t: torch.Tensor) -> torch.Tensor:
    """Upcast half/bfloat16 to float32; float64 stays float64 (gradcheck runs in double)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _check_floating(name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _checked_topk_inputs(student_logits, teacher_topk_ids, teacher_topk_logits, teacher_logsumexp,
                         temperature, mask):
    """`topk_kd_loss`'s argument checks (see its Raises); returns the rows that count and (V, k)."""
    _check_temperature(temperature)
    if student_logits.ndim != 2:
        raise _shape_error("student_logits", student_logits, "(N, V)")
    _check_floating("student_logits", student_logits)
    n, v = student_logits.shape
    if teacher_topk_ids.ndim != 2 or teacher_topk_ids.shape[0] != n:
        raise _shape_error("teacher_topk_ids", teacher_topk_ids, f"(N, k) with N={n}")
    if teacher_topk_ids.dtype != torch.long:
        raise ValueError(f"teacher_topk_ids must have dtype torch.long, got {teacher_topk_ids.dtype}")
    k = teacher_topk_ids.shape[1]
    if not 1 <= k <= v:
        raise ValueError(f"teacher_topk_ids must have 1 <= k <= V={v}, got shape {tuple(teacher_topk_ids.shape)}")
    if teacher_topk_logits.shape != teacher_topk_ids.shape:
        raise _shape_error("teacher_topk_logits", teacher_topk_logits, f"(N, k)=({n}, {k})")
    _check_floating("teacher_topk_logits", teacher_topk_logits)
    if teacher_logsumexp.shape != (n,):
        raise _shape_error("teacher_logsumexp", teacher_logsumexp, f"(N,)=({n},)")
    _check_floating("teacher_logsumexp", teacher_logsumexp)
    if mask is not None:
        if mask.shape != (n,):
            raise _shape_error("mask", mask, f"(N,)=({n},)")
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must have dtype torch.bool, got {mask.dtype}")
        student_logits = student_logits[mask]
        teacher_topk_ids = teacher_topk_ids[mask]
        teacher_topk_logits = teacher_topk_logits[mask]
        teacher_logsumexp = teacher_logsumexp[mask]

    ids = teacher_topk_ids
    if ids.numel() > 0:
        if int(ids.min()) < 0 or int(ids.max()) >= v:
            raise ValueError(
                f"teacher_topk_ids must lie in [0, V={v}), got values in [{int(ids.min())}, {int(ids.max())}]"
            )
        sorted_ids = ids.sort(dim=-1).values
        if bool((sorted_ids[:, 1:] == sorted_ids[:, :-1]).any()):
            raise ValueError("teacher_topk_ids must be distinct within each row; found a repeated id")

    return student_logits, teacher_topk_ids, teacher_topk_logits, teacher_logsumexp, v, k


def topk_kd_loss(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logits: torch.Tensor,
    teacher_logsumexp: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None = None,
    reverse: bool = False,
    skew: float = 0.0,
) -> torch.Tensor:
    """Temperature-scaled KL(teacher || student) from a cached teacher top-k plus its tail mass.

    The cache holds, per row, the teacher's k largest logits at T=1 and the logsumexp of its full-vocab
    logits at T=1. Both distributions are coarsened to k+1 buckets: the k cached ids and one "tail"
    bucket holding every other id. Each bucket gets a bucket logit at T=1 that is exact:

    - teacher: the cached top-k logits, and ``lse + log(1 - sum_i exp(z_i - lse))`` for the tail, the
      log of the tail's exact probability mass times exp(lse);
    - student: its logits at the k cached ids, and the logsumexp of its logits over the other V-k ids.

    The temperature is then applied to the k+1 bucket logits, on both sides alike:
    ``p = softmax(teacher_buckets / T)``, ``q = softmax(student_buckets / T)``, and the loss is
    ``T**2 * sum_b p_b (log p_b - log q_b)`` (Hinton's T^2 keeps gradient size independent of T).

    Exactness: at T=1 this is exactly KL between the two true distributions coarsened to the k+1
    buckets (a lower bound on the full-vocab KL, equal to it when the student matches the teacher
    inside the tail up to scale). With k = V there is no tail bucket and the loss equals the full-vocab
    KL at any T. At T != 1 the tail is tempered as if it were one token. The teacher's true tempered
    tail needs the tail logits, which the cache does not hold, so this is an approximation; for T > 1
    it under-weights the tail relative to full-vocab tempering. The student tail is tempered the same
    way (not taken from a full-vocab student softmax at T), so the loss is exactly 0 when the
    student's logits equal the teacher's, at any T. Mixing a full-vocab student at T with a one-token
    teacher tail would leave the minimum away from student == teacher.

    Args:
        student_logits (torch.Tensor): student logits over the full vocabulary, shape (N, V).
        teacher_topk_ids (torch.Tensor): long ids of the teacher's top-k tokens, shape (N, k),
            1 <= k <= V, distinct within a row, each in [0, V).
        teacher_topk_logits (torch.Tensor): teacher logits at T=1 for those ids, shape (N, k).
        teacher_logsumexp (torch.Tensor): logsumexp of the teacher's full-vocab logits at T=1,
            shape (N,).
        temperature (float): softmax temperature T > 0, applied to both sides.
        mask (torch.Tensor | None): bool, shape (N,); True marks rows that count. Masked rows are not
            read beyond their shape, so padding may hold anything. None counts every row.
        reverse (bool): KL(student || teacher) on the same buckets instead (mode-seeking, as MiniLLM);
            a teacher bucket of probability 0 is read as log-probability -80 so the loss stays finite.
        skew (float): alpha in [0, 1) of DistiLLM's skew KL (Ko et al. 2024): the second argument of the
            KL is mixed with the first, KL(p || a p + (1 - a) q) (reverse: KL(q || a q + (1 - a) p)),
            which bounds the gradient where the student is far off. 0 = the plain KL.

    Returns:
        torch.Tensor: 0-dim loss, the mean over counted rows; 0 (still attached to the graph) when no
        row counts.

    No gradient flows to the teacher tensors (they are a cache).

    Raises:
        ValueError: on a shape or dtype mismatch, ids out of range or repeated within a row, or cached
            top-k probabilities that sum to more than 1 (beyond rounding) given the logsumexp.
    """
    if not (isinstance(skew, (int, float)) and 0.0 <= skew < 1.0):  # NaN fails too
        raise ValueError(f"skew: must be in [0, 1), got {skew!r}")
    student_logits, teacher_topk_ids, teacher_topk_logits, teacher_logsumexp, v, k = _checked_topk_inputs(
        student_logits, teacher_topk_ids, teacher_topk_logits, teacher_logsumexp, temperature, mask)
    ids = teacher_topk_ids
    s = _f32(student_logits)  # (n, V)
    z = _f32(teacher_topk_logits).detach()  # (n, k)
    lse = _f32(teacher_logsumexp).detach()  # (n,)
    s_topk = s.gather(1, ids)  # (n, k)
    if k < v:
        # log of the teacher's top-k mass at T=1; must be <= 0 up to rounding.
        log_topk_mass = torch.logsumexp(z, dim=-1) - lse  # (n,)
        if log_topk_mass.numel() > 0 and float(log_topk_mass.max()) > _TOPK_MASS_LOG_TOLERANCE:
            raise ValueError(
                "teacher_topk_logits and teacher_logsumexp are inconsistent: the cached top-k "
                f"probabilities sum to {math.exp(float(log_topk_mass.max())):.4f} > 1 in some row"
            )
        # log(1 - exp(d)) computed as log(-expm1(d)): accurate when the tail is tiny; -inf if it is empty.
        t_tail = lse + torch.log(-torch.expm1(log_topk_mass.clamp(max=0.0)))  # (n,)
        in_topk = torch.zeros_like(s, dtype=torch.bool).scatter(1, ids, True)  # (n, V)
        s_tail = s.masked_fill(in_topk, float("-inf")).logsumexp(dim=-1)  # (n,)
        teacher_buckets = torch.cat([z, t_tail[:, None]], dim=-1)  # (n, k+1)
        student_buckets = torch.cat([s_topk, s_tail[:, None]], dim=-1)  # (n, k+1)
    else:
        teacher_buckets, student_buckets = z, s_topk  # (n, V): every id is cached, no tail

    log_q = F.log_softmax(student_buckets / temperature, dim=-1)
    if reverse or skew > 0:
        return _kl_between_buckets(F.log_softmax(teacher_buckets / temperature, dim=-1), log_q, reverse, skew) \
            * (temperature**2)
    p = F.softmax(teacher_buckets / temperature, dim=-1)
    # xlogy gives 0 * log 0 = 0 for an empty teacher tail.
    kl = (torch.xlogy(p, p) - p * log_q).sum(dim=-1)  # (n,)
    return kl.sum() * (temperature**2) / max(kl.shape[0], 1)


def _kl_between_buckets(log_p: torch.Tensor, log_q: torch.Tensor, reverse: bool, skew: float) -> torch.Tensor:
    """Mean over rows of KL(p || a p + (1 - a) q), or with `reverse` KL(q || a q + (1 - a) p), from (n, b)
    log-probabilities (teacher p, student q); a = `skew`, checked in [0, 1) by `topk_kd_loss`."""
    log_p = log_p.clamp_min(-80.0)  # a teacher bucket of probability 0 (an empty tail) stays finite
    first, second = (log_q, log_p) if reverse else (log_p, log_q)
    mixed = second if skew == 0 else torch.logaddexp(first + math.log(skew), second + math.log1p(-skew))
    kl = (first.exp() * (first - mixed)).sum(dim=-1)  # (n,)
    return kl.sum() / max(kl.shape[0], 1)


def sequence_kd_loss(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logits: torch.Tensor,
    teacher_logsumexp: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None = None,
    reverse: bool = False,
    skew: float = 0.0,
) -> torch.Tensor:
    """`topk_kd_loss` over sequences: tokens are flattened and the loss is the mean over counted tokens.

    Every counted token weighs the same, so long sequences weigh more than short ones.

    Args:
        student_logits (torch.Tensor): shape (B, T, V).
        teacher_topk_ids (torch.Tensor): long, shape (B, T, k).
        teacher_topk_logits (torch.Tensor): shape (B, T, k).
        teacher_logsumexp (torch.Tensor): shape (B, T).
        temperature (float): softmax temperature > 0.
        mask (torch.Tensor | None): bool, shape (B, T); True marks tokens that count (e.g. not padding).

    Returns:
        torch.Tensor: 0-dim loss, the mean over counted tokens.
    """
    if student_logits.ndim != 3:
        raise _shape_error("student_logits", student_logits, "(B, T, V)")
    b, t, v = student_logits.shape
    if teacher_topk_ids.ndim != 3 or teacher_topk_ids.shape[:2] != (b, t):
        raise _shape_error("teacher_topk_ids", teacher_topk_ids, f"(B, T, k) with (B, T)=({b}, {t})")
    k = teacher_topk_ids.shape[2]
    if teacher_topk_logits.shape != (b, t, k):
        raise _shape_error("teacher_topk_logits", teacher_topk_logits, f"(B, T, k)=({b}, {t}, {k})")
    if teacher_logsumexp.shape != (b, t):
        raise _shape_error("teacher_logsumexp", teacher_logsumexp, f"(B, T)=({b}, {t})")
    if mask is not None and mask.shape != (b, t):
        raise _shape_error("mask", mask, f"(B, T)=({b}, {t})")
    return topk_kd_loss(
        student_logits.reshape(b * t, v),
        teacher_topk_ids.reshape(b * t, k),
        teacher_topk_logits.reshape(b * t, k),
        teacher_logsumexp.reshape(b * t),
        temperature,
        None if mask is None else mask.reshape(b * t),
        reverse,
        skew,
    )


def next_token_ce_loss(student_logits: torch.Tensor, target_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the student's logits (B, T, V) on the true next token ids (B, T) over the
    positions `valid` (B, T) marks; 0 (attached to the graph) when none counts. The hard-label term
    next to KD: the metric a text student is judged by is next-token accuracy on real text."""
    if student_logits.ndim != 3:
        raise _shape_error("student_logits", student_logits, "(B, T, V)")
    if target_ids.shape != student_logits.shape[:2] or valid.shape != student_logits.shape[:2]:
        raise ValueError(f"target_ids {tuple(target_ids.shape)} and valid {tuple(valid.shape)} must be "
                         f"(B, T) = {tuple(student_logits.shape[:2])}")
    if not bool(valid.any()):
        return student_logits.sum() * 0.0
    return F.cross_entropy(_f32(student_logits[valid]), target_ids[valid].long())


def anchoring_loss(
    student_hidden: torch.Tensor,
    projection: nn.Module | torch.Tensor,
    teacher_hidden: torch.Tensor,
    pca_mean: torch.Tensor,
    pca_components: torch.Tensor,
    importance: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted MSE between projected student and teacher hidden states inside the teacher's PCA subspace.

    Both sides are mapped to PCA scores, ``c = (h - pca_mean) @ pca_components.T`` (shape (B, r)), and
    the loss is ``mean_{b,i} w_i * (c_student[b, i] - c_teacher[b, i])**2``. Differences orthogonal to
    every component cost nothing. The mean cancels in the difference; it is subtracted so that the
    coordinates compared are the PCA scores themselves.

    Weights: without `importance`, w_i = 1. With it, coordinate i gets the importance mass its
    component carries, ``w_i = sum_j pca_components[i, j]**2 * importance[j]``, rescaled so that
    ``mean_i w_i = 1`` (so the loss scale does not depend on the importance scale). For orthonormal
    components and uniform importance every w_i is 1, the unweighted loss.

    Args:
        student_hidden (torch.Tensor): student hidden states, shape (B, Hs).
        projection (nn.Module | torch.Tensor): maps the student to teacher width. A module is called
            as ``projection(student_hidden)`` and must return (B, Ht). A tensor must have shape
            (Hs, Ht) and is applied as ``student_hidden @ projection`` (note: the transpose of an
            ``nn.Linear`` weight, which is (Ht, Hs)).
        teacher_hidden (torch.Tensor): teacher hidden states, shape (B, Ht).
        pca_mean (torch.Tensor): the teacher's PCA mean, shape (Ht,).
        pca_components (torch.Tensor): the protected subspace's components as rows, shape (r, Ht).
        importance (torch.Tensor | None): non-negative per-teacher-dimension importance, shape (Ht,).

    Returns:
        torch.Tensor: 0-dim loss.
    """
    if student_hidden.ndim != 2:
        raise _shape_error("student_hidden", student_hidden, "(B, Hs)")
    b, hs = student_hidden.shape
    if teacher_hidden.ndim != 2 or teacher_hidden.shape[0] != b:
        raise _shape_error("teacher_hidden", teacher_hidden, f"(B, Ht) with B={b}")
    ht = teacher_hidden.shape[1]
    if pca_mean.shape != (ht,):
        raise _shape_error("pca_mean", pca_mean, f"(Ht,)=({ht},)")
    if pca_components.ndim != 2 or pca_components.shape[1] != ht or pca_components.shape[0] == 0:
        raise _shape_error("pca_components", pca_components, f"(r, Ht) with r >= 1, Ht={ht}")
    if isinstance(projection, torch.Tensor):
        if projection.shape != (hs, ht):
            raise _shape_error("projection", projection, f"(Hs, Ht)=({hs}, {ht})")
        projected = student_hidden @ projection
    elif isinstance(projection, nn.Module):
        projected = projection(student_hidden)
    else:
        raise ValueError(f"projection must be an nn.Module or a torch.Tensor, got {type(projection).__name__}")
    if projected.shape != (b, ht):
        raise ValueError(
            f"projection(student_hidden) must have shape (B, Ht)=({b}, {ht}), got {tuple(projected.shape)}"
        )

    mean = _f32(pca_mean)
    comps = _f32(pca_components)  # (r, Ht)
    c_student = (_f32(projected) - mean) @ comps.T  # (B, r)
    c_teacher = (_f32(teacher_hidden) - mean) @ comps.T  # (B, r)
    sq = (c_student - c_teacher) ** 2  # (B, r)
    if importance is None:
        return sq.mean()
    if importance.shape != (ht,):
        raise _shape_error("importance", importance, f"(Ht,)=({ht},)")
    imp = _f32(importance)
    if not bool(torch.isfinite(imp).all()) or bool((imp < 0).any()):
        raise ValueError("importance must be finite and non-negative")
    w = (comps**2) @ imp  # (r,)
    if float(w.sum()) <= 0:
        raise ValueError("importance gives zero weight to every pca_components row")
    w = w / w.mean()
    return (sq * w).mean()


def token_state_loss(
    student_states: torch.Tensor,
    teacher_scores: torch.Tensor,
    pca_mean: torch.Tensor,
    pca_components: torch.Tensor,
    pca_variances: torch.Tensor,
    mask: torch.Tensor,
    sink_factor: float | None = 10.0,
) -> torch.Tensor:
    """Per-token intermediate-state distillation inside the teacher's PCA subspace (Minitron: a model cut
    deeply learns better from its teacher's intermediate states as well as its logits).

    A carved block keeps its teacher's width, so its residual stream lives in the teacher's basis and is
    compared directly (no projection). Scores ``c = (h - pca_mean) @ pca_components.T``; the teacher's are
    cached. Coordinate i weighs ``1 / (v_i + mean(v))``: a soft whitening, because a causal LM's residual
    stream puts most of its variance in a few "massive activation" directions (up to 60% in one here),
    which a plain MSE would spend every step on; the ``mean(v)`` term keeps the smallest components from
    being weighted up as noise. Loss = mean over masked tokens of ``mean_i w_i (c_s - c_t)_i ** 2``; it is
    ``mean_i v_i / (v_i + mean(v))`` (< 1) for a student that always predicts the mean.

    Attention sinks are left out: a token whose teacher scores cost more than ``sink_factor`` times that
    mean-predictor value (``mean_i w_i c_t,i ** 2``) carries a "massive activation", as each row's first token
    does. SmolLM2 puts one on the second token of ~1.5% of rows, 400-2,000x a typical token's size (after
    layer 21; the bulk stays under 5x); a batch holding one was all that loss, and the carved tower's
    training diverged on them at rank 32 (6 rollbacks by step 557). None keeps every token.

    Args:
        student_states (torch.Tensor): (B, T, H) student hidden states at the matched depth.
        teacher_scores (torch.Tensor): (B, T, r) the teacher's cached PCA scores there.
        pca_mean (torch.Tensor): (H,). pca_components (torch.Tensor): (r, H), rows orthonormal.
        pca_variances (torch.Tensor): (r,) non-negative variance of each component (not all zero).
        mask (torch.Tensor): (B, T) bool, the tokens that count.
        sink_factor (float | None): > 0, or None; see above.

    Returns:
        torch.Tensor: 0-dim loss (0 when no token counts).
    """
    if sink_factor is not None and not sink_factor > 0:
        raise ValueError(f"sink_factor must be > 0 or None, got {sink_factor!r}")
    if student_states.ndim != 3:
        raise _shape_error("student_states", student_states, "(B, T, H)")
    b, t, h = student_states.shape
    if pca_mean.shape != (h,):
        raise _shape_error("pca_mean", pca_mean, f"(H,)=({h},)")
    if pca_components.ndim != 2 or pca_components.shape[1] != h or pca_components.shape[0] == 0:
        raise _shape_error("pca_components", pca_components, f"(r, H) with r >= 1, H={h}")
    r = pca_components.shape[0]
    if teacher_scores.shape != (b, t, r):
        raise _shape_error("teacher_scores", teacher_scores, f"(B, T, r)=({b}, {t}, {r})")
    if pca_variances.shape != (r,):
        raise _shape_error("pca_variances", pca_variances, f"(r,)=({r},)")
    if mask.shape != (b, t):
        raise _shape_error("mask", mask, f"(B, T)=({b}, {t})")
    var = _f32(pca_variances)
    if not bool(torch.isfinite(var).all()) or bool((var < 0).any()) or float(var.sum()) <= 0:
        raise ValueError("pca_variances must be finite, non-negative and not all zero")
    weight = 1.0 / (var + var.mean())
    keep = mask.bool()
    if sink_factor is not None:
        size = (_f32(teacher_scores) ** 2 * weight).mean(-1)  # (B, T)
        keep = keep & (size <= sink_factor * (var * weight).mean())
    if not bool(keep.any()):
        return student_states.sum() * 0.0
    scores = (_f32(student_states[keep]) - _f32(pca_mean)) @ _f32(pca_components).T  # (N, r)
    diff = scores - _f32(teacher_scores[keep])
    return (diff**2 * weight).mean()


def gram_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Relational loss: MSE between the batch cosine-similarity Gram matrices of student and teacher.

    ``G = normalize(x) @ normalize(x).T`` (B, B) for each side; the loss is the mean of
    ``(G_student - G_teacher)**2`` over the B*(B-1) off-diagonal entries. The diagonal is excluded: it
    is 1 on both sides for any non-zero row, so including it would only shrink the loss by a
    B-dependent factor. Invariant to a rotation or positive rescaling of either side. A zero row has
    cosine 0 with every other row.

    Args:
        student (torch.Tensor): student features, shape (B, Ds), B >= 2.
        teacher (torch.Tensor): teacher features, shape (B, Dt); Dt may differ from Ds.

    Returns:
        torch.Tensor: 0-dim loss.
    """
    if student.ndim != 2 or student.shape[0] < 2:
        raise _shape_error("student", student, "(B, Ds) with B >= 2")
    b = student.shape[0]
    if teacher.ndim != 2 or teacher.shape[0] != b:
        raise _shape_error("teacher", teacher, f"(B, Dt) with B={b}")
    s = F.normalize(_f32(student), dim=-1)
    t = F.normalize(_f32(teacher), dim=-1)
    diff = s @ s.T - t @ t.T  # (B, B)
    off_diagonal = ~torch.eye(b, dtype=torch.bool, device=diff.device)
    return (diff[off_diagonal] ** 2).mean()


def cosine_embedding_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``1 - cos(student_b, teacher_b)``: 0 aligned, 1 orthogonal, 2 opposite.

    Args:
        student (torch.Tensor): shape (B, D).
        teacher (torch.Tensor): shape (B, D).

    Returns:
        torch.Tensor: 0-dim loss in [0, 2].
    """
    if student.ndim != 2:
        raise _shape_error("student", student, "(B, D)")
    if teacher.shape != student.shape:
        raise _shape_error("teacher", teacher, f"(B, D)={tuple(student.shape)}")
    cos = F.cosine_similarity(_f32(student), _f32(teacher), dim=-1)  # (B,)
    return (1.0 - cos).mean()


def neighbour_kd_loss(student: torch.Tensor, teacher: torch.Tensor, bank: torch.Tensor, temperature: float,
                      self_cosine: float = 1.0 - 1e-6) -> torch.Tensor:
    """KL(teacher || student) of each row's softmax over its cosines to a fixed bank of teacher embeddings.

    Retrieval asks which other passage is NEAREST, a ranking that a cosine loss of ~0.1 per row (or a
    Gram loss over 8 rows) can leave scrambled. Scoring student and teacher rows against the same many
    teacher anchors at a low temperature (CompRess, Abbasi Koohpayegani et al. 2020, its "1q" form) puts
    the weight on each row's nearest neighbours. Bank entries whose cosine with the teacher row is
    >= `self_cosine` (the row itself, or an identical text) are left out of both softmaxes: the row's
    own position is what the cosine loss is for.

    Args:
        student (torch.Tensor): (B, D) student embeddings, in the teacher's space.
        teacher (torch.Tensor): (B, D) teacher embeddings of the same rows.
        bank (torch.Tensor): (M, D) teacher embeddings (the training rows'), M >= 2; no gradient.
        temperature (float): softmax temperature on cosines (> 0; 0.05 is SimCSE's).
        self_cosine (float): bank entries at least this close to the teacher row are masked.

    Returns:
        torch.Tensor: 0-dim loss, mean over the B rows; 0 when the student ranks the bank as the teacher does.
    """
    _check_temperature(temperature)
    if student.ndim != 2:
        raise _shape_error("student", student, "(B, D)")
    if teacher.shape != student.shape:
        raise _shape_error("teacher", teacher, f"(B, D)={tuple(student.shape)}")
    if bank.ndim != 2 or bank.shape[1] != student.shape[1] or bank.shape[0] < 2:
        raise _shape_error("bank", bank, f"(M, D) with M >= 2, D={student.shape[1]}")
    b = F.normalize(_f32(bank).detach(), dim=-1)
    ct = F.normalize(_f32(teacher), dim=-1) @ b.T  # (B, M)
    cs = F.normalize(_f32(student), dim=-1) @ b.T  # (B, M)
    masked = ct >= self_cosine
    if bool(masked.all(1).any()):
        raise ValueError("bank: every entry is the teacher row itself for some row; the bank needs other rows")
    ct, cs = ct.masked_fill(masked, -math.inf), cs.masked_fill(masked, -math.inf)
    log_pt = F.log_softmax(ct / temperature, dim=-1)
    log_ps = F.log_softmax(cs / temperature, dim=-1)
    kl = torch.where(masked, torch.zeros_like(log_pt), log_pt.exp() * (log_pt - log_ps))  # (B, M)
    return kl.sum(-1).mean()


def lwf_loss(
    new_outputs: Mapping[str, torch.Tensor],
    old_outputs: Mapping[str, torch.Tensor],
    kinds: Mapping[str, str],
    temperature: float,
) -> torch.Tensor:
    """Learning without Forgetting (Li & Hoiem, 2016): keep a tower's existing heads where they were.

    While a new capability's adapter trains, the tower's existing heads are run on the new data and
    compared with their outputs recorded before training (`old_outputs`, treated as constants). Each
    head in `old_outputs` contributes:

    - ``"logits"``: ``T**2 * KL(softmax(old / T) || softmax(new / T))`` over the last dim, mean over
      all leading positions;
    - ``"embedding"``: `cosine_embedding_loss` over the last dim, mean over all leading positions.

    The result is the unweighted mean over those heads. Heads in `new_outputs` that are not in
    `old_outputs` (the new capability's own head) are not read.

    Args:
        new_outputs (Mapping[str, torch.Tensor]): head name -> current output, shape (..., C).
        old_outputs (Mapping[str, torch.Tensor]): head name -> recorded output, same shape as the new.
        kinds (Mapping[str, str]): head name -> ``"logits"`` or ``"embedding"``; must cover every head
            of `old_outputs`; every entry must be a known kind.
        temperature (float): softmax temperature > 0 for logits heads.

    Returns:
        torch.Tensor: 0-dim loss.
    """
    _check_temperature(temperature)
    for head, kind in kinds.items():
        if kind not in LWF_KINDS:
            raise ValueError(f"kinds[{head!r}] = {kind!r} is not a known head kind; expected one of {LWF_KINDS}")
    if not old_outputs:
        raise ValueError("old_outputs is empty: no existing head to preserve")
    per_head = []
    for head, old in old_outputs.items():
        if head not in new_outputs:
            raise ValueError(f"new_outputs has no head {head!r}, which old_outputs records")
        if head not in kinds:
            raise ValueError(f"kinds has no entry for head {head!r}")
        new = new_outputs[head]
        if new.shape != old.shape or new.ndim < 1:
            raise ValueError(
                f"new_outputs[{head!r}] has shape {tuple(new.shape)} but old_outputs[{head!r}] has "
                f"{tuple(old.shape)}; both must be the same (..., C)"
            )
        new_rows = _f32(new.reshape(-1, new.shape[-1]))  # (rows, C)
        old_rows = _f32(old.reshape(-1, old.shape[-1])).detach()  # (rows, C)
        if kinds[head] == "logits":
            kl = F.kl_div(
                F.log_softmax(new_rows / temperature, dim=-1),
                F.log_softmax(old_rows / temperature, dim=-1),
                reduction="batchmean",
                log_target=True,
            )
            per_head.append(kl * temperature**2)
        else:
            per_head.append(cosine_embedding_loss(new_rows, old_rows))
    return torch.stack(per_head).mean()


def router_balance_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer load-balance loss with soft assignment fractions.

    With ``P_e = mean_b softmax(router_logits)[b, e]`` the mean routing probability of expert e, the
    Switch form ``E * sum_e f_e * P_e`` is used with the soft fraction ``f_e = P_e`` (the hard argmax
    fraction has no gradient), giving ``E * sum_e P_e**2``. It is 1 exactly when routing is balanced
    across the batch (every P_e = 1/E, whether each sample is uniform or confident), never below 1,
    and E when every sample goes to one expert.

    Args:
        router_logits (torch.Tensor): shape (B, E), E >= 1.

    Returns:
        torch.Tensor: 0-dim loss in [1, E].
    """
    if router_logits.ndim != 2 or router_logits.shape[0] == 0 or router_logits.shape[1] == 0:
        raise _shape_error("router_logits", router_logits, "(B, E) with B, E >= 1")
    e = router_logits.shape[1]
    mean_prob = F.softmax(_f32(router_logits), dim=-1).mean(dim=0)  # (E,)
    return e * (mean_prob**2).sum()


def router_entropy(router_logits: torch.Tensor) -> torch.Tensor:
    """Mean over samples of the routing distribution's entropy (nats): log E for uniform, 0 for one-hot.

    Args:
        router_logits (torch.Tensor): shape (B, E); a -inf logit (a disabled expert) counts as p = 0.

    Returns:
        torch.Tensor: 0-dim entropy in [0, log E].
    """
    if router_logits.ndim != 2 or router_logits.shape[0] == 0 or router_logits.shape[1] == 0:
        raise _shape_error("router_logits", router_logits, "(B, E) with B, E >= 1")
    log_p = F.log_softmax(_f32(router_logits), dim=-1)  # (B, E)
    p = log_p.exp()
    # 0 * log 0 = 0 for experts masked with a -inf logit (and a finite gradient there).
    return -(p * log_p.masked_fill(p == 0, 0.0)).sum(dim=-1).mean()


def weighted_sum(
    losses: Mapping[str, torch.Tensor], weights: Mapping[str, float]
) -> tuple[torch.Tensor, dict[str, float]]:
    """Combine named 0-dim losses (several teachers, several objectives) as ``sum_name w * loss``.

    `losses` and `weights` must have the same names: a weight without a loss is a misspelt or missing
    loss, and a loss without a weight would be silently dropped. Give weight 0.0 to log a loss without
    training on it.

    Args:
        losses (Mapping[str, torch.Tensor]): name -> 0-dim loss.
        weights (Mapping[str, float]): name -> finite weight >= 0.

    Returns:
        tuple[torch.Tensor, dict[str, float]]: the 0-dim weighted total, and each loss's unweighted
        value as a float (for logging).
    """
    if not losses:
        raise ValueError("losses is empty")
    for name in weights:
        if name not in losses:
            raise ValueError(f"weights has {name!r} but losses has no loss {name!r}; losses: {sorted(losses)}")
    for name in losses:
        if name not in weights:
            raise ValueError(f"losses has {name!r} but weights has no weight for it; weights: {sorted(weights)}")
    total = None
    values: dict[str, float] = {}
    for name, loss in losses.items():
        if loss.ndim != 0:
            raise ValueError(f"losses[{name!r}] must be a 0-dim tensor, got shape {tuple(loss.shape)}")
        w = weights[name]
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
            raise ValueError(f"weights[{name!r}] must be a finite number >= 0, got {w!r}")
        term = loss * w
        total = term if total is None else total + term
        values[name] = float(loss.detach())
    return total, values
