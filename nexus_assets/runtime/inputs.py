"""Checks on everything a user hands the runtime, done before any real work.

Why a separate module: the runtime is the boundary where untrusted text, images and audio come in, so
every limit lives here, in one place, and every failure is one typed exception (`InputError`) whose
message names the input and the limit. Limits are sized so that any input under 1 MB stays far below
1 GB of memory and a few seconds of work (issue 13): decoders cut or refuse *before* they allocate.

Only numpy, PIL (lazily), the stdlib `wave` and nexus_assets.student.transforms: teacher-free.
"""
from __future__ import annotations

import io
import math
import os
import stat
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from nexus_assets.student.transforms import HOP, N_FFT, SAMPLE_RATE, decode_wav, preprocess_image

__all__ = ["InputError", "InputWarning", "MAX_TEXT_CHARS", "MAX_TEXTS", "MAX_FILE_BYTES", "MAX_IMAGE_PIXELS",
           "MIN_SAMPLE_RATE", "MAX_SAMPLE_RATE", "MIN_SAMPLES", "MAX_NEW_TOKENS", "MAX_TOP_K", "check_text",
           "check_texts", "check_count", "read_input_file", "image_tensor", "waveform", "max_audio_samples",
           "describe"]

MAX_TEXT_CHARS = 100_000  # the towers read 64-512 tokens; 100k chars is ~25k tokens, routed in < 1 s
MAX_TEXTS = 4096  # texts in one text.embed call
MAX_FILE_BYTES = 64 << 20  # an image / WAV file read from disk
MAX_IMAGE_PIXELS = 4096 * 4096  # 16.8 MP (50 MB as RGB); PIL's own default is 89.5 MP
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 4_000, 192_000
MAX_CHANNELS = 16
MIN_SAMPLES = N_FFT  # one 25 ms analysis window at 16 kHz; shorter clips cannot be framed
MAX_NEW_TOKENS = 1024
MAX_TOP_K = 1000


class InputError(ValueError):
    """An input the runtime refuses (empty, too large, malformed, out of range); the message names it."""


class InputWarning(UserWarning):
    """An input was accepted but changed (e.g. audio cut to the tower's max_frames)."""


def describe(x: Any, limit: int = 60) -> str:
    """A short, printable name for an input in error messages (never the whole 10 MB text)."""
    if isinstance(x, (bytes, bytearray)):
        return f"<{len(x):,} bytes>"
    if isinstance(x, np.ndarray):
        return f"<array shape={x.shape} dtype={x.dtype}>"
    s = os.fspath(x) if isinstance(x, os.PathLike) else x
    if isinstance(s, str):
        r = repr(s)
        return r if len(r) <= limit else f"{r[:limit]}...' ({len(s):,} chars)"
    return f"<{type(x).__name__}>"


# -- text / numbers -------------------------------------------------------------------------------------


def check_text(text: Any, what: str = "text") -> str:
    """A non-empty str of at most MAX_TEXT_CHARS characters: checked before tokenizing or routing,
    because both are linear in the length (the router's n-grams are the slow part)."""
    if not isinstance(text, str):
        raise InputError(f"{what} input must be a str, got {type(text).__name__}")
    if len(text) > MAX_TEXT_CHARS:
        raise InputError(f"{what} input {describe(text)} is {len(text):,} characters; "
                         f"the limit is {MAX_TEXT_CHARS:,}")
    if not text.strip():
        raise InputError(f"{what} input is empty or only whitespace")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate: the tokenizer would raise a bare TypeError
        raise InputError(f"{what} input is not valid Unicode ({e.reason} at character {e.start})") from None
    return text


def check_texts(texts: Any) -> list[str]:
    """str or a non-empty sequence of at most MAX_TEXTS valid texts -> list[str]."""
    if isinstance(texts, str):
        return [check_text(texts)]
    if not isinstance(texts, (list, tuple)):
        raise InputError(f"texts must be a str or a list of str, got {type(texts).__name__}")
    if not texts:
        raise InputError("texts: the list is empty")
    if len(texts) > MAX_TEXTS:
        raise InputError(f"texts: {len(texts):,} texts in one call; the limit is {MAX_TEXTS:,}")
    return [check_text(t, f"text #{i}") for i, t in enumerate(texts)]


def check_count(value: Any, name: str, hi: int, lo: int = 1) -> int:
    """An int in [lo, hi]: 0 or -2 new tokens used to echo the prompt with exit 0."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name} must be an int, got {type(value).__name__}")
    if not lo <= int(value) <= hi:
        raise InputError(f"{name} must be between {lo} and {hi}, got {int(value)}")
    return int(value)


# -- files --------------------------------------------------------------------------------------------


def read_input_file(path: str | os.PathLike, what: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a user's image / WAV file, refused above `limit` before they are read."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise InputError(f"{what} file {str(p)!r} is {size:,} bytes; the limit is {limit:,}")
            if stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                data = f.read(min(size, limit) + 1)  # read(n) allocates n bytes up front
            else:  # a pipe (`<(cat voice.wav)`): no size to trust, read in chunks up to the limit
                chunks, total = [], 0
                while total <= limit and (chunk := f.read(1 << 20)):
                    chunks.append(chunk)
                    total += len(chunk)
                data = b"".join(chunks)
    except OSError as e:
        raise InputError(f"{what} file {str(p)!r} cannot be read: {e.strerror or e}") from e
    if len(data) > limit:
        raise InputError(f"{what} file {str(p)!r} is over {limit:,} bytes")
    return data


# -- images -------------------------------------------------------------------------------------------


def _check_image_header(data: bytes, name: str) -> None:
    """Read only the header and refuse more than MAX_IMAGE_PIXELS before anything is decoded: a 482 KB
    PNG may declare 13000x13000 pixels (1.8 GB). Per call, so PIL's global limit is left alone."""
    from PIL import Image

    try:
        with warnings.catch_warnings():  # PIL warns above its own (higher) limit; we refuse below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
                w, h = img.size
    except Image.DecompressionBombError as e:
        raise InputError(f"image {name} has too many pixels ({e})") from None
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, SyntaxError, struct.error...)
        raise InputError(f"image {name} is not a readable image ({type(e).__name__}: {e})") from None
    if w < 1 or h < 1 or w * h > MAX_IMAGE_PIXELS:
        raise InputError(f"image {name} is {w}x{h} pixels; the limit is {MAX_IMAGE_PIXELS:,} pixels")


def _encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="PNG")  # lossless: same pixels, same decoder path
    return buf.getvalue()


def image_tensor(image: Any, size: int):
    """path / HxWx3 uint8 array / encoded bytes -> (3, size, size), the exact transform of training."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise InputError(f"image array must be HxWx3 uint8, got shape {image.shape} dtype {image.dtype}")
        if image.shape[0] * image.shape[1] > MAX_IMAGE_PIXELS or 0 in image.shape:
            raise InputError(f"image array {image.shape[1]}x{image.shape[0]} pixels; "
                             f"the limit is {MAX_IMAGE_PIXELS:,} pixels")
        data, name = _encode_png(image), "<array>"
    elif isinstance(image, (bytes, bytearray)):
        data, name = bytes(image), describe(image)
    elif isinstance(image, (str, os.PathLike)):
        data, name = read_input_file(image, "image"), repr(str(image))
    else:
        raise InputError(f"image input must be a path, bytes or an HxWx3 uint8 array, got {type(image).__name__}")
    with warnings.catch_warnings():  # PIL warns per corrupt TIFF tag / EXIF field: noise, not information
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        _check_image_header(data, name)
        try:
            return preprocess_image(data, size, name)
        except Exception as e:  # a valid header over a corrupt body fails only here
            raise InputError(f"image {name} is not a readable image ({type(e).__name__}: {e})") from None


# -- audio --------------------------------------------------------------------------------------------


def _warn_cut(name: str, seconds: float, max_samples: int) -> None:
    warnings.warn(f"audio {name} is {seconds:.1f} s; the tower reads only the first "
                  f"{max_samples / SAMPLE_RATE:.1f} s (max_frames), the rest is ignored",
                  InputWarning, stacklevel=4)


def _check_length(x: np.ndarray, name: str) -> np.ndarray:
    if x.size < MIN_SAMPLES:
        raise InputError(f"audio {name} has {x.size} samples at 16 kHz; at least {MIN_SAMPLES} "
                         f"({MIN_SAMPLES / SAMPLE_RATE * 1000:.0f} ms) are needed")
    return x


def _decode_wav(data: bytes, name: str, max_samples: int) -> np.ndarray:
    """WAV bytes -> (N,) float32 at 16 kHz with N <= max_samples (+ one window), cut BEFORE resampling:
    a 2 KB file declaring 1 Hz would otherwise be interpolated to 16000x its samples."""
    import wave

    try:
        with wave.open(io.BytesIO(data)) as w:
            sr, ch, width, n = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
            if not MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE:
                raise InputError(f"audio {name}: sample rate {sr} Hz is outside "
                                 f"[{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}] Hz")
            if not 1 <= ch <= MAX_CHANNELS or width not in (1, 2, 4):
                raise InputError(f"audio {name}: {ch} channels of {width} bytes per sample are not supported "
                                 f"(1-{MAX_CHANNELS} channels of 8, 16 or 32-bit PCM)")
            # source frames that reach the tower, +2 so the resampled samples we keep are interior points
            keep = math.ceil((max_samples + N_FFT) * sr / SAMPLE_RATE) + 2
            raw = w.readframes(min(n, keep))
    except InputError:
        raise
    except Exception as e:  # wave.Error, EOFError, struct.error...
        raise InputError(f"audio {name} is not a readable PCM WAV ({type(e).__name__}: {e})") from None
    got = len(raw) // (ch * width)
    cut = n > keep and got >= keep
    if cut:
        _warn_cut(name, n / sr, max_samples)
    out = io.BytesIO()
    with wave.open(out, "wb") as w:  # the kept frames re-wrapped, so training's decode_wav does the rest
        w.setnchannels(ch), w.setsampwidth(width), w.setframerate(sr)
        w.writeframes(raw[: got * ch * width])
    try:
        x = decode_wav(out.getvalue(), name)
    except ValueError as e:
        raise InputError(f"audio {name}: {e}") from None
    return _check_length(x[: max_samples + N_FFT] if cut else x, name)


def _array_waveform(wav: np.ndarray, max_samples: int) -> np.ndarray:
    name = describe(wav)
    if wav.ndim != 1:
        raise InputError(f"waveform array must be 1-D (N,) at 16 kHz, got shape {wav.shape}")
    if wav.dtype.kind not in "fiu":
        raise InputError(f"waveform array must be real numbers, got dtype {wav.dtype}")
    x = _check_length(wav, name)
    keep = max_samples + N_FFT
    if x.size > keep:
        _warn_cut(name, x.size / SAMPLE_RATE, max_samples)
        x = x[:keep]
    with np.errstate(over="ignore", invalid="ignore"):
        x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise InputError(f"waveform {name} holds NaN or infinite samples (or values beyond float32)")
    return x


def waveform(wav: Any, max_samples: int) -> np.ndarray:
    """path / WAV bytes / (N,) real array at 16 kHz -> (N,) finite float32, MIN_SAMPLES <= N and N at most
    max_samples plus one analysis window (the frames a tower reads; longer input is cut with a warning)."""
    if isinstance(wav, np.ndarray):
        return _array_waveform(wav, max_samples)
    if isinstance(wav, (bytes, bytearray)):
        return _decode_wav(bytes(wav), describe(wav), max_samples)
    if isinstance(wav, (str, os.PathLike)):
        return _decode_wav(read_input_file(wav, "audio"), repr(str(wav)), max_samples)
    raise InputError(f"audio input must be a path, WAV bytes or a 1-D array, got {type(wav).__name__}")


def max_audio_samples(cfg) -> int:
    """Samples at 16 kHz that reach a tower: max_frames hops (a carved Whisper tower: its window too)."""
    n = cfg.max_frames * HOP
    if getattr(cfg, "init", None) == "carved" and cfg.carve.get("family") == "whisper":
        n = max(n, int(cfg.carve["max_seconds"]) * SAMPLE_RATE)
    return n
