"""Decode the `wav` bytes of audio probe rows into what the audio teachers expect: float32 mono 16 kHz.

Shared by the Whisper and GE2E adapters so both teachers hear exactly the same samples.
"""
from __future__ import annotations

import io

import librosa
import numpy as np
import soundfile as sf

SAMPLE_RATE = 16000


class AudioDecodeError(ValueError):
    """A probe row's audio cannot be decoded; the message names the row."""


def decode_wav(data: bytes, row_id: object = None, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """WAV (or any libsndfile format) bytes -> (T,) float32 in [-1, 1], mono, at `sample_rate`.

    Channels are averaged; other rates are resampled with librosa. Empty or unreadable audio raises
    AudioDecodeError naming `row_id`, since a silent zero-length input would give a meaningless feature.
    """
    try:
        wav, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)  # (T, C)
    except Exception as e:  # soundfile raises LibsndfileError, TypeError, RuntimeError...
        raise AudioDecodeError(f"row {row_id!r}: unreadable audio ({type(e).__name__}: {e})") from e
    if wav.shape[0] == 0:
        raise AudioDecodeError(f"row {row_id!r}: audio has no samples")
    wav = wav.mean(axis=1)
    if sr != sample_rate:
        wav = librosa.resample(wav, orig_sr=sr, target_sr=sample_rate)
    return np.ascontiguousarray(wav, dtype=np.float32)


def rows_to_audio(rows: list[dict], sample_rate: int = SAMPLE_RATE) -> list[np.ndarray]:
    """Probe rows (dicts with `wav` bytes and `row_id`) -> list of B (T_b,) float32 arrays."""
    out = []
    for i, row in enumerate(rows):
        row_id = row.get("row_id", f"#{i}")
        if not isinstance(row.get("wav"), (bytes, bytearray, memoryview)):
            raise AudioDecodeError(f"row {row_id!r}: field 'wav' must hold WAV bytes, got {type(row.get('wav')).__name__}")
        out.append(decode_wav(bytes(row["wav"]), row_id, sample_rate))
    return out
