"""Hidden-size carving of a Llama teacher (SliceGPT, Ashkboos et al. 2024): rotate the residual stream into
the principal directions of the teacher's own block inputs and keep the top `k`.

A pre-norm transformer's residual stream is invariant to an orthogonal rotation Q once every RMSNorm gain is
folded into the linears that read its output (RMSNorm without a gain commutes with Q: ||Q^T x|| = ||x||).
Rotating the embedding, every block's readers (q, k, v, gate, up: W Q) and writers (o, down: Q^T W) leaves the
network's function unchanged; keeping only the first k columns of Q then drops the directions the block
inputs use least. One Q for every block (SliceGPT allows one per block, at the price of a k x k shortcut matrix
on every residual connection, which a stock `LlamaForCausalLM` has no place for), so the carved tower stays
a stock Llama of `hidden_size` k.

Two approximations, both left to the distillation that follows the carve: the sliced RMSNorm measures the
norm of the k kept coordinates (its gain is set to sqrt(d / k) so a vector whose energy lies in them keeps its
scale), and the tied output embedding cannot absorb the final norm's per-channel gain, which is replaced by its
best diagonal approximation in the rotated basis.

Measured on SmolLM2 (2026-12-07, teacher-forced top-1 agreement with the whole teacher on 16 train rows, all
30 blocks, no slicing): the identity folds exactly (1.000), but its final norm's gains are far from uniform
(mean 1.80, from -2.1 to 3.3 on a few massive-activation channels), so a rotation costs the tied head its
function: 0.156 with the PCA basis at k = d; replacing every gain by its mean 0.034; keeping the 71 channels
whose gain is outside 1.6-2.0 as they are and the rest at their mean 0.905. A stock Llama could only carry the
exact gain in an untied head (+ vocab x k parameters, more than the slicing saves at the default's budget), so
the carve does not call this yet; the functions stay, tested, for a teacher with an untied head.

Pure tensor functions; imports no Dagster.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch

FOLD_INTO = {  # norm -> the linears that read its output
    "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
}
WRITERS = ("self_attn.o_proj", "mlp.down_proj")  # add their output to the residual stream


def direction_second_moment(hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum over masked tokens of u u^T with u = x / rms(x), count): what an RMSNorm passes on is the
    direction, so every token weighs the same and an attention sink's massive norm does not set the basis.

    hidden: (B, T, d); mask: (B, T) bool."""
    x = hidden[mask].double()  # (N, d)
    if x.shape[0] == 0:
        return torch.zeros(hidden.shape[-1], hidden.shape[-1], dtype=torch.float64), 0
    u = x / x.pow(2).mean(-1, keepdim=True).clamp_min(1e-12).sqrt()
    return u.T @ u, int(x.shape[0])


def hidden_basis(second_moment: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """(Q_k (d, k) float32: the k leading eigenvectors of a symmetric second moment, sign-fixed so the largest
    entry of each column is positive; the share of the moment's trace they keep)."""
    d = second_moment.shape[0]
    if second_moment.shape != (d, d):
        raise ValueError(f"hidden_basis: second_moment must be square, got {tuple(second_moment.shape)}")
    if not 1 <= k <= d:
        raise ValueError(f"hidden_basis: k must be in 1..{d}, got {k}")
    evals, evecs = torch.linalg.eigh(second_moment.double())
    order = torch.argsort(evals, descending=True)[:k]
    q = evecs[:, order]
    sign = torch.sign(q.gather(0, q.abs().argmax(0, keepdim=True)))
    q = q * torch.where(sign == 0, torch.ones_like(sign), sign)
    kept = float(evals[order].clamp_min(0).sum() / evals.clamp_min(0).sum().clamp_min(1e-30))
    return q.float(), kept


def slice_llama_state(sd: Mapping[str, torch.Tensor], q: torch.Tensor, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """A Llama state dict (tied embedding, `prefix` + "embed_tokens.weight", "layers.i.…", "norm.weight")
    rotated into Q (d, k) and sliced to k: the norms' gains folded into their readers, the norms set to
    sqrt(d / k), the final norm to the diagonal of Q^T diag(g) Q (times sqrt(d / k)). Keys and every
    non-residual dimension (heads, MLP neurons, vocabulary rows) are unchanged."""
    d, k = q.shape
    scale = math.sqrt(d / k)
    qf = q.float()
    out: dict[str, torch.Tensor] = {}
    layer_prefix = prefix + "layers."
    for name, v in sd.items():
        if not name.startswith(layer_prefix):
            continue
        rest = name[len(layer_prefix):]
        idx, sub = rest.split(".", 1)
        base = f"{layer_prefix}{idx}."
        if sub.endswith("layernorm.weight"):
            out[name] = torch.full((k,), scale, dtype=v.dtype)
            continue
        mod = sub.rsplit(".", 1)[0]
        if sub.endswith(".weight") and any(mod == r for rs in FOLD_INTO.values() for r in rs):
            norm = next(n for n, rs in FOLD_INTO.items() if mod in rs)
            g = sd[f"{base}{norm}.weight"].float()
            out[name] = ((v.float() * g[None, :]) @ qf).to(v.dtype)  # (out, d) -> (out, k)
        elif sub.endswith(".weight") and mod in WRITERS:
            out[name] = (qf.T @ v.float()).to(v.dtype)  # (d, in) -> (k, in)
        elif sub.endswith(".bias") and mod in WRITERS:
            out[name] = (qf.T @ v.float()).to(v.dtype)
        else:
            out[name] = v
    emb = sd[prefix + "embed_tokens.weight"]
    out[prefix + "embed_tokens.weight"] = (emb.float() @ qf).to(emb.dtype)
    g = sd[prefix + "norm.weight"].float()
    out[prefix + "norm.weight"] = (scale * ((qf * g[:, None]) * qf).sum(0)).to(sd[prefix + "norm.weight"].dtype)
    return out
