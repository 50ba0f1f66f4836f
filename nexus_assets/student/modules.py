"""Student backbones and heads (torch only): the building blocks `StudentTower` assembles.

Every backbone block names its Linear layers `attn.qkv`, `attn.proj`, `mlp.fc1`, `mlp.fc2` (the LoRA
targets), so the stems, heads and the ASR decoder never get adapters.
"""
from __future__ import annotations

import abc
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .config import TowerConfig


class Attention(nn.Module):
    def __init__(self, width: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        b, t, w = x.shape  # (B, T, W)
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, w // self.n_heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, T, d)
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, T) True = attend
        if causal and attn_mask is not None:
            attn_mask = attn_mask & torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)  # (B, h, T, d)
        return self.proj(y.transpose(1, 2).reshape(b, t, w))


class MLP(nn.Module):
    def __init__(self, width: int, ratio: int):
        super().__init__()
        self.fc1 = nn.Linear(width, ratio * width)
        self.fc2 = nn.Linear(ratio * width, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)); x + mlp(ln(x))."""

    def __init__(self, width: int, n_heads: int, mlp_ratio: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width, n_heads)
        self.mlp = MLP(width, mlp_ratio)

    def forward(self, x, mask=None, causal=False):
        x = x + self.attn(self.ln1(x), mask, causal)
        return x + self.mlp(self.ln2(x))


class _Backbone(nn.Module, abc.ABC):
    """Stem + positions + blocks. forward(inputs) -> (per-block hidden list of (B, L, W), mask (B, L) bool)."""

    causal = False

    def __init__(self, cfg: TowerConfig, n_pos: int):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(n_pos, cfg.width) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.n_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.ln_f = nn.LayerNorm(cfg.width)

    @abc.abstractmethod
    def stem(self, inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Modality-specific input -> (tokens (B, L, W), padding mask (B, L) or None)."""

    def forward(self, inputs: Mapping[str, torch.Tensor]):
        x, mask = self.stem(inputs)  # (B, L, W), (B, L) or None
        x = x + self.pos[: x.shape[1]]
        hiddens = []
        for blk in self.blocks:
            x = blk(x, mask, self.causal)
            hiddens.append(x)
        hiddens[-1] = self.ln_f(x)
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return hiddens, mask


class TextBackbone(_Backbone):
    """Causal transformer over SmolLM2 ids. inputs: input_ids (B, T) long, attention_mask (B, T) bool
    (right padding: causal attention already keeps real tokens off the pads)."""

    causal = True

    def __init__(self, cfg: TowerConfig):
        super().__init__(cfg, cfg.max_len)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.width)
        nn.init.normal_(self.tok_emb.weight, std=0.02)

    def stem(self, inputs):
        ids = inputs["input_ids"]
        if ids.shape[1] > self.pos.shape[0]:
            raise ValueError(f"input_ids has {ids.shape[1]} positions > max_len {self.pos.shape[0]}")
        mask = inputs.get("attention_mask")
        return self.tok_emb(ids), (None if mask is None else mask.bool())

    def forward(self, inputs):
        hiddens, _ = super().forward({"input_ids": inputs["input_ids"]})  # causal: no key mask needed
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(inputs["input_ids"], dtype=torch.bool) if mask is None else mask.bool()
        return hiddens, mask


class VisionBackbone(_Backbone):
    """4 stride-2 3x3 convs (GroupNorm, GELU) -> (S/16)^2 tokens, then a bidirectional transformer.
    inputs: pixels (B, 3, S, S) ImageNet-normalised."""

    def __init__(self, cfg: TowerConfig):
        super().__init__(cfg, (cfg.image_size // 16) ** 2)
        w = cfg.width
        chans = [3, max(w // 4, 8), max(w // 2, 8), w, w]
        layers: list[nn.Module] = []
        for i in range(4):
            layers.append(nn.Conv2d(chans[i], chans[i + 1], 3, stride=2, padding=1))
            if i < 3:
                layers += [nn.GroupNorm(1, chans[i + 1]), nn.GELU()]
        self.convs = nn.Sequential(*layers)

    def stem(self, inputs):
        x = self.convs(inputs["pixels"])  # (B, W, S/16, S/16)
        return x.flatten(2).transpose(1, 2), None  # (B, L, W)


class AudioBackbone(_Backbone):
    """2 stride-2 conv1d over log-mel frames (40 ms per token), then a bidirectional transformer.
    inputs: mels (B, F, n_mels), mel_mask (B, F) bool."""

    def __init__(self, cfg: TowerConfig):
        super().__init__(cfg, (cfg.max_frames + 3) // 4)
        self.conv1 = nn.Conv1d(cfg.n_mels, cfg.width, 3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(cfg.width, cfg.width, 3, stride=2, padding=1)

    def stem(self, inputs):
        mels = inputs["mels"]  # (B, F, M)
        mask = inputs.get("mel_mask")
        mask = torch.ones(mels.shape[:2], dtype=torch.bool, device=mels.device) if mask is None else mask.bool()
        x = mels.transpose(1, 2) * mask[:, None, :]
        x = F.gelu(self.conv2(F.gelu(self.conv1(x))))  # (B, W, ceil(F/4))
        return x.transpose(1, 2), mask[:, ::2][:, ::2]


_BACKBONES = {"text": TextBackbone, "vision": VisionBackbone, "audio": AudioBackbone}


# ----------------------------------------------------------------------------------------------------
# Heads
# ----------------------------------------------------------------------------------------------------


def _pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over positions: (B, L, W), (B, L) -> (B, W)."""
    m = mask.to(h.dtype)[..., None]
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


class LMHead(nn.Module):
    """Next-token logits (B, T, V); the output matrix is the token embedding when tied."""

    def __init__(self, width: int, vocab: int, tied: bool):
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.out = None if tied else nn.Linear(width, vocab, bias=False)

    def forward(self, h, emb_weight):
        x = self.ln(h)
        return F.linear(x, emb_weight) if self.out is None else self.out(x)


class PooledHead(nn.Module):
    """Masked mean pool -> LayerNorm -> Linear; L2-normalised for embeddings. (B, L, W) -> (B, out)."""

    def __init__(self, width: int, out_dim: int, normalise: bool):
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.fc = nn.Linear(width, out_dim)
        self.normalise = normalise

    def forward(self, h, mask):
        return self.from_pooled(_pool(h, mask))

    def from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """The head on already pooled states (B, W): lets a linear probe train on cached pooled features."""
        y = self.fc(self.ln(pooled))
        return F.normalize(y, dim=-1) if self.normalise else y


class CrossBlock(nn.Module):
    """Decoder block: causal self-attention, cross-attention to the encoder, MLP (all pre-norm)."""

    def __init__(self, width, n_heads, mlp_ratio):
        super().__init__()
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.self_attn = Attention(width, n_heads)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.o = nn.Linear(width, width)
        self.ff = MLP(width, mlp_ratio)
        self.n_heads = n_heads

    def forward(self, x, dec_mask, mem, mem_mask):
        x = x + self.self_attn(self.ln1(x), dec_mask, True)
        b, u, w = x.shape
        d = w // self.n_heads
        q = self.q(self.ln2(x)).view(b, u, self.n_heads, d).transpose(1, 2)  # (B, h, U, d)
        k, v = self.kv(mem).view(b, mem.shape[1], 2, self.n_heads, d).permute(2, 0, 3, 1, 4)  # (B, h, L, d)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mem_mask[:, None, None, :])
        x = x + self.o(y.transpose(1, 2).reshape(b, u, w))
        return x + self.ff(self.ln3(x))


class ASRDecoder(nn.Module):
    """Autoregressive decoder over Whisper ids, cross-attending to the audio encoder.

    forward(dec_ids (B, U'), dec_mask (B, U'), mem (B, L, W), mem_mask (B, L)) -> (logits (B, U', V),
    last hidden (B, U', W)); logits at position j predict token j+1 (output matrix tied to the input
    embedding).
    """

    def __init__(self, cfg: TowerConfig, vocab: int):
        super().__init__()
        w = cfg.width
        self.emb = nn.Embedding(vocab, w)
        nn.init.normal_(self.emb.weight, std=0.02)
        self.pos = nn.Parameter(torch.randn(cfg.asr_max_len, w) * 0.02)
        self.layers = nn.ModuleList(CrossBlock(w, cfg.n_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_depth))
        self.ln = nn.LayerNorm(w)

    def forward(self, dec_ids, dec_mask, mem, mem_mask):
        if dec_ids.shape[1] > self.pos.shape[0]:
            raise ValueError(f"dec_ids has {dec_ids.shape[1]} positions > asr_max_len {self.pos.shape[0]}")
        x = self.emb(dec_ids) + self.pos[: dec_ids.shape[1]]
        for layer in self.layers:
            x = layer(x, None, mem, mem_mask)  # causal; right padding needs no key mask
        x = self.ln(x)
        return F.linear(x, self.emb.weight), x
