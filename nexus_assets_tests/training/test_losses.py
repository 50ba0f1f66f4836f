"""Tests for nexus_assets.training.losses: each loss against a reference (torch's kl_div, full softmaxes)
or a hand-computed value, plus its invariances and its shape errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from nexus_assets.training.losses import (
    anchoring_loss,
    cosine_embedding_loss,
    gram_loss,
    lwf_loss,
    neighbour_kd_loss,
    next_token_ce_loss,
    router_balance_loss,
    router_entropy,
    sequence_kd_loss,
    token_state_loss,
    topk_kd_loss,
    weighted_sum,
)


def _cache(teacher_logits: torch.Tensor, k: int):
    """What the teacher-feature cache holds for full teacher logits (N, V): top-k ids, logits, logsumexp."""
    values, ids = teacher_logits.topk(k, dim=-1)
    return ids, values, teacher_logits.logsumexp(dim=-1)


def _full_kl(student_logits, teacher_logits, temperature):
    """Reference: T^2 * KL(softmax(t/T) || softmax(s/T)), mean over rows, via torch's kl_div."""
    return (
        F.kl_div(
            F.log_softmax(student_logits / temperature, dim=-1),
            F.softmax(teacher_logits / temperature, dim=-1),
            reduction="batchmean",
        )
        * temperature**2
    )


# ---------------------------------------------------------------- topk_kd_loss


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_topk_kd_full_vocab_matches_kl_div(temperature):
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 11) * 3, torch.randn(6, 11) * 3
    loss = topk_kd_loss(student, *_cache(teacher, k=11), temperature=temperature)
    assert_close(loss, _full_kl(student, teacher, temperature))


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
def test_topk_kd_single_token_tail_is_exact(temperature):
    # With k = V-1 the tail bucket is one real token, so tempering it as one token is exact.
    torch.manual_seed(1)
    student, teacher = torch.randn(5, 9) * 2, torch.randn(5, 9) * 2
    loss = topk_kd_loss(student, *_cache(teacher, k=8), temperature=temperature)
    assert_close(loss, _full_kl(student, teacher, temperature))


def test_topk_kd_at_t1_equals_kl_of_bucketed_full_distributions():
    torch.manual_seed(2)
    n, v, k = 4, 20, 5
    student, teacher = torch.randn(n, v) * 2, torch.randn(n, v) * 2
    ids, values, lse = _cache(teacher, k)
    p, q = F.softmax(teacher, -1), F.softmax(student, -1)
    in_topk = torch.zeros(n, v, dtype=torch.bool).scatter(1, ids, True)
    p_b = torch.cat([p.gather(1, ids), (p * ~in_topk).sum(-1, keepdim=True)], -1)  # (n, k+1)
    q_b = torch.cat([q.gather(1, ids), (q * ~in_topk).sum(-1, keepdim=True)], -1)
    expected = (p_b * (p_b.log() - q_b.log())).sum(-1).mean()
    assert_close(topk_kd_loss(student, ids, values, lse, temperature=1.0), expected)
    # and it is a lower bound on the full-vocab KL (data-processing inequality)
    assert expected <= _full_kl(student, teacher, 1.0)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_kd_zero_when_student_equals_teacher(temperature):
    torch.manual_seed(3)
    teacher = torch.randn(7, 30) * 4
    loss = topk_kd_loss(teacher.clone(), *_cache(teacher, k=4), temperature=temperature)
    assert_close(loss, torch.tensor(0.0), atol=1e-6, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_kd_positive_when_student_differs(temperature):
    torch.manual_seed(4)
    teacher = torch.randn(7, 30) * 4
    student = teacher + torch.randn(7, 30)
    assert topk_kd_loss(student, *_cache(teacher, k=4), temperature=temperature) > 1e-3


def test_topk_kd_mask_ignores_masked_rows_even_if_garbage():
    torch.manual_seed(5)
    student, teacher = torch.randn(6, 12), torch.randn(6, 12)
    ids, values, lse = _cache(teacher, k=3)
    mask = torch.tensor([True, False, True, True, False, True])
    expected = topk_kd_loss(student[mask], ids[mask], values[mask], lse[mask], temperature=2.0)
    ids[~mask] = -1  # padding rows hold anything
    values[~mask] = float("nan")
    lse[~mask] = 0.0
    assert_close(topk_kd_loss(student, ids, values, lse, temperature=2.0, mask=mask), expected)


def test_topk_kd_all_masked_is_zero_and_backward_works():
    student = torch.randn(3, 8, requires_grad=True)
    ids, values, lse = _cache(torch.randn(3, 8), k=2)
    loss = topk_kd_loss(student, ids, values, lse, temperature=1.0, mask=torch.zeros(3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(student.grad, torch.zeros(3, 8))


@pytest.mark.parametrize("k", [3, 10])
def test_topk_kd_gradient(k):
    torch.manual_seed(6)
    teacher = torch.randn(4, 10, dtype=torch.float64)
    student = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    ids, values, lse = _cache(teacher, k)
    assert torch.autograd.gradcheck(lambda s: topk_kd_loss(s, ids, values, lse, temperature=2.0), (student,))
    loss = topk_kd_loss(student, ids, values, lse, temperature=2.0)
    loss.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_kd_reverse_matches_kl_div_the_other_way(temperature):
    torch.manual_seed(8)
    student, teacher = torch.randn(6, 11) * 3, torch.randn(6, 11) * 3
    loss = topk_kd_loss(student, *_cache(teacher, k=11), temperature=temperature, reverse=True)
    expected = F.kl_div(F.log_softmax(teacher / temperature, -1), F.softmax(student / temperature, -1),
                        reduction="batchmean") * temperature**2  # KL(q || p)
    assert_close(loss, expected)


@pytest.mark.parametrize("reverse", [False, True])
def test_topk_kd_skew_against_the_mixture_by_hand(reverse):
    torch.manual_seed(9)
    student, teacher = torch.randn(5, 9) * 2, torch.randn(5, 9) * 2
    p, q = F.softmax(teacher, -1), F.softmax(student, -1)
    a = 0.1
    first, second = (q, p) if reverse else (p, q)
    expected = (first * (first.log() - (a * first + (1 - a) * second).log())).sum(-1).mean()
    got = topk_kd_loss(student, *_cache(teacher, k=9), temperature=1.0, reverse=reverse, skew=a)
    assert_close(got, expected)
    # convexity: KL(f || a f + (1 - a) s) <= (1 - a) KL(f || s), so skewing never raises the loss
    plain = topk_kd_loss(student, *_cache(teacher, k=9), temperature=1.0, reverse=reverse)
    assert got <= (1 - a) * plain + 1e-6
    assert_close(topk_kd_loss(teacher.clone(), *_cache(teacher, k=3), temperature=1.0, reverse=reverse, skew=a),
                 torch.tensor(0.0), atol=1e-6, rtol=0)


def test_topk_kd_reverse_skew_gradient_with_a_tail():
    torch.manual_seed(10)
    teacher = torch.randn(4, 10, dtype=torch.float64)
    student = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    ids, values, lse = _cache(teacher, 3)
    assert torch.autograd.gradcheck(
        lambda s: topk_kd_loss(s, ids, values, lse, temperature=2.0, reverse=True, skew=0.1), (student,))
    for bad in (1.0, -0.5, float("nan")):  # refused on the forward path too, not only where skew is applied
        with pytest.raises(ValueError, match="skew"):
            topk_kd_loss(student, ids, values, lse, temperature=1.0, skew=bad)


def test_train_config_refuses_an_unknown_divergence_or_skew():
    from nexus_assets.training.config import TrainConfig

    with pytest.raises(ValueError, match="kd_divergence"):
        TrainConfig(kd_divergence="js")
    for bad in (1.0, -0.1, float("nan"), True):
        with pytest.raises(ValueError, match="kd_skew"):
            TrainConfig(kd_skew=bad)


def test_topk_kd_bfloat16_student_is_computed_in_float32():
    torch.manual_seed(7)
    student, teacher = torch.randn(4, 16), torch.randn(4, 16)
    cache = _cache(teacher, k=4)
    loss16 = topk_kd_loss(student.bfloat16(), *cache, temperature=1.0)
    assert loss16.dtype == torch.float32
    assert_close(loss16, topk_kd_loss(student.bfloat16().float(), *cache, temperature=1.0))


def _topk_args(n=3, v=8, k=2):
    ids, values, lse = _cache(torch.randn(n, v), k)
    return dict(
        student_logits=torch.randn(n, v),
        teacher_topk_ids=ids,
        teacher_topk_logits=values,
        teacher_logsumexp=lse,
        temperature=1.0,
        mask=None,
    )


@pytest.mark.parametrize(
    "name, bad",
    [
        ("student_logits", torch.randn(3, 8, 1)),
        ("teacher_topk_ids", torch.zeros(4, 2, dtype=torch.long)),
        ("teacher_topk_ids", torch.zeros(3, 2)),  # float ids
        ("teacher_topk_ids", torch.arange(9).repeat(3, 1)),  # k > V
        ("teacher_topk_logits", torch.randn(3, 3)),
        ("teacher_logsumexp", torch.randn(3, 1)),
        ("mask", torch.ones(4, dtype=torch.bool)),
        ("mask", torch.ones(3)),  # not bool
        ("temperature", 0.0),
        ("temperature", float("nan")),
    ],
)
def test_topk_kd_rejects_bad_arguments_naming_them(name, bad):
    args = _topk_args()
    args[name] = bad
    with pytest.raises(ValueError, match=name):
        topk_kd_loss(**args)


def test_topk_kd_rejects_out_of_range_and_repeated_ids():
    args = _topk_args()
    args["teacher_topk_ids"] = torch.tensor([[0, 8]] * 3)
    with pytest.raises(ValueError, match=r"teacher_topk_ids must lie in \[0, V=8\)"):
        topk_kd_loss(**args)
    args["teacher_topk_ids"] = torch.tensor([[1, 1]] * 3)
    with pytest.raises(ValueError, match="distinct"):
        topk_kd_loss(**args)


def test_topk_kd_rejects_logsumexp_inconsistent_with_topk():
    args = _topk_args()
    args["teacher_logsumexp"] = args["teacher_logsumexp"] - 1.0  # top-k mass would be e times too large
    with pytest.raises(ValueError, match="teacher_logsumexp are inconsistent"):
        topk_kd_loss(**args)


# ---------------------------------------------------------------- sequence_kd_loss


def test_sequence_kd_flattens_tokens_and_masks():
    torch.manual_seed(8)
    b, t, v, k = 2, 5, 13, 4
    student, teacher = torch.randn(b, t, v), torch.randn(b, t, v)
    values, ids = teacher.topk(k, dim=-1)  # (B, T, k)
    lse = teacher.logsumexp(dim=-1)  # (B, T)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    loss = sequence_kd_loss(student, ids, values, lse, temperature=2.0, mask=mask)
    assert loss.shape == ()
    flat = topk_kd_loss(
        student.reshape(-1, v), ids.reshape(-1, k), values.reshape(-1, k), lse.reshape(-1), 2.0, mask.reshape(-1)
    )
    assert_close(loss, flat)
    # mean over the 7 counted tokens, not over sequences
    per_token = [
        topk_kd_loss(student[i, j : j + 1], ids[i, j : j + 1], values[i, j : j + 1], lse[i, j : j + 1], 2.0)
        for i in range(b)
        for j in range(t)
        if mask[i, j]
    ]
    assert_close(loss, torch.stack(per_token).mean())


@pytest.mark.parametrize(
    "name, bad",
    [
        ("student_logits", torch.randn(2, 5 * 13)),
        ("teacher_topk_ids", torch.zeros(2, 4, 3, dtype=torch.long)),
        ("teacher_topk_logits", torch.randn(2, 5, 2)),
        ("teacher_logsumexp", torch.randn(10)),
        ("mask", torch.ones(10, dtype=torch.bool)),
    ],
)
def test_sequence_kd_rejects_bad_shapes_naming_them(name, bad):
    teacher = torch.randn(2, 5, 13)
    values, ids = teacher.topk(3, dim=-1)
    args = dict(
        student_logits=torch.randn(2, 5, 13),
        teacher_topk_ids=ids,
        teacher_topk_logits=values,
        teacher_logsumexp=teacher.logsumexp(-1),
        temperature=1.0,
        mask=torch.ones(2, 5, dtype=torch.bool),
    )
    args[name] = bad
    with pytest.raises(ValueError, match=name):
        sequence_kd_loss(**args)


# ---------------------------------------------------------------- anchoring_loss


def _orthonormal_rows(r, h, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(h, h, generator=g))
    return q[:, :r].T.contiguous()  # (r, h)


@pytest.mark.parametrize("with_importance", [False, True])
def test_anchoring_zero_when_projection_matches_teacher(with_importance):
    torch.manual_seed(9)
    proj = nn.Linear(5, 8)
    student = torch.randn(4, 5)
    teacher = proj(student).detach()
    importance = torch.rand(8) if with_importance else None
    loss = anchoring_loss(student, proj, teacher, torch.randn(8), _orthonormal_rows(3, 8, 0), importance)
    assert_close(loss, torch.tensor(0.0), atol=1e-7, rtol=0)


@pytest.mark.parametrize("with_importance", [False, True])
def test_anchoring_ignores_teacher_differences_orthogonal_to_subspace(with_importance):
    torch.manual_seed(10)
    ht, r = 8, 3
    basis = _orthonormal_rows(ht, ht, 1)  # (8, 8) orthonormal
    comps, orth = basis[:r], basis[r:]  # orth rows are orthogonal to every component
    student, teacher = torch.randn(4, 6), torch.randn(4, ht)
    proj = torch.randn(6, ht)
    importance = torch.rand(ht) if with_importance else None
    mean = torch.randn(ht)
    base = anchoring_loss(student, proj, teacher, mean, comps, importance)
    shifted = teacher + 5.0 * torch.randn(4, ht - r) @ orth  # (4, 8), each row orthogonal to comps
    assert_close(anchoring_loss(student, proj, shifted, mean, comps, importance), base)
    # while a shift inside the subspace does change it
    assert not torch.allclose(anchoring_loss(student, proj, teacher + comps[0], mean, comps, importance), base)


def test_anchoring_hand_values_2d():
    identity = torch.eye(2)
    # one component (0.6, 0.8), mean (1, 1): scores 1.2 and 0.8, squared difference 0.16
    loss = anchoring_loss(
        torch.tensor([[3.0, 1.0]]), identity, torch.tensor([[1.0, 2.0]]), torch.ones(2), torch.tensor([[0.6, 0.8]])
    )
    assert_close(loss, torch.tensor(0.16))
    # axis components, importance (3, 1) -> weights (1.5, 0.5); squared diffs (1, 4) -> mean(1.5, 2.0)
    s, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    assert_close(anchoring_loss(s, identity, t, torch.zeros(2), torch.eye(2)), torch.tensor(2.5))
    assert_close(anchoring_loss(s, identity, t, torch.zeros(2), torch.eye(2), torch.tensor([3.0, 1.0])), torch.tensor(1.75))
    # rotated components, importance (1, 0): w = (0.36, 0.64) / 0.5 = (0.72, 1.28);
    # s - t = (1, 0) -> scores (0.6, -0.8) -> squared (0.36, 0.64) -> mean(0.2592, 0.8192) = 0.5392
    rotated = torch.tensor([[0.6, 0.8], [-0.8, 0.6]])
    loss = anchoring_loss(torch.tensor([[1.0, 0.0]]), identity, torch.zeros(1, 2), torch.zeros(2), rotated, torch.tensor([1.0, 0.0]))
    assert_close(loss, torch.tensor(0.5392))


def test_anchoring_tensor_projection_is_student_at_matrix():
    torch.manual_seed(11)
    lin = nn.Linear(5, 8, bias=False)
    student, teacher = torch.randn(3, 5), torch.randn(3, 8)
    comps, mean = _orthonormal_rows(4, 8, 2), torch.randn(8)
    assert_close(
        anchoring_loss(student, lin.weight.T, teacher, mean, comps),
        anchoring_loss(student, lin, teacher, mean, comps),
    )


def test_anchoring_gradient_reaches_projection():
    lin = nn.Linear(5, 8)
    loss = anchoring_loss(torch.randn(3, 5), lin, torch.randn(3, 8), torch.zeros(8), _orthonormal_rows(2, 8, 3))
    loss.backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "name, bad",
    [
        ("student_hidden", torch.randn(3)),
        ("teacher_hidden", torch.randn(4, 8)),
        ("pca_mean", torch.randn(7)),
        ("pca_components", torch.randn(2, 7)),
        ("projection", torch.randn(8, 5)),
        ("projection", nn.Linear(5, 7)),
        ("importance", torch.randn(7).abs()),
        ("importance", -torch.ones(8)),
    ],
)
def test_anchoring_rejects_bad_arguments_naming_them(name, bad):
    args = dict(
        student_hidden=torch.randn(3, 5),
        projection=torch.randn(5, 8),
        teacher_hidden=torch.randn(3, 8),
        pca_mean=torch.zeros(8),
        pca_components=_orthonormal_rows(2, 8, 4),
        importance=torch.ones(8),
    )
    args[name] = bad
    with pytest.raises(ValueError, match=name):
        anchoring_loss(**args)


# ---------------------------------------------------------------- gram_loss


def test_gram_zero_for_rotated_and_scaled_teacher():
    torch.manual_seed(12)
    teacher = torch.randn(6, 5)
    student = teacher @ _orthonormal_rows(5, 5, 5) * 3.0
    assert_close(gram_loss(student, teacher), torch.tensor(0.0), atol=1e-6, rtol=0)


def test_gram_zero_across_widths():
    torch.manual_seed(13)
    teacher = torch.randn(6, 4)
    student = torch.cat([teacher, torch.zeros(6, 3)], dim=1)  # (6, 7): same geometry, wider
    assert_close(gram_loss(student, teacher), torch.tensor(0.0), atol=1e-6, rtol=0)


def test_gram_positive_for_shuffled_batch():
    torch.manual_seed(14)
    teacher = torch.randn(6, 5)
    assert gram_loss(teacher[torch.tensor([1, 0, 3, 2, 5, 4])], teacher) > 1e-3


def test_gram_hand_value_b2():
    # student rows orthogonal (cos 0), teacher rows at 45 degrees (cos 1/sqrt 2):
    # two off-diagonal entries, each (0 - 1/sqrt2)^2 = 0.5
    loss = gram_loss(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]))
    assert_close(loss, torch.tensor(0.5))


# ---------------------------------------------------------------- neighbour_kd_loss


def test_neighbour_kd_zero_when_the_student_is_the_teacher_up_to_scale():
    g = torch.Generator().manual_seed(0)
    teacher, bank = torch.randn(5, 8, generator=g), torch.randn(30, 8, generator=g)
    assert_close(neighbour_kd_loss(3.0 * teacher, teacher, bank, 0.05), torch.tensor(0.0), atol=1e-6, rtol=0)


def test_neighbour_kd_hand_value():
    # one row, bank of two unit vectors; teacher cosines (1/sqrt2, 1/sqrt2), student cosines (1, 0), T = 1:
    # p_t = (1/2, 1/2), p_s = softmax(1, 0); KL = sum p_t (log p_t - log p_s)
    teacher, student = torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    log_ps = torch.log_softmax(torch.tensor([1.0, 0.0]), 0)
    expected = 0.5 * (math.log(0.5) - log_ps[0]) + 0.5 * (math.log(0.5) - log_ps[1])
    assert_close(neighbour_kd_loss(student, teacher, bank, 1.0), expected.float())


def test_neighbour_kd_leaves_the_row_itself_out_of_the_bank():
    g = torch.Generator().manual_seed(1)
    teacher, student, bank = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g), torch.randn(20, 6, generator=g)
    with_self = neighbour_kd_loss(student, teacher, torch.cat([bank, teacher]), 0.1)
    # row b's own teacher vector is masked for row b only; the other rows' vectors stay in its bank, so compare
    # row by row against a bank holding the other rows but not itself
    per_row = [neighbour_kd_loss(student[b:b + 1], teacher[b:b + 1], torch.cat([bank, teacher[torch.arange(4) != b]]), 0.1)
               for b in range(4)]
    assert_close(with_self, torch.stack(per_row).mean())


def test_neighbour_kd_ranks_the_nearest_neighbours_not_the_far_ones():
    """Swapping the student's two nearest bank neighbours costs more than swapping two far ones."""
    bank = torch.eye(4)
    teacher = torch.tensor([[0.9, 0.6, 0.1, 0.0]])
    near_swap = torch.tensor([[0.6, 0.9, 0.1, 0.0]])
    far_swap = torch.tensor([[0.9, 0.6, 0.0, 0.1]])
    assert neighbour_kd_loss(near_swap, teacher, bank, 0.05) > 10 * neighbour_kd_loss(far_swap, teacher, bank, 0.05)


def test_neighbour_kd_gradient_reaches_the_student_only():
    student = torch.randn(3, 5, requires_grad=True)
    bank = torch.randn(10, 5, requires_grad=True)
    neighbour_kd_loss(student, torch.randn(3, 5), bank, 0.05).backward()
    assert student.grad is not None and float(student.grad.abs().sum()) > 0
    assert bank.grad is None


@pytest.mark.parametrize("student, teacher, bank, match", [
    (torch.randn(4), torch.randn(4), torch.randn(5, 4), "student"),
    (torch.randn(2, 4), torch.randn(3, 4), torch.randn(5, 4), "teacher"),
    (torch.randn(2, 4), torch.randn(2, 4), torch.randn(5, 3), "bank"),
    (torch.randn(2, 4), torch.randn(2, 4), torch.randn(1, 4), "bank"),
])
def test_neighbour_kd_rejects_bad_shapes(student, teacher, bank, match):
    with pytest.raises(ValueError, match=match):
        neighbour_kd_loss(student, teacher, bank, 0.05)


def test_neighbour_kd_needs_a_bank_beyond_the_row_itself():
    t = torch.randn(1, 4)
    with pytest.raises(ValueError, match="bank"):
        neighbour_kd_loss(torch.randn(1, 4), t, torch.cat([t, 2 * t]), 0.05)
    with pytest.raises(ValueError, match="temperature"):
        neighbour_kd_loss(torch.randn(1, 4), t, torch.randn(3, 4), 0.0)


@pytest.mark.parametrize(
    "student, teacher, name",
    [
        (torch.randn(4), torch.randn(4, 3), "student"),
        (torch.randn(1, 3), torch.randn(1, 3), "student"),
        (torch.randn(4, 3), torch.randn(5, 3), "teacher"),
    ],
)
def test_gram_rejects_bad_shapes(student, teacher, name):
    with pytest.raises(ValueError, match=name):
        gram_loss(student, teacher)


# ---------------------------------------------------------------- cosine_embedding_loss


@pytest.mark.parametrize(
    "teacher, expected",
    [
        (torch.tensor([[2.0, 0.0], [0.0, 0.5]]), 0.0),  # same directions
        (torch.tensor([[0.0, 3.0], [1.0, 0.0]]), 1.0),  # orthogonal
        (torch.tensor([[-1.0, 0.0], [0.0, -7.0]]), 2.0),  # opposite
    ],
)
def test_cosine_embedding_known_angles(teacher, expected):
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert_close(cosine_embedding_loss(student, teacher), torch.tensor(expected))


def test_cosine_embedding_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="teacher"):
        cosine_embedding_loss(torch.randn(3, 4), torch.randn(3, 5))


# ---------------------------------------------------------------- lwf_loss


def _heads():
    torch.manual_seed(15)
    old = {"caption": torch.randn(2, 5, 10), "embed": torch.randn(4, 6)}
    kinds = {"caption": "logits", "embed": "embedding", "new_skill": "logits"}
    return old, kinds


def test_lwf_zero_when_heads_unchanged():
    old, kinds = _heads()
    new = {name: t.clone() for name, t in old.items()}
    new["new_skill"] = torch.randn(4, 3)  # the new capability's own head is not read
    assert_close(lwf_loss(new, old, kinds, temperature=2.0), torch.tensor(0.0), atol=1e-6, rtol=0)


def test_lwf_logits_head_matches_kl_reference_and_averages_heads():
    old, kinds = _heads()
    new = {"caption": old["caption"] + torch.randn(2, 5, 10), "embed": old["embed"].clone()}
    rows_new, rows_old = new["caption"].reshape(-1, 10), old["caption"].reshape(-1, 10)
    expected_caption = _full_kl(rows_new, rows_old, 2.0)
    assert expected_caption > 0
    assert_close(lwf_loss(new, old, kinds, temperature=2.0), expected_caption / 2, atol=1e-6, rtol=1e-5)


def test_lwf_positive_when_embedding_head_changes():
    old, kinds = _heads()
    new = {"caption": old["caption"].clone(), "embed": -old["embed"]}
    assert_close(lwf_loss(new, old, kinds, temperature=1.0), torch.tensor(1.0))  # (0 + 2) / 2


def test_lwf_gradient_flows_to_new_outputs_only():
    old, kinds = _heads()
    new = {name: (t + 0.3 * torch.randn_like(t)).requires_grad_() for name, t in old.items()}
    lwf_loss(new, old, kinds, temperature=2.0).backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in new.values())


def test_lwf_unknown_kind_names_the_head():
    old, kinds = _heads()
    kinds["embed"] = "regression"
    with pytest.raises(ValueError, match="'embed'.*regression"):
        lwf_loss(dict(old), old, kinds, temperature=1.0)


@pytest.mark.parametrize("drop_from", ["new", "kinds"])
def test_lwf_missing_head_names_it(drop_from):
    old, kinds = _heads()
    new = dict(old)
    (new if drop_from == "new" else kinds).pop("embed")
    with pytest.raises(ValueError, match="'embed'"):
        lwf_loss(new, old, kinds, temperature=1.0)


def test_lwf_shape_mismatch_names_the_head():
    old, kinds = _heads()
    new = dict(old, caption=torch.randn(2, 5, 11))
    with pytest.raises(ValueError, match=r"new_outputs\['caption'\]"):
        lwf_loss(new, old, kinds, temperature=1.0)


# ---------------------------------------------------------------- router losses


def test_router_balance_is_one_for_uniform_and_balanced_routing():
    assert_close(router_balance_loss(torch.zeros(8, 4)), torch.tensor(1.0))
    confident_but_balanced = 50.0 * torch.eye(4).repeat(2, 1)  # (8, 4): each expert gets 2 samples
    assert_close(router_balance_loss(confident_but_balanced), torch.tensor(1.0))


def test_router_balance_is_e_for_collapsed_routing():
    collapsed = torch.zeros(8, 4)
    collapsed[:, 2] = 50.0
    assert_close(router_balance_loss(collapsed), torch.tensor(4.0))


def test_router_balance_between_bounds_and_differentiable():
    torch.manual_seed(16)
    logits = torch.randn(16, 5, requires_grad=True)
    loss = router_balance_loss(logits)
    assert 1.0 < loss.item() < 5.0
    loss.backward()
    assert logits.grad.abs().sum() > 0


def test_router_entropy_known_values():
    assert_close(router_entropy(torch.zeros(3, 6)), torch.tensor(math.log(6)))
    assert_close(router_entropy(100.0 * torch.eye(3)), torch.tensor(0.0), atol=1e-6, rtol=0)
    # a disabled expert: p = (0.5, 0.5, 0) -> log 2, with a finite gradient
    logits = torch.tensor([[0.0, 1e-3, -float("inf")]], requires_grad=True)
    entropy = router_entropy(logits)
    assert_close(entropy, torch.tensor(math.log(2)))
    entropy.backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("fn", [router_balance_loss, router_entropy])
def test_router_rejects_bad_shape(fn):
    with pytest.raises(ValueError, match="router_logits"):
        fn(torch.zeros(4))


# ---------------------------------------------------------------- weighted_sum


def test_weighted_sum_value_and_logged_floats():
    a = torch.tensor(2.0, requires_grad=True)
    total, values = weighted_sum({"kd": a, "anchor": torch.tensor(3.0)}, {"kd": 0.5, "anchor": 2.0})
    assert_close(total, torch.tensor(7.0))
    assert values == {"kd": 2.0, "anchor": 3.0}
    total.backward()
    assert a.grad.item() == 0.5


def test_weighted_sum_weight_for_missing_loss_names_it():
    with pytest.raises(ValueError, match="'gram'"):
        weighted_sum({"kd": torch.tensor(1.0)}, {"kd": 1.0, "gram": 0.1})


def test_weighted_sum_loss_without_weight_names_it():
    with pytest.raises(ValueError, match="'gram'"):
        weighted_sum({"kd": torch.tensor(1.0), "gram": torch.tensor(1.0)}, {"kd": 1.0})


@pytest.mark.parametrize(
    "losses, weights, match",
    [
        ({"kd": torch.tensor(1.0)}, {"kd": -1.0}, r"weights\['kd'\]"),
        ({"kd": torch.tensor(1.0)}, {"kd": float("inf")}, r"weights\['kd'\]"),
        ({"kd": torch.ones(2)}, {"kd": 1.0}, r"losses\['kd'\]"),
        ({}, {}, "losses is empty"),
    ],
)
def test_weighted_sum_rejects_bad_inputs(losses, weights, match):
    with pytest.raises(ValueError, match=match):
        weighted_sum(losses, weights)


def test_next_token_ce_counts_only_valid_positions():
    # two positions count: one-hot-ish logits make the answer known: -log softmax at the target
    logits = torch.full((1, 3, 4), 0.0)
    logits[0, 0, 2] = math.log(3.0)  # p(2) = 3 / 6 = 0.5
    logits[0, 1, 1] = 5.0
    logits[0, 2] = torch.tensor([float("nan")] * 4)  # a masked position is never read
    targets = torch.tensor([[2, 0, 3]])
    valid = torch.tensor([[True, True, False]])
    want = (-math.log(0.5) + -(0.0 - math.log(3.0 + math.exp(5.0)))) / 2
    assert_close(next_token_ce_loss(logits, targets, valid), torch.tensor(want), rtol=1e-5, atol=1e-6)


def test_next_token_ce_none_valid_is_zero_with_a_graph_and_rejects_bad_shapes():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    loss = next_token_ce_loss(logits, torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.bool))
    assert float(loss.detach()) == 0.0
    loss.backward()
    with pytest.raises(ValueError, match="target_ids"):
        next_token_ce_loss(logits, torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool))


def test_task_losses_pass_the_configured_divergence_to_lm_heads():
    from nexus_assets.training.config import TrainConfig
    from nexus_assets.training.objective import task_losses

    torch.manual_seed(11)
    out, teacher = torch.randn(2, 5, 12), torch.randn(2, 5, 12)
    ids, values, lse = _cache(teacher.reshape(10, 12), 4)
    batch = {"c:mask": torch.ones(2, 5, dtype=torch.bool), "c:topk_ids": ids.reshape(2, 5, 4),
             "c:topk_logits": values.reshape(2, 5, 4), "c:logsumexp": lse.reshape(2, 5)}
    for div, skew in (("forward", 0.0), ("reverse", 0.0), ("reverse", 0.1), ("forward", 0.1)):
        tc = TrainConfig(kd_divergence=div, kd_skew=skew)
        got = task_losses("c", "lm", {"out": out}, batch, tc)["kd"]
        assert_close(got, sequence_kd_loss(out, batch["c:topk_ids"], batch["c:topk_logits"], batch["c:logsumexp"],
                                           tc.temperature, batch["c:mask"], reverse=div == "reverse", skew=skew))
    fwd = task_losses("c", "lm", {"out": out}, batch, TrainConfig())["kd"]
    rev = task_losses("c", "lm", {"out": out}, batch, TrainConfig(kd_divergence="reverse"))["kd"]
    assert not torch.allclose(fwd, rev)


# --- token_state_loss ---------------------------------------------------------------------------------

def _basis(h=6, r=3, seed=0):
    q, _ = torch.linalg.qr(torch.randn(h, h, generator=torch.Generator().manual_seed(seed)))
    return q[:, :r].T.contiguous()  # (r, H) orthonormal rows


def test_token_state_loss_is_zero_for_the_teachers_own_states_and_ignores_the_orthogonal_complement():
    comps, mean = _basis(), torch.randn(6)
    teacher = torch.randn(2, 4, 6)
    scores = (teacher - mean) @ comps.T
    mask = torch.ones(2, 4, dtype=torch.bool)
    var = torch.tensor([4.0, 1.0, 0.25])
    assert float(token_state_loss(teacher, scores, mean, comps, var, mask)) < 1e-10
    # a change outside the subspace costs nothing
    q = torch.linalg.qr(torch.cat([comps.T, torch.randn(6, 3)], 1))[0][:, 3:]  # (H, 3) orthogonal to comps
    moved = teacher + (torch.randn(2, 4, 3) @ q.T)
    assert float(token_state_loss(moved, scores, mean, comps, var, mask)) < 1e-10


def test_token_state_loss_weights_each_component_by_its_soft_whitened_variance():
    comps, mean = torch.eye(3, 6), torch.zeros(6)  # components = the first three axes
    student = torch.zeros(1, 2, 6)
    student[0, 0, :3] = torch.tensor([1.0, 2.0, 3.0])
    scores = torch.zeros(1, 2, 3)
    var = torch.tensor([4.0, 1.0, 1.0])  # mean 2: weights 1/6, 1/3, 1/3
    mask = torch.tensor([[True, False]])  # only the first token counts
    expected = (1.0 / 6 + 4.0 / 3 + 9.0 / 3) / 3
    assert float(token_state_loss(student, scores, mean, comps, var, mask)) == pytest.approx(expected)
    mask_both = torch.tensor([[True, True]])  # the second token is exact: the mean halves
    assert float(token_state_loss(student, scores, mean, comps, var, mask_both)) == pytest.approx(expected / 2)


def test_token_state_loss_carries_gradient_upcasts_and_is_zero_on_an_empty_mask():
    comps, mean = _basis(), torch.zeros(6)
    student = torch.randn(2, 4, 6, dtype=torch.bfloat16, requires_grad=True)
    scores = torch.randn(2, 4, 3).half()
    var = torch.ones(3)
    loss = token_state_loss(student, scores, mean, comps, var, torch.ones(2, 4, dtype=torch.bool))
    assert loss.dtype == torch.float32
    loss.backward()
    assert student.grad is not None and float(student.grad.abs().sum()) > 0
    empty = token_state_loss(student, scores, mean, comps, var, torch.zeros(2, 4, dtype=torch.bool))
    assert float(empty.detach()) == 0.0


def test_token_state_loss_leaves_out_attention_sink_tokens():
    comps, mean = torch.eye(3, 6), torch.zeros(6)
    var = torch.tensor([4.0, 1.0, 1.0])  # weights 1/6, 1/3, 1/3; a mean-predicting student costs (4/6+1/3+1/3)/3 = 4/9
    scores = torch.tensor([[[1.0, 0.5, -0.5], [0.0, 1.0, 1.0], [200.0, 0.0, 0.0]]])  # token 2: a massive activation
    student = torch.zeros(1, 3, 6)  # predicts the mean everywhere
    mask = torch.ones(1, 3, dtype=torch.bool)
    typical = [(1.0 / 6 + 0.25 / 3 + 0.25 / 3) / 3, (0.0 + 1.0 / 3 + 1.0 / 3) / 3]  # 0.111, 0.222: < 10 x 4/9
    assert float(token_state_loss(student, scores, mean, comps, var, mask)) == pytest.approx(sum(typical) / 2)
    # the sink's own cost, 200^2/6/3 = 2,222: kept only without the guard, where it is all the loss
    every = float(token_state_loss(student, scores, mean, comps, var, mask, sink_factor=None))
    assert every == pytest.approx((sum(typical) + 200.0**2 / 6 / 3) / 3)
    # the guard reads the teacher, not the student: a student that learnt the sink changes nothing
    learnt = student.clone()
    learnt[0, 2, 0] = 200.0
    assert float(token_state_loss(learnt, scores, mean, comps, var, mask)) == pytest.approx(sum(typical) / 2)
    with pytest.raises(ValueError, match="sink_factor"):
        token_state_loss(student, scores, mean, comps, var, mask, sink_factor=0.0)


@pytest.mark.parametrize("bad, match", [
    (dict(teacher_scores=torch.zeros(2, 4, 2)), "teacher_scores"),
    (dict(pca_mean=torch.zeros(5)), "pca_mean"),
    (dict(pca_variances=torch.zeros(3)), "pca_variances"),
    (dict(pca_variances=torch.tensor([1.0, -1.0, 1.0])), "pca_variances"),
    (dict(mask=torch.ones(2, 3, dtype=torch.bool)), "mask"),
])
def test_token_state_loss_rejects_bad_shapes_and_variances(bad, match):
    args = dict(student_states=torch.zeros(2, 4, 6), teacher_scores=torch.zeros(2, 4, 3), pca_mean=torch.zeros(6),
                pca_components=_basis(), pca_variances=torch.ones(3), mask=torch.ones(2, 4, dtype=torch.bool))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        token_state_loss(**args)
