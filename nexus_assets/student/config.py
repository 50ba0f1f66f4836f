"""Tower architecture config: what one student tower is made of, validated on construction.

Dagster-free and torch-free so the registry, sizing and the runtime can read it cheaply.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

FORMAT_VERSION = "1"
MODALITIES = ("text", "vision", "audio")
HEAD_KINDS = ("lm", "embedding", "classes", "asr")
_KINDS_BY_MODALITY = {"text": ("lm", "embedding", "classes"), "vision": ("embedding", "classes"),
                      "audio": ("embedding", "classes", "asr")}
LORA_TARGET_REGEX = r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"

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
        exit_block: 0 = the head reads the last block; k > 0 (a pooled head: "embedding" / "classes") = it
            reads the first k blocks (a carved backbone's through its final norm), its anchors are matched
            within them, and a pass for this capability alone runs no further (early exit).
    """

    kind: str
    out_dim: int
    teacher: str = ""
    anchor_layers: dict[str, int] = field(default_factory=dict)
    exit_block: int = 0

    def __post_init__(self):
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"kind: {self.kind!r} is not one of {HEAD_KINDS}")
        if not isinstance(self.out_dim, int) or self.out_dim < 1:
            raise ValueError(f"out_dim: must be an int >= 1, got {self.out_dim!r}")
        if not isinstance(self.exit_block, int) or isinstance(self.exit_block, bool) or self.exit_block < 0:
            raise ValueError(f"exit_block: must be an int >= 0, got {self.exit_block!r}")
        if self.exit_block and self.kind not in ("embedding", "classes"):
            raise ValueError(f"exit_block: only a pooled head (embedding, classes) can exit early, not {self.kind!r}")
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
        init: "random" (the ablation baseline: a fresh small transformer) or "carved" (the backbone is the
            teacher's own architecture cut down by `carve`, initialised from the teacher's weights).
        carve: the carve plan of a "carved" tower (JSON): at least {"family": ...} naming the carved
            backbone (`student.carved.CARVED_FAMILIES`), plus what that family needs to rebuild the
            architecture (e.g. the stock transformers config of the cut model, kept token ids).
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
    init: str = "random"
    carve: dict = field(default_factory=dict)

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
        if self.width % self.n_heads and self.init != "carved":  # a carve keeps its teacher's head_dim: any count
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
            if head.kind == "asr" and self.init != "carved" and max(self.asr_prompt_ids + [self.asr_eot_id]) >= head.out_dim:
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
        if self.init not in ("random", "carved"):
            raise ValueError(f"init: must be 'random' or 'carved', got {self.init!r}")
        if self.init == "carved" and not (isinstance(self.carve, dict) and self.carve.get("family")):
            raise ValueError(f"carve: tower {self.name!r} is carved but its carve plan names no 'family'")
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
