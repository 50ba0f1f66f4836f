"""Issue 13, part 1: bad and hostile inputs get a typed `InputError` (API) or a one-line exit 2 (CLI),
never a traceback, a memory blow-up or a silently wrong answer."""
from __future__ import annotations

import io
import struct
import time
import tracemalloc
import wave
import zlib

import numpy as np
import pytest

from nexus_assets.runtime import Bundle, InputError, InputWarning
from nexus_assets.runtime import cli
from nexus_assets.runtime.inputs import MAX_IMAGE_PIXELS, MAX_TEXT_CHARS, MIN_SAMPLES
from nexus_assets_tests.runtime.tiny import png_bytes, wav_bytes


@pytest.fixture(scope="module")
def b(bundle_dir):
    return Bundle.load(bundle_dir)


def make_wav(samples: np.ndarray, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels but holds one compressed row: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (3 * width + 1)))
            + chunk(b"IEND", b""))


# -- text ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "   ", "\n\t "])
def test_empty_text_is_an_input_error(b, text):
    with pytest.raises(InputError, match="empty"):
        b.text_generate(text)
    with pytest.raises(InputError, match="empty"):
        b.text_embed(text)
    with pytest.raises(InputError, match="empty"):
        b.run("auto", text)
    with pytest.raises(InputError, match="empty"):
        b.text_embed(["w1", text])


def test_text_length_cap_before_any_work(b):
    t0 = time.perf_counter()
    with pytest.raises(InputError, match="limit is 100,000"):
        b.run("auto", "w1 " * (10_000_000 // 3))  # 10 MB: used to hang the router past 120 s
    with pytest.raises(InputError, match="limit"):
        b.text_embed(["w1"] * 5000)
    with pytest.raises(InputError, match="empty"):
        b.text_embed([])
    assert time.perf_counter() - t0 < 2
    assert isinstance(b.run("auto", "w1 " * (MAX_TEXT_CHARS // 3 - 1)), (str, np.ndarray))  # just under


def test_numeric_options(b):
    for bad in (0, -2, 10_000, True, 2.5):
        with pytest.raises(InputError, match="max_new_tokens"):
            b.text_generate("w1 w2", max_new_tokens=bad)
    for bad in (0, -1, 10_000):
        with pytest.raises(InputError, match="top_k"):
            b.vision_classify(png_bytes(1), top_k=bad)
    assert len(b.vision_classify(png_bytes(1), top_k=1)) == 1


def test_long_prompt_keeps_its_last_tokens(b):
    """The docstring says the last max_len tokens are the context; they used to be the first."""
    words = [f"w{i}" for i in range(1, 40)]
    t = b.tower("text")
    assert len(words) > t.cfg.max_len
    tail = " ".join(words[-t.cfg.max_len:])
    assert b.text_generate(" ".join(words), max_new_tokens=3) == b.text_generate(tail, max_new_tokens=3)
    assert t.text_token_ids(" ".join(words), keep="last") == t.text_token_ids(tail)


# -- audio --------------------------------------------------------------------------------------------


def test_short_or_empty_audio(b):
    with pytest.raises(InputError, match=f"at least {MIN_SAMPLES}"):
        b.audio_speaker_embed(make_wav(np.zeros(1)))  # used to crash in torch F.pad
    with pytest.raises(InputError, match=f"at least {MIN_SAMPLES}"):
        b.audio_transcribe(np.zeros(0, np.float32))
    with pytest.raises(InputError, match=f"at least {MIN_SAMPLES}"):
        b.run("audio.speaker_embed", np.zeros(10, np.float32))
    with pytest.raises(InputError, match="real numbers"):
        b.audio_speaker_embed(np.zeros(1000, np.complex64))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e300])
def test_non_finite_audio(b, bad):
    x = np.full(8000, 0.1, np.float64)
    x[100] = bad
    with pytest.raises(InputError, match="NaN or infinite"):
        b.audio_speaker_embed(x)


def test_sample_rate_range(b):
    with pytest.raises(InputError, match="sample rate 1 Hz"):
        b.audio_speaker_embed(make_wav(np.zeros(1000), rate=1))  # 2 KB at 1 Hz used to take ~1 GB
    with pytest.raises(InputError, match="sample rate 400000 Hz"):
        b.audio_speaker_embed(make_wav(np.zeros(1000), rate=400_000))


def test_long_audio_cut_before_resampling_with_a_warning(b):
    """10 minutes at 8 kHz: cut to the tower's frames first (bounded memory), and said so."""
    sr, seconds = 8000, 600
    x = 0.1 * np.sin(np.arange(sr * seconds, dtype=np.float32) / 7)
    data = make_wav(x, sr)
    tracemalloc.start()
    with pytest.warns(InputWarning, match="600.0 s"):
        e = b.audio_speaker_embed(data)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert e.shape == (256,) and np.isfinite(e).all()
    assert peak < 3 * len(data)  # never the resampled 10 minutes (19 MB at 16 kHz in float64)
    with pytest.warns(InputWarning):
        b.audio_speaker_embed(np.zeros(16000 * 60, np.float32) + 0.01)


def test_cut_matches_the_uncut_features(b):
    """Cutting before resampling changes nothing the tower reads (first max_frames frames)."""
    from nexus_assets.runtime.inputs import max_audio_samples, waveform
    from nexus_assets.student.transforms import decode_wav

    t = b.tower("audio")
    x = 0.1 * np.random.default_rng(0).normal(size=22050 * 3)
    data = make_wav(x, 22050)
    with pytest.warns(InputWarning):
        cut = waveform(data, max_audio_samples(t.cfg))
    full = decode_wav(data)
    assert np.array_equal(cut, full[: cut.size])
    assert cut.size >= max_audio_samples(t.cfg)


def test_ordinary_audio_unchanged(b, recwarn):
    assert b.audio_speaker_embed(wav_bytes(0.5)).shape == (256,)
    assert not [w for w in recwarn if issubclass(w.category, InputWarning)]


# -- images -------------------------------------------------------------------------------------------


def test_image_pixel_limit(b):
    bomb = png_header_only(13000, 13000)
    assert len(bomb) < 100_000
    tracemalloc.start()
    with pytest.raises(InputError, match="13000x13000 pixels"):
        b.vision_classify(bomb)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50 << 20
    big = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (5000, 5000, 3))  # no 75 MB allocation
    with pytest.raises(InputError, match="pixels"):
        b.vision_classify(big)
    from PIL import Image
    assert Image.MAX_IMAGE_PIXELS != MAX_IMAGE_PIXELS  # the limit is per call, not PIL's global


def test_corrupt_image_body(b):
    good = png_bytes(2)
    with pytest.raises(InputError, match="not a readable image"):
        b.vision_classify(good[:60])
    with pytest.raises(InputError, match="not a readable image"):
        b.vision_classify(png_header_only(64, 64)[:-20])


# -- CLI ----------------------------------------------------------------------------------------------


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv,needle", [
    (["text.generate", "w1", "--max-new-tokens", "0"], "--max-new-tokens: must be between 1 and 1024, got 0"),
    (["text.generate", "w1", "--max-new-tokens", "-2"], "got -2"),
    (["vision.classify", "x.png", "--top-k", "-1"], "--top-k: must be between 1 and 1000, got -1"),
    (["vision.classify", "x.png", "--top-k", "many"], "'many' is not an integer"),
])
def test_cli_option_bounds(bundle_dir, capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--bundle", str(bundle_dir), *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_cli_bad_inputs_exit_2_one_line(bundle_dir, tmp_path, capsys):
    one = tmp_path / "one.wav"
    one.write_bytes(make_wav(np.zeros(1)))
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(13000, 13000))
    for argv in (["text.generate", "   "], ["auto", ""], ["audio.speaker_embed", str(one)],
                 ["vision.classify", str(bomb)], ["audio.transcribe", str(tmp_path / "missing.wav")]):
        code, out, err = run_cli(capsys, "run", "--bundle", str(bundle_dir), *argv)
        assert code == 2 and out == "" and err.startswith("nexus: error: "), (argv, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_warns_when_audio_is_cut(bundle_dir, tmp_path, capsys):
    long = tmp_path / "long.wav"
    long.write_bytes(make_wav(np.zeros(16000 * 20) + 0.01))
    code, out, err = run_cli(capsys, "run", "--bundle", str(bundle_dir), "audio.speaker_embed", str(long))
    assert code == 0 and len(out.strip()) > 0
    assert err.startswith("nexus: warning: audio") and "20.0 s" in err


def test_cli_unexpected_error_one_line(bundle_dir, capsys, monkeypatch):
    from nexus_assets.runtime.bundle import TowerRuntime

    def boom(self, *a, **k):
        raise RuntimeError("something\ninternal broke")
    monkeypatch.setattr(TowerRuntime, "text_embed", boom)
    monkeypatch.delenv("NEXUS_DEBUG", raising=False)
    code, out, err = run_cli(capsys, "run", "--bundle", str(bundle_dir), "text.embed", "w1 w2")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "text.embed on input 'w1 w2'" in err and "RuntimeError: something internal broke" in err
    monkeypatch.setenv("NEXUS_DEBUG", "1")
    with pytest.raises(RuntimeError, match="internal broke"):
        cli.main(["run", "--bundle", str(bundle_dir), "text.embed", "w1 w2"])
