"""GE2E speaker-identity teacher (resemblyzer's VoiceEncoder: 3-layer LSTM over 40-band mels, 256-d).

resemblyzer embeds one utterance at a time; here the 1.6 s partial windows of every row in the batch go
through the LSTM in one call, then are regrouped per row exactly as `VoiceEncoder.embed_utterance` does.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from resemblyzer import VoiceEncoder, preprocess_wav
from resemblyzer.audio import wav_to_mel_spectrogram

from nexus_assets.core.registry import TeacherSpec
from nexus_assets.teachers.audio_io import SAMPLE_RATE, AudioDecodeError, rows_to_audio
from nexus_assets.teachers.base import ConvertResult, TeacherLoadError, TeacherOutputs

WEIGHTS = "pretrained.pt"
PARTIAL_RATE, MIN_COVERAGE = 1.3, 0.75  # embed_utterance's defaults: partial windows per second, last-window fill


def convert(spec: TeacherSpec, snapshot_dir: Path) -> ConvertResult:
    return ConvertResult(info={"converted": False})


class GE2ETeacher:
    """Items: `embedding` (B, 256) L2-normalised, and `hidden.lstm.2` (B, 256), the last LSTM layer's
    output averaged over all frames of all partial windows of the row."""

    def __init__(self, spec: TeacherSpec, encoder: VoiceEncoder):
        self.spec, self.encoder = spec, encoder

    def layer_names(self) -> list[str]:
        return [f"lstm.{self.encoder.lstm.num_layers - 1}"]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.encoder.parameters())

    def partial_mels(self, wav: np.ndarray) -> np.ndarray:
        """Preprocessed (T,) waveform -> (P, 160, 40) mel windows, as in `VoiceEncoder.embed_utterance`."""
        wav_slices, mel_slices = self.encoder.compute_partial_slices(len(wav), PARTIAL_RATE, MIN_COVERAGE)
        if wav_slices[-1].stop >= len(wav):
            wav = np.pad(wav, (0, wav_slices[-1].stop - len(wav)))
        mel = wav_to_mel_spectrogram(wav)  # (frames, 40)
        return np.stack([mel[s] for s in mel_slices])

    @torch.inference_mode()
    def forward(self, rows: list[dict]) -> TeacherOutputs:
        mels = []
        for row, wav in zip(rows, rows_to_audio(rows)):
            if not np.any(wav):
                raise AudioDecodeError(f"row {row.get('row_id')!r}: audio is silent; no speaker to embed")
            mels.append(self.partial_mels(preprocess_wav(wav, source_sr=SAMPLE_RATE)))
        captured: list[torch.Tensor] = []
        hook = self.encoder.lstm.register_forward_hook(lambda mod, inp, out: captured.append(out[0]))
        try:
            x = torch.from_numpy(np.concatenate(mels)).to(self.encoder.device)  # (sum P, 160, 40)
            partial = self.encoder(x).cpu().numpy()  # (sum P, 256), each L2-normalised
        finally:
            hook.remove()
        lstm_out = captured[0].mean(1).cpu().numpy()  # (sum P, 160, 256) -> (sum P, 256)
        bounds = np.cumsum([0] + [len(m) for m in mels])
        embed = np.stack([partial[a:b].mean(0) for a, b in zip(bounds[:-1], bounds[1:])])  # (B, 256)
        items = {"embedding": (embed / np.linalg.norm(embed, axis=1, keepdims=True)).astype(np.float32)}
        for name in self.spec.extraction.layers:  # load_teacher checked they are all lstm.2
            items[f"hidden.{name}"] = np.stack(
                [lstm_out[a:b].mean(0) for a, b in zip(bounds[:-1], bounds[1:])]
            ).astype(np.float32)
        return TeacherOutputs(items=items)


    def importance_spec(self, capability: str, rows: list[dict]):
        """Objective: each partial embedding's projection on its own (detached) direction: the neurons that
        carry the speaker identity the student must reproduce. Neurons: the LSTM output's last dim."""
        from nexus_assets.teachers.base import ImportanceSpec

        mels = [self.partial_mels(preprocess_wav(w, source_sr=SAMPLE_RATE)) for w in rows_to_audio(rows)]
        batches = [torch.from_numpy(np.concatenate(mels[i:i + 8])).to(self.encoder.device)
                   for i in range(0, len(mels), 8)]

        def objective(emb):
            return (emb * torch.nn.functional.normalize(emb.detach(), dim=-1)).sum()

        layers = {n: self.encoder.lstm for n in self.spec.extraction.layers}
        return ImportanceSpec(_EmbedFromLstmOutput(self.encoder), layers, batches, objective)


class _EmbedFromLstmOutput(torch.nn.Module):
    """resemblyzer embeds from the LSTM's final hidden state h_n, which a hook on the LSTM's output
    sequence cannot reach; out[:, -1] of the last layer is that same h_n, so this path is differentiable
    through the hooked output and equal in value."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, mels):  # (P, 160, 40) -> (P, 256)
        out, _ = self.encoder.lstm(mels)
        raw = self.encoder.relu(self.encoder.linear(out[:, -1]))
        return raw / torch.norm(raw, dim=1, keepdim=True).clamp_min(1e-5)


def load(spec: TeacherSpec, snapshot_dir: Path, device: str = "cpu") -> GE2ETeacher:
    """Load `<snapshot>/pretrained.pt` only. resemblyzer loads non-strictly (the checkpoint also holds the
    GE2E loss's similarity scale), so the weights are re-checked here: a missing tensor must not stay random."""
    path = Path(snapshot_dir) / WEIGHTS
    if not path.is_file():
        raise TeacherLoadError(f"teacher {spec.name!r}: missing weights file {path}")
    try:
        encoder = VoiceEncoder(device, verbose=False, weights_fpath=path)
        state = torch.load(path, map_location="cpu", weights_only=True)["model_state"]
    except Exception as e:  # torch.load raises pickle, zip and runtime errors alike
        raise TeacherLoadError(f"teacher {spec.name!r}: cannot load {path}: {type(e).__name__}: {e}") from e
    missing = encoder.load_state_dict(state, strict=False).missing_keys
    if missing:
        raise TeacherLoadError(f"teacher {spec.name!r}: {path} lacks weights {missing}")
    return GE2ETeacher(spec, encoder.eval().requires_grad_(False))
