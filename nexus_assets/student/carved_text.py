"""The text backbone carved from a Llama-family teacher (SmolLM2): a stock `LlamaForCausalLM` with fewer
decoder blocks, narrower MLPs and a trimmed vocabulary, initialised from the teacher's weights.

Vocabulary: the tower reads and writes the TEACHER's token ids (so the teacher's tokenizer, cached
features and metrics are unchanged); inside, `old_to_new` maps them to the kept vocabulary
(`carve["vocab"]`, new id = index) and every dropped id to one extra fallback slot (new id = len(vocab)).
The "lm" head therefore predicts len(vocab) + 1 classes; `to_teacher_vocab` spreads the fallback's
probability evenly over the dropped ids, giving a proper distribution over the teacher's vocabulary for
perplexity and accuracy. Generation never emits the fallback. As INPUT, a dropped id reads as its nearest
kept token (`carve["input_map"]`, teacher id -> new id, chosen at carve time), or, for the most frequent
dropped ids (`carve["input_rows"]`), as a row of its own: input-only rows stored after the fallback in the
same embedding matrix, which the "lm" head never scores (it reads rows [0, len(vocab)]) and generation
suppresses; a plan without an input map reads dropped ids as the fallback slot.

Runtime-safe: torch + transformers only.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .config import HeadSpec, TowerConfig


# transformers' attention registry name of `sdpa_float32_attention`: set on the live model only (a config's
# attention implementation is never written to config.json, so the stock folder loads as plain "sdpa")
SDPA_FLOAT32 = "nexus_sdpa_float32"


def sdpa_float32_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' own SDPA attention with q, k, v (and a float mask) upcast to float32, the output cast
    back. Under bfloat16 autocast, PyTorch's CPU flash-attention BACKWARD is ~5x slower in bfloat16 than in
    float32 (B 8, 9 heads, T 48: 7.95 against 1.64 ms forward + backward on this machine's 2 cores), and a
    short-context text tower spends ~15% of a training step there; float32 attention is also the more exact.
    A float32 forward is unchanged (the casts are no-ops)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast(query.device.type, enabled=False):  # autocast would cast SDPA's inputs back down
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              **kwargs)
    return out.to(query.dtype), weights


def _register_sdpa_float32() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(SDPA_FLOAT32, sdpa_float32_attention)  # idempotent: the same name, the same function
    return SDPA_FLOAT32


def vocab_maps(vocab: list[int], teacher_vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(old_to_new (teacher_vocab,), new_to_old (len(vocab) + 1,)); dropped ids -> fallback len(vocab),
    whose own entry in new_to_old is -1 (it is no teacher token)."""
    # checked in Python and built on the CPU explicitly: index maps, not weights, so they must hold real
    # values even when the tower is built under torch.device("meta") (the runtime's size check)
    ids = [int(t) for t in vocab]
    if not ids or min(ids) < 0 or max(ids) >= teacher_vocab:
        raise ValueError(f"carve.vocab: ids must lie in [0, {teacher_vocab}), got {len(ids)} ids")
    if len(set(ids)) != len(ids):
        raise ValueError("carve.vocab: ids must be distinct")
    kept = torch.tensor(ids, dtype=torch.long, device="cpu")
    old_to_new = torch.full((teacher_vocab,), len(ids), dtype=torch.long, device="cpu")
    old_to_new[kept] = torch.arange(len(ids), device="cpu")
    new_to_old = torch.cat([kept, torch.tensor([-1], device="cpu")])
    return old_to_new, new_to_old


def reading_map(plan: Mapping, old_to_new: torch.Tensor, fallback: int) -> torch.Tensor:
    """(teacher_vocab,) teacher id -> the new id the backbone READS: the plan's map (nearest kept token, or an
    input-only row after the fallback), or `old_to_new` (dropped ids -> the fallback slot) without one."""
    given = plan.get("input_map")
    if given is None:
        return old_to_new.clone()
    n_rows = len(plan.get("input_rows", []))
    top = fallback + n_rows
    m = torch.tensor([int(i) for i in given], dtype=torch.long, device="cpu")
    if m.shape != old_to_new.shape or int(m.min()) < 0 or int(m.max()) > top:
        raise ValueError(f"carve.input_map: expected one id in [0, {top}] per teacher id "
                         f"({old_to_new.numel()}), got {m.numel()} ids")
    if n_rows:
        own = torch.tensor([int(t) for t in plan["input_rows"]], dtype=torch.long, device="cpu")
        if int(own.min()) < 0 or int(own.max()) >= old_to_new.numel() or bool((old_to_new[own] < fallback).any()):
            raise ValueError("carve.input_rows: must be dropped teacher ids")
        if not torch.equal(m[own], torch.arange(fallback + 1, top + 1, device="cpu")):
            raise ValueError("carve.input_map: an input_rows id must read its own row (fallback + 1 + its index)")
    kept = old_to_new < fallback
    if not torch.equal(m[kept], old_to_new[kept]):
        raise ValueError("carve.input_map: a kept teacher id must read as itself")
    return m


class _TiedLMHead(nn.Module):
    """Logits over the kept vocabulary + fallback: the final norm is already applied by the backbone."""

    def forward(self, h: torch.Tensor, emb_weight: torch.Tensor) -> torch.Tensor:
        return F.linear(h, emb_weight)  # (B, T, V' + 1)


class CarvedLlamaBackbone(nn.Module):
    """forward({input_ids (B, T) teacher ids, attention_mask (B, T)}) -> (hiddens [(B, T, H)] per kept
    block (the last after the final norm), mask (B, T)); see `student.carved` for the contract."""

    # a causal LM's first k blocks compute the same states whether or not later blocks run (and the exit
    # pass pads as the full pass does): training reads an early-exit head's states from the full pass
    exit_is_prefix = True
    lora_target_regex = r".*lm\.model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"

    def __init__(self, cfg: TowerConfig):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        plan = cfg.carve
        hf = dict(plan["hf_config"])
        vocab = list(plan["vocab"])
        self.n_input_rows = len(plan.get("input_rows", []))
        hf["vocab_size"] = len(vocab) + 1 + self.n_input_rows  # kept + fallback + input-only rows
        hf["tie_word_embeddings"] = True
        self.hf_config = LlamaConfig(**hf)
        self.lm = LlamaForCausalLM(self.hf_config)
        self.lm.set_attn_implementation(_register_sdpa_float32())
        old_to_new, new_to_old = vocab_maps(vocab, int(plan["teacher_vocab"]))
        self.register_buffer("old_to_new", old_to_new, persistent=False)
        self.register_buffer("new_to_old", new_to_old, persistent=False)
        self.register_buffer("input_map", reading_map(plan, old_to_new, len(vocab)), persistent=False)
        self.n_dropped = int(plan["teacher_vocab"]) - len(vocab)
        self.n_outputs = len(vocab) + 1  # what the "lm" head scores: the kept vocabulary + fallback
        self.eos_new = [int(old_to_new[e]) for e in plan.get("eos_ids", []) if int(old_to_new[e]) < len(vocab)]
        # teacher layer "layers.i" (its hidden_states[i]) -> index into this backbone's hidden_states
        self.anchor_map: dict[str, int] = dict(plan.get("anchor_map", {}))
        self.layer_widths = {name: self.hf_config.hidden_size for name in self.anchor_map}
        self.layer_states: dict[str, torch.Tensor] = {}
        self.max_len = cfg.max_len
        self.exit_after: int | None = None  # blocks to run (an early-exit head's pass); None = all
        self._compiled_forward: Callable | None = None  # set_compiled; a function, so no state-dict entry

    # -- contract ------------------------------------------------------------------------------------

    def forward(self, inputs: Mapping[str, torch.Tensor]):
        ids = self.input_map[inputs["input_ids"]]  # (B, T) new ids
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        n = self.hf_config.num_hidden_layers
        k = n if self.exit_after is None else max(1, min(int(self.exit_after), n))
        cfg = self.lm.model.config
        cfg.num_hidden_layers = k  # LlamaModel runs layers[:num_hidden_layers], then its final norm
        run = self.lm.model
        if self._compiled_forward is not None and torch.is_grad_enabled() and k == n:
            run = self._compiled_forward  # a training pass; evaluation and early exits stay eager
        try:
            out = run(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
        finally:
            cfg.num_hidden_layers = n
        hs = out.hidden_states  # (k + 1) x (B, T, H); the last is after the final norm
        m = mask.to(hs[-1].dtype)[..., None]
        self.layer_states = {name: (hs[i] * m).sum(1) / m.sum(1).clamp_min(1.0)
                             for name, i in self.anchor_map.items() if i < len(hs)}
        return list(hs[1:]), mask

    def set_compiled(self, enabled: bool) -> None:
        """Route training passes (gradients on, every block) through `torch.compile` of the decoder (inductor,
        dynamic shapes: length-grouped batches vary in length). Eager PyTorch spends ~70% of a carved
        text step outside its matmuls (norms, rotary, casts, one dispatch each on (8, ~40)-token tensors);
        fused, a phase-(a) step of the embedded default took 0.315 s instead of 0.418 (2 cores with AMX). Off
        again, the next pass is eager; the weights are shared either way."""
        self._compiled_forward = torch.compile(self.lm.model.forward, dynamic=True) if enabled else None

    def exit_norm(self, h: torch.Tensor) -> torch.Tensor:
        """A block's states as an early-exit head reads them: through the final norm, as if the backbone
        ended there."""
        return self.lm.model.norm(h)

    def make_head(self, capability: str, spec: HeadSpec):
        return _TiedLMHead() if spec.kind == "lm" else None

    def lm_weight(self) -> torch.Tensor:
        return self.lm.model.embed_tokens.weight[:self.n_outputs]  # (V' + 1, H), tied output matrix

    # -- teacher vocabulary ----------------------------------------------------------------------------

    def to_teacher_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., V' + 1) logits -> (..., V_teacher) log-probabilities; dropped ids share the fallback's mass."""
        if self.n_dropped == 0:  # nothing was dropped: the fallback slot stands for no token
            return torch.log_softmax(logits[..., :-1].float(), -1)[..., self.old_to_new]
        logp = torch.log_softmax(logits.float(), -1)
        spread = logp[..., -1:] - math.log(max(self.n_dropped, 1))
        out = spread.expand(*logp.shape[:-1], self.old_to_new.shape[0]).clone()
        out[..., self.new_to_old[:-1]] = logp[..., :-1]
        return out

    @torch.no_grad()
    def generate_ids(self, input_ids: torch.Tensor, max_new_tokens: int) -> list[list[int]]:
        """transformers' `generate` (greedy, KV cache, EOS, no 4-gram repeats) on the teacher ids of a
        prompt (B, T); returns the new teacher ids per row, EOS excluded."""
        ids = self.input_map[input_ids[:, -self.max_len:]]
        budget = max(1, min(max_new_tokens, self.hf_config.max_position_embeddings - ids.shape[1]))
        out = self.lm.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=budget, do_sample=False,
            eos_token_id=self.eos_new or None, pad_token_id=self.eos_new[0] if self.eos_new else 0,
            no_repeat_ngram_size=4, repetition_penalty=1.1,  # never the fallback slot or an input-only row
            suppress_tokens=list(range(self.n_outputs - 1, self.hf_config.vocab_size)))
        rows = []
        for row in out[:, ids.shape[1]:].tolist():
            keep = []
            for t in row:
                if t in self.eos_new:
                    break
                keep.append(int(self.new_to_old[t]))
            rows.append(keep)
        return rows

    # -- stock export --------------------------------------------------------------------------------

    def export_stock(self, state: Mapping[str, torch.Tensor], folder: Path) -> set[str]:
        """Write the backbone as a stock LlamaForCausalLM folder (config.json + model.safetensors) that
        `AutoModelForCausalLM.from_pretrained` loads; its ids are the kept vocabulary (vocab.json maps them)."""
        from safetensors.torch import save_file

        keys = {k for k in state if k.startswith("lm.") and k != "lm.lm_head.weight"}
        save_file({k[len("lm."):]: state[k] for k in sorted(keys)}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
        cfg = self.hf_config.to_dict()
        cfg["architectures"] = ["LlamaForCausalLM"]
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
        # rows after the fallback are input-only: a stock model's logits there must be masked, as generate_ids does
        (folder / "vocab.json").write_text(json.dumps({"teacher_ids": self.new_to_old[:-1].tolist(),
                                                       "fallback": len(self.new_to_old) - 1,
                                                       "input_only_rows": self.n_input_rows,
                                                       "input_ids": self.input_map.tolist()}))
        return keys | {"lm.lm_head.weight"}

    def import_stock(self, folder: Path, read_state: Callable[[Path], dict]) -> dict:
        sd = read_state(Path(folder) / "model.safetensors")
        out = {f"lm.{k}": v for k, v in sd.items()}
        out["lm.lm_head.weight"] = out["lm.model.embed_tokens.weight"]
        return out
