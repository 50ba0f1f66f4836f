"""The audio tower carved from Whisper (distil-whisper style): the teacher's encoder, copied, run on a
shorter window than Whisper's 30 s, and a decoder of a few of the teacher's decoder layers over a trimmed
vocabulary; `audio.speaker_embed` pools the same encoder states.

Inputs are Whisper's own log-mel features (`whisper_log_mel`, transformers' WhisperFeatureExtractor with
`max_seconds` chunks): the first frames are exactly the teacher's, so the copied encoder reads what it was
trained on. Token ids in and out are the TEACHER's (tokenizer, cache and metrics unchanged); inside, the
decoder works over the kept vocabulary `carve["vocab"]` (new id = index) plus one fallback slot that every
dropped id maps to (new id = len(vocab)), exactly as the carved text tower.

Runtime-safe: torch, numpy and transformers only.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .carved_text import vocab_maps
from .config import HeadSpec, TowerConfig

SAMPLE_RATE = 16000
_EXTRACTORS: dict[int, object] = {}


def whisper_log_mel(wave: np.ndarray, max_seconds: int = 10) -> torch.Tensor:
    """(N,) float32 16 kHz -> (F, 80) Whisper log-mel of the frames that hold audio (F <= 100 * max_seconds;
    the clip is cut there). Whisper pads with silence, whose frames are the clip's floor: the backbone
    restores them (`pad_to_window`)."""
    from transformers import WhisperFeatureExtractor

    if max_seconds not in _EXTRACTORS:
        _EXTRACTORS[max_seconds] = WhisperFeatureExtractor(feature_size=80, sampling_rate=SAMPLE_RATE,
                                                          chunk_length=max_seconds)
    fe = _EXTRACTORS[max_seconds]
    feats = fe(np.asarray(wave, dtype=np.float32)[: SAMPLE_RATE * max_seconds], sampling_rate=SAMPLE_RATE,
               return_tensors="np").input_features[0]  # (80, F)
    n = min(feats.shape[1], len(wave) // 160 + 1)
    return torch.from_numpy(np.ascontiguousarray(feats[:, :n].T, dtype=np.float32))


def pad_to_window(mels: torch.Tensor, mask: torch.Tensor, n_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, F, 80) frames + (B, F) mask -> (B, n_frames, 80) as Whisper's extractor would give for the clip
    padded with silence: every non-audio frame is the clip's floor, max - 2 (log-mel floored 8 decades under
    the maximum, then scaled by 1/4)."""
    b, f, m = mels.shape
    if f < n_frames:
        mels = torch.cat([mels, mels.new_zeros(b, n_frames - f, m)], 1)
        mask = torch.cat([mask, mask.new_zeros(b, n_frames - f)], 1)
    mels, mask = mels[:, :n_frames], mask[:, :n_frames]
    peak = torch.where(mask[..., None], mels, mels.new_tensor(-float("inf"))).amax(dim=(1, 2))  # (B,)
    return torch.where(mask[..., None], mels, (peak - 2.0)[:, None, None]), mask


def _encoder_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, F) frame mask -> (B, F / 2) mask of the encoder positions that hold audio (conv2 has stride 2;
    the first position always counts, so an empty clip still pools something)."""
    enc_mask = mask[:, ::2].clone()
    enc_mask[:, 0] = True
    return enc_mask


def _whisper_config(plan: dict):
    from transformers import WhisperConfig

    hf = dict(plan["hf_config"])
    new = {t: i for i, t in enumerate(plan["vocab"])}  # special ids in the kept vocabulary's numbering
    eot, sot = new[int(plan["eot_id"])], new[int(plan["prompt_ids"][0])]
    hf.update(vocab_size=len(plan["vocab"]) + 1, decoder_layers=len(plan["decoder_layers"]),
              max_source_positions=int(plan["max_seconds"]) * 50, pad_token_id=eot, bos_token_id=eot,
              eos_token_id=eot, decoder_start_token_id=sot, suppress_tokens=None, begin_suppress_tokens=None)
    return WhisperConfig(**hf)


class CarvedWhisperBackbone(nn.Module):
    """forward({mels (B, F, 80) Whisper log-mel, mel_mask (B, F)}) -> (encoder hidden states [(B, L, 384)],
    mask (B, L) of the positions that hold audio); see `student.carved` for the contract."""

    lora_target_regex = r".*encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|fc1|fc2)"

    def __init__(self, cfg: TowerConfig):
        super().__init__()
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        self.plan = cfg.carve
        self.hf_config = _whisper_config(self.plan)
        self.encoder = WhisperEncoder(self.hf_config)
        self.n_frames = 2 * self.hf_config.max_source_positions
        self.layer_widths = {f"encoder.{i}": self.hf_config.d_model for i in range(self.hf_config.encoder_layers + 1)}
        self.layer_states: dict[str, torch.Tensor] = {}
        self.anchor_layers = [l for l in self.plan.get("anchor_layers", []) if l in self.layer_widths]
        self.layer_widths = {l: self.layer_widths[l] for l in self.anchor_layers}
        self.exit_after: int | None = None  # encoder layers to run (an early-exit head's pass); None = all

    def forward(self, inputs: Mapping[str, torch.Tensor]):
        mels = inputs["mels"]  # (B, F, 80)
        mask = inputs.get("mel_mask")
        mask = torch.ones(mels.shape[:2], dtype=torch.bool, device=mels.device) if mask is None else mask.bool()
        if self.exit_after is not None:
            return self._exit_pass(mels, mask, max(1, min(int(self.exit_after), len(self.encoder.layers))))
        mels, mask = pad_to_window(mels, mask, self.n_frames)
        out = self.encoder(mels.transpose(1, 2), output_hidden_states=True)
        enc_mask = _encoder_mask(mask)
        m = enc_mask.to(out.last_hidden_state.dtype)[..., None]
        self.layer_states = {l: (out.hidden_states[int(l.split(".")[1])] * m).sum(1) / m.sum(1).clamp_min(1.0)
                             for l in self.anchor_layers}
        return list(out.hidden_states[1:]), enc_mask

    def _exit_pass(self, mels: torch.Tensor, mask: torch.Tensor, k: int):
        """The first k encoder layers over the clip's own frames (padded to the batch's longest clip, not to
        the window: a 3 s clip costs a third of the window's frames): the pass an early-exit head (the
        speaker embedding) reads. WhisperEncoder.forward insists on the whole window, so this runs its
        modules itself; the last state returned is through the final norm, as a full pass's is."""
        enc = self.encoder
        frames = int(mask.sum(1).max()) if mask.numel() else 2
        frames = min(self.n_frames, max(2, frames + frames % 2))  # conv2 has stride 2
        mels, mask = pad_to_window(mels, mask, frames)
        h = F.gelu(enc.conv2(F.gelu(enc.conv1(mels.transpose(1, 2))))).permute(0, 2, 1)  # (B, frames / 2, W)
        h = h + enc.embed_positions.weight[: h.shape[1]]
        states = []
        for layer in enc.layers[:k]:
            h = layer(h, None)
            states.append(h)
        states[-1] = enc.layer_norm(states[-1])
        self.layer_states = {}  # the ASR anchors' layers are not all run
        return states, _encoder_mask(mask)

    def exit_norm(self, h: torch.Tensor) -> torch.Tensor:
        """A layer's states as an early-exit head reads them: through the encoder's final norm."""
        return self.encoder.layer_norm(h)

    def make_head(self, capability: str, spec: HeadSpec):
        return CarvedWhisperDecoder(self.plan, self.hf_config) if spec.kind == "asr" else None


class CarvedWhisperDecoder(nn.Module):
    """The "asr" head: Whisper decoder layers over the kept vocabulary, output tied to the token embedding.

    forward(dec_ids (B, U') teacher ids, dec_mask, mem (B, L, W), mem_mask (B, L)) -> (logits (B, U', V'+1),
    last hidden (B, U', W)).
    """

    def __init__(self, plan: dict, hf_config):
        super().__init__()
        from transformers.models.whisper.modeling_whisper import WhisperDecoder

        self.decoder = WhisperDecoder(hf_config)
        old_to_new, new_to_old = vocab_maps(list(plan["vocab"]), int(plan["teacher_vocab"]))
        self.register_buffer("old_to_new", old_to_new, persistent=False)
        self.register_buffer("new_to_old", new_to_old, persistent=False)
        self.n_dropped = int(plan["teacher_vocab"]) - len(plan["vocab"])
        self.prompt = [int(t) for t in plan["prompt_ids"]]
        self.eot = int(plan["eot_id"])
        self.hf_config = hf_config

    def forward(self, dec_ids, dec_mask, mem, mem_mask):
        ids = self.old_to_new[dec_ids]
        out = self.decoder(input_ids=ids, encoder_hidden_states=mem, use_cache=False)
        h = out.last_hidden_state  # (B, U', W)
        return F.linear(h, self.decoder.embed_tokens.weight), h

    def to_teacher_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., V'+1) -> (..., V_teacher) log-probabilities; dropped ids share the fallback's mass."""
        if self.n_dropped == 0:
            return torch.log_softmax(logits[..., :-1].float(), -1)[..., self.old_to_new]
        logp = torch.log_softmax(logits.float(), -1)
        out = (logp[..., -1:] - math.log(self.n_dropped)).expand(*logp.shape[:-1], self.old_to_new.shape[0]).clone()
        out[..., self.new_to_old[:-1]] = logp[..., :-1]
        return out

    def _never_emitted(self) -> list[list[int]]:
        """The fallback slot and every kept special token (Whisper numbers them after <|endoftext|>: the
        prompt's <|startoftranscript|>, <|notimestamps|>, timestamps) in the kept numbering: a transcript
        holds text tokens only."""
        special = [i for i, old in enumerate(self.new_to_old[:-1].tolist()) if old > self.eot or old in self.prompt]
        return [[self.hf_config.vocab_size - 1]] + [[i] for i in special]

    @torch.no_grad()
    def generate_ids(self, mem: torch.Tensor, mem_mask: torch.Tensor, max_new_tokens: int) -> list[list[int]]:
        """transformers' `generate` (greedy, KV cache, stops at <|endoftext|>, no repeated 3-grams, a
        repetition penalty) from the prompt; teacher ids per row, prompt and end token excluded."""
        from transformers import WhisperForConditionalGeneration
        from transformers.generation import GenerationMixin
        from transformers.modeling_outputs import BaseModelOutput

        model = WhisperForConditionalGeneration(self.hf_config) if not hasattr(self, "_gen") else self._gen
        if not hasattr(self, "_gen"):
            model.model.decoder = self.decoder  # shared: the active weights, no copy
            model.proj_out = nn.Linear(self.hf_config.d_model, self.hf_config.vocab_size, bias=False)
            model.proj_out.weight = self.decoder.embed_tokens.weight
            model.model.encoder = None
            model.eval()
            object.__setattr__(self, "_gen", model)  # not a submodule: no duplicate weights in state_dict
        b = mem.shape[0]
        start = self.old_to_new[torch.tensor(self.prompt)].expand(b, -1).to(mem.device)
        eot = int(self.old_to_new[self.eot])
        budget = max(1, min(max_new_tokens, self.hf_config.max_target_positions - start.shape[1]))
        out = GenerationMixin.generate(
            model, encoder_outputs=BaseModelOutput(last_hidden_state=mem), decoder_input_ids=start,
            max_new_tokens=budget, do_sample=False, num_beams=1, eos_token_id=eot, pad_token_id=eot,
            no_repeat_ngram_size=3, repetition_penalty=1.1, bad_words_ids=self._never_emitted())
        rows = []
        for row in out[:, start.shape[1]:].tolist():
            keep = []
            for t in row:
                if t == eot:
                    break
                keep.append(int(self.new_to_old[t]))
            rows.append(keep)
        return rows
