"""A tiny, complete NEXUS world for runtime / validation / bundle tests, built in about a second.

Three towers from small TowerConfigs (random weights, random LoRA), saved with `save_tower` plus the
tokenizers / class names tower_adapter adds; a router; probe tables with heldout / ood / train rows;
and feature-cache entries for the five default teachers whose values are synthetic but have the real
columns (tokens: token_id, topk_ids, next_logprob, has_next; items: embedding, logits, transcript).
Output dims match the defaults where the runtime API promises them (text.embed 384, speaker 256).
"""
from __future__ import annotations

import io
import json
import wave
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from nexus_assets.core.feature_store import _column, write_chunk
from nexus_assets.student.router import Router
from nexus_assets.student.config import HeadSpec, TowerConfig
from nexus_assets.student.tower import StudentTower, save_tower

WORDS = [f"w{i}" for i in range(120)]
ASR_VOCAB = 1200


def tiny_configs() -> dict[str, TowerConfig]:
    return {
        "text": TowerConfig(
            name="text", modality="text", width=32, depth=2, n_heads=2, vocab_size=128, max_len=16,
            capabilities={"text.generate": HeadSpec("lm", 128, "smollm2-135m", {"layers.10": 24}),
                          "text.embed": HeadSpec("embedding", 384, "minilm-l6", {"layers.3": 8})},
            lora_rank={"text.generate": 4, "text.embed": 2}),
        "vision": TowerConfig(
            name="vision", modality="vision", width=32, depth=2, n_heads=2, image_size=32,
            capabilities={"vision.classify": HeadSpec("classes", 10, "efficientnet-lite0", {"blocks.5": 8})},
            lora_rank={"vision.classify": 4}),
        "audio": TowerConfig(
            name="audio", modality="audio", width=32, depth=2, n_heads=2, n_mels=16, max_frames=64,
            decoder_depth=1, asr_max_len=12, asr_prompt_ids=[1100, 1101], asr_eot_id=1102,
            capabilities={"audio.speaker_embed": HeadSpec("embedding", 256, "ge2e-speaker", {"lstm.2": 8}),
                          "audio.transcribe": HeadSpec("asr", ASR_VOCAB, "whisper-tiny-en", {"encoder.2": 8})},
            lora_rank={"audio.speaker_embed": 2, "audio.transcribe": 2}),
    }


def _word_tokenizer(path: Path, vocab: list[str], specials: dict[int, str] | None = None) -> None:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=vocab[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if specials:
        tok.add_special_tokens([AddedToken(s, special=True) for s in specials.values()])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))


def build_tower_dir(cfg: TowerConfig, out: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    tower = StudentTower(cfg)
    for cap in cfg.capabilities:
        tower.add_adapter(cap)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in tower.backbone.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    save_tower(tower, out)
    if cfg.modality == "text":
        _word_tokenizer(out / "tokenizer" / "tokenizer.json", ["<unk>"] + WORDS + [f"x{i}" for i in range(7)])
    elif cfg.modality == "audio":
        vocab = ["<unk>"] + WORDS + [f"v{i}" for i in range(ASR_VOCAB - 1 - len(WORDS))]
        vocab[1100:1103] = ["<|sot|>", "<|notimestamps|>", "<|endoftext|>"]
        _word_tokenizer(out / "tokenizer" / "tokenizer.json", vocab,
                        {1100: "<|sot|>", 1101: "<|notimestamps|>", 1102: "<|endoftext|>"})
    else:
        (out / "classes.json").write_text(json.dumps([f"class_{i}" for i in range(10)]))
    return out


def wav_bytes(seconds: float = 0.4, freq: float = 220.0, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    x = 0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.normal(size=t.size)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def png_bytes(seed: int = 0, size: int = 40) -> bytes:
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


SPLITS = ["heldout"] * 6 + ["ood"] * 4 + ["train"] * 2


def _write_entry(folder: Path, items: dict, tokens: dict | None = None) -> Path:
    cols = {k: (pa.array(v) if isinstance(v, list) else _column(np.asarray(v))) for k, v in items.items()}
    tok = None if tokens is None else pa.table({k: (pa.array(v) if isinstance(v, list) else _column(np.asarray(v)))
                                                for k, v in tokens.items()})
    folder.mkdir(parents=True, exist_ok=True)
    write_chunk(folder, 0, pa.table(cols), tok)
    return folder


def build_world(root: Path, seed: int = 0) -> dict:
    """Tower folders, router folder, teacher feature entries and probe tables under `root`."""
    rng = np.random.default_rng(seed)
    cfgs = tiny_configs()
    tower_dirs = {name: build_tower_dir(cfg, root / "towers" / name, seed) for name, cfg in cfgs.items()}
    router = Router.from_towers(cfgs.values())
    router.fit_text_auto(steps=50)
    router_dir = router.save(root / "router")
    n = len(SPLITS)

    # text: 4 documents x 3 passages
    text_ids = [f"pydoc_topics/doc{i // 3}:{i % 3}/0" for i in range(n)]
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 12)))) for _ in range(n)]
    text_probe = pa.table({"row_id": text_ids, "source": ["pydoc_topics"] * n,
                           "item": [f"doc{i // 3}:{i % 3}" for i in range(n)], "split": SPLITS, "text": texts})
    tok_rows: dict[str, list] = {k: [] for k in ("row_id", "position", "token_id", "topk_ids", "topk_logits",
                                                  "logsumexp", "next_logprob", "has_next")}
    for rid, text in zip(text_ids, texts):
        ids = [1 + WORDS.index(w) for w in text.split()]
        for p, tid in enumerate(ids):
            tok_rows["row_id"].append(rid)
            tok_rows["position"].append(p)
            tok_rows["token_id"].append(tid)
            nxt = ids[p + 1] if p + 1 < len(ids) else 0
            top = [nxt if rng.random() < 0.5 else int(rng.integers(0, 128))] + list(rng.integers(0, 128, 3))
            tok_rows["topk_ids"].append(top)
            tok_rows["topk_logits"].append([4.0, 3.0, 2.0, 1.0])
            tok_rows["logsumexp"].append(5.0)
            tok_rows["next_logprob"].append(float(-rng.uniform(0.5, 3.0)) if p + 1 < len(ids) else 0.0)
            tok_rows["has_next"].append(p + 1 < len(ids))
    for k in ("topk_ids", "topk_logits"):
        tok_rows[k] = np.asarray(tok_rows[k])
    feats = root / "features"
    entries = {
        "smollm2-135m": _write_entry(feats / "smollm2-135m", {"row_id": text_ids, "split": SPLITS},
                                     tok_rows),
        "minilm-l6": _write_entry(feats / "minilm-l6", {
            "row_id": text_ids, "split": SPLITS,
            "embedding": np.repeat(rng.normal(size=(4, 384)), 3, 0) + 0.5 * rng.normal(size=(n, 384))}),
    }
    # vision
    img_ids = [f"skimage/img{i}/0" for i in range(n)]
    image_probe = pa.table({"row_id": img_ids, "source": ["skimage"] * n, "item": [f"img{i}" for i in range(n)],
                            "split": SPLITS, "image": [png_bytes(i) for i in range(n)]})
    entries["efficientnet-lite0"] = _write_entry(feats / "efficientnet-lite0", {
        "row_id": img_ids, "split": SPLITS, "logits": rng.normal(size=(n, 10))})
    # audio: 3 speakers
    wav_ids = [f"flite/s{i}@v{i % 3}/0" for i in range(n)]
    speakers = [f"v{i % 3}" for i in range(n)]
    speech_probe = pa.table({
        "row_id": wav_ids, "source": ["flite"] * n, "item": [f"s{i}@v{i % 3}" for i in range(n)], "split": SPLITS,
        "wav": [wav_bytes(0.3 + 0.05 * (i % 3), 150 + 60 * (i % 3), i) for i in range(n)],
        "transcript": [" ".join(rng.choice(WORDS, 4)) for _ in range(n)], "speaker": speakers})
    centers = rng.normal(size=(3, 256))
    entries["ge2e-speaker"] = _write_entry(feats / "ge2e-speaker", {
        "row_id": wav_ids, "split": SPLITS,
        "embedding": centers[[i % 3 for i in range(n)]] + 0.7 * rng.normal(size=(n, 256))})
    refs = speech_probe.column("transcript").to_pylist()
    entries["whisper-tiny-en"] = _write_entry(feats / "whisper-tiny-en", {
        "row_id": wav_ids, "split": SPLITS,
        "transcript": [r.capitalize() + "." if i % 4 else r.split()[0] for i, r in enumerate(refs)]})
    return {"cfgs": cfgs, "tower_dirs": tower_dirs, "router_dir": Path(router_dir), "teacher_entries": entries,
            "probe_tables": {"text-probe": text_probe, "image-probe": image_probe, "speech-probe": speech_probe}}


TOWER_TEACHERS = {"text": ["smollm2-135m", "minilm-l6"], "vision": ["efficientnet-lite0"],
                  "audio": ["ge2e-speaker", "whisper-tiny-en"]}
