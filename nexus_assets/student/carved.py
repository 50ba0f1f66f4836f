"""Carved backbones: the teacher's own architecture, cut down by a carve plan and initialised from the
teacher's weights (DistilBERT / Minitron / distil-whisper style), instead of a random small transformer.

A carved backbone is an `nn.Module` built from `TowerConfig` alone (`cfg.carve` holds the plan), with
weights filled later by `load_state_dict` (from the carve at training start, from the tower folder at
run time). Its contract with `StudentTower`:

* ``forward(inputs) -> (hiddens, mask)``: per-block states [(B, L, W)] (the heads read the last) and the
  (B, L) bool mask, exactly as the random backbones.
* ``layer_states``: {teacher layer name: (B, Ht)} pooled states of the teacher layers the carve kept,
  set on each forward; anchoring reads them directly (no projection when Ht matches).
* ``layer_widths``: {teacher layer name: width} of those layers (known at construction).
* ``lora_target_regex``: peft `target_modules` full-match regex for this family's Linear layers.
* optional ``make_head(capability, spec) -> nn.Module | None``: a head of the family's own (the teacher's
  classifier or decoder, carved); None falls back to the generic heads.
* optional ``lm_weight()``: the output matrix of an "lm" head (tied embedding).
* optional ``generate_ids(input_ids, max_new_tokens)`` (lm) / a head's ``generate_ids(mem, mem_mask,
  max_new_tokens)`` (asr): decoding through transformers' `generate`, returning ids in the teacher's id space.
* optional ``export_stock(state, folder) -> set[str]`` / ``import_stock(folder, read_state) -> dict``:
  save / load (part of) the backbone as a stock transformers model folder.

Families register in `CARVED_FAMILIES` (family name -> "module:Class"), imported lazily so the runtime
only pays for the family it loads.
"""
from __future__ import annotations

import importlib

from torch import nn

from .config import TowerConfig

CARVED_FAMILIES = {
    "llama": "nexus_assets.student.carved_text:CarvedLlamaBackbone",
    "efficientnet_lite": "nexus_assets.student.carved_vision:CarvedEfficientNetBackbone",
    "whisper": "nexus_assets.student.carved_whisper:CarvedWhisperBackbone",
}


def build_carved_backbone(cfg: TowerConfig) -> nn.Module:
    family = cfg.carve.get("family")
    if family not in CARVED_FAMILIES:
        raise ValueError(f"tower {cfg.name!r}: carve family {family!r} cannot be carved; "
                         f"carvable families: {sorted(CARVED_FAMILIES)} (init: random stays available)")
    module, cls = CARVED_FAMILIES[family].split(":")
    return getattr(importlib.import_module(module), cls)(cfg)


def audio_input_features(cfg: TowerConfig, wave):
    """(F, n_mels) input features of an audio tower for a (N,) float32 16 kHz waveform: a carved Whisper
    tower reads Whisper's own log-mel (its copied encoder was trained on it), a random tower
    `transforms.log_mel`. Training and the runtime both call this, so they feed the same tensors."""
    import torch

    if cfg.init == "carved" and cfg.carve.get("family") == "whisper":
        from .carved_whisper import whisper_log_mel

        return whisper_log_mel(wave, int(cfg.carve["max_seconds"]))
    from .transforms import log_mel

    return log_mel(torch.as_tensor(wave), cfg.n_mels)
