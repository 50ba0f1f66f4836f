"""Example towers with fixed heads (the five embedded-default teachers' shapes) for tests and synthetic
benchmarks only. The pipeline never uses them: it builds every tower from the registry and the cached
features (`training.tower_spec`); an import-linter contract keeps training/, release/, runtime/ and defs/
from importing this module.
"""
from __future__ import annotations

from .config import MODALITIES, HeadSpec, TowerConfig


def example_tower_config(tower: str) -> TowerConfig:
    """A random-init example of each tower, heads shaped like the embedded default's teachers."""
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
