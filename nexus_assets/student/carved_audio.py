"""A carved Whisper audio tower (`student.carved_whisper`) as one stock `WhisperForConditionalGeneration`.

The carved tower splits Whisper across two modules: the encoder is the backbone (shared with
`audio.speaker_embed`, LoRA adapters on its Linear layers) and the decoder is the "asr" head. A stock
folder therefore needs the whole tower, not the backbone's state alone (which is all
`backbone.export_stock(state, folder)` is handed by `save_tower`), so this module works on the tower:

* `stock_whisper(tower, capability)`: the encoder (with that capability's LoRA adapter merged in, if it
  has one) + the head's decoder as a `WhisperForConditionalGeneration`; its logits equal the tower's.
* `export_stock_whisper(tower, folder)`: `config.json`, `model.safetensors`, `generation_config.json`,
  `preprocessor_config.json` (Whisper's extractor with `chunk_length = max_seconds`, which gives exactly
  the frames the tower reads) and `carve_vocab.json` (kept teacher ids; the stock model's token ids are the
  carved ones: id i is teacher id vocab[i], id len(vocab) the fallback of every dropped token).
  `WhisperForConditionalGeneration.from_pretrained(folder)` loads it.
* `teacher_ids(ids, folder_or_vocab)`: carved ids -> teacher ids (the teacher's tokenizer decodes them).

Runtime-safe: torch, transformers and the stdlib only.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch

VOCAB_FILE = "carve_vocab.json"


def _asr_capability(tower, capability: str | None) -> str:
    asr = [c for c, h in tower.cfg.capabilities.items() if h.kind == "asr"]
    if capability is None:
        if not asr:
            raise ValueError(f"tower {tower.cfg.name!r}: no 'asr' capability to export as stock Whisper")
        return asr[0]
    if capability not in asr:
        raise ValueError(f"tower {tower.cfg.name!r}: {capability!r} is not an 'asr' capability (those: {asr})")
    return capability


def _merged_encoder_state(tower, capability: str) -> dict[str, torch.Tensor]:
    """The backbone's encoder weights with `capability`'s LoRA delta (scaling * B @ A) merged in."""
    from .config import adapter_name

    base = tower.base_backbone()
    raw = {k: v.detach() for k, v in base.state_dict().items()}
    out = {k.replace(".base_layer.", "."): v.clone() for k, v in raw.items() if "lora_" not in k}
    if capability in tower.adapters:
        name = adapter_name(capability)
        scaling = tower.cfg.lora_alpha / tower.cfg.lora_rank[capability]
        for k, a in raw.items():
            if k.endswith(f"lora_A.{name}.weight"):
                stem = k[: -len(f"lora_A.{name}.weight")]
                b = raw[f"{stem}lora_B.{name}.weight"]
                w = f"{stem.rstrip('.')}.weight"
                out[w] = out[w] + scaling * (b.float() @ a.float()).to(out[w].dtype)
    return {k[len("encoder."):]: v for k, v in out.items() if k.startswith("encoder.")}


def stock_whisper(tower, capability: str | None = None):
    """The tower's ASR path as a `WhisperForConditionalGeneration` over the carved vocabulary (eval mode)."""
    from transformers import WhisperForConditionalGeneration

    from .config import adapter_name

    capability = _asr_capability(tower, capability)
    base = tower.base_backbone()
    head = tower.heads[adapter_name(capability)]
    if not hasattr(base, "hf_config") or not hasattr(head, "decoder"):
        raise ValueError(f"tower {tower.cfg.name!r}: not a carved Whisper tower (carve family "
                         f"{tower.cfg.carve.get('family')!r})")
    cfg = base.hf_config.__class__.from_dict(base.hf_config.to_dict())
    cfg.tie_word_embeddings = True
    model = WhisperForConditionalGeneration(cfg)
    model.model.encoder.load_state_dict(_merged_encoder_state(tower, capability), strict=True)
    model.model.decoder.load_state_dict({k: v.detach().clone() for k, v in head.decoder.state_dict().items()},
                                        strict=True)
    model.tie_weights()
    gc = model.generation_config
    gc.decoder_start_token_id, gc.eos_token_id, gc.pad_token_id = (cfg.decoder_start_token_id, cfg.eos_token_id,
                                                                   cfg.pad_token_id)
    gc.forced_decoder_ids = None
    gc.suppress_tokens = [cfg.vocab_size - 1]  # the fallback slot is no token
    gc.no_repeat_ngram_size, gc.repetition_penalty = 3, 1.1
    return model.eval()


def export_stock_whisper(tower, folder: str | os.PathLike, capability: str | None = None) -> Path:
    """Write the stock folder (see the module docstring); returns it."""
    from transformers import WhisperFeatureExtractor

    folder = Path(folder)
    model = stock_whisper(tower, capability)
    plan = tower.cfg.carve
    model.save_pretrained(folder, safe_serialization=True)
    WhisperFeatureExtractor(feature_size=model.config.num_mel_bins, sampling_rate=16000,
                            chunk_length=int(plan["max_seconds"])).save_pretrained(folder)
    new = {t: i for i, t in enumerate(plan["vocab"])}
    (folder / VOCAB_FILE).write_text(json.dumps({
        "vocab": [int(t) for t in plan["vocab"]], "fallback": len(plan["vocab"]),
        "teacher_vocab": int(plan["teacher_vocab"]),
        "prompt_ids": [new[int(t)] for t in plan["prompt_ids"]], "eot_id": new[int(plan["eot_id"])],
        "teacher_prompt_ids": [int(t) for t in plan["prompt_ids"]], "teacher_eot_id": int(plan["eot_id"])}))
    return folder


def teacher_ids(ids: Sequence[Sequence[int]], vocab: str | os.PathLike | Sequence[int]) -> list[list[int]]:
    """Carved ids (rows) -> teacher ids; `vocab` is a stock folder or the kept id list. The fallback id
    (and anything outside the kept vocabulary) is dropped: it stands for no single teacher token."""
    if isinstance(vocab, (str, os.PathLike)):
        vocab = json.loads((Path(vocab) / VOCAB_FILE).read_text())["vocab"]
    vocab = [int(t) for t in vocab]
    return [[vocab[t] for t in row if 0 <= t < len(vocab)] for row in ids]
