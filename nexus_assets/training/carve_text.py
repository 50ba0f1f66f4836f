"""Carve a text student from a Llama-family teacher snapshot (SmolLM2): which decoder blocks, MLP neurons
and tokens to keep, measured on the cached probe tokens, and the teacher weights sliced accordingly.

* blocks: ShortGPT's block influence BI_l = 1 - mean cos(h_in, h_out) over real tokens (a block that
  barely turns the residual stream is the cheapest to drop); the kept blocks keep their order.
* MLP neurons: NIWT-style first-order Taylor score |a * dL/da| on each block's down_proj input, with
  L = the log-likelihood of the TRUE next tokens (`core.importance.taylor_scores` idea, per neuron).
* attention heads (`heads_keep`): the same first-order Taylor estimate per query head, |sum over the head's
  dims of a * dL/da| on o_proj's input per token (the loss change of zeroing that head there); each kv
  group keeps its best `round(heads_keep * heads per group)` query heads, the same count in every block
  and group, so the carve is still a stock Llama (fewer `num_attention_heads`, explicit `head_dim`) and
  grouped-query attention pairs every kept query head with its own key/value head.
* tokens: the fewest ids covering `vocab_mass` of a combined mass: the train tokens themselves plus the
  teacher's cached next-token probabilities (top-k), so tokens the teacher predicts but the small probe
  corpus never spells still count; plus the special tokens.
* dropped tokens as INPUT: each reads as its nearest kept token (cosine of the teacher's input embedding
  rows), not as the one fallback slot. Measured with the teacher itself on held-out / never-seen rows
  (5% of their input tokens outside a 99.9%-mass vocabulary): teacher-forced top-1 agreement 0.78 / 0.79
  with the fallback's mean embedding, 0.86 / 0.86 with the nearest kept token, 0.84 / 0.84 with a rank-128
  embedding of every dropped row (3.2M more parameters); 0.99 / 0.97 with no token dropped.
* frequent dropped tokens as INPUT (`input_rows`): the N most frequent dropped train tokens keep the
  teacher's own input row, read-only (no output class: the tower cannot name them). Measured with the
  teacher itself (bench/vocabulary_cost.py part 2, the 11,322-token vocabulary, held-out / never-seen
  teacher-forced agreement): nearest kept token 0.775 / 0.820; own rows for the 2,000 / 4,000 / 8,000 most
  frequent dropped tokens 0.800 / 0.835, 0.821 / 0.846, 0.854 / 0.868. The trained student does not gain
  it (3,000 rows, text.generate retention 0.761 / 0.683 against 0.756 / 0.687: it learns to read the
  nearest-token stand-in), so the default is 0 (docs/experiments.md).
* size: blocks x MLP width chosen to fit `param_fraction` of the teacher's parameters (input rows included).
* embedding heads exit early: a pooled (sentence) head reads the first k carved blocks (through the final
  norm) and a pass for it alone runs no further. k is measured: the fewest blocks whose mean-pooled states
  a ridge map fits to the embedding teacher's cached train embeddings best (cosine on a held-back fold of
  the train rows). On the embedded default it picks block 1 of 9: deeper blocks of the depth-cut LM carry
  next-token features, not sentence meaning (probe on the trained tower, never-seen recall@1 retention
  0.70 reading block 1 vs 0.58 reading block 9), and the head runs 1/9 of the backbone.

Reads the teacher's safetensors with transformers' stock Llama classes: no teacher package is imported.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch


@dataclass
class TextCarveTarget:
    """How small the carved text tower must be.

    Attributes:
        param_fraction: the student's parameters / the teacher's, in (0, 1].
        mlp_keep: share of each kept block's MLP neurons kept, in (0, 1]; the block count then fills the
            budget (Minitron: width pruning retains more than depth pruning at equal size).
        vocab_mass: share of the train tokens the kept vocabulary must cover, in (0, 1].
        sample_rows: probe sequences used for block influence and neuron scores.
        min_blocks: refuse a budget that leaves fewer blocks.
        block_selection: "contiguous" drops the run of consecutive blocks whose input and output are the
            closest in angle (Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers"), so
            the kept blocks still see the residual stream they were trained on; "influence" keeps the
            blocks of highest block influence wherever they are (ShortGPT); "nll" removes blocks one at a
            time, each time the one whose removal raises the teacher's next-token loss on the probe rows
            least (SLEB; `greedy_block_removal`), scored over the kept vocabulary.
        input_rows: how many of the most frequent dropped train tokens keep an input-only embedding row
            (the teacher's); 0 = every dropped token reads as its nearest kept token.
        heads_keep: share of each kv group's query heads kept, in (0, 1] (at least one per group); the
            parameters it frees go to blocks, like `mlp_keep`'s.
    """

    param_fraction: float = 0.26
    mlp_keep: float = 0.5
    vocab_mass: float = 0.99
    sample_rows: int = 48
    min_blocks: int = 2
    block_selection: str = "contiguous"
    input_rows: int = 0
    heads_keep: float = 1.0

    def __post_init__(self):
        for f in ("param_fraction", "mlp_keep", "vocab_mass", "heads_keep"):
            v = getattr(self, f)
            if not (isinstance(v, (int, float)) and 0 < v <= 1):
                raise ValueError(f"text carve {f}: must be in (0, 1], got {v!r}")
        if self.block_selection not in ("contiguous", "influence", "nll"):
            raise ValueError(f"text carve block_selection: 'contiguous', 'influence' or 'nll', got "
                             f"{self.block_selection!r}")
        if self.sample_rows < 1 or self.min_blocks < 1:
            raise ValueError("text carve sample_rows and min_blocks: must be >= 1")
        if isinstance(self.input_rows, bool) or not isinstance(self.input_rows, int) or self.input_rows < 0:
            raise ValueError(f"text carve input_rows: must be an int >= 0, got {self.input_rows!r}")


def block_influence(hidden_states: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """ShortGPT block influence. hidden_states: (L + 1) x (B, T, H) (input of block 0 .. output of block
    L-1, *before* the final norm); mask (B, T) bool. Returns (L,): 1 - mean cosine(h_l, h_{l+1})."""
    m = mask.bool()
    out = []
    for a, b in zip(hidden_states[:-1], hidden_states[1:]):
        cos = torch.nn.functional.cosine_similarity(a[m].double(), b[m].double(), dim=-1)  # (N,)
        out.append(1.0 - cos.mean())
    return torch.stack(out).float()


def angular_distances(hidden_states: list[torch.Tensor], mask: torch.Tensor, n: int) -> torch.Tensor:
    """(L - n + 1,): mean over real tokens of arccos(cos(h_l, h_{l+n})) / pi, for each start l; dropping
    blocks l .. l+n-1 changes the residual stream least where it is smallest."""
    m = mask.bool()
    out = []
    for l in range(len(hidden_states) - n):
        cos = torch.nn.functional.cosine_similarity(hidden_states[l][m].double(), hidden_states[l + n][m].double(), dim=-1)
        out.append(torch.arccos(cos.clamp(-1, 1)).mean() / math.pi)
    return torch.stack(out).float()


def select_blocks(bi: torch.Tensor, angular: torch.Tensor | None, keep: int, how: str) -> list[int]:
    """Kept block indices (sorted). bi: (L,) block influence; angular: (L - (L-keep) + 1,) distances for
    dropping L - keep consecutive blocks (see `angular_distances`)."""
    n_layers = len(bi)
    if keep >= n_layers:
        return list(range(n_layers))
    if how == "influence":
        return sorted(torch.argsort(bi, descending=True)[:keep].tolist())
    start = int(torch.argmin(angular))
    drop = set(range(start, start + n_layers - keep))
    return [b for b in range(n_layers) if b not in drop]


def seeded_subset(items: Sequence, n: int) -> list:
    """n of `items` drawn evenly and reproducibly (seed 0): what each carver scores on. Sorted ids are
    grouped by source, so their first n all come from one (48 Brown press rows once)."""
    return [items[i] for i in np.random.default_rng(0).permutation(len(items))[:n]]


def greedy_block_removal(losses_without: Callable[[list[int]], Sequence[float]], n_blocks: int, keep: int,
                         log: Callable[[str], None] = print) -> tuple[list[int], list[dict]]:
    """SLEB (Song et al. 2024): remove one block at a time, the one whose removal raises the loss least,
    re-scoring the rest after every removal (which blocks are redundant changes as others go; a one-shot
    score of each block against the whole model does not see that).

    losses_without(kept) -> the loss of the model of blocks `kept` without kept[j], for each j.
    Returns (kept blocks, sorted; one {"dropped", "loss"} per removal, in order)."""
    if not 1 <= keep <= n_blocks:
        raise ValueError(f"greedy_block_removal: keep must be in 1..{n_blocks}, got {keep}")
    kept, trace = list(range(n_blocks)), []
    while len(kept) > keep:
        losses = [float(v) for v in losses_without(kept)]
        if len(losses) != len(kept):
            raise ValueError(f"greedy_block_removal: {len(losses)} losses for {len(kept)} kept blocks")
        j = min(range(len(kept)), key=lambda i: (losses[i], kept[i]))
        trace.append({"dropped": kept[j], "loss": round(losses[j], 5)})
        log(f"[text carve] {len(kept) - 1} blocks: drop {kept[j]} (loss {losses[j]:.4f})")
        kept.pop(j)
    return kept, trace


@torch.no_grad()
def nll_without_each(model, batches: list[tuple[torch.Tensor, torch.Tensor]], kept: list[int],
                     vocab: torch.Tensor | None = None) -> list[float]:
    """For each j: the mean next-token NLL of a Llama teacher run with blocks `kept` less kept[j], on
    `batches` of (ids (B, T), mask (B, T) bool). The states before kept[j] are those of the `kept` model,
    computed once per batch, so one call costs about half of len(kept) separate passes. `vocab`: score
    the softmax over these ids only (the kept vocabulary: what the carved student can predict); targets
    outside it are skipped."""
    from transformers.masking_utils import create_causal_mask

    inner = model.model
    w = model.lm_head.weight
    pos_of = None
    if vocab is not None:  # teacher id -> its row of the kept vocabulary (-1: not kept)
        pos_of = torch.full((w.shape[0],), -1, dtype=torch.long)
        pos_of[vocab] = torch.arange(len(vocab))
        w = w[vocab]
    sums, count = [0.0] * len(kept), 0
    for ids, mask in batches:
        pos = torch.arange(ids.shape[1])[None]
        h0 = inner.embed_tokens(ids)
        causal = create_causal_mask(config=model.config, inputs_embeds=h0, attention_mask=mask.long(),
                                    past_key_values=None, position_ids=pos)
        pe = inner.rotary_emb(h0, position_ids=pos)

        def run(h, blocks):
            for b in blocks:
                h = inner.layers[b](h, attention_mask=causal, position_embeddings=pe, position_ids=pos)
            return h

        inputs, h = [], h0
        for b in kept:  # the input of every kept block in the current model
            inputs.append(h)
            h = run(h, [b])
        tgt = ids[:, 1:]
        valid = mask[:, 1:] & mask[:, :-1]
        if pos_of is not None:
            tgt = pos_of[tgt]
            valid = valid & (tgt >= 0)
            tgt = tgt.clamp_min(0)
        for j in range(len(kept)):
            out = inner.norm(run(inputs[j], kept[j + 1:]))[:, :-1]
            logp = torch.log_softmax((out @ w.T).float(), -1).gather(-1, tgt[..., None])[..., 0]
            sums[j] -= float((logp * valid).sum())
        count += int(valid.sum())
    if count == 0:
        raise ValueError("text carve: no probe token to score block removal on")
    return [v / count for v in sums]


def vocab_by_coverage(counts: np.ndarray, mass: float, always: list[int]) -> list[int]:
    """Fewest ids whose counts cover `mass` of the total (ties by id), plus `always`; sorted ids."""
    total = counts.sum()
    if total <= 0:
        raise ValueError("text carve: no token counted (empty train split?)")
    order = np.lexsort((np.arange(len(counts)), -counts))
    cum = np.cumsum(counts[order]) / total
    n = int(np.searchsorted(cum, mass - 1e-12) + 1)
    return sorted(set(order[:n].tolist()) | set(always))


def frequent_dropped(counts: np.ndarray, vocab: list[int], n: int) -> list[int]:
    """The `n` dropped ids most frequent in `counts` (ties by id), those counted at least once; in that order."""
    dropped = np.ones(len(counts), dtype=bool)
    dropped[np.asarray(vocab, dtype=np.int64)] = False
    ids = np.nonzero(dropped & (counts > 0))[0]
    order = np.lexsort((ids, -counts[ids]))
    return ids[order][:n].tolist()


def with_input_rows(input_map: list[int], extra: list[int], fallback: int) -> list[int]:
    """`input_map` with each id of `extra` reading its own row: new id fallback + 1 + its index in `extra`."""
    out = list(input_map)
    for j, t in enumerate(extra):
        out[t] = fallback + 1 + j
    return out


def nearest_kept(embedding: torch.Tensor, vocab: list[int], chunk: int = 4096) -> list[int]:
    """Input map over the teacher's ids: a kept id -> its new id (its index in `vocab`), a dropped id -> the
    new id of the kept token whose embedding row is closest in cosine. embedding: (V_teacher, H)."""
    kept = torch.as_tensor(vocab, dtype=torch.long)
    if kept.numel() == 0:
        raise ValueError("text carve: the kept vocabulary is empty")
    unit = torch.nn.functional.normalize(embedding.float(), dim=-1)
    out = torch.empty(embedding.shape[0], dtype=torch.long)
    out[kept] = torch.arange(kept.numel())
    dropped = torch.ones(embedding.shape[0], dtype=torch.bool)
    dropped[kept] = False
    ids = torch.nonzero(dropped).squeeze(1)
    kept_unit = unit[kept].T
    for i in range(0, ids.numel(), chunk):
        part = ids[i:i + chunk]
        out[part] = (unit[part] @ kept_unit).argmax(-1)
    return out.tolist()


def ridge_fold_cosine(x: torch.Tensor, y: torch.Tensor, fold: float = 0.8, alpha: float = 1.0) -> float:
    """Mean cosine between y and a ridge regression of y on x fitted on the first `fold` of the rows and
    scored on the rest: how well a linear head on x reproduces y on rows it was not fitted to.
    x: (N, D), y: (N, E)."""
    n = x.shape[0]
    cut = int(n * fold)
    if cut < 2 or n - cut < 1:
        raise ValueError(f"ridge_fold_cosine: {n} rows leave no fit / held-back fold")
    x, y = x.double(), y.double()
    mx, my = x[:cut].mean(0), y[:cut].mean(0)
    a, b = x[:cut] - mx, y[:cut] - my
    w = torch.linalg.solve(a.T @ a + alpha * torch.eye(x.shape[1], dtype=x.dtype), a.T @ b)  # (D, E)
    pred = (x[cut:] - mx) @ w + my
    return float(torch.nn.functional.cosine_similarity(pred, y[cut:], dim=-1).mean())


def choose_exit_block(scores: list[float], tolerance: float = 0.005) -> int:
    """1-based block count an embedding head reads: the fewest blocks scoring within `tolerance` of the best
    (per-block scores, shallow to deep)."""
    if not scores:
        raise ValueError("choose_exit_block: no block scores")
    best = max(scores)
    return next(i + 1 for i, v in enumerate(scores) if v >= best - tolerance)


def pooled_block_states(net, batches) -> list[torch.Tensor]:
    """Per block of a carved backbone with `exit_norm`, the (N, W) mean-pooled states over `batches`
    (input dicts), read as an early-exit head reads them: through `exit_norm`, except the last block's,
    which the backbone's own forward already normed."""
    from nexus_assets.student.modules import _pool

    pooled: list[list[torch.Tensor]] = []
    for inputs in batches:
        hs, mask = net(inputs)
        pooled.append([_pool(net.exit_norm(h) if k < len(hs) - 1 else h, mask) for k, h in enumerate(hs)])
    return [torch.cat([p[k] for p in pooled]) for k in range(len(pooled[0]))]


@torch.no_grad()
def embedding_exit_block(plan: dict, model_dir: Path, token_rows: dict[str, list[int]],
                         targets: dict[str, np.ndarray], max_len: int, rows: int = 1024) -> dict:
    """{"blocks": k, "fold_cosine": per-block scores} for an embedding head over the carved (untrained)
    backbone of `plan`: ridge_fold_cosine of each block's mean-pooled states, read as an early-exit head
    reads them (the backbone's own forward and `exit_norm`), against `targets` (train row_id -> the
    teacher's embedding)."""
    from nexus_assets.student.carved_text import CarvedLlamaBackbone
    from nexus_assets.student.config import HeadSpec, TowerConfig

    ids = sorted(r for r in targets if r in token_rows)
    ids = seeded_subset(ids, rows)
    if len(ids) < 16:
        raise ValueError(f"text carve: {len(ids)} train rows have both LM tokens and embedding targets (< 16)")
    hf, nv = plan["hf_config"], len(plan["vocab"]) + 1
    cfg = TowerConfig(name="text", modality="text", width=hf["hidden_size"], depth=len(plan["blocks"]),
                      n_heads=hf["num_attention_heads"], vocab_size=nv, max_len=max_len,
                      capabilities={"text.generate": HeadSpec("lm", nv)}, lora_rank={"text.generate": 1},
                      init="carved", carve=plan)
    net = CarvedLlamaBackbone(cfg).eval()
    net.load_state_dict({k[len("backbone."):]: v for k, v in carved_text_state(plan, model_dir).items()})

    def batches():
        for i in range(0, len(ids), 32):
            chunk = [token_rows[r][:max_len] for r in ids[i:i + 32]]
            x = torch.zeros(len(chunk), max(len(c) for c in chunk), dtype=torch.long)  # teacher ids, right padded
            m = torch.zeros(x.shape, dtype=torch.bool)
            for j, c in enumerate(chunk):
                x[j, :len(c)], m[j, :len(c)] = torch.as_tensor(c, dtype=torch.long), True
            yield {"input_ids": x, "attention_mask": m}

    y = torch.as_tensor(np.stack([targets[r] for r in ids]), dtype=torch.float32)
    scores = [ridge_fold_cosine(x, y) for x in pooled_block_states(net, batches())]
    return {"blocks": choose_exit_block(scores), "fold_cosine": [round(v, 4) for v in scores], "rows": len(ids)}


def head_dim(cfg: dict) -> int:
    """Width of one attention head of a Llama config dict (explicit `head_dim`, else hidden / heads)."""
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def heads_per_group(n_heads: int, n_kv: int, keep: float) -> int:
    """Query heads each kv group keeps: round(keep * n_heads / n_kv), at least 1."""
    if n_kv < 1 or n_heads % n_kv:
        raise ValueError(f"text carve: {n_heads} query heads do not split into {n_kv} kv groups")
    return max(1, min(n_heads // n_kv, int(round(keep * n_heads / n_kv))))


def select_heads(scores: torch.Tensor, n_kv: int, per_group: int) -> list[int]:
    """Kept query heads of one block: the `per_group` best-scoring heads of each kv group (query head i
    belongs to group i // (H / n_kv), as in transformers' repeat_kv), in head order, so the kept heads stay
    grouped by their key/value head. scores: (H,)."""
    g = scores.numel() // n_kv
    out = []
    for k in range(n_kv):
        top = torch.argsort(scores[k * g:(k + 1) * g], descending=True, stable=True)[:per_group]
        out += sorted((k * g + top).tolist())
    return out


def layer_budget(teacher_cfg: dict, vocab_size: int, target: TextCarveTarget, teacher_params: int,
                 input_rows: int = 0) -> tuple[int, int]:
    """(blocks, mlp width) fitting param_fraction * teacher_params with the kept vocabulary (tied) and
    `input_rows` input-only rows."""
    h, heads, kv = teacher_cfg["hidden_size"], teacher_cfg["num_attention_heads"], teacher_cfg["num_key_value_heads"]
    d = head_dim(teacher_cfg)
    inter = max(1, int(round(teacher_cfg["intermediate_size"] * target.mlp_keep)))
    heads = kv * heads_per_group(heads, kv, target.heads_keep)
    per_block = h * heads * d * 2 + h * kv * d * 2 + 3 * h * inter + 2 * h
    fixed = (vocab_size + 1 + input_rows) * h + h
    if target.param_fraction >= 1.0:  # no depth cut asked for (the fallback row alone must not drop a block)
        return teacher_cfg["num_hidden_layers"], inter
    budget = target.param_fraction * teacher_params
    blocks = int((budget - fixed) // per_block)
    if blocks < target.min_blocks:
        raise ValueError(f"tower 'text': param_fraction {target.param_fraction} leaves {max(blocks, 0)} blocks "
                         f"(< min_blocks {target.min_blocks}) after a {vocab_size}-token vocabulary and "
                         f"{input_rows} input rows; raise param_fraction or lower vocab_mass / mlp_keep / input_rows")
    return min(blocks, teacher_cfg["num_hidden_layers"]), inter


def _load_teacher(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def _sample_batches(token_rows: dict[str, list[int]], n: int, max_len: int, bs: int = 8):
    """Batches of n train rows (`seeded_subset` of the sorted row ids)."""
    ids = [v[:max_len] for _, v in seeded_subset(sorted(token_rows.items()), n) if len(v) >= 2]
    for i in range(0, len(ids), bs):
        chunk = ids[i:i + bs]
        t = max(len(x) for x in chunk)
        x = torch.zeros(len(chunk), t, dtype=torch.long)
        m = torch.zeros(len(chunk), t, dtype=torch.bool)
        for j, row in enumerate(chunk):
            x[j, : len(row)], m[j, : len(row)] = torch.tensor(row), True
        yield x, m


def score_teacher(model, batches, n_drop: int = 0
                  ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None, list[torch.Tensor]]:
    """(block influence (L,), per-block MLP neuron Taylor scores [(I,)], angular distances for dropping
    n_drop consecutive blocks (or None), per-block query-head Taylor scores [(H,)]) over the probe batches."""
    layers = model.model.layers
    n_heads = model.config.num_attention_heads
    acts: dict[int, torch.Tensor] = {}
    head_acts: dict[int, torch.Tensor] = {}
    def keep_input(store: dict, i: int):  # a forward pre-hook keeping the module's input (and its grad)
        def hook(mod, args):
            args[0].retain_grad()
            store[i] = args[0]
        return hook

    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(keep_input(acts, i)))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(keep_input(head_acts, i)))
    bi_sum = torch.zeros(len(layers))
    ang_sum = None
    taylor = [torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.float64) for layer in layers]
    head_taylor = [torch.zeros(n_heads, dtype=torch.float64) for _ in layers]
    n_batches = 0
    try:
        for ids, mask in batches:
            model.zero_grad(set_to_none=True)
            out = model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
            # (hidden_states[-1] is after the final norm; cosine is scale-invariant per token, and RMSNorm's
            # learned gain is the only distortion, accepted for the last block)
            hs = [h.detach() for h in out.hidden_states]
            bi_sum += block_influence(hs, mask)
            if n_drop > 0:
                a = angular_distances(hs, mask, n_drop)
                ang_sum = a if ang_sum is None else ang_sum + a
            logp = torch.log_softmax(out.logits[:, :-1].float(), -1)
            tgt = ids[:, 1:]
            valid = (mask[:, 1:] & mask[:, :-1]).float()
            ll = (logp.gather(-1, tgt[..., None])[..., 0] * valid).sum()
            ll.backward()
            for i, a in acts.items():
                s = (a.detach() * a.grad).abs() * mask[..., None]  # (B, T, I)
                taylor[i] += s.sum((0, 1)).double()
            for i, a in head_acts.items():  # (B, T, H * d): zeroing head k at a token changes L by ~ -sum_d a g
                ag = (a.detach() * a.grad).unflatten(-1, (n_heads, -1)).sum(-1).abs() * mask[..., None]  # (B, T, H)
                head_taylor[i] += ag.sum((0, 1)).double()
            n_batches += 1
    finally:
        for h in hooks:
            h.remove()
    if n_batches == 0:
        raise ValueError("text carve: no probe sequence with >= 2 tokens to score")
    return (bi_sum / n_batches, [t.float() for t in taylor], None if ang_sum is None else ang_sum / n_batches,
            [t.float() for t in head_taylor])


def plan_text_carve(model_dir: Path, *, token_rows: dict[str, list[int]], topk_ids: np.ndarray,
                    target: TextCarveTarget, max_len: int, log: Callable[[str], None] = print,
                    topk_probs: np.ndarray | None = None) -> dict:
    """The carve plan (JSON-able) of the text tower and its report.

    Args:
        model_dir: the teacher snapshot's stock Llama folder (config.json + safetensors).
        token_rows: train row_id -> teacher token ids (cached), for block / neuron scores and coverage.
        topk_ids: the teacher's cached top-k ids on the train split, (N, k).
        topk_probs: their probabilities (N, k); None weighs every listed id as one occurrence.
    """
    model = _load_teacher(model_dir)
    tcfg = model.config.to_dict()
    teacher_vocab = int(model.config.vocab_size)
    teacher_params = sum(p.numel() for p in model.parameters())
    counts = np.zeros(teacher_vocab, dtype=np.float64)
    for ids in token_rows.values():
        np.add.at(counts, np.asarray(ids, dtype=np.int64), 1.0)
    soft = np.zeros(teacher_vocab, dtype=np.float64)  # expected next-token counts under the teacher
    tk = np.asarray(topk_ids, dtype=np.int64)
    np.add.at(soft, tk.reshape(-1), (np.ones(tk.shape) if topk_probs is None else np.asarray(topk_probs)).reshape(-1))
    specials = sorted({int(i) for i in (tcfg.get("bos_token_id"), tcfg.get("eos_token_id"),
                                          tcfg.get("pad_token_id")) if isinstance(i, int)})
    vocab = vocab_by_coverage(counts + soft, target.vocab_mass, specials)
    extra = frequent_dropped(counts, vocab, target.input_rows)
    blocks, inter = layer_budget(tcfg, len(vocab), target, teacher_params, input_rows=len(extra))
    log(f"[text carve] vocabulary {len(vocab)}/{teacher_vocab} (covering {target.vocab_mass:.3%} of the train "
        f"tokens + the teacher's next-token mass), {len(extra)} input-only rows; budget: {blocks} blocks, MLP {inter}")
    n_layers = model.config.num_hidden_layers
    batches = list(_sample_batches(token_rows, target.sample_rows, max_len))
    bi, taylor, ang, head_taylor = score_teacher(model, batches, n_drop=n_layers - blocks)
    removal = []
    if target.block_selection == "nll" and blocks < n_layers:
        vocab_t = torch.as_tensor(vocab, dtype=torch.long)
        kept_blocks, removal = greedy_block_removal(lambda k: nll_without_each(model, batches, k, vocab_t),
                                                    n_layers, blocks, log=log)
    else:
        kept_blocks = select_blocks(bi, ang, blocks, target.block_selection)
    kept_neurons = {}
    mass = {}
    for b in kept_blocks:
        order = torch.argsort(taylor[b], descending=True)[:inter]
        kept_neurons[str(b)] = sorted(order.tolist())
        mass[str(b)] = float(taylor[b][order].sum() / taylor[b].sum().clamp_min(1e-30))
    n_heads, n_kv = tcfg["num_attention_heads"], tcfg["num_key_value_heads"]
    per_group = heads_per_group(n_heads, n_kv, target.heads_keep)
    kept_heads, head_mass = {}, {}
    for b in kept_blocks:
        kept_heads[str(b)] = select_heads(head_taylor[b], n_kv, per_group)
        head_mass[str(b)] = float(head_taylor[b][kept_heads[str(b)]].sum() / head_taylor[b].sum().clamp_min(1e-30))
    # teacher layer "layers.i" = its hidden_states[i] = output of block i-1; the student's hidden_states[j]
    # is the output of its (j-1)-th kept block. Anchor a teacher layer only where that block was kept.
    anchor_map = {}
    for i in range(1, n_layers + 1):
        if i == n_layers:
            anchor_map[f"layers.{i}"] = len(kept_blocks)
        elif (i - 1) in kept_blocks:
            anchor_map[f"layers.{i}"] = kept_blocks.index(i - 1) + 1
    hf = {k: tcfg[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                                "rope_theta", "max_position_embeddings", "hidden_act", "attention_bias",
                                "mlp_bias", "head_dim", "rope_scaling", "rope_parameters") if k in tcfg}
    hf.update(num_hidden_layers=len(kept_blocks), intermediate_size=inter, num_attention_heads=n_kv * per_group,
              head_dim=head_dim(tcfg))
    eos = tcfg.get("eos_token_id")
    eos_ids = [e for e in (eos if isinstance(eos, list) else [eos]) if isinstance(e, int) and e in set(vocab)]
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):  # the carved shape, to count its parameters exactly
        shape = LlamaForCausalLM(LlamaConfig(**{**hf, "vocab_size": len(vocab) + 1 + len(extra),
                                                "tie_word_embeddings": True}))
    student_params = sum(p.numel() for p in shape.parameters())
    input_map = with_input_rows(nearest_kept(model.get_input_embeddings().weight.detach(), vocab), extra, len(vocab))
    report = {
        "teacher_params": int(teacher_params), "student_params": int(student_params),
        "param_fraction": student_params / teacher_params,
        "blocks_kept": kept_blocks, "blocks_dropped": [b for b in range(n_layers) if b not in kept_blocks],
        "block_influence": [round(float(x), 5) for x in bi],
        "block_selection": target.block_selection,
        "block_removal_order": removal,
        "angular_distance_of_dropped_run": None if ang is None else round(float(ang.min()), 4),
        "mlp_neurons_kept": f"{inter}/{tcfg['intermediate_size']} per block",
        "mlp_importance_mass_kept": {k: round(v, 4) for k, v in mass.items()},
        "vocab_kept": len(vocab), "vocab_teacher": teacher_vocab,
        "dropped_input_tokens": (f"the {len(extra)} most frequent read their own (teacher) input row, the rest "
                                 "as their nearest kept token (teacher input-embedding cosine)"),
        "input_rows": len(extra),
        "train_token_coverage": float(counts[vocab].sum() / max(counts.sum(), 1.0)),
        "train_input_token_coverage": float(counts[vocab + extra].sum() / max(counts.sum(), 1.0)),
        "teacher_next_token_mass_covered": float(soft[vocab].sum() / max(soft.sum(), 1e-12)),
        "heads": (f"all {n_heads} query / {n_kv} kv heads kept" if per_group * n_kv == n_heads else
                  f"{per_group * n_kv}/{n_heads} query heads per block ({per_group} of each of the {n_kv} kv groups), "
                  f"every kv head kept"),
        "head_importance_mass_kept": {k: round(v, 4) for k, v in head_mass.items()},
    }
    log(f"[text carve] keep blocks {kept_blocks} of {n_layers}; {student_params / 1e6:.1f}M of "
        f"{teacher_params / 1e6:.1f}M params ({report['param_fraction']:.2f})")
    return {"family": "llama", "teacher_vocab": teacher_vocab, "vocab": vocab, "hf_config": hf,
            "blocks": kept_blocks, "mlp_neurons": kept_neurons, "attention_heads": kept_heads,
            "anchor_map": anchor_map, "eos_ids": eos_ids,
            "input_map": input_map, "input_rows": extra, "target": asdict(target), "report": report}


def carved_text_config(base, plan: dict, lora_rank: int):
    """`base` (the text tower's heads) turned into the carved tower: the teacher's width, heads and kept
    blocks, the "lm" head over the kept vocabulary + fallback, LoRA rank `lora_rank` per capability."""
    import dataclasses

    hf = plan["hf_config"]
    nv = len(plan["vocab"]) + 1
    caps = {c: (dataclasses.replace(h, out_dim=nv) if h.kind == "lm" else h) for c, h in base.capabilities.items()}
    for c, k in plan.get("exit_blocks", {}).items():
        if c in caps:
            caps[c] = dataclasses.replace(caps[c], exit_block=int(k))
    return dataclasses.replace(base, width=hf["hidden_size"], depth=len(plan["blocks"]),
                               n_heads=hf["num_attention_heads"], vocab_size=nv, capabilities=caps,
                               lora_rank={c: lora_rank for c in caps}, init="carved", carve=plan)


def carved_text_state(plan: dict, model_dir: Path) -> dict[str, torch.Tensor]:
    """StudentTower state-dict entries ("backbone.lm.…") sliced from the teacher's weights by `plan`."""
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"text carve: no *.safetensors in {model_dir}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    vocab = torch.as_tensor(plan["vocab"], dtype=torch.long)
    emb = sd["model.embed_tokens.weight"]
    # the fallback slot starts as the mean of the dropped rows: "any other token"
    dropped = torch.ones(emb.shape[0], dtype=torch.bool)
    dropped[vocab] = False
    fallback = emb[dropped].mean(0, keepdim=True) if dropped.any() else emb.mean(0, keepdim=True)
    extra = torch.as_tensor(plan.get("input_rows", []), dtype=torch.long)  # input-only rows, after the fallback
    out = {"backbone.lm.model.embed_tokens.weight": torch.cat([emb[vocab], fallback, emb[extra]]).contiguous(),
           "backbone.lm.model.norm.weight": sd["model.norm.weight"]}
    out["backbone.lm.lm_head.weight"] = out["backbone.lm.model.embed_tokens.weight"]
    for j, b in enumerate(plan["blocks"]):
        src, dst = f"model.layers.{b}.", f"backbone.lm.model.layers.{j}."
        keep = torch.as_tensor(plan["mlp_neurons"][str(b)], dtype=torch.long)
        heads = plan.get("attention_heads", {}).get(str(b))  # older plans kept every head
        q_rows = None
        if heads is not None:  # the plan writes its head_dim with every head map
            d = plan["hf_config"]["head_dim"]
            q_rows = torch.cat([torch.arange(k * d, (k + 1) * d) for k in heads])
        for k, v in sd.items():
            if not k.startswith(src):
                continue
            name = k[len(src):]
            if q_rows is not None and name in ("self_attn.q_proj.weight", "self_attn.q_proj.bias"):
                v = v[q_rows]
            elif q_rows is not None and name == "self_attn.o_proj.weight":
                v = v[:, q_rows]
            elif name in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                v = v[keep]
            elif name == "mlp.down_proj.weight":
                v = v[:, keep]
            elif name.startswith("mlp.") and name.endswith("bias") and "down" not in name:
                v = v[keep]
            out[dst + name] = v.contiguous()
    return out


def token_rows_from_cache(entry: Path, splits=("train",)) -> tuple[dict[str, list[int]], np.ndarray, np.ndarray]:
    """(row_id -> ordered teacher token ids, cached top-k ids (N, k), their probabilities (N, k)) of the
    LM teacher's feature cache, `splits` only."""
    from nexus_assets.core.feature_store import column_matrix, read_features

    items = read_features(Path(entry), "items", columns=["row_id"], filter_splits=list(splits))
    keep = set(items.column("row_id").to_pylist())
    tok = read_features(Path(entry), "tokens", columns=["row_id", "position", "token_id", "topk_ids", "topk_logits",
                                                        "logsumexp"])
    rid = tok.column("row_id").to_pylist()
    pos = tok.column("position").to_numpy()
    tid = tok.column("token_id").to_numpy()
    sel = np.fromiter((r in keep for r in rid), dtype=bool, count=len(rid))
    rows: dict[str, list[tuple[int, int]]] = {}
    for r, p, t in zip(np.asarray(rid, dtype=object)[sel], pos[sel], tid[sel]):
        rows.setdefault(r, []).append((int(p), int(t)))
    topk = column_matrix(tok.column("topk_ids"))[sel]
    lse = tok.column("logsumexp").to_numpy()[sel]
    probs = np.exp(column_matrix(tok.column("topk_logits"))[sel].astype(np.float64) - lse[:, None])
    return {r: [t for _, t in sorted(v)] for r, v in rows.items()}, topk, probs
