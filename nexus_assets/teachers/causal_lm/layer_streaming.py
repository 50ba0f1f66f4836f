"""Layer-streamed causal-LM feature extraction for teachers whose weights do not fit in memory.

The in-memory adapter (`nexus_assets.teachers.causal_lm`) loads the whole model and runs one forward per
batch. Here the loop is turned inside out: the model is run ONE DECODER BLOCK AT A TIME over the whole
batch of probe inputs. Block i's tensors are read from the safetensors shards with `safe_open` (zero-copy
memory maps, so only the pages of that block are touched), every input's hidden state is pushed through
it, then the block is dropped and its mapping released. Peak memory is therefore bounded by the largest
block (a mixture-of-experts block is loaded whole: router + all experts) plus the hidden states between
blocks, which are kept in RAM while they fit `memory_cap_bytes` and otherwise spilled to a file and
streamed back micro-batch by micro-batch.

The embedding matrix is only gathered at the input ids' rows, and the LM head is read in vocab chunks
whose top-k and logsumexp are merged on the fly, so neither the full (V, H) head nor the (B, T, V) logits
are ever resident at once.

Outputs are the same columns as `nexus_assets.teachers.causal_lm.lm_outputs` (HF `output_hidden_states`
semantics: hidden_states[0] is the embedding output, hidden_states[i] the output of block i, and
hidden_states[num_hidden_layers] is after the final norm). Modules, rotary embeddings and attention masks
come from transformers itself (the model is instantiated on the meta device and its own layer, rotary
and mask code is called), so streamed outputs equal the full forward up to float rounding.

Dagster-free: the teacher-features asset decides with `should_stream` and calls `stream_causal_lm`.
"""
from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .checkpoint_reader import (SUPPORTED_MODEL_TYPES, _Checkpoint, _materialise, should_stream,  # noqa: F401
                                weights_bytes)

# Families whose block structure, checkpoint key layout and mask rule have been checked against the full
# forward (tests). Others are refused rather than risking silently different features.


# ----------------------------------------------------------------------------------------------------
# hidden states between blocks


class _HiddenStore:
    """The (B, T, H) hidden states between blocks: a tensor in RAM, or a raw file read back per micro-batch.

    Rows are read, pushed through a block, and written back in place, so one buffer serves every block.
    """

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype, memory_cap_bytes: int, spill_dir: Path | None):
        self.shape, self.dtype = shape, dtype
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        self.row_bytes = shape[1] * shape[2] * self.itemsize
        self.nbytes = shape[0] * self.row_bytes
        self.path: Path | None = None
        self._tmpdir = None
        if self.nbytes <= memory_cap_bytes:
            self.ram = torch.empty(shape, dtype=dtype)
            return
        self.ram = None
        if spill_dir is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="nexus-spill-")
            spill_dir = Path(self._tmpdir.name)
        spill_dir.mkdir(parents=True, exist_ok=True)
        self.path = Path(spill_dir) / f"hidden-{uuid.uuid4().hex}.bin"
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(self._fd, self.nbytes)

    @property
    def spilled(self) -> bool:
        return self.ram is None

    def read(self, start: int, stop: int) -> torch.Tensor:  # (stop-start, T, H)
        if self.ram is not None:
            return self.ram[start:stop]
        n = (stop - start) * self.row_bytes
        buf = bytearray(n)
        got = os.preadv(self._fd, [buf], start * self.row_bytes)
        if got != n:
            raise IOError(f"{self.path}: short read ({got} of {n} bytes)")
        return torch.frombuffer(buf, dtype=self.dtype).reshape(stop - start, *self.shape[1:])

    def write(self, start: int, h: torch.Tensor) -> None:
        if self.ram is not None:
            self.ram[start:start + h.shape[0]] = h
            return
        data = h.contiguous().view(torch.uint8).numpy()
        os.pwrite(self._fd, data, start * self.row_bytes)

    def close(self) -> None:
        if self.path is not None:
            os.close(self._fd)
            self.path.unlink(missing_ok=True)
            self.path = None
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None
        self.ram = None


# ----------------------------------------------------------------------------------------------------
# the streamed forward


def _mask_kind(config, i: int) -> str:
    """Which attention mask layer i uses, by the same rule as the model's own forward."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return layer_types[i]
    return "sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"


def _checked_config(model_dir: Path, input_ids, attention_mask, layers, token_layers, top_k, micro_batch,
                    memory_cap_bytes):
    """The model's config, after refusing every argument `stream_causal_lm` cannot honour."""
    from transformers import AutoConfig

    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids and attention_mask must both be (B, T); got {tuple(input_ids.shape)}, "
                         f"{tuple(attention_mask.shape)}")
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    if memory_cap_bytes < 0:
        raise ValueError(f"memory_cap_bytes must be >= 0, got {memory_cap_bytes}")
    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{model_dir}: model_type {config.model_type!r} is not supported for layer streaming; "
                         f"supported: {SUPPORTED_MODEL_TYPES}")
    if getattr(config, "final_logit_softcapping", None):
        raise ValueError(f"{model_dir}: final_logit_softcapping is not supported for layer streaming")
    L, V = config.num_hidden_layers, config.vocab_size
    bad = [i for i in list(layers) + list(token_layers) if not 0 <= i <= L]
    if bad:
        raise ValueError(f"layers/token_layers {bad} out of range 0..{L} (num_hidden_layers={L})")
    if not 1 <= top_k <= V:
        raise ValueError(f"top_k must be in 1..{V} (vocab_size), got {top_k}")
    return config


@torch.inference_mode()
def stream_causal_lm(
    model_dir: Path,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    layers: list[int],
    token_layers: list[int],
    top_k: int,
    memory_cap_bytes: int,
    spill_dir: Path | None = None,
    micro_batch: int = 8,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Run a causal LM block by block over a whole batch and return its teacher features.

    Args:
        model_dir: folder with config.json and model.safetensors or model.safetensors.index.json + shards.
        input_ids: (B, T) token ids, padded left or right.
        attention_mask: (B, T) 1 for real tokens, 0 for padding.
        layers: hidden-state indices to mean-pool per item, 0..num_hidden_layers (HF hidden_states indexing).
        token_layers: hidden-state indices also returned per non-pad token.
        top_k: logits kept per position.
        memory_cap_bytes: the (B, T, H) hidden states stay in RAM up to this size, else they are spilled.
        spill_dir: where the spill file goes (a temporary folder if None); the file is removed at the end.
        micro_batch: rows pushed through a block at once (bounds activation memory).
        dtype: compute dtype; checkpoint tensors are cast to it.
        progress: called as progress(stage, done, total) after the embeddings, each block and the head.

    Returns:
        {"items": {f"hidden.{i}": (B, H) float32}, "tokens": {"item_index", "position", "token_id" (N,) int32,
        "topk_ids" (N, k) int32, "topk_logits" (N, k) float32, "logsumexp" (N,) float32,
        f"hidden.{i}": (N, H) float32}, "info": {...}} with tokens over non-pad positions in (item, position)
        order; a position's logits predict the next token.
    """
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    config = _checked_config(model_dir, input_ids, attention_mask, layers, token_layers, top_k, micro_batch,
                             memory_cap_bytes)
    L, V = config.num_hidden_layers, config.vocab_size
    ckpt = _Checkpoint(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    config = model.config  # carries the attention / experts implementation the full model would use
    base = model.model

    B, T = input_ids.shape
    H = config.hidden_size
    ids = input_ids.long()
    am = attention_mask.long()
    keep = am.bool()  # (B, T)
    counts = keep.sum(1)  # (B,) non-pad tokens per item
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])  # token-row start of each item
    N = int(offsets[-1])
    mbs = [(s, min(s + micro_batch, B)) for s in range(0, B, micro_batch)]
    report = progress or (lambda stage, done, total: None)

    items = {i: np.zeros((B, H), dtype=np.float32) for i in sorted(set(layers))}
    tok_hidden = {i: np.zeros((N, H), dtype=np.float32) for i in sorted(set(token_layers))}

    def record(i: int, s: int, e: int, h: torch.Tensor) -> None:  # h (e-s, T, H) = hidden_states[i] rows s:e
        if i in items:
            m = keep[s:e].unsqueeze(-1).to(h.dtype)  # (b, T, 1)
            items[i][s:e] = ((h * m).sum(1) / m.sum(1).clamp_min(1e-9)).float().numpy()
        if i in tok_hidden:
            tok_hidden[i][int(offsets[s]):int(offsets[e])] = h[keep[s:e]].float().numpy()

    store = _HiddenStore((B, T, H), dtype, memory_cap_bytes, spill_dir)
    try:
        _embed(base, ckpt, ids, mbs, record, store, dtype, V, model_dir)
        report("embed", 0, L + 1)
        _stream_blocks(base, config, ckpt, store, am, mbs, record, dtype, report)

        # hidden_states[L] is after the final norm (as output_hidden_states returns it)
        norm = _materialise(base.norm, "model.norm.", ckpt, config.model_type, dtype)
        for s, e in mbs:
            h = norm(store.read(s, e))
            record(L, s, e, h)
            store.write(s, h)
        del norm

        next_ids = _next_token_ids(ids, keep)  # (N,) the true next token of each kept position, or -1
        topk_ids, topk_logits, lse, target_logit = _streamed_head(model, config, ckpt, store, keep, mbs, N, top_k,
                                                                  dtype, next_ids)
        report("head", L + 1, L + 1)
        spilled = store.spilled
    finally:
        store.close()

    return _pack_outputs(ids, keep, topk_ids, topk_logits, lse, target_logit, next_ids, items, tok_hidden,
                         {"spilled": spilled, "num_hidden_layers": L, "model_type": config.model_type})


def _pack_outputs(ids, keep, topk_ids, topk_logits, lse, target_logit, next_ids, items, tok_hidden, info) -> dict:
    """The feature columns `stream_causal_lm` returns (its docstring lists them)."""
    b_idx, t_idx = torch.nonzero(keep, as_tuple=True)  # row-major: (item, position) order
    tokens = {
        "item_index": b_idx.numpy().astype(np.int32),
        "position": t_idx.numpy().astype(np.int32),
        "token_id": ids[keep].numpy().astype(np.int32),
        "topk_ids": topk_ids.numpy().astype(np.int32),
        "topk_logits": topk_logits.float().numpy(),
        "logsumexp": lse.float().numpy(),
        "next_logprob": torch.where(next_ids >= 0, target_logit - lse, 0.0).float().numpy(),
        "has_next": (next_ids >= 0).numpy(),
    }
    tokens.update({f"hidden.{i}": a for i, a in tok_hidden.items()})
    return {
        "items": {f"hidden.{i}": a for i, a in items.items()},
        "tokens": tokens,
        "info": info,
    }


def _embed(base, ckpt, ids, mbs, record, store, dtype, V: int, model_dir) -> None:
    """hidden_states[0]: gather only the needed rows of the (V, H) embedding map, then cast."""
    embed = base.embed_tokens
    if type(embed) is not torch.nn.Embedding:
        raise ValueError(f"{model_dir}: embedding {type(embed).__name__} is not a plain nn.Embedding")
    uniq, inverse = torch.unique(ids, sorted=True, return_inverse=True)  # (U,), (B, T)
    if int(uniq.min()) < 0 or int(uniq.max()) >= V:
        raise ValueError(f"input_ids must be in 0..{V - 1} (vocab_size)")
    table = ckpt.rows("model.embed_tokens.weight", uniq, dtype)  # (U, H): only the rows used
    for s, e in mbs:
        h = torch.nn.functional.embedding(inverse[s:e], table)  # (b, T, H)
        record(0, s, e, h)
        store.write(s, h)
    del table


def _stream_blocks(base, config, ckpt, store, am, mbs, record, dtype, report) -> None:
    """Every decoder block in turn: materialised from the checkpoint, run over every micro-batch of the
    stored hidden states (rewriting them in place), then dropped."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    L = config.num_hidden_layers
    position_ids = torch.arange(am.shape[1]).unsqueeze(0)  # (1, T): the full forward's default, padding included
    rotary = type(base.rotary_emb)(config=config)  # real (CPU) inv_freq; the meta copy has none
    for i in range(L):
        layer = _materialise(base.layers[i], f"model.layers.{i}.", ckpt, config.model_type, dtype)
        kind = _mask_kind(config, i)
        mask_fn = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
        for s, e in mbs:
            h = store.read(s, e)  # (b, T, H)
            mask = mask_fn(config=config, inputs_embeds=h, attention_mask=am[s:e], past_key_values=None,
                           position_ids=position_ids)
            pos = rotary(h, position_ids)  # (cos, sin), each (1, T, head_dim)
            out = layer(h, attention_mask=mask, position_embeddings=pos, position_ids=position_ids,
                        past_key_values=None, use_cache=False)
            out = out[0] if isinstance(out, tuple) else out
            if i + 1 < L:
                record(i + 1, s, e, out)
            store.write(s, out)
        base.layers[i] = torch.nn.Module()  # drop the block: its tensors and mapped pages go with it
        del layer
        report("block", i + 1, L + 1)


def _head_name(config, ckpt: _Checkpoint) -> str:
    if "lm_head.weight" in ckpt.files:
        return "lm_head.weight"
    if config.tie_word_embeddings:
        return "model.embed_tokens.weight"
    raise KeyError(f"{ckpt.model_dir}: lm_head.weight missing and tie_word_embeddings is False")


def _next_token_ids(ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """ids, keep (B, T) -> (N,) for the kept positions in row-major order: ids[b, t+1] if kept, else -1."""
    nxt = torch.full_like(ids, -1)
    nxt[:, :-1] = torch.where(keep[:, 1:], ids[:, 1:], torch.full_like(ids[:, 1:], -1))
    return nxt[keep]


def _streamed_head(model, config, ckpt, store, keep, mbs, N, top_k, dtype, next_ids):
    """Top-k and logsumexp of lm_head(hidden_states[L]) for every non-pad token, vocab chunk by chunk.

    The head is read in row chunks of at most half the largest decoder block and logits exist only as
    (rows, chunk) tiles of at most an eighth of it, so the head phase stays under the block phase's peak. Running top-k: merge the kept k with the chunk's top-k;
    running logsumexp: logaddexp. The logit of each position's true next token (next_ids (N,), -1 = none)
    is picked from whichever chunk holds it. Returns topk_ids (N, k), topk_logits (N, k), logsumexp (N,),
    target_logit (N,).
    """
    name = _head_name(config, ckpt)
    if getattr(model.lm_head, "bias", None) is not None:
        raise ValueError(f"{ckpt.model_dir}: lm_head with bias is not supported for layer streaming")
    V, H = ckpt.shape(name)
    itemsize = torch.empty((), dtype=dtype).element_size()
    block_bytes = max(sum(ckpt.nbytes(n) for n in ckpt.names_with_prefix(f"model.layers.{i}."))
                      for i in range(config.num_hidden_layers))
    budget = max(block_bytes, 4 << 20)
    # head chunk <= half a block; a logits tile <= 1/8 block (logsumexp and topk each make a temporary)
    vchunk = max(1, min(V, budget // 2 // (H * itemsize)))
    rows_per_tile = max(1, budget // 8 // (vchunk * 4))
    best_val = torch.full((N, top_k), -torch.inf)
    best_idx = torch.zeros((N, top_k), dtype=torch.long)
    lse = torch.full((N,), -torch.inf)
    target_logit = torch.zeros(N)
    for v0 in range(0, V, vchunk):
        w = ckpt.rows(name, torch.arange(v0, min(v0 + vchunk, V)), dtype)  # (vc, H)
        n0 = 0
        for s, e in mbs:
            x = store.read(s, e)[keep[s:e]]  # (n, H) final-normed states of the non-pad tokens
            for r0 in range(0, x.shape[0], rows_per_tile):
                r1 = min(r0 + rows_per_tile, x.shape[0])
                logits = (x[r0:r1] @ w.T).float()  # (r, vc)
                a, b = n0 + r0, n0 + r1
                lse[a:b] = torch.logaddexp(lse[a:b], torch.logsumexp(logits, -1))
                tgt = next_ids[a:b] - v0
                hit = (tgt >= 0) & (tgt < logits.shape[1])
                if hit.any():
                    rows = torch.nonzero(hit)[:, 0]
                    target_logit[a + rows] = logits[rows, tgt[rows]]
                kk = min(top_k, logits.shape[1])
                cv, ci = torch.topk(logits, kk, dim=-1)
                vals = torch.cat([best_val[a:b], cv], 1)
                idx = torch.cat([best_idx[a:b], ci + v0], 1)
                top = torch.topk(vals, top_k, dim=-1)
                best_val[a:b] = top.values
                best_idx[a:b] = torch.gather(idx, 1, top.indices)
            n0 += x.shape[0]
        del w
    return best_idx, best_val, lse, target_logit
