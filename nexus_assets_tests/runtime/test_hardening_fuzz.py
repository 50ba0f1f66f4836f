"""Issue 13, part 4: random and mutated bytes through the runtime's input decoders (image, WAV, text).
Every input ends in a correct result or an `InputError`: no other exception, bounded time and memory."""
from __future__ import annotations

import io
import struct
import time
import tracemalloc
import warnings
import zlib

import numpy as np
import pytest
import torch

from nexus_assets.runtime import InputError, InputWarning, load_tower_dir
from nexus_assets.runtime.inputs import HOP, MIN_SAMPLES, check_text, image_tensor, waveform
from nexus_assets_tests.runtime.tiny import build_tower_dir, png_bytes, tiny_configs, wav_bytes

BUDGET_S = 6.0  # per decoder
MAX_PEAK = 256 << 20  # traced bytes for any one input under 1 MB
MAX_SAMPLES = 64 * HOP


def seeds_image() -> list[bytes]:
    from PIL import Image

    arr = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    out = [png_bytes(1, 24)]
    for fmt in ("JPEG", "BMP", "GIF", "WEBP", "TIFF"):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


def mutate(rng: np.random.Generator, data: bytes) -> bytes:
    """One of: random bytes, bit flips, truncation, a random 4-byte field (sizes, rates, lengths)."""
    b = bytearray(data)
    kind = rng.integers(0, 5)
    if kind == 0:
        return rng.bytes(int(rng.integers(0, 2048)))
    if kind == 1:
        for _ in range(int(rng.integers(1, 16))):
            b[int(rng.integers(0, len(b)))] ^= 1 << int(rng.integers(0, 8))
    elif kind == 2:
        b = b[: int(rng.integers(0, len(b)))]
    elif kind == 3 and len(b) > 8:
        i = int(rng.integers(0, min(len(b) - 4, 64)))
        b[i:i + 4] = struct.pack("<I", int(rng.choice([0, 1, 2, 255, 65535, 2**31 - 1, 2**32 - 1,
                                                       int(rng.integers(0, 2**32))])))
    else:
        b = b[:8] + rng.bytes(int(rng.integers(0, 64))) + b[8:]
    return bytes(b)


def fuzz(decode, seeds, check, n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    stats = {"ok": 0, "refused": 0}
    t0 = time.perf_counter()
    for i in range(n):
        data = mutate(rng, seeds[i % len(seeds)])
        tracemalloc.start()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", InputWarning)
                out = decode(data)
        except InputError:
            stats["refused"] += 1
        except Exception as e:  # pragma: no cover - the failure this test exists to catch
            pytest.fail(f"input #{i} ({len(data)} bytes, {data[:24]!r}...): {type(e).__name__}: {e}")
        else:
            check(out)
            stats["ok"] += 1
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert peak < MAX_PEAK, f"input #{i}: peak {peak:,} bytes"
        if time.perf_counter() - t0 > BUDGET_S:
            break
    return stats


def test_fuzz_images():
    def check(x):
        assert isinstance(x, torch.Tensor) and x.shape == (3, 32, 32) and torch.isfinite(x).all()
    stats = fuzz(lambda d: image_tensor(d, 32), seeds_image(), check, 400, 1)
    assert stats["ok"] > 0 and stats["refused"] > 0, stats


def test_fuzz_wav():
    seeds = [wav_bytes(0.2), wav_bytes(0.3, seed=3)]

    def check(x):
        assert x.dtype == np.float32 and x.ndim == 1 and MIN_SAMPLES <= x.size <= MAX_SAMPLES + 400 + 1
        assert np.isfinite(x).all()
    stats = fuzz(lambda d: waveform(d, MAX_SAMPLES), seeds, check, 600, 2)
    assert stats["ok"] > 0 and stats["refused"] > 0, stats


def test_fuzz_waveform_arrays():
    rng = np.random.default_rng(4)
    for _ in range(200):
        n = int(rng.integers(0, 20000))
        with np.errstate(over="ignore"):
            x = rng.normal(size=n) * float(rng.choice([1e-3, 1, 1e30, 1e300]))
        if n and rng.random() < 0.3:
            x[int(rng.integers(0, n))] = rng.choice([np.nan, np.inf])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", InputWarning)
                with np.errstate(over="ignore"):
                    x = x.astype(rng.choice([np.float64, np.float32]))
                out = waveform(x, MAX_SAMPLES)
        except InputError:
            continue
        assert np.isfinite(out).all() and MIN_SAMPLES <= out.size <= MAX_SAMPLES + 400


@pytest.fixture(scope="module")
def text_tower(tmp_path_factory):
    d = build_tower_dir(tiny_configs()["text"], tmp_path_factory.mktemp("t") / "text")
    return load_tower_dir(d)


def test_fuzz_text(text_tower):
    rng = np.random.default_rng(5)
    t0 = time.perf_counter()
    alphabet = [" ", "\t", "\n", "\0", "w1", "é", "\U0001F600", "\ud800", "<|endoftext|>", "\u200b"]
    for i in range(300):
        if i % 3 == 0:
            text = rng.bytes(int(rng.integers(0, 512))).decode("utf-8", "replace")
        else:
            text = "".join(rng.choice(alphabet, size=int(rng.integers(0, 64))))
        try:
            check_text(text)
            e = text_tower.text_embed(text)
        except InputError:
            continue
        assert e.shape == (1, 384) and np.isfinite(e).all()
        if time.perf_counter() - t0 > BUDGET_S:
            break
