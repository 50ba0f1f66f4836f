"""GE2E speaker teacher, real weights from the resemblyzer package, on flite voices."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from nexus_assets.teachers.base import TeacherLoadError

resemblyzer = pytest.importorskip("resemblyzer")
needs_flite = pytest.mark.skipif(shutil.which("flite") is None, reason="flite is not installed (apt-get install flite)")

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella and ask her to bring these things with her from the store.",
]
VOICES = ["slt", "rms"]


def _spec():
    from nexus_assets.core.registry import load_registry

    return load_registry().teacher("ge2e-speaker")


def _flite(text: str, voice: str, path: Path) -> bytes:
    subprocess.run(["flite", "-voice", voice, "-t", text, "-o", str(path)], check=True, capture_output=True)
    return path.read_bytes()


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    snap = tmp_path_factory.mktemp("ge2e-snapshot")
    shutil.copy(Path(resemblyzer.__file__).parent / "pretrained.pt", snap / "pretrained.pt")
    return snap


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ge2e-wavs")
    return [
        {"row_id": f"{v}{i}", "wav": _flite(s, v, tmp / f"{v}{i}.wav"), "transcript": s, "speaker": v}
        for v in VOICES for i, s in enumerate(SENTENCES)
    ]


@pytest.mark.slow
@needs_flite
def test_real_ge2e_separates_voices(snapshot, rows):
    from nexus_assets.teachers.audio_io import rows_to_audio
    from nexus_assets.teachers.base import load_teacher

    teacher = load_teacher(_spec(), snapshot)
    assert teacher.layer_names() == ["lstm.2"]
    assert 1.4e6 < teacher.num_parameters() < 1.45e6
    out = teacher.forward(rows)
    e, h = out.items["embedding"], out.items["hidden.lstm.2"]
    assert e.shape == h.shape == (4, 256) and e.dtype == h.dtype == np.float32 and out.tokens is None
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert np.isfinite(h).all() and not np.allclose(h[0], h[2])

    cos = e @ e.T  # rows: slt0, slt1, rms0, rms1
    same = [cos[0, 1], cos[2, 3]]
    different = [cos[0, 2], cos[0, 3], cos[1, 2], cos[1, 3]]
    assert min(same) > max(different), cos

    # The batched partials reproduce resemblyzer's own one-utterance-at-a-time embedding.
    for row, wav, emb in zip(rows, rows_to_audio(rows), e):
        ref = teacher.encoder.embed_utterance(resemblyzer.preprocess_wav(wav, source_sr=16000))
        np.testing.assert_allclose(emb, ref, atol=1e-5, err_msg=row["row_id"])
    # and batching does not change an item's features.
    alone = teacher.forward(rows[1:2])
    np.testing.assert_allclose(alone.items["hidden.lstm.2"][0], h[1], atol=1e-5)


def test_missing_or_corrupt_weights_fail_naming_file(snapshot, tmp_path):
    from nexus_assets.teachers import ge2e

    with pytest.raises(TeacherLoadError, match=r"ge2e-speaker.*pretrained\.pt"):
        ge2e.load(_spec(), tmp_path, "cpu")
    data = (snapshot / "pretrained.pt").read_bytes()
    (tmp_path / "pretrained.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(TeacherLoadError, match=r"ge2e-speaker.*cannot load .*pretrained\.pt"):
        ge2e.load(_spec(), tmp_path, "cpu")


def test_silent_row_is_named(snapshot):
    import io

    import soundfile as sf

    from nexus_assets.teachers import ge2e
    from nexus_assets.teachers.audio_io import AudioDecodeError

    buf = io.BytesIO()
    sf.write(buf, np.zeros(16000, dtype=np.float32), 16000, format="WAV", subtype="PCM_16")
    with pytest.raises(AudioDecodeError, match="'quiet-1'"):
        ge2e.load(_spec(), snapshot, "cpu").forward([{"row_id": "quiet-1", "wav": buf.getvalue()}])
