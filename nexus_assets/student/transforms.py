"""Input transforms shared by training and the runtime: both must feed a tower exactly the same tensors.

Only numpy, torch, PIL and the stdlib `wave` (lazily): the teacher-free runtime imports this module.
"""
from __future__ import annotations

import io

import numpy as np
import torch

SAMPLE_RATE = 16000
N_FFT = 400  # 25 ms at 16 kHz
HOP = 160  # 10 ms at 16 kHz
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
