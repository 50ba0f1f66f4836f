"""The klettres engine: recorded human voices (Debian klettres-data), letters and syllables, no sentences."""
import io

import numpy as np
import pyarrow as pa
import pytest

from nexus_assets.core.registry import DatasetSpec
from nexus_assets.probes import probe_sources as ps
from nexus_assets.probes.probe_data import build_probe_dataset, read_probe_rows

needs_klettres = pytest.mark.skipif(ps.klettres_missing() is not None,
                                    reason="klettres-data needed (scripts/setup.sh installs it)")


def _audio(wav: bytes) -> tuple[np.ndarray, int]:
    import soundfile as sf

    return sf.read(io.BytesIO(wav), dtype="float32")


def test_trim_silence_keeps_the_loud_span():
    x = np.zeros(100, np.float32)
    x[30:41] = 0.5
    x[35] = -1.0
    x[10] = 0.01  # below 2% of the peak: silence
    assert ps.trim_silence(x).tolist() == x[30:41].tolist()
    assert len(ps.trim_silence(np.zeros(50, np.float32))) == 0


@needs_klettres
def test_klettres_utterance_is_16k_long_enough_deterministic_and_one_speaker():
    speaker, wav, n = ps.synthesize("klettres", "en", "ignored sentence", "k1")
    assert speaker == "klettres:en"
    audio, sr = _audio(wav)
    assert sr == 16000 and len(audio) == n and ps.KLETTRES_MIN_SECONDS <= n / sr < 20
    assert ps.synthesize("klettres", "en", "another sentence", "k1")[1] == wav  # the key decides, not the text
    assert ps.synthesize("klettres", "en", "ignored sentence", "k2")[1] != wav
    assert ps.synthesize("klettres", "de", "x", "k1")[0] == "klettres:de"


def test_klettres_missing_and_unknown_language_are_named(monkeypatch, tmp_path):
    monkeypatch.setattr(ps, "KLETTRES_DIR", tmp_path / "nowhere")
    ps._klettres_clips.cache_clear()
    assert "klettres-data not installed" in ps.engine_missing("klettres")
    with pytest.raises(RuntimeError, match="klettres-data not installed"):
        ps.synthesize("klettres", "en", "x", "k")
    (tmp_path / "kl" / "en" / "alpha").mkdir(parents=True)
    monkeypatch.setattr(ps, "KLETTRES_DIR", tmp_path / "kl")
    assert ps.engine_missing("klettres") is None
    with pytest.raises(RuntimeError, match=r"klettres voice 'xx': no folder .*kl/xx"):
        ps.synthesize("klettres", "xx", "x", "k")
    with pytest.raises(ps.ProbeSourceError, match=r"klettres voice 'en': no \.ogg recordings under .*kl/en"):
        ps.synthesize("klettres", "en", "x", "k")
    (tmp_path / "kl" / "en" / "alpha" / "A.ogg").write_bytes(b"not an ogg file")
    ps._klettres_clips.cache_clear()
    with pytest.raises(ps.ProbeSourceError, match=r"cannot read .*alpha/A\.ogg"):
        ps.synthesize("klettres", "en", "x", "k")
    ps._klettres_clips.cache_clear()


@needs_klettres
def test_klettres_rows_have_no_transcript_and_train_the_speaker_only(tmp_path):
    text = pa.table({"source": ["s"] * 9, "item": [f"i{k}" for k in range(9)],
                     "text": [f"This is sentence number {w} for the voices to speak." for w in
                              ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")]})
    spec = DatasetSpec(name="speech-k", modality="audio", sources=["espeak", "klettres", "sox"],
                       heldout_sources=[], text_dataset="t",
                       voices=["espeak:en-us", "klettres:en", "klettres:fr", "sox:klettres.en.p300.t100"],
                       sizes={"tiny": {"items": 9}})
    build_probe_dataset(spec, "tiny", tmp_path, text_table=text)
    table = read_probe_rows(tmp_path).to_pylist()
    recorded = [r for r in table if r["source"] != "espeak"]
    assert {r["speaker"] for r in recorded} == {"klettres:en", "klettres:fr", "sox:klettres.en.p300.t100"}
    assert all(r["transcript"] == "" and r["text_row_id"] == "" for r in recorded)
    assert all(r["transcript"] for r in table if r["source"] == "espeak")
    assert ps.parse_sox_voice("klettres.en_GB.p-200.t95") == ("klettres", "en_GB", -200, 95)
