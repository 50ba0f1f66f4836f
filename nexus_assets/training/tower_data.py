"""Cached teacher features + probe rows -> aligned tensors for one student tower.

Every capability of a tower is trained on the same rows at once (phase (a) is joint), so the rows
kept are those every teacher of the tower has cached for the requested splits *and* the probe table
holds; they are sorted by row_id so the order never depends on chunking. heldout/ood rows are never
read unless a caller asks for those splits. One exception: a text tower's inputs are its "lm" teacher's
cached token ids, so its rows are every row that teacher cached (the probe rows plus the text the teacher
wrote itself, `teacher_written`); a capability whose teacher lacks some of them gets a row mask
"<cap>:rows" (N,) bool, its item targets are zero there and the objective skips those rows.

`TowerData.tensors` is one flat dict whose every tensor has first dim N (rows), so batching and DDP
sharding are plain indexing. Keys:

    inputs    text:   input_ids (N, T) long, attention_mask (N, T) bool
              vision: pixels (N, 3, S, S) float32, ImageNet-normalised, resized to image_size
              audio:  mels (N, F, n_mels) float32, mel_mask (N, F) bool;
                      dec_ids (N, P+U-1) long, dec_mask (N, P+U-1) bool  (when an "asr" head exists)
    targets   "<cap>:topk_ids" (N, T|U, k) long, "<cap>:topk_logits" (N, T|U, k), "<cap>:logsumexp" (N, T|U),
              "<cap>:mask" (N, T|U) bool           for "lm" / "asr" heads (sequence top-k KD)
              "<cap>:next_ids" (N, T) long, "<cap>:next_valid" (N, T) bool   for "lm" heads (true next token)
              "<cap>:state.<layer>" (N, T, r) float16  for "lm" heads whose teacher caches per-token states
                                   (`extraction.state_layers`: PCA scores; their basis in `state_basis`)
              "<cap>:embedding" (N, D)             for "embedding" heads
              "<cap>:logits" (N, C)                for "classes" heads
              "<cap>:hidden.<layer>" (N, Ht)       for every anchored teacher layer (mean-pooled)
              "<cap>:rows" (N,) bool               only when the capability's teacher lacks some rows

Text inputs for every text capability are the SmolLM2 token ids cached by the "lm" teacher (the same
text the sentence encoder read), so training never loads a tokenizer. Imports pyarrow (via the feature
store), so the runtime never imports this module.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import math

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from nexus_assets.core import metrics as M
from nexus_assets.core.feature_store import (STATE_BASIS, FeatureCacheError, column_matrix, decode_states,
                                             load_state_basis, read_features, with_scale_columns)
from nexus_assets.student.carved import audio_input_features
from nexus_assets.student.config import TowerConfig
from nexus_assets.student.transforms import decode_wav, preprocess_image

__all__ = ["TowerData", "load_tower_data", "synthetic_tower_data", "INPUT_KEYS"]

INPUT_KEYS = ("input_ids", "attention_mask", "pixels", "mels", "mel_mask", "dec_ids", "dec_mask")
# distil-whisper's pseudo-label filter: an utterance whose teacher transcript is more than 10% WER from the
# sentence spoken teaches the teacher's mistake, not speech
ASR_MAX_TEACHER_WER = 0.10
_PROBE_COLUMN = {"text": "text", "vision": "image", "audio": "wav"}
_TOKEN_COLUMNS = ("row_id", "position", "token_id", "topk_ids", "topk_logits", "logsumexp")


@dataclass
class TowerData:
    """Aligned tensors of one tower's rows (see the module docstring for the keys and shapes).

    trim: tensor key -> (mask key, extra): in `batch`, axis 1 of that tensor is cut to the batch's
    longest real row under the mask (its last True + 1) plus `extra`, so a batch of short rows does
    not pay for the dataset's longest one (the ASR decoder input is P - 1 longer than its targets).
    """

    row_ids: list[str]
    tensors: dict[str, torch.Tensor]
    trim: dict[str, tuple[str, int]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # capability -> what loading left out and why
    # capability -> {teacher layer: {"mean", "components", "variances"}}: the basis of "<cap>:state.<layer>"
    state_basis: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self):
        n = len(self.row_ids)
        for k, v in self.tensors.items():
            if v.shape[0] != n:
                raise ValueError(f"tensors[{k!r}] has {v.shape[0]} rows, expected {n} (len(row_ids))")
        for k, (m, _) in self.trim.items():
            if k not in self.tensors or m not in self.tensors:
                raise ValueError(f"trim[{k!r}] refers to a missing tensor ({k!r} or {m!r})")

    def __len__(self) -> int:
        return len(self.row_ids)

    def batch(self, idx: torch.Tensor | Sequence[int]) -> dict[str, torch.Tensor]:
        """Rows `idx` of every tensor, sequence axes cut per `trim`."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        out = {k: v[idx] for k, v in self.tensors.items()}
        lengths = {}
        for m in {m for m, _ in self.trim.values()}:
            any_pos = out[m].any(0).nonzero()
            lengths[m] = int(any_pos.max()) + 1 if any_pos.numel() else 1
        for k, (m, extra) in self.trim.items():
            out[k] = out[k][:, : lengths[m] + extra]
        return out

    def lengths(self) -> list[int] | None:
        """Each row's real length under its first sequence mask (None: the rows have no sequence axis)."""
        if not self.trim:
            return None
        mask = self.tensors[next(iter(self.trim.values()))[0]].bool()
        # its last True + 1, what `batch` cuts to
        return (mask * torch.arange(1, mask.shape[1] + 1)).amax(1).tolist()

    def subset(self, idx: Sequence[int]) -> "TowerData":
        idx_t = torch.as_tensor(idx, dtype=torch.long)
        return TowerData([self.row_ids[i] for i in idx], {k: v[idx_t] for k, v in self.tensors.items()},
                         dict(self.trim), dict(self.notes), dict(self.state_basis))


def _row_index(row_ids: Sequence[str]) -> dict[str, int]:
    return {r: i for i, r in enumerate(row_ids)}


def _token_slots(tokens, rows: dict[str, int], length: int, offset: int = 0):
    """(row index, position - offset, kept) per token row; kept = a row of `rows`, inside [0, length)."""
    rid = tokens.column("row_id").to_pylist()
    pos = tokens.column("position").to_numpy().astype(np.int64) - offset
    ri = np.fromiter((rows.get(r, -1) for r in rid), dtype=np.int64, count=len(rid))
    return ri, pos, (ri >= 0) & (pos >= 0) & (pos < length)


def _scatter_tokens(tokens, rows: dict[str, int], n: int, length: int, column: str, offset: int,
                    fill, dtype) -> np.ndarray:
    """Per-token column -> (n, length[, k]) array at [row, position - offset]; tokens beyond `length` dropped."""
    ri, pos, keep = _token_slots(tokens, rows, length, offset)
    values = column_matrix(tokens.column(column)) if column != "__mask__" else np.ones(len(ri), bool)
    shape = (n, length) + tuple(values.shape[1:])
    out = np.full(shape, fill, dtype=dtype)
    out[ri[keep], pos[keep]] = values[keep]
    return out


def remap_topk(ids: np.ndarray, logits: np.ndarray, old_to_new: np.ndarray, fallback: int) -> tuple[np.ndarray, np.ndarray]:
    """Teacher top-k over the teacher's vocabulary -> over a carved (trimmed) vocabulary.

    ids, logits: (..., k). Kept ids are renumbered; the dropped ones all become the fallback id, whose
    logit is the logsumexp of theirs (their mass, merged). The loss needs distinct ids per row, so the
    other fallback slots get unused rare kept ids with logit -1e4 (probability ~0; their student mass
    moves out of the tail bucket, a small documented approximation). Returns (ids, logits) of the same shape.
    """
    new = old_to_new[ids]
    lg = logits.astype(np.float32).copy()
    k = new.shape[-1]
    flat_new, flat_lg = new.reshape(-1, k), lg.reshape(-1, k)
    is_fb = flat_new == fallback
    rows = np.nonzero(is_fb.sum(-1) > 1)[0]
    # the rarest kept ids fill the other fallback slots: a row has at most k - 2 of them in use and at most
    # k - 1 slots to fill, so the first 2k candidates always hold enough free ones
    pool = np.arange(fallback - 1, max(fallback - 1 - 2 * k, -1), -1)
    fb, nw = is_fb[rows], flat_new[rows]
    lse = np.logaddexp.reduce(np.where(fb, flat_lg[rows].astype(np.float64), -np.inf), axis=-1)
    rank = np.cumsum(fb, axis=-1) - 1  # 0 for a row's first fallback slot, then 1, 2, ...
    used = np.zeros((len(rows), len(pool) + 1), dtype=bool)  # last column: ids outside the pool
    at = fallback - 1 - nw
    used[np.arange(len(rows))[:, None], np.where((at >= 0) & (at < len(pool)), at, len(pool))] = True
    order = np.argsort(used[:, :-1], axis=-1, kind="stable")  # a row's free candidates first, rarest first
    out_new, out_lg = nw.copy(), flat_lg[rows]
    first, extra = fb & (rank == 0), fb & (rank > 0)
    out_lg[first] = lse[np.nonzero(first)[0]]
    er, ec = np.nonzero(extra)
    out_new[er, ec] = pool[order[er, rank[er, ec] - 1]]
    out_lg[er, ec] = -1e4
    flat_new[rows], flat_lg[rows] = out_new, out_lg
    return new, lg


def next_token_targets(ids: np.ndarray, mask: np.ndarray, remap: tuple[np.ndarray, int] | None) -> tuple[np.ndarray, np.ndarray]:
    """True next-token targets of (N, T) token ids: (targets, valid), both (N, T); position t holds
    token t+1, valid where both t and t+1 are real tokens and (carved) token t+1 is in the kept
    vocabulary. The last position has no next token in the window and never counts."""
    nxt = np.zeros_like(ids)
    nxt[:, :-1] = ids[:, 1:]
    valid = np.zeros_like(mask, dtype=bool)
    valid[:, :-1] = mask[:, :-1] & mask[:, 1:]
    if remap is not None:
        old_to_new, fallback = remap
        nxt = old_to_new[nxt]
        valid &= nxt != fallback
    return nxt * valid, valid


def _carved_vocab(tower_cfg: TowerConfig) -> tuple[np.ndarray, int] | None:
    """(old_to_new, fallback) of a carved tower whose sequence head predicts a trimmed vocabulary."""
    plan = tower_cfg.carve if tower_cfg.init == "carved" else {}
    if not plan.get("vocab"):
        return None
    vocab = np.asarray(plan["vocab"], dtype=np.int64)
    fallback = int(plan.get("fallback", len(vocab)))
    old_to_new = np.full(int(plan["teacher_vocab"]), fallback, dtype=np.int64)
    old_to_new[vocab] = np.arange(len(vocab))
    return old_to_new, fallback


def _seq_targets(tensors: dict, cap: str, tk, rows, n: int, length: int, offset: int, remap) -> None:
    """`<cap>:topk_ids|topk_logits|logsumexp` (N, length[, k]) from per-token rows, remapped when carved."""
    ids = _scatter_tokens(tk, rows, n, length, "topk_ids", offset, 0, np.int64)
    lg = _scatter_tokens(tk, rows, n, length, "topk_logits", offset, 0.0, np.float32)
    if remap is not None:
        ids, lg = remap_topk(ids, lg, *remap)
    tensors[f"{cap}:topk_ids"], tensors[f"{cap}:topk_logits"] = torch.from_numpy(ids), torch.from_numpy(lg)
    tensors[f"{cap}:logsumexp"] = torch.from_numpy(_scatter_tokens(tk, rows, n, length, "logsumexp", offset, 0.0, np.float32))


def load_tower_data(
    tower_cfg: TowerConfig,
    teacher_features: Mapping[str, Path],
    probe_rows: Mapping[str, "object"],
    splits: Sequence[str] = ("train",),
    asr_max_wer: float | None = ASR_MAX_TEACHER_WER,
    token_states: bool = True,
) -> TowerData:
    """Read the tower's cached teacher features and probe inputs for `splits` into a TowerData.

    Args:
        tower_cfg: the tower (its HeadSpecs name the teacher of each capability).
        teacher_features: teacher name -> feature cache entry directory (as `feature_store.current_entry`).
        probe_rows: dataset name -> pyarrow Table of probe rows (row_id + `text` / `image` / `wav`).
        splits: which splits to load ("train" for training, "val" for early stopping).
        asr_max_wer: an "asr" capability learns only from utterances whose teacher transcript is within
            this WER of the spoken sentence (the probe's `transcript`); None keeps every utterance.
        token_states: read the "lm" teachers' cached per-token states ("<cap>:state.<layer>"), which only the
            training objective uses (validation losses do not): a scan of every token chunk, so off for "val".

    Raises:
        ValueError: a capability's teacher has no features, no probe table has the modality's input
            column, or no row is common to every teacher and the probe rows.
    """
    caps = tower_cfg.capabilities
    missing = sorted({h.teacher for h in caps.values()} - set(teacher_features))
    if missing:
        raise ValueError(f"tower {tower_cfg.name!r}: teacher_features lacks {missing} "
                         f"(needed by {[c for c, h in caps.items() if h.teacher in missing]})")
    col = _PROBE_COLUMN[tower_cfg.modality]
    probe, spoken = {}, {}
    for name, table in probe_rows.items():
        if col in table.column_names:
            for rid, value in zip(table.column("row_id").to_pylist(), table.column(col).to_pylist()):
                probe[rid] = value
            if "transcript" in table.column_names:
                spoken.update(zip(table.column("row_id").to_pylist(), table.column("transcript").to_pylist()))
    if not probe:
        raise ValueError(f"tower {tower_cfg.name!r}: no probe table in {sorted(probe_rows)} has column {col!r}")

    items = {t: read_features(Path(teacher_features[t]), "items", filter_splits=list(splits))
             for t in sorted({h.teacher for h in caps.values()})}
    lm = [h.teacher for h in caps.values() if h.kind == "lm"]
    if tower_cfg.modality == "text" and lm:  # inputs are the lm teacher's token ids: all of its rows
        row_ids = sorted(items[lm[0]].column("row_id").to_pylist())
    else:
        common = set(probe)
        for t, table in items.items():
            common &= set(table.column("row_id").to_pylist())
        row_ids = sorted(common)
    if not row_ids:
        raise ValueError(f"tower {tower_cfg.name!r}: no row of splits {list(splits)} is common to the "
                         f"teachers {sorted(items)} and the probe rows")
    src = _Sources(tower_cfg, teacher_features, items, row_ids, probe, spoken, asr_max_wer, token_states=token_states)
    tensors: dict[str, torch.Tensor] = {}
    trim: dict[str, tuple[str, int]] = {}
    {"text": _text_inputs, "vision": _vision_inputs, "audio": _audio_inputs}[tower_cfg.modality](src, tensors, trim)
    _item_targets(src, tensors)
    return TowerData(row_ids, tensors, trim, src.notes, src.state_basis)


@dataclass
class _Sources:
    """What the input / target builders of `load_tower_data` read: the kept rows, their cached items and
    probe inputs, and the feature entries (per-token tables are read on demand)."""

    cfg: TowerConfig
    entries: Mapping[str, Path]
    items: dict
    row_ids: list[str]
    probe: dict
    spoken: dict = field(default_factory=dict)  # row_id -> the sentence the probe spoke (audio)
    asr_max_wer: float | None = None
    notes: dict = field(default_factory=dict)
    state_basis: dict = field(default_factory=dict)
    token_states: bool = True  # load_tower_data(token_states=)

    def __post_init__(self):
        self.n, self.rows = len(self.row_ids), _row_index(self.row_ids)

    def row_mask(self, teacher: str) -> torch.Tensor:
        """(N,) bool: which of the tower's rows this teacher has cached items for."""
        have = set(self.items[teacher].column("row_id").to_pylist())
        return torch.tensor([r in have for r in self.row_ids], dtype=torch.bool)

    def item_matrix(self, teacher: str, column: str) -> torch.Tensor:
        """(N, D) float32 in row order; zeros where the teacher has no row (see `row_mask`)."""
        table = self.items[teacher]
        if column not in table.column_names:
            raise FeatureCacheError(f"teacher {teacher!r}: column {column!r} not cached; have {table.column_names}")
        order = _row_index(table.column("row_id").to_pylist())
        m = column_matrix(table.column(column))
        at = np.array([order.get(r, -1) for r in self.row_ids], dtype=np.int64)
        out = np.zeros((self.n,) + m.shape[1:], dtype=np.float32)
        out[at >= 0] = m[at[at >= 0]]
        return torch.from_numpy(out)

    def tokens_of(self, teacher: str):
        import pyarrow as pa
        import pyarrow.compute as pc

        # only what the sequence targets use: the per-token hidden layers (1.1 kB/token for SmolLM2, the
        # bulk of the table) are for profiling, and reading them would cost GBs on the larger profiles
        t = read_features(Path(self.entries[teacher]), "tokens", columns=list(_TOKEN_COLUMNS))
        return t.filter(pc.is_in(t.column("row_id"), value_set=pa.array(self.row_ids)))


def _text_inputs(src: _Sources, tensors: dict, trim: dict) -> None:
    """input_ids / attention_mask from the "lm" teacher's cached token ids, and its per-token KD targets."""
    cfg, caps, n, rows, row_ids = src.cfg, src.cfg.capabilities, src.n, src.rows, src.row_ids
    lm = [h.teacher for h in caps.values() if h.kind == "lm"]
    source = lm[0] if lm else next((t for t in src.entries if t not in src.items), None)
    if source is None:
        raise ValueError(f"tower {cfg.name!r}: text inputs come from an 'lm' teacher's cached "
                         "token ids; add one to teacher_features")
    tok = src.tokens_of(source)
    T = cfg.max_len
    ids = _scatter_tokens(tok, rows, n, T, "token_id", 0, 0, np.int64)
    mask = _scatter_tokens(tok, rows, n, T, "__mask__", 0, False, bool)
    tensors["input_ids"], tensors["attention_mask"] = torch.from_numpy(ids), torch.from_numpy(mask)
    trim.update({"input_ids": ("attention_mask", 0), "attention_mask": ("attention_mask", 0)})
    if not mask[:, 0].all():
        bad = [row_ids[i] for i in np.nonzero(~mask[:, 0])[0][:3]]
        raise FeatureCacheError(f"teacher {source!r}: rows {bad} have no token at position 0")
    remap = _carved_vocab(cfg)
    for cap, h in caps.items():
        if h.kind == "lm":
            tk = tok if h.teacher == source else src.tokens_of(h.teacher)
            _seq_targets(tensors, cap, tk, rows, n, T, 0, remap)
            tensors[f"{cap}:mask"] = torch.from_numpy(_scatter_tokens(tk, rows, n, T, "__mask__", 0, False, bool)) & tensors["attention_mask"]
            nxt, valid = next_token_targets(ids, mask, remap)
            tensors[f"{cap}:next_ids"] = torch.from_numpy(nxt)
            tensors[f"{cap}:next_valid"] = torch.from_numpy(valid) & tensors[f"{cap}:mask"]
            trim.update({f"{cap}:{c}": ("attention_mask", 0)
                         for c in ("topk_ids", "topk_logits", "logsumexp", "mask", "next_ids", "next_valid")})
            if src.token_states:
                _state_targets(src, tensors, trim, cap, h.teacher, T)


def _state_targets(src: "_Sources", tensors: dict, trim: dict, cap: str, teacher: str, length: int) -> None:
    """"<cap>:state.<layer>" (N, length, r) float16 from the teacher's cached per-token state scores, read
    (and decoded, if stored in 4 or 8 bits) chunk by chunk and kept float16 (4 layers of 128 scores are ~1 kB a
    token), and their basis."""
    entry = Path(src.entries[teacher])
    if not (entry / STATE_BASIS).exists():
        return
    basis = load_state_basis(entry / STATE_BASIS)
    names = [f"state.{layer}" for layer in basis]
    out = {name: None for name in names}
    for f in sorted(entry.glob("tokens-*.parquet")):
        have = set(pq.read_schema(f).names)
        if not set(names) <= have:
            raise FeatureCacheError(f"teacher {teacher!r}: {f.name} lacks {sorted(set(names) - have)} "
                                    f"although {STATE_BASIS} is there")
        t = decode_states(pq.read_table(f, columns=["row_id", "position", *with_scale_columns(names, have)]), basis, f)
        ri, pos, keep = _token_slots(t, src.rows, length)
        for name in names:
            col = t.column(name).combine_chunks()
            vals = col.values.to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size).astype(np.float16)
            if out[name] is None:
                out[name] = np.zeros((src.n, length, vals.shape[1]), np.float16)
            out[name][ri[keep], pos[keep]] = vals[keep]
    for name, arr in out.items():
        if arr is not None:
            tensors[f"{cap}:{name}"] = torch.from_numpy(arr)
            trim[f"{cap}:{name}"] = ("attention_mask", 0)
    src.state_basis[cap] = {layer: {k: b[k] for k in ("mean", "components", "variances")} for layer, b in basis.items()}


def _vision_inputs(src: _Sources, tensors: dict, trim: dict) -> None:
    tensors["pixels"] = torch.stack([preprocess_image(src.probe[r], src.cfg.image_size, r) for r in src.row_ids])


def _audio_inputs(src: _Sources, tensors: dict, trim: dict) -> None:
    """mels / mel_mask from the probe wavs and, for an "asr" head, teacher-forced decoder inputs + KD targets."""
    cfg, n, rows = src.cfg, src.n, src.rows
    mels = [audio_input_features(cfg, decode_wav(src.probe[r], r))[: cfg.max_frames] for r in src.row_ids]
    f = max(m.shape[0] for m in mels)
    tensors["mels"] = torch.zeros(n, f, mels[0].shape[1])
    tensors["mel_mask"] = torch.zeros(n, f, dtype=torch.bool)
    for i, m in enumerate(mels):
        tensors["mels"][i, : m.shape[0]] = m
        tensors["mel_mask"][i, : m.shape[0]] = True
    trim.update({"mels": ("mel_mask", 0), "mel_mask": ("mel_mask", 0)})
    for cap, h in cfg.capabilities.items():
        if h.kind != "asr":
            continue
        p = len(cfg.asr_prompt_ids)
        U = cfg.asr_max_len - p + 1
        tk = src.tokens_of(h.teacher)
        tgt = _scatter_tokens(tk, rows, n, U, "token_id", p, 0, np.int64)  # (N, U) transcript ids
        tmask = _scatter_tokens(tk, rows, n, U, "__mask__", p, False, bool)
        _seq_targets(tensors, cap, tk, rows, n, U, p, _carved_vocab(cfg))
        tensors[f"{cap}:mask"] = torch.from_numpy(tmask)
        tensors[f"{cap}:target_ids"] = torch.from_numpy(tgt)
        prompt = torch.tensor(cfg.asr_prompt_ids, dtype=torch.long).expand(n, p)
        tensors["dec_ids"] = torch.cat([prompt, torch.from_numpy(tgt[:, :-1])], dim=1)  # (N, P+U-1)
        tensors["dec_mask"] = torch.cat([torch.ones(n, p, dtype=torch.bool), torch.from_numpy(tmask[:, :-1])], 1)
        trim.update({f"{cap}:{c}": (f"{cap}:mask", 0) for c in ("topk_ids", "topk_logits", "logsumexp", "mask", "target_ids")})
        trim.update({"dec_ids": (f"{cap}:mask", p - 1), "dec_mask": (f"{cap}:mask", p - 1)})
        _filter_teacher_transcripts(src, tensors, cap, h.teacher)


def _filter_teacher_transcripts(src: _Sources, tensors: dict, cap: str, teacher: str) -> None:
    """`<cap>:rows` False where the teacher misheard the spoken sentence (WER > src.asr_max_wer): its
    transcript would teach the student the teacher's mistake (distil-whisper's pseudo-label filter); and,
    filter or not, where nothing known was said (a recording with no transcript)."""
    items = src.items[teacher]
    if "transcript" not in items.column_names or not src.spoken:
        return
    heard = dict(zip(items.column("row_id").to_pylist(), items.column("transcript").to_pylist()))
    # without the filter, only the recordings of unknown content (no spoken sentence) are left out
    max_wer = np.inf if src.asr_max_wer is None else src.asr_max_wer
    keep, rates = M.transcripts_agree([src.spoken.get(r) or "" for r in src.row_ids],
                                      [heard.get(r) or "" for r in src.row_ids], max_wer)
    unknown = int(np.isnan(rates).sum())
    misheard = int((~keep).sum()) - unknown
    if not keep.any():
        why = [f"{unknown} recordings with no transcript"]
        if src.asr_max_wer is not None:
            why.insert(0, f"{misheard} with a transcript more than {max_wer:.0%} WER from the spoken sentence")
        raise ValueError(f"tower {src.cfg.name!r}: teacher {teacher!r}: no utterance left for {cap!r} "
                         f"({', '.join(why)}): the probe's transcripts and audio disagree")
    if not keep.all():
        tensors[f"{cap}:rows"] = torch.from_numpy(keep)
    why = []
    if src.asr_max_wer is not None:  # the filter's count is noted even when it drops nothing
        why.append(f"{misheard} with a teacher transcript > {max_wer:.0%} WER from the spoken sentence")
    if unknown:
        why.append(f"{unknown} recordings with no transcript")
    if why:
        src.notes[cap] = f"{int((~keep).sum())} of {src.n} utterances left out: " + ", ".join(why)


def _item_targets(src: _Sources, tensors: dict) -> None:
    """Embeddings, class logits and the pooled hidden states of every anchored teacher layer."""
    for cap, h in src.cfg.capabilities.items():
        if h.kind in ("embedding", "classes") or h.anchor_layers:
            rows = src.row_mask(h.teacher)
            if not bool(rows.all()):
                if not bool(rows.any()):
                    raise ValueError(f"tower {src.cfg.name!r}: teacher {h.teacher!r} ({cap}) has none of the "
                                     f"{src.n} rows of the tower's splits")
                tensors[f"{cap}:rows"] = rows & tensors.get(f"{cap}:rows", rows)
        if h.kind == "embedding":
            tensors[f"{cap}:embedding"] = src.item_matrix(h.teacher, "embedding")
        elif h.kind == "classes":
            tensors[f"{cap}:logits"] = src.item_matrix(h.teacher, "logits")
        for layer, ht in h.anchor_layers.items():
            m = src.item_matrix(h.teacher, f"hidden.{layer}")
            if m.shape[1] != ht:
                raise FeatureCacheError(f"teacher {h.teacher!r}: hidden.{layer} is {m.shape[1]}-d, but "
                                        f"{cap}'s anchor_layers says {ht}")
            tensors[f"{cap}:hidden.{layer}"] = m



def synthetic_tower_data(cfg: TowerConfig, n: int, seed: int = 0, seq_len: int | None = None,
                         frames: int = 200, top_k: int = 8) -> TowerData:
    """A learnable stand-in for cached features, with the shapes `load_tower_data` gives (tests, bench).

    Every target is a fixed deterministic function of the inputs, so a student can drive the losses
    down: the "lm" teacher's top-k at a position depends on the token there, the "asr" one on the
    previous decoder token, embeddings / logits / hidden states are fixed random maps of pooled inputs.
    """
    g = torch.Generator().manual_seed(seed)
    t: dict[str, torch.Tensor] = {}
    trim: dict[str, tuple[str, int]] = {}

    def seq_topk(tokens: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        j = torch.arange(top_k)
        ids = (tokens[..., None] * 7 + j * 13 + 1) % vocab  # (..., k), distinct for k*13 < vocab
        logits = torch.linspace(6.0, 0.0, top_k).expand_as(ids).clone()
        tail = math.log(vocab - top_k) - 4.0  # tail mass of the other ids, each at logit -4
        lse = torch.logaddexp(torch.logsumexp(logits, -1), torch.full(ids.shape[:-1], tail))
        return ids, logits, lse

    if cfg.modality == "text":
        T = seq_len or cfg.max_len
        ids = torch.randint(0, cfg.vocab_size, (n, T), generator=g)
        lengths = torch.randint(max(2, T // 2), T + 1, (n,), generator=g)
        mask = torch.arange(T)[None] < lengths[:, None]
        t["input_ids"], t["attention_mask"] = ids * mask, mask
        trim.update({"input_ids": ("attention_mask", 0), "attention_mask": ("attention_mask", 0)})
        pooled = torch.randn(cfg.vocab_size if cfg.vocab_size <= 4096 else 4096, 32, generator=g)[ids % 4096]
        pooled = (pooled * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (N, 32)
    elif cfg.modality == "vision":
        s = cfg.image_size
        t["pixels"] = torch.randn(n, 3, s, s, generator=g)
        pooled = F.adaptive_avg_pool2d(t["pixels"], 4).flatten(1)[:, :32]  # (N, 32)
    else:
        f = min(frames, cfg.max_frames)
        t["mels"] = torch.randn(n, f, cfg.n_mels, generator=g)
        lengths = torch.randint(f // 2, f + 1, (n,), generator=g)
        t["mel_mask"] = torch.arange(f)[None] < lengths[:, None]
        trim.update({"mels": ("mel_mask", 0), "mel_mask": ("mel_mask", 0)})
        pooled = (t["mels"] * t["mel_mask"][..., None]).sum(1) / lengths[:, None]  # (N, n_mels)
        pooled = pooled @ torch.randn(cfg.n_mels, 32, generator=g) / math.sqrt(cfg.n_mels)  # (N, 32)
    for cap, h in cfg.capabilities.items():
        if h.kind == "lm":
            ids_, lg, lse = seq_topk(t["input_ids"], h.out_dim)
            t[f"{cap}:topk_ids"], t[f"{cap}:topk_logits"], t[f"{cap}:logsumexp"] = ids_, lg, lse
            t[f"{cap}:mask"] = t["attention_mask"].clone()
            nxt, valid = next_token_targets(t["input_ids"].numpy() % h.out_dim, t["attention_mask"].numpy(), None)
            t[f"{cap}:next_ids"], t[f"{cap}:next_valid"] = torch.from_numpy(nxt), torch.from_numpy(valid)
            trim.update({f"{cap}:{c}": ("attention_mask", 0)
                         for c in ("topk_ids", "topk_logits", "logsumexp", "mask", "next_ids", "next_valid")})
        elif h.kind == "asr":
            p = len(cfg.asr_prompt_ids)
            U = min(12, cfg.asr_max_len - p + 1)
            tgt = torch.randint(0, 1000, (n, U), generator=g)
            lengths = torch.randint(2, U + 1, (n,), generator=g)
            tmask = torch.arange(U)[None] < lengths[:, None]
            dec = torch.cat([torch.tensor(cfg.asr_prompt_ids).expand(n, p), tgt[:, :-1]], 1)  # (N, P+U-1)
            ids_, lg, lse = seq_topk(dec[:, p - 1:], h.out_dim)  # the teacher's next-token given the previous
            t[f"{cap}:topk_ids"], t[f"{cap}:topk_logits"], t[f"{cap}:logsumexp"] = ids_, lg, lse
            t[f"{cap}:mask"], t[f"{cap}:target_ids"] = tmask, tgt
            t["dec_ids"] = dec
            t["dec_mask"] = torch.cat([torch.ones(n, p, dtype=torch.bool), tmask[:, :-1]], 1)
            trim.update({f"{cap}:{c}": (f"{cap}:mask", 0) for c in ("topk_ids", "topk_logits", "logsumexp", "mask", "target_ids")})
            trim.update({"dec_ids": (f"{cap}:mask", p - 1), "dec_mask": (f"{cap}:mask", p - 1)})
        elif h.kind == "embedding":
            t[f"{cap}:embedding"] = F.normalize(pooled @ torch.randn(32, h.out_dim, generator=g), dim=-1)
        else:
            t[f"{cap}:logits"] = 3.0 * pooled @ torch.randn(32, h.out_dim, generator=g) / math.sqrt(32)
        for layer, ht in h.anchor_layers.items():
            t[f"{cap}:hidden.{layer}"] = torch.tanh(pooled @ torch.randn(32, ht, generator=g)) * 5.0 + 1.0
    return TowerData([f"r{i:05d}" for i in range(n)], t, trim)
