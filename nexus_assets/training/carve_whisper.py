"""Carve the audio tower from a Whisper teacher snapshot (distil-whisper): the encoder copied whole (its
positions cut to `max_seconds`), a few decoder layers copied (by default the first and the last, as
distil-whisper initialises its 2-layer decoder), the vocabulary trimmed to the tokens the teacher writes
or predicts on the train split. Reads the stock WhisperForConditionalGeneration folder the teacher
adapter converted (`<snapshot>/hf`); imports no teacher package.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .carve_text import vocab_by_coverage

PROMPT_IDS = [50257, 50362]  # <|startoftranscript|><|notimestamps|> of tiny.en
EOT_ID = 50256


def plan_whisper_carve(hf_dir: Path, *, transcript_ids: np.ndarray, topk_ids: np.ndarray, topk_probs: np.ndarray,
                       decoder_layers: Sequence[int] | None = None, vocab_mass: float = 0.999,
                       max_seconds: int = 10, anchor_layers: Sequence[str] = ("encoder.2", "encoder.4"),
                       log: Callable[[str], None] = print) -> dict:
    """The carve plan of the audio tower (JSON-able) with its report.

    Args:
        hf_dir: the teacher's stock Whisper folder (config.json + model.safetensors).
        transcript_ids: teacher transcript token ids on the train split (any shape).
        topk_ids, topk_probs: the teacher's cached next-token top-k on the train split, (N, k).
        decoder_layers: teacher decoder layers kept, in order; None = first and last.
        vocab_mass: share of the (transcript + teacher next-token) mass the kept vocabulary covers.
        max_seconds: the encoder's window (Whisper's is 30 s; the probe clips are a few seconds).
    """
    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    n_dec, teacher_vocab = int(cfg["decoder_layers"]), int(cfg["vocab_size"])
    layers = list(decoder_layers) if decoder_layers is not None else sorted({0, n_dec - 1})
    if not layers:
        raise ValueError("tower 'audio' carve decoder_layers: at least one decoder layer must be kept")
    if any(not 0 <= l < n_dec for l in layers) or len(set(layers)) != len(layers):
        raise ValueError(f"tower 'audio' carve decoder_layers: distinct layers in 0..{n_dec - 1}, got {layers}")
    if not (0 < vocab_mass <= 1):
        raise ValueError(f"tower 'audio' carve vocab_mass: must be in (0, 1], got {vocab_mass}")
    if not 1 <= int(max_seconds) <= 30:
        raise ValueError(f"tower 'audio' carve max_seconds: 1..30, got {max_seconds}")
    counts = np.bincount(np.asarray(transcript_ids, dtype=np.int64).reshape(-1), minlength=teacher_vocab).astype(float)
    soft = np.zeros(teacher_vocab)
    np.add.at(soft, np.asarray(topk_ids, dtype=np.int64).reshape(-1), np.asarray(topk_probs, dtype=float).reshape(-1))
    vocab = vocab_by_coverage(counts + soft, vocab_mass, PROMPT_IDS + [EOT_ID])
    keys = ("d_model", "encoder_layers", "encoder_attention_heads", "decoder_attention_heads", "encoder_ffn_dim",
            "decoder_ffn_dim", "num_mel_bins", "max_target_positions", "activation_function", "scale_embedding",
            "layer_norm_eps")
    hf = {k: cfg[k] for k in keys if k in cfg}
    plan = {"family": "whisper", "teacher_vocab": teacher_vocab, "vocab": vocab, "hf_config": hf,
            "decoder_layers": layers, "max_seconds": int(max_seconds), "prompt_ids": PROMPT_IDS, "eot_id": EOT_ID,
            "anchor_layers": list(anchor_layers)}
    teacher_params = _count(cfg, teacher_vocab, n_dec, 1500)
    student_params = _count(cfg, len(vocab) + 1, len(layers), int(max_seconds) * 50)
    plan["report"] = {
        "teacher_params": teacher_params, "student_params": student_params,
        "param_fraction": student_params / teacher_params,
        "decoder_layers_kept": layers, "decoder_layers_dropped": [l for l in range(n_dec) if l not in layers],
        "encoder": f"all {cfg['encoder_layers']} layers copied; window {max_seconds} s (teacher 30 s)",
        "vocab_kept": len(vocab), "vocab_teacher": teacher_vocab,
        "train_transcript_coverage": float(counts[vocab].sum() / max(counts.sum(), 1.0)),
        "teacher_next_token_mass_covered": float(soft[vocab].sum() / max(soft.sum(), 1e-12)),
    }
    log(f"[audio carve] decoder layers {layers} of {n_dec}, vocabulary {len(vocab)}/{teacher_vocab}, window "
        f"{max_seconds} s: {student_params / 1e6:.1f}M of {teacher_params / 1e6:.1f}M params")
    return plan


def _count(cfg: dict, vocab: int, dec_layers: int, src_pos: int) -> int:
    """Parameters of a Whisper with this vocabulary, decoder depth and encoder positions (tied output)."""
    d, fe, fd = cfg["d_model"], cfg["encoder_ffn_dim"], cfg["decoder_ffn_dim"]
    enc_layer = 4 * d * d + 3 * d + 2 * d * fe + fe + d + 4 * d
    dec_layer = 8 * d * d + 6 * d + 2 * d * fd + fd + d + 6 * d
    conv = cfg["num_mel_bins"] * d * 3 + d + d * d * 3 + d
    return (conv + src_pos * d + cfg["encoder_layers"] * enc_layer + 2 * d
            + vocab * d + cfg["max_target_positions"] * d + dec_layers * dec_layer + 2 * d)


def carved_whisper_config(base, plan: dict, lora_rank: int):
    """`base` (the audio tower's heads from the registry) turned into the carved Whisper tower."""
    from nexus_assets.student.config import adapter_name

    asr = [c for c, h in base.capabilities.items() if h.kind == "asr"]
    if not asr:
        raise ValueError(f"tower {base.name!r}: carved from Whisper but has no 'asr' capability")
    nv = len(plan["vocab"]) + 1
    caps = {c: (dataclasses.replace(h, out_dim=nv) if h.kind == "asr" else h) for c, h in base.capabilities.items()}
    for c, k in plan.get("exit_blocks", {}).items():
        if c in caps and caps[c].kind in ("embedding", "classes"):
            caps[c] = dataclasses.replace(caps[c], exit_block=int(k))
    hf = plan["hf_config"]
    plan = {**plan, "asr_head": adapter_name(asr[0])}
    return dataclasses.replace(base, width=hf["d_model"], depth=hf["encoder_layers"],
                               n_heads=hf["encoder_attention_heads"], n_mels=hf["num_mel_bins"],
                               max_frames=plan["max_seconds"] * 100, asr_prompt_ids=list(plan["prompt_ids"]),
                               asr_eot_id=plan["eot_id"], capabilities=caps,
                               lora_rank={c: lora_rank for c in caps}, init="carved", carve=plan)


def carved_whisper_state(plan: dict, hf_dir: Path) -> dict[str, torch.Tensor]:
    """StudentTower state-dict entries from the teacher's weights: "backbone.encoder.*" and the asr head's
    "heads.<asr>.decoder.*" (kept layers renumbered, embedding rows of the kept vocabulary + a fallback row)."""
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        sd.update(load_file(str(f)))
    if not sd:
        raise FileNotFoundError(f"audio carve: no *.safetensors in {hf_dir}")
    n_pos = int(plan["max_seconds"]) * 50
    head = f"heads.{plan['asr_head']}.decoder."
    out = {}
    for k, v in sd.items():
        if k.startswith("model.encoder."):
            name = k[len("model.encoder."):]
            out["backbone.encoder." + name] = v[:n_pos].contiguous() if name == "embed_positions.weight" else v
    vocab = torch.as_tensor(plan["vocab"], dtype=torch.long)
    emb = sd["model.decoder.embed_tokens.weight"]
    dropped = torch.ones(emb.shape[0], dtype=torch.bool)
    dropped[vocab] = False
    fallback = emb[dropped].mean(0, keepdim=True) if dropped.any() else emb.mean(0, keepdim=True)
    out[head + "embed_tokens.weight"] = torch.cat([emb[vocab], fallback]).contiguous()
    out[head + "embed_positions.weight"] = sd["model.decoder.embed_positions.weight"]
    for n in ("layer_norm.weight", "layer_norm.bias"):
        out[head + n] = sd["model.decoder." + n]
    for j, l in enumerate(plan["decoder_layers"]):
        src = f"model.decoder.layers.{l}."
        for k, v in sd.items():
            if k.startswith(src):
                out[f"{head}layers.{j}.{k[len(src):]}"] = v
    return out


@torch.no_grad()
def encoder_exit_block(plan: dict, hf_dir: Path, mels: Sequence[torch.Tensor], targets: np.ndarray,
                       batch_size: int = 16) -> dict:
    """{"blocks": k, "fold_cosine": per-layer scores, "rows": n} for an embedding head pooling the carved
    (untrained) encoder of `plan`: ridge_fold_cosine of each layer's mean-pooled states, read as the
    early-exit pass reads them (the clip's own frames, `exit_norm`), against `targets` (N, E), the
    teacher's embeddings of the N clips whose Whisper log-mels (F_i, 80) are `mels`."""
    from nexus_assets.student.carved_whisper import CarvedWhisperBackbone
    from nexus_assets.student.config import HeadSpec, TowerConfig

    from .carve_text import choose_exit_block, pooled_block_states, ridge_fold_cosine

    if len(mels) != len(targets) or len(mels) < 16:
        raise ValueError(f"audio carve: {len(mels)} clips and {len(targets)} embedding targets (need >= 16, equal)")
    hf = plan["hf_config"]
    cfg = TowerConfig(name="audio", modality="audio", width=hf["d_model"], depth=hf["encoder_layers"],
                      n_heads=hf["encoder_attention_heads"], n_mels=hf["num_mel_bins"],
                      capabilities={"audio.embed": HeadSpec("embedding", int(np.shape(targets)[1]))},
                      lora_rank={"audio.embed": 1}, init="carved", carve=plan)
    net = CarvedWhisperBackbone(cfg).eval()
    state = {k[len("backbone."):]: v for k, v in carved_whisper_state({**plan, "asr_head": "asr"}, hf_dir).items()
             if k.startswith("backbone.")}
    net.load_state_dict(state)
    net.exit_after = len(net.encoder.layers)

    def batches():
        for i in range(0, len(mels), batch_size):
            chunk = list(mels[i:i + batch_size])
            x = torch.zeros(len(chunk), max(m.shape[0] for m in chunk), chunk[0].shape[1])
            m = torch.zeros(x.shape[:2], dtype=torch.bool)
            for j, c in enumerate(chunk):
                x[j, :c.shape[0]], m[j, :c.shape[0]] = c, True
            yield {"mels": x, "mel_mask": m}

    y = torch.as_tensor(np.asarray(targets), dtype=torch.float32)
    order = torch.as_tensor(np.random.default_rng(0).permutation(len(mels)))
    scores = [ridge_fold_cosine(x[order], y[order], alpha=10.0) for x in pooled_block_states(net, batches())]
    return {"blocks": choose_exit_block(scores), "fold_cosine": [round(v, 4) for v in scores], "rows": len(mels)}
