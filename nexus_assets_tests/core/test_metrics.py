"""Metrics on data with a known answer (hand-computed, or scipy where it is installed)."""
from __future__ import annotations

import numpy as np
import pytest

from nexus_assets.core import metrics as M


def test_next_token_hits_and_accuracy():
    pred = np.array([5, 7, 9, 1])
    nxt = np.array([5, 8, 9, -1])
    valid = np.array([True, True, True, False])  # the last position has no next token
    hits = M.next_token_hits(pred, nxt, valid)
    assert hits.tolist() == [True, False, True]
    assert hits.mean() == pytest.approx(2 / 3)


def test_perplexity_known():
    assert M.perplexity(np.log([0.5, 0.5, 0.5])) == pytest.approx(2.0)
    assert M.perplexity(np.log([0.25, 1.0])) == pytest.approx(2.0)  # exp(-(log .25)/2) = 2
    with pytest.raises(ValueError):
        M.perplexity(np.array([]))


@pytest.mark.parametrize("x,y,rho", [
    ([1, 2, 3, 4, 5], [5, 6, 7, 8, 7], 0.8207826816681233),  # hand: ranks of y = 1,2,3.5,5,3.5
    ([1, 2, 3], [3, 2, 1], -1.0),
    ([1, 2, 3, 4], [1, 4, 9, 16], 1.0),  # monotone, not linear
])
def test_spearman_hand(x, y, rho):
    assert M.spearman(np.array(x), np.array(y)) == pytest.approx(rho)


def test_rankdata_ties():
    assert M.rankdata(np.array([10, 20, 20, 5])).tolist() == [2.0, 3.5, 3.5, 1.0]


def test_spearman_vs_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    y = x + rng.normal(size=200)
    y[:20] = np.round(y[:20])  # some ties
    assert M.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)


def test_recall_at_1_known():
    emb = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.7, 0.7]], dtype=float)
    groups = ["a", "a", "b", "b", "c"]  # "c" has no other member: not a query
    hits = M.recall_at_1_hits(emb, groups)
    assert hits.tolist() == [True, True, True, True]
    hits = M.recall_at_1_hits(emb, ["a", "b", "a", "b", "c"])  # nearest neighbours are now wrong
    assert hits.tolist() == [False, False, False, False]


def test_recall_never_matches_self():
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]])  # each "a" is nearer to "b" than to the other "a"
    assert M.recall_at_1_hits(emb, ["a", "a", "b"]).tolist() == [False, False]


def test_eer_known():
    same = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
    assert M.eer(np.array([.9, .8, .7, .6, .4, .3, .2, .1]), same) == 0.0
    assert M.eer(np.array([.1, .2, .3, .4, .6, .7, .8, .9]), same) == 1.0
    # one impostor above one target: FAR = FRR = 1/4 at threshold 0.65
    assert M.eer(np.array([.9, .8, .7, .5, .65, .3, .2, .1]), same) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="different"):
        M.eer(np.array([.5, .6]), np.array([True, True]))


def test_speaker_pairs_skip_self():
    s, same = M.speaker_pairs(np.eye(3), ["x", "x", "y"])
    assert s.shape == (3,) and same.tolist() == [True, False, False]


@pytest.mark.parametrize("ref,hyp,errors", [
    ("the cat sat", "the cat sat", 0),
    ("the cat sat", "the bat sat", 1),  # substitution
    ("the cat sat", "the sat", 1),  # deletion
    ("the cat sat", "the cat sat down", 1),  # insertion
    ("a b c d", "", 4),
    ("kitten sitting", "sitting kitten on", 2),  # insert "sitting", substitute sitting -> on
])
def test_word_errors(ref, hyp, errors):
    assert M.word_errors(ref, hyp) == (errors, len(ref.split()))


def test_wer_corpus_and_normalisation():
    assert M.normalize_transcript(" Hello, World! It's  fine.") == "hello world it's fine"
    assert M.wer(["a b c d", "e f"], ["a b c d", "x"]) == pytest.approx(2 / 6)


def test_topk_agreement():
    logits = np.array([[0.1, 0.9, 0.5, 0.0], [3.0, 2.0, 1.0, 0.0]])
    assert M.topk_agreement(logits, np.array([1, 2]), k=1).tolist() == [True, False]
    assert M.topk_agreement(logits, np.array([1, 2]), k=3).tolist() == [True, True]


def test_retention():
    assert M.retention(0.45, 0.5) == pytest.approx(0.9)
    assert M.retention(0.4, 0.0) is None


def test_bootstrap_ci_mean_covers_and_is_reproducible():
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 1.0, size=400)
    lo, hi = M.bootstrap_ci(x, np.mean, n=500, seed=0)
    assert lo < 3.0 < hi and hi - lo < 0.3  # se ~0.05: width ~0.2
    assert (lo, hi) == M.bootstrap_ci(x, np.mean, n=500, seed=0)


def test_bootstrap_ci_paired_ratio():
    s = np.array([1, 0, 1, 1, 0, 1, 1, 1] * 20, float)
    t = np.ones_like(s)
    lo, hi = M.bootstrap_ci((s, t), M.ratio_of_sums, n=300, seed=0)
    assert lo <= s.mean() <= hi
    lo, hi = M.bootstrap_ci((t, t), M.ratio_of_sums, n=50, seed=0)  # identical pairs: no spread
    assert lo == hi == 1.0


def test_eer_sort_sweep_equals_brute_force_threshold_sweep():
    rng = np.random.default_rng(3)
    scores = np.round(rng.normal(size=300), 1)  # many ties
    same = rng.random(300) < 0.3
    scores[same] += 0.8
    best = None
    for thr in np.concatenate([np.unique(scores), [np.inf]]):
        far = ((scores >= thr) & ~same).sum() / (~same).sum()
        frr = ((scores < thr) & same).sum() / same.sum()
        if best is None or abs(far - frr) < best[0]:
            best = (abs(far - frr), (far + frr) / 2)
    assert M.eer(scores, same) == pytest.approx(best[1])


def test_transcripts_agree_is_distil_whispers_filter():
    refs = ["turn off the lights", "the cat sat on the hat", "one two three four five six seven eight nine ten", ""]
    hyps = ["Turn off the lights.", "the cat sat on a mat", "one two three four five six seven eight nine then",
            "anything"]
    keep, rates = M.transcripts_agree(refs, hyps, 0.10)
    assert keep.tolist() == [True, False, True, False]  # 0, 2/6, 1/10 (at the threshold: kept), no reference
    assert rates[:3] == pytest.approx([0.0, 2 / 6, 0.1]) and np.isnan(rates[3])
    assert M.transcripts_agree(refs, hyps, 0.0)[0].tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match="2 references but 1"):
        M.transcripts_agree(["a", "b"], ["a"], 0.1)
    with pytest.raises(ValueError, match="max_wer"):
        M.transcripts_agree(["a"], ["a"], -0.1)


def test_trimmed_vocabulary_positions_marks_what_the_vocabulary_hides():
    kept = np.array([True, True, False, True, False, True])  # ids 2 and 4 dropped
    ids = np.array([0, 2, 1, 1, 1, 4, 5])
    m = M.trimmed_vocabulary_positions(ids, kept, window=2)
    assert m["input_dropped"].tolist() == [False, True, False, False, False, True, False]
    assert m["recent_input_dropped"].tolist() == [False, True, True, False, False, True, True]
    assert m["next_dropped"].tolist() == [True, False, False, False, True, False, False]
    wide = M.trimmed_vocabulary_positions(ids, kept, window=8)
    assert wide["recent_input_dropped"].tolist() == [False] + [True] * 6
    assert not M.trimmed_vocabulary_positions(ids, np.ones(6, bool))["recent_input_dropped"].any()
    # id 4 read through an input row of its own: no longer misread as input, still unnameable as output
    own = M.trimmed_vocabulary_positions(ids, kept, window=2, read_as_itself=kept | (np.arange(6) == 4))
    assert own["input_dropped"].tolist() == [False, True, False, False, False, False, False]
    assert own["recent_input_dropped"].tolist() == [False, True, True, False, False, False, False]
    assert own["next_dropped"].tolist() == m["next_dropped"].tolist()
    with pytest.raises(ValueError, match="window"):
        M.trimmed_vocabulary_positions(ids, kept, window=0)
    with pytest.raises(ValueError, match="token_ids"):
        M.trimmed_vocabulary_positions(ids[None], kept)
