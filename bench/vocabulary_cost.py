"""What the text tower's trimmed vocabulary costs text.generate, and where.

Part 1 (no teacher loaded): the pipeline's text tower (or `--tower DIR`) scored through the runtime on the
held-out and never-seen rows, its next-token retention split by `metrics.trimmed_vocabulary_positions`:
positions whose input token is dropped (the tower reads it as its nearest kept token; a dropped token with
an input row of its own, the carve's `input_rows`, reads as itself and does not count), positions with such
a token among the last 8 inputs, positions whose next token is dropped (the tower cannot name it).

Part 2 (`--teacher-bound`, loads SmolLM2 from the teacher snapshot): the TEACHER itself with its dropped
input tokens re-embedded the way the tower reads them, or with the teacher's own rows kept for the most
frequent dropped train tokens, teacher-forced top-1 agreement with its cached pass. What the input mapping
alone costs a network that was never trained around it, and what input rows would buy back per parameter.

Reads a finished pipeline run (README command 1) from NEXUS_HOME like bench/init_ablation.py.

Run:
    .venv/bin/python bench/vocabulary_cost.py [--tower DIR] [--rows N] [--teacher-bound [--bound-rows 600]]
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from init_ablation import _asset  # noqa: E402

WINDOW = 8


def _token_table(entry: Path):
    """The teacher's cached token rows, read once for both parts and both splits."""
    from nexus_assets.core.feature_store import read_features

    return read_features(entry, "tokens", columns=["row_id", "position", "token_id", "topk_ids", "has_next"])


def _rows(tok, entry: Path, split: str, limit: int | None) -> list[list[dict]]:
    """The split's cached token rows (sorted by position, at most 64 tokens: the tower's max_len)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from nexus_assets.release.validation import _cached_rows

    ids = sorted(_cached_rows(entry, split))[:limit]
    tok = tok.filter(pc.is_in(tok.column("row_id"), value_set=pa.array(ids)))
    by = defaultdict(list)
    for r in tok.to_pylist():
        by[r["row_id"]].append(r)
    rows = [sorted(v, key=lambda r: r["position"])[:64] for v in by.values() if len(v) >= 2]
    return sorted(rows, key=len)


def student_breakdown(tower: Path, tok, entry: Path, kept: np.ndarray, limit: int | None,
                      read_as_itself: np.ndarray | None = None) -> None:
    from nexus_assets.core import metrics as M
    from nexus_assets.runtime.bundle import load_tower_dir

    rt = load_tower_dir(tower)
    print(f"\nPart 1: {tower} (no teacher loaded), next-token accuracy by position class")
    print(f"{'split':8s} {'positions':38s} {'share':>6s} {'student':>8s} {'teacher':>8s} {'retention':>9s}")
    for split in ("heldout", "ood"):
        rows = _rows(tok, entry, split, limit)
        acc = defaultdict(lambda: np.zeros(3))  # class -> positions, student hits, teacher hits
        for c in range(0, len(rows), 32):
            part = rows[c:c + 32]
            for rr, lp in zip(part, rt.text_log_probs([[r["token_id"] for r in rr] for rr in part])):
                ids = np.array([r["token_id"] for r in rr])
                ts = lp.shape[0]
                valid = np.array([r["has_next"] for r in rr[:ts]]) & (np.arange(ts) + 1 < ts)
                nxt = np.concatenate([ids[1:ts], [-1]])
                s_hit = (lp.argmax(-1).numpy() == nxt) & valid
                t_hit = (np.array([r["topk_ids"][0] for r in rr[:ts]]) == nxt) & valid
                classes = M.trimmed_vocabulary_positions(ids[:ts], kept, WINDOW, read_as_itself)
                classes["all"] = np.ones(ts, bool)
                classes["no dropped token among last 8 inputs"] = ~classes["recent_input_dropped"]
                for name, m in classes.items():
                    m = m & valid
                    acc[name] += (m.sum(), (s_hit & m).sum(), (t_hit & m).sum())
        for name in ("all", "input_dropped", "recent_input_dropped", "no dropped token among last 8 inputs",
                     "next_dropped"):
            n, s, t = acc[name]
            print(f"{split:8s} {name:38s} {n / acc['all'][0]:6.3f} {s / n:8.3f} {t / n:8.3f} "
                  f"{(s / t if t else float('nan')):9.3f}")


def teacher_bound(snapshot: Path, tok, entry: Path, vocab: dict, limit: int | None, extra_rows: list[int]) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc
    import torch
    from transformers import AutoModelForCausalLM

    from nexus_assets.release.validation import _cached_rows

    model = AutoModelForCausalLM.from_pretrained(snapshot / "hf", dtype=torch.float32).eval()
    E = model.get_input_embeddings().weight.detach()
    V = E.shape[0]
    teacher_ids = np.asarray(vocab["teacher_ids"])
    reads = np.asarray(vocab["input_ids"])[:V]  # new id each teacher id is read as; > fallback: its own input row
    own = reads > vocab["fallback"]
    if (reads == vocab["fallback"]).any():  # the fallback slot is the tower's own: the teacher has no row for it
        raise SystemExit(f"{int((reads == vocab['fallback']).sum())} teacher ids read as the fallback slot: this "
                         "tower's input mapping is not the nearest-kept-token one part 2 re-creates")
    read_as = torch.as_tensor(np.where(own, np.arange(V), teacher_ids[np.where(own, 0, reads)]))
    dropped = np.setdiff1d(np.arange(V), teacher_ids)
    train = tok.filter(pc.is_in(tok.column("row_id"), value_set=pa.array(sorted(_cached_rows(entry, "train")))))
    counts = np.bincount(train.column("token_id").to_numpy(), minlength=V)
    by_count = dropped[np.argsort(-counts[dropped], kind="stable")]
    variants = {"teacher's own rows (no trimming)": torch.arange(V), "as the tower reads them": read_as}
    for k in extra_rows:
        m = read_as.clone()
        m[torch.as_tensor(by_count[:k])] = torch.as_tensor(by_count[:k])
        variants[f"+{k} input rows ({k * E.shape[1] / 1e6:.1f}M params)"] = m
    print(f"\nPart 2: the teacher, dropped input tokens re-embedded ({len(dropped)} of {V} ids dropped; "
          f"{counts[dropped].sum() / counts.sum():.3f} of the train tokens)")
    for split in ("heldout", "ood"):
        rows = _rows(tok, entry, split, limit)
        for name, mapping in variants.items():
            hits = n = 0
            for c in range(0, len(rows), 32):
                part = rows[c:c + 32]
                L = max(len(r) for r in part)
                ids = torch.zeros(len(part), L, dtype=torch.long)
                att = torch.zeros(len(part), L, dtype=torch.long)
                for j, rr in enumerate(part):
                    ids[j, :len(rr)] = torch.tensor([r["token_id"] for r in rr])
                    att[j, :len(rr)] = 1
                with torch.no_grad():
                    pred = model(inputs_embeds=E[mapping[ids]], attention_mask=att).logits.argmax(-1)
                for j, rr in enumerate(part):
                    for i, r in enumerate(rr[:-1]):
                        if r["has_next"]:
                            n += 1
                            hits += int(pred[j, i]) == r["topk_ids"][0]
            print(f"{split:8s} {name:40s} agreement {hits / n:.3f} ({n} positions)", flush=True)


def main() -> None:
    from nexus_assets.core.paths import artifacts_root

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tower", default=None, help="a trained text tower folder (default: the pipeline's)")
    ap.add_argument("--rows", type=int, default=None, help="part 1: at most this many rows per split (default: all)")
    ap.add_argument("--bound-rows", type=int, default=600, help="part 2: rows per split (the teacher runs once per "
                    "variant)")
    ap.add_argument("--teacher-bound", action="store_true", help="also part 2 (loads the teacher)")
    ap.add_argument("--extra-rows", default="2000,4000,8000", help="part 2: input rows kept, comma-separated")
    args = ap.parse_args()
    root = artifacts_root()
    tower = Path(args.tower) if args.tower else Path(_asset(root, "tower_adapter", "text")["path"])
    vocab = json.loads((tower / "hf" / "vocab.json").read_text())
    entry = Path(_asset(root, "teacher_features", "smollm2-135m")["path"])
    snapshot = Path(_asset(root, "teacher_snapshot", "smollm2-135m")["path"])
    V = json.loads((snapshot / "hf" / "config.json").read_text())["vocab_size"]
    kept = np.zeros(V, bool)
    kept[vocab["teacher_ids"]] = True
    own_row = np.asarray(vocab["input_ids"]) > vocab["fallback"]  # input-only rows (carve `input_rows`)
    print(f"text tower vocabulary: {kept.sum()} of {V} teacher ids kept, {own_row.sum()} more read through input rows")
    tok = _token_table(entry)
    student_breakdown(tower, tok, entry, kept, args.rows, read_as_itself=kept | own_row)
    if args.teacher_bound:
        teacher_bound(snapshot, tok, entry, vocab, args.bound_rows, [int(k) for k in args.extra_rows.split(",") if k])


if __name__ == "__main__":
    main()
