"""Student towers: one small backbone per modality, one head and one LoRA adapter per capability.

Model code only (torch, peft, safetensors; PIL and the stdlib `wave` lazily for input decoding): the
teacher-free runtime imports this module, so it must never import training code, Dagster, pyarrow or
any teacher package. The input transforms (`preprocess_image`, `decode_wav`, `log_mel`) live here for
the same reason: training and the runtime must feed the tower exactly the same tensors.

Shape of a tower::

    inputs ── stem ── + positions ── Block x depth ──┬── head[cap] ── out
                                                     └── anchor_proj[cap, layer] ── (B, Ht) per teacher layer

* text:   token embedding (SmolLM2 ids, vocab 49152) + learned positions, causal pre-norm transformer.
* vision: 4 stride-2 convs (RGB, image_size/16 squared patches) + learned positions, bidirectional
          pre-norm transformer. Inputs are downsampled from the probe's 224 px to `image_size` (112 by
          default) because the CPU budget is a few minutes per tower.
* audio:  2 stride-2 conv1d over 80-bin log-mel frames (10 ms hop, so one token per 40 ms), learned
          positions, bidirectional transformer encoder; the "asr" head adds a small autoregressive
          decoder cross-attending to it.

Every backbone block names its Linear layers `attn.qkv`, `attn.proj`, `mlp.fc1`, `mlp.fc2`; those are
the LoRA targets (`LORA_TARGET_REGEX`), so the stems, heads and the ASR decoder never get adapters.
Adapter names are the capability with dots replaced (`text.generate` -> `text_generate`), since peft
and `nn.ModuleDict` keys cannot hold dots.

Why one backbone + per-capability adapters: phase (a) of training fits the shared backbone to every
teacher of the tower at once; phase (b) freezes it and gives each capability a low-rank correction of
its own, so specialising one capability cannot move another (the adapters are disjoint parameters).
"""
from __future__ import annotations

import abc
import contextlib
import io
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "HeadSpec",
    "TowerConfig",
    "StudentTower",
    "save_tower",
    "load_tower",
    "default_tower_config",
    "adapter_name",
    "log_mel",
    "mel_filterbank",
    "decode_wav",
    "preprocess_image",
    "LORA_TARGET_REGEX",
    "HEAD_KINDS",
    "MODALITIES",
]

FORMAT_VERSION = "1"
MODALITIES = ("text", "vision", "audio")
HEAD_KINDS = ("lm", "embedding", "classes", "asr")
_KINDS_BY_MODALITY = {"text": ("lm", "embedding", "classes"), "vision": ("embedding", "classes"),
                      "audio": ("embedding", "classes", "asr")}
LORA_TARGET_REGEX = r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"
"""peft `target_modules` (full-match regex on module names): the backbone blocks' Linear layers only."""

SAMPLE_RATE = 16000
N_FFT = 400  # 25 ms at 16 kHz
HOP = 160  # 10 ms at 16 kHz
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WHISPER_SOT, WHISPER_NOTIMESTAMPS, WHISPER_EOT = 50257, 50362, 50256


def adapter_name(capability: str) -> str:
    """peft adapter / ModuleDict key for a capability: `text.generate` -> `text_generate`."""
    return capability.replace(".", "_")


def _anchor_key(capability: str, layer: str) -> str:
    return f"{adapter_name(capability)}__{layer.replace('.', '_')}"


# ----------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------


@dataclass
class HeadSpec:
    """What one capability's head produces and which teacher layers its backbone is anchored to.

    Attributes:
        kind: "lm" next-token logits (B, T, out_dim); "embedding" L2-normalised (B, out_dim);
            "classes" logits (B, out_dim); "asr" decoder logits over Whisper ids (B, U, out_dim).
        out_dim: vocabulary, embedding width or class count of the teacher this head imitates.
        teacher: registry name of the teacher (keys the PCA / importance of its layers in training).
        anchor_layers: teacher layer name -> teacher width Ht, listed shallow to deep. The k-th of n
            layers is matched to student block round((k+1) * depth / n) - 1 (relative depth); for an
            "asr" head, layers named `decoder.*` are matched to the decoder's last block instead.
    """

    kind: str
    out_dim: int
    teacher: str = ""
    anchor_layers: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"kind: {self.kind!r} is not one of {HEAD_KINDS}")
        if not isinstance(self.out_dim, int) or self.out_dim < 1:
            raise ValueError(f"out_dim: must be an int >= 1, got {self.out_dim!r}")
        for layer, width in self.anchor_layers.items():
            if not isinstance(width, int) or width < 1:
                raise ValueError(f"anchor_layers: width of {layer!r} must be an int >= 1, got {width!r}")


@dataclass
class TowerConfig:
    """Architecture of one student tower; `to_dict`/`from_dict` round-trip through JSON.

    Attributes:
        name: tower name, also the prefix of its capabilities ("text" -> "text.generate").
        modality: "text", "vision" or "audio"; decides the backbone.
        width: hidden width W of every block (divisible by n_heads).
        depth: number of backbone blocks.
        n_heads: attention heads per block.
        mlp_ratio: MLP hidden = mlp_ratio * W.
        vocab_size: token vocabulary of the text backbone (SmolLM2: 49152); ignored by other modalities.
        max_len: most tokens a text input has (longer ones are truncated by the data loader).
        image_size: side of the square RGB input (vision); a multiple of 16. 112 on CPU: 4x fewer pixels
            than the teacher's 224 for a few points of accuracy.
        n_mels: log-mel bins of the audio input (80, 25 ms window, 10 ms hop at 16 kHz).
        max_frames: most log-mel frames an audio input has (500 = 5 s); the encoder has max_frames/4 tokens.
        decoder_depth: blocks of the "asr" decoder.
        asr_max_len: most decoder positions (prompt + transcript tokens).
        asr_prompt_ids: decoder prompt (Whisper <|startoftranscript|><|notimestamps|> for tiny.en).
        asr_eot_id: the id that ends a transcript (Whisper <|endoftext|>).
        capabilities: capability -> HeadSpec.
        lora_rank: capability -> LoRA rank of its adapter (every capability needs one).
        lora_alpha: LoRA scaling numerator (peft `lora_alpha`), shared by all adapters.
        tie_lm_head: "lm" heads reuse the token embedding as output matrix (saves vocab*W parameters).
    """

    name: str
    modality: str
    width: int = 256
    depth: int = 4
    n_heads: int = 4
    mlp_ratio: int = 4
    vocab_size: int = 49152
    max_len: int = 64
    image_size: int = 112
    n_mels: int = 80
    max_frames: int = 500
    decoder_depth: int = 2
    asr_max_len: int = 96
    asr_prompt_ids: list[int] = field(default_factory=lambda: [WHISPER_SOT, WHISPER_NOTIMESTAMPS])
    asr_eot_id: int = WHISPER_EOT
    capabilities: dict[str, HeadSpec] = field(default_factory=dict)
    lora_rank: dict[str, int] = field(default_factory=dict)
    lora_alpha: float = 16.0
    tie_lm_head: bool = True

    def __post_init__(self):
        self.capabilities = {c: (h if isinstance(h, HeadSpec) else HeadSpec(**h)) for c, h in self.capabilities.items()}
        if not isinstance(self.name, str) or not self.name or "." in self.name:
            raise ValueError(f"name: must be a non-empty string without dots, got {self.name!r}")
        if self.modality not in MODALITIES:
            raise ValueError(f"modality: {self.modality!r} is not one of {MODALITIES}")
        for f in ("width", "depth", "n_heads", "mlp_ratio", "max_len", "n_mels", "max_frames",
                  "decoder_depth", "asr_max_len"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{f}: must be an int >= 1, got {v!r}")
        if self.width % self.n_heads:
            raise ValueError(f"width: {self.width} is not divisible by n_heads={self.n_heads}")
        if not isinstance(self.vocab_size, int) or self.vocab_size < 2:
            raise ValueError(f"vocab_size: must be an int >= 2, got {self.vocab_size!r}")
        if not isinstance(self.image_size, int) or self.image_size < 16 or self.image_size % 16:
            raise ValueError(f"image_size: must be a positive multiple of 16, got {self.image_size!r}")
        if not self.asr_prompt_ids or len(self.asr_prompt_ids) >= self.asr_max_len:
            raise ValueError(f"asr_prompt_ids: must be non-empty and shorter than asr_max_len, got {self.asr_prompt_ids}")
        if not self.capabilities:
            raise ValueError("capabilities: a tower needs at least one capability")
        for cap, head in self.capabilities.items():
            tower, _, verb = cap.partition(".")
            if tower != self.name or not verb:
                raise ValueError(f"capabilities: {cap!r} must be named '{self.name}.<verb>'")
            if head.kind not in _KINDS_BY_MODALITY[self.modality]:
                raise ValueError(f"capabilities: {cap!r} has head kind {head.kind!r}, which a "
                                 f"{self.modality} tower cannot have (allowed: {_KINDS_BY_MODALITY[self.modality]})")
            if head.kind == "asr" and max(self.asr_prompt_ids + [self.asr_eot_id]) >= head.out_dim:
                raise ValueError(f"asr_prompt_ids: ids {self.asr_prompt_ids} / asr_eot_id {self.asr_eot_id} must be "
                                 f"< the {cap!r} vocabulary {head.out_dim}")
            if head.kind == "lm" and head.out_dim != self.vocab_size:
                raise ValueError(f"capabilities: {cap!r} lm out_dim {head.out_dim} != vocab_size {self.vocab_size}")
        if set(self.lora_rank) != set(self.capabilities):
            raise ValueError(f"lora_rank: needs exactly one rank per capability {sorted(self.capabilities)}, "
                             f"got {sorted(self.lora_rank)}")
        for cap, r in self.lora_rank.items():
            if not isinstance(r, int) or r < 1:
                raise ValueError(f"lora_rank: rank of {cap!r} must be an int >= 1, got {r!r}")
        if not (isinstance(self.lora_alpha, (int, float)) and self.lora_alpha > 0):
            raise ValueError(f"lora_alpha: must be > 0, got {self.lora_alpha!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TowerConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"TowerConfig: unknown fields {sorted(unknown)}")
        return cls(**dict(d))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, s: str) -> "TowerConfig":
        return cls.from_dict(json.loads(s))


def default_tower_config(tower: str) -> TowerConfig:
    """The CPU default of each tower, heads matching the registry's embedded teachers.

    Sized so the three towers train in about 6 minutes on 2 cores with `training.cpu_train_config`
    (the `student_architecture` asset may override width / rank from the measured intrinsic dims).
    """
    if tower == "text":
        return TowerConfig(
            name="text", modality="text", width=256, depth=4, n_heads=4, vocab_size=49152, max_len=64,
            capabilities={
                "text.generate": HeadSpec("lm", 49152, "smollm2-135m",
                                          {"layers.10": 576, "layers.20": 576, "layers.30": 576}),
                "text.embed": HeadSpec("embedding", 384, "minilm-l6", {"layers.3": 384, "layers.6": 384}),
            },
            lora_rank={"text.generate": 8, "text.embed": 8},
        )
    if tower == "vision":
        return TowerConfig(
            name="vision", modality="vision", width=192, depth=4, n_heads=4, image_size=112,
            capabilities={"vision.classify": HeadSpec("classes", 1000, "efficientnet-lite0",
                                                      {"blocks.5": 80, "blocks.10": 112, "features": 1280})},
            lora_rank={"vision.classify": 8},
        )
    if tower == "audio":
        return TowerConfig(
            name="audio", modality="audio", width=192, depth=4, n_heads=4, n_mels=80, max_frames=500,
            decoder_depth=2, asr_max_len=96,
            capabilities={
                "audio.speaker_embed": HeadSpec("embedding", 256, "ge2e-speaker", {"lstm.2": 256}),
                "audio.transcribe": HeadSpec("asr", 51864, "whisper-tiny-en",
                                             {"encoder.2": 384, "encoder.4": 384, "decoder.4": 384}),
            },
            lora_rank={"audio.speaker_embed": 8, "audio.transcribe": 8},
        )
    raise ValueError(f"tower: {tower!r} has no default config; known: {MODALITIES}")


# ----------------------------------------------------------------------------------------------------
# Input transforms shared by training and the runtime
# ----------------------------------------------------------------------------------------------------


def mel_filterbank(n_fft: int = N_FFT, n_mels: int = 80, sample_rate: int = SAMPLE_RATE,
                   fmin: float = 0.0, fmax: float | None = None) -> np.ndarray:
    """Triangular mel filters (HTK mel scale, Slaney area normalisation), shape (n_fft//2 + 1, n_mels)."""
    fmax = sample_rate / 2 if fmax is None else fmax
    hz_to_mel = lambda f: 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)  # noqa: E731
    mel_to_hz = lambda m: 700.0 * (10.0 ** (np.asarray(m) / 2595.0) - 1.0)  # noqa: E731
    hz = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))  # (n_mels + 2,)
    freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)  # (n_bins,)
    lower, centre, upper = hz[:-2], hz[1:-1], hz[2:]
    up = (freqs[:, None] - lower) / (centre - lower)
    down = (upper - freqs[:, None]) / (upper - centre)
    fb = np.maximum(0.0, np.minimum(up, down))  # (n_bins, n_mels)
    fb *= 2.0 / (upper - lower)  # equal area per filter
    return fb.astype(np.float32)


_FB_CACHE: dict[int, torch.Tensor] = {}


def log_mel(wave: torch.Tensor, n_mels: int = 80) -> torch.Tensor:
    """Whisper-style log-mel spectrogram: 16 kHz, 25 ms Hann window, 10 ms hop.

    Args:
        wave: float waveform in [-1, 1] at 16 kHz, shape (N,) or (B, N).

    Returns:
        (F, n_mels) or (B, F, n_mels) with F = N // 160 + 1: log10 power, floored 8 decades below each
        item's maximum, scaled as (x + 4) / 4 so values sit roughly in [-1, 1].
    """
    squeeze = wave.ndim == 1
    w = wave[None] if squeeze else wave
    spec = torch.stft(w.float(), N_FFT, HOP, window=torch.hann_window(N_FFT), center=True,
                      return_complex=True)  # (B, n_bins, F)
    power = spec.abs() ** 2
    if n_mels not in _FB_CACHE:
        _FB_CACHE[n_mels] = torch.from_numpy(mel_filterbank(n_mels=n_mels))
    mel = torch.einsum("bkf,km->bfm", power, _FB_CACHE[n_mels])  # (B, F, n_mels)
    logm = torch.log10(mel.clamp_min(1e-10))
    logm = torch.maximum(logm, logm.amax(dim=(1, 2), keepdim=True) - 8.0)
    out = (logm + 4.0) / 4.0
    return out[0] if squeeze else out


def decode_wav(data: bytes, row_id: object = None) -> np.ndarray:
    """PCM WAV bytes -> (N,) float32 mono at 16 kHz (channels averaged, other rates linearly resampled).

    Uses the stdlib `wave` module so the runtime needs no audio library.
    """
    import wave

    try:
        with wave.open(io.BytesIO(data)) as w:
            sr, ch, width, n = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
            raw = w.readframes(n)
    except Exception as e:
        raise ValueError(f"row {row_id!r}: unreadable WAV ({type(e).__name__}: {e})") from e
    if width == 2:
        x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    elif width == 4:
        x = np.frombuffer(raw, dtype="<i4").astype(np.float32) / 2147483648.0
    elif width == 1:
        x = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    else:
        raise ValueError(f"row {row_id!r}: unsupported WAV sample width {width} bytes")
    x = x.reshape(-1, ch).mean(axis=1)
    if x.size == 0:
        raise ValueError(f"row {row_id!r}: WAV has no samples")
    if sr != SAMPLE_RATE:
        t_new = np.arange(int(round(x.size * SAMPLE_RATE / sr))) / SAMPLE_RATE
        x = np.interp(t_new, np.arange(x.size) / sr, x).astype(np.float32)
    return np.ascontiguousarray(x, dtype=np.float32)


def preprocess_image(data: bytes, image_size: int, row_id: object = None) -> torch.Tensor:
    """PNG/JPEG bytes -> (3, image_size, image_size) float32, bilinear-resized, ImageNet-normalised."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data)).convert("RGB")
    except Exception as e:
        raise ValueError(f"row {row_id!r}: unreadable image ({type(e).__name__}: {e})") from e
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BILINEAR)
    x = np.asarray(img, dtype=np.float32) / 255.0  # (S, S, 3)
    x = (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


# ----------------------------------------------------------------------------------------------------
# Backbones
# ----------------------------------------------------------------------------------------------------


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
        y = self.fc(self.ln(_pool(h, mask)))
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


# ----------------------------------------------------------------------------------------------------
# The tower
# ----------------------------------------------------------------------------------------------------


class StudentTower(nn.Module):
    """One modality's student: backbone, a head per capability, LoRA adapters, anchor projections.

    `forward(inputs, capability)` returns dict(
        out: the head output — "lm" (B, T, V) logits, "embedding" (B, D) unit vectors,
             "classes" (B, C) logits, "asr" (B, U, V) logits at the transcript positions (see below),
        hidden: (B, W) masked mean of the last backbone block,
        anchors: {teacher layer: (B, Ht)} the projected pooled student states anchored to that layer).

    Inputs by modality: text {input_ids (B, T), attention_mask (B, T)}; vision {pixels (B, 3, S, S)};
    audio {mels (B, F, n_mels), mel_mask (B, F)} and, for "asr", {dec_ids (B, P + U - 1), dec_mask}:
    the prompt then the transcript tokens but the last; `out` holds the logits of the last U positions,
    whose j-th predicts transcript token j (teacher forcing).
    """

    def __init__(self, cfg: TowerConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone: nn.Module = _BACKBONES[cfg.modality](cfg)
        heads = {}
        anchor_proj = {}
        for cap, spec in cfg.capabilities.items():
            if spec.kind == "lm":
                heads[adapter_name(cap)] = LMHead(cfg.width, spec.out_dim, cfg.tie_lm_head)
            elif spec.kind == "asr":
                heads[adapter_name(cap)] = ASRDecoder(cfg, spec.out_dim)
            else:
                heads[adapter_name(cap)] = PooledHead(cfg.width, spec.out_dim, spec.kind == "embedding")
            for layer, ht in spec.anchor_layers.items():
                anchor_proj[_anchor_key(cap, layer)] = nn.Linear(cfg.width, ht)
        self.heads = nn.ModuleDict(heads)
        self.anchor_proj = nn.ModuleDict(anchor_proj)
        self.adapters: list[str] = []  # capabilities that have a LoRA adapter, in the order added
        self.capability: str | None = None

    # -- adapters ------------------------------------------------------------------------------------

    def base_backbone(self) -> nn.Module:
        """The backbone module itself (inside the PeftModel once adapters exist)."""
        return self.backbone.get_base_model() if hasattr(self.backbone, "get_base_model") else self.backbone

    def lora_config(self, capability: str):
        from peft import LoraConfig

        return LoraConfig(r=self.cfg.lora_rank[capability], lora_alpha=self.cfg.lora_alpha, lora_dropout=0.0,
                          target_modules=LORA_TARGET_REGEX, init_lora_weights=True)

    def add_adapter(self, capability: str) -> None:
        """Add a fresh LoRA adapter (B = 0, so the output is unchanged) for `capability` and activate it."""
        self._check_cap(capability)
        if capability in self.adapters:
            raise ValueError(f"capability {capability!r} already has an adapter")
        name = adapter_name(capability)
        if not self.adapters:
            from peft import get_peft_model

            self.backbone = get_peft_model(self.backbone, self.lora_config(capability), adapter_name=name)
        else:
            self.backbone.add_adapter(name, self.lora_config(capability))
        self.adapters.append(capability)
        self.set_capability(capability)

    def load_adapter(self, capability: str, path: str | os.PathLike) -> None:
        """Load a stock-peft adapter folder (adapter_config.json + adapter_model.safetensors)."""
        self._check_cap(capability)
        name = adapter_name(capability)
        if not self.adapters:
            from peft import PeftModel

            self.backbone = PeftModel.from_pretrained(self.backbone, str(path), adapter_name=name)
        else:
            self.backbone.load_adapter(str(path), adapter_name=name)
        self.adapters.append(capability)

    def set_capability(self, capability: str) -> None:
        """Activate `capability`'s adapter, or run the bare backbone if it has none."""
        self._check_cap(capability)
        if self.adapters:
            lora = self.backbone.base_model
            if capability in self.adapters:
                lora.enable_adapter_layers()
                self.backbone.set_adapter(adapter_name(capability))
            else:
                lora.disable_adapter_layers()
        self.capability = capability

    @contextlib.contextmanager
    def adapters_disabled(self):
        """Run the bare backbone inside the block (used to record phase-(a) outputs for LwF)."""
        if not self.adapters:
            yield
            return
        lora = self.backbone.base_model
        active = self.capability in self.adapters
        lora.disable_adapter_layers()
        try:
            yield
        finally:
            if active:
                lora.enable_adapter_layers()

    def lora_parameters(self, capability: str) -> list[nn.Parameter]:
        key = f".{adapter_name(capability)}."
        return [p for n, p in self.backbone.named_parameters() if "lora_" in n and key in n + "."]

    def head_parameters(self, capability: str) -> list[nn.Parameter]:
        """Head + anchor projections of one capability (the LM head's tied embedding is backbone's)."""
        params = list(self.heads[adapter_name(capability)].parameters())
        for layer in self.cfg.capabilities[capability].anchor_layers:
            params += list(self.anchor_proj[_anchor_key(capability, layer)].parameters())
        return params

    def _check_cap(self, capability: str) -> None:
        if capability not in self.cfg.capabilities:
            raise ValueError(f"tower {self.cfg.name!r} has no capability {capability!r}; "
                             f"it has {sorted(self.cfg.capabilities)}")

    # -- forward -------------------------------------------------------------------------------------

    def encode(self, inputs: Mapping[str, torch.Tensor]):
        """Backbone pass with the currently active adapter: (per-block hiddens [(B, L, W)], mask (B, L))."""
        return self.backbone(inputs)

    def head_forward(self, capability: str, enc, inputs: Mapping[str, torch.Tensor]) -> dict:
        """Run one capability's head on an `encode` result (so several heads share one backbone pass)."""
        spec = self.cfg.capabilities[capability]
        hiddens, mask = enc
        last = hiddens[-1]  # (B, L, W)
        head = self.heads[adapter_name(capability)]
        dec_hidden = None
        if spec.kind == "lm":
            out = head(last, self.base_backbone().tok_emb.weight)  # (B, T, V)
        elif spec.kind == "asr":
            p = len(self.cfg.asr_prompt_ids)
            logits, dec_hidden = head(inputs["dec_ids"], inputs.get("dec_mask"), last, mask)
            out = logits[:, p - 1:]  # (B, U, V): position j predicts transcript token j
        else:
            out = head(last, mask)
        anchors = {}
        layers = list(spec.anchor_layers)
        enc_layers = [l for l in layers if not (spec.kind == "asr" and l.startswith("decoder"))]
        depth = len(hiddens)
        for k, layer in enumerate(enc_layers):
            block = max(round((k + 1) * depth / len(enc_layers)) - 1, 0)
            anchors[layer] = self.anchor_proj[_anchor_key(capability, layer)](_pool(hiddens[block], mask))
        for layer in layers:
            if layer not in anchors:
                dm = inputs.get("dec_mask")
                dm = torch.ones(dec_hidden.shape[:2], dtype=torch.bool) if dm is None else dm.bool()
                anchors[layer] = self.anchor_proj[_anchor_key(capability, layer)](_pool(dec_hidden, dm))
        return {"out": out, "hidden": _pool(last, mask), "anchors": anchors}

    def forward(self, inputs: Mapping[str, torch.Tensor], capability: str | None = None) -> dict:
        capability = capability or self.capability
        if capability is None:
            raise ValueError("forward: no capability given and none set (call set_capability first)")
        if capability != self.capability:
            self.set_capability(capability)
        return self.head_forward(capability, self.encode(inputs), inputs)

    @torch.no_grad()
    def generate(self, inputs: Mapping[str, torch.Tensor], capability: str, max_new_tokens: int = 64) -> list[list[int]]:
        """Greedy decoding. "asr": transcript ids (without prompt, up to but excluding EOT) per item from
        the audio inputs. "lm": continuation ids of `input_ids` (B, T) (all rows must have the same length).
        """
        spec = self.cfg.capabilities.get(capability)
        if spec is None or spec.kind not in ("asr", "lm"):
            raise ValueError(f"generate: {capability!r} is not an 'asr' or 'lm' capability of tower {self.cfg.name!r}")
        self.set_capability(capability)
        if spec.kind == "lm":
            ids = inputs["input_ids"]
            for _ in range(max_new_tokens):
                ids = ids[:, -self.cfg.max_len:]
                logits = self.head_forward(capability, self.encode({"input_ids": ids}), {})["out"]
                ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            return ids[:, -max_new_tokens:].tolist()
        hiddens, mask = self.encode(inputs)
        mem = hiddens[-1]
        b = mem.shape[0]
        ids = torch.tensor([self.cfg.asr_prompt_ids] * b, dtype=torch.long)
        done = torch.zeros(b, dtype=torch.bool)
        steps = min(max_new_tokens, self.cfg.asr_max_len - ids.shape[1])
        for _ in range(steps):
            logits, _ = self.heads[adapter_name(capability)](ids, None, mem, mask)
            nxt = logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.cfg.asr_eot_id), nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            done |= nxt == self.cfg.asr_eot_id
            if bool(done.all()):
                break
        out = []
        for row in ids[:, len(self.cfg.asr_prompt_ids):].tolist():
            out.append(row[: row.index(self.cfg.asr_eot_id)] if self.cfg.asr_eot_id in row else row)
        return out


# ----------------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------------


def _clean_backbone_state(tower: StudentTower) -> dict[str, torch.Tensor]:
    """Backbone weights without LoRA tensors and with peft's `.base_layer.` wrapper removed."""
    out = {}
    for k, v in tower.base_backbone().state_dict().items():
        if "lora_" in k:
            continue
        out[k.replace(".base_layer.", ".")] = v.detach().contiguous().clone()
    return out


def save_tower(tower: StudentTower, directory: str | os.PathLike) -> Path:
    """Write the tower atomically: backbone.safetensors, heads.safetensors, config.json and one stock
    peft adapter folder per capability (`<dir>/<adapter name>/adapter_model.safetensors`).

    Everything goes into a temporary sibling directory that replaces `directory` only when complete.
    """
    from safetensors.torch import save_file

    from .atomic import atomic_dir

    directory = Path(directory)
    heads = {k: v.detach().contiguous().clone() for k, v in tower.state_dict().items()
             if k.startswith(("heads.", "anchor_proj."))}
    meta = {"format_version": FORMAT_VERSION, "tower": tower.cfg.name}
    with atomic_dir(directory) as tmp:
        save_file(_clean_backbone_state(tower), str(tmp / "backbone.safetensors"), metadata=meta)
        save_file(heads, str(tmp / "heads.safetensors"), metadata=meta)
        if tower.adapters:
            tower.backbone.save_pretrained(str(tmp), selected_adapters=[adapter_name(c) for c in tower.adapters])
        (tmp / "config.json").write_text(json.dumps(
            {"format_version": FORMAT_VERSION, "tower": tower.cfg.to_dict(),
             "adapters": {c: adapter_name(c) for c in tower.adapters},
             "num_parameters": sum(p.numel() for p in tower.parameters())}, indent=2))
    return directory


def load_tower(directory: str | os.PathLike, read_state: Callable[[Path], dict] | None = None) -> StudentTower:
    """Rebuild a tower written by `save_tower` (torch + peft + safetensors only), in eval mode.

    read_state: how a weights file becomes a state dict (default: safetensors `load_file`); the runtime
    passes its dequantizing reader for int8 / nf4 bundles, so both paths share these steps."""
    from safetensors.torch import load_file

    directory = Path(directory)
    read_state = read_state or (lambda path: load_file(str(path)))
    meta = json.loads((directory / "config.json").read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{directory}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION!r}")
    tower = StudentTower(TowerConfig.from_dict(meta["tower"]))
    tower.backbone.load_state_dict(read_state(directory / "backbone.safetensors"), strict=True)
    missing, unexpected = tower.load_state_dict(read_state(directory / "heads.safetensors"), strict=False)
    missing = [k for k in missing if not k.startswith("backbone.")]
    if missing or unexpected:
        raise ValueError(f"{directory}/heads.safetensors: missing {missing}, unexpected {unexpected}")
    for cap, name in meta.get("adapters", {}).items():
        tower.load_adapter(cap, directory / name)
    tower.capability = None
    return tower.eval()
