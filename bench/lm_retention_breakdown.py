"""Where text.generate loses its retention: next-token accuracy of student and teacher by position in the
row and by how frequent the true next token is in the train split.

The metric is `validation_report`'s (hits on the TRUE next token; the teacher's from its cached top-1), on a
seeded sample of held-out and never-seen rows of a finished run's SmolLM2 features, with the student read
from a bundle (no teacher loaded). Frequency rank 0 = the most frequent train token; ranks past the kept
vocabulary are tokens the carved student cannot name.

Run (README command 1, then a bundle):
    .venv/bin/python bench/lm_retention_breakdown.py --bundle data/artifacts/quantized_bundle/default
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.init_ablation import _asset  # noqa: E402

POSITIONS = [(0, 4), (4, 16), (16, 32), (32, 64), (64, 10**9)]
RANKS = [(0, 100), (100, 1000), (1000, 5000), (5000, 11000), (11000, 10**9)]


def breakdown(student_hits: np.ndarray, teacher_hits: np.ndarray, key: np.ndarray, bins) -> list[tuple]:
    """[(lo, hi, n, teacher accuracy, student accuracy, retention)] of the tokens whose key is in [lo, hi)."""
    out = []
    for lo, hi in bins:
        m = (key >= lo) & (key < hi)
        if m.any():
            t, s = teacher_hits[m].sum(), student_hits[m].sum()
            out.append((lo, hi, int(m.sum()), t / m.sum(), s / m.sum(), s / t if t else float("nan")))
    return out


def main() -> None:
    from nexus_assets.core.feature_store import read_features
    from nexus_assets.core.paths import artifacts_root
    from nexus_assets.runtime import Bundle
    from nexus_assets.training.carve_text import token_rows_from_cache

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--rows", type=int, default=400, help="rows per split")
    args = ap.parse_args()

    entry = Path(_asset(artifacts_root(), "teacher_features", args.teacher)["path"])
    train_rows, _, _ = token_rows_from_cache(entry)
    tower = Bundle.load(args.bundle).tower("text")
    tok = read_features(entry, "tokens", columns=["row_id", "position", "token_id", "topk_ids"])
    rid = np.asarray(tok.column("row_id").to_pylist(), dtype=object)
    pos = tok.column("position").to_numpy()
    tid = tok.column("token_id").to_numpy()
    counts = np.bincount(np.concatenate([np.asarray(v, dtype=np.int64) for v in train_rows.values()]),
                         minlength=int(tid.max()) + 1)
    rank = np.full(len(counts), 10**9, dtype=np.int64)  # never-counted ids stay past every bin
    order = np.argsort(-counts, kind="stable")
    rank[order[counts[order] > 0]] = np.arange(int((counts > 0).sum()))
    top1 = np.asarray([a[0] for a in tok.column("topk_ids").to_pylist()])
    where: dict[str, list[int]] = {}
    for i, r in enumerate(rid):
        where.setdefault(r, []).append(i)
    for split in ("heldout", "ood"):
        ids = sorted(read_features(entry, "items", columns=["row_id"], filter_splits=[split]).column("row_id").to_pylist())
        ids = [ids[i] for i in np.random.default_rng(0).permutation(len(ids))[:args.rows] if len(where.get(ids[i], [])) >= 2]
        seqs = [sorted(where[r], key=lambda i: pos[i]) for r in ids]
        lps = tower.text_log_probs([tid[s].tolist() for s in seqs])
        s_hit, t_hit, p_key, r_key = [], [], [], []
        for s, lp in zip(seqs, lps):
            n = lp.shape[0]
            nxt = tid[s][1:n]
            s_hit.append(lp.numpy().argmax(-1)[: n - 1] == nxt)
            t_hit.append(top1[s][: n - 1] == nxt)
            p_key.append(np.arange(n - 1))
            r_key.append(rank[nxt])
        s_hit, t_hit, p_key, r_key = map(np.concatenate, (s_hit, t_hit, p_key, r_key))
        print(f"\n{split}: {len(seqs)} rows, {len(s_hit)} tokens, retention {s_hit.sum() / t_hit.sum():.3f}")
        for title, key, bins in (("position", p_key, POSITIONS), ("train frequency rank", r_key, RANKS)):
            print(f"  {title:22s} {'tokens':>7s} {'teacher':>8s} {'student':>8s} {'retention':>9s}")
            for lo, hi, n, ta, sa, ret in breakdown(s_hit, t_hit, key, bins):
                print(f"  {f'{lo}-{hi if hi < 10**9 else chr(8734)}':22s} {n:7d} {ta:8.3f} {sa:8.3f} {ret:9.3f}")


if __name__ == "__main__":
    main()
