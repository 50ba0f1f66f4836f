"""Speaker identities: sox pitch/tempo variants of the synthesizer voices, and the check that every
registry voice really sounds different."""
import io
import shutil

import numpy as np
import pyarrow as pa
import pytest

from nexus_assets.core.registry import DatasetSpec
from nexus_assets.probes.probe_data import build_probe_dataset, read_probe_rows
from nexus_assets.probes.probe_sources import base_family, parse_sox_voice, synthesize

needs_tools = pytest.mark.skipif(not all(shutil.which(t) for t in ("sox", "flite", "espeak-ng")),
                                 reason="sox, flite and espeak-ng needed (scripts/setup.sh installs them)")


def test_parse_sox_voice():
    assert parse_sox_voice("flite.slt.p-300.t110") == ("flite", "slt", -300, 110)
    assert parse_sox_voice("espeak.en-us+m3.p250.t95") == ("espeak", "en-us+m3", 250, 95)
    assert parse_sox_voice("piper.joe.p-200.t100") == ("piper", "joe", -200, 100)
    for bad in ("flite.slt", "kokoro.af.p100.t100", "flite.slt.p5000.t100", "flite.slt.p100.t300", "flite.slt.t100.p1"):
        with pytest.raises(ValueError, match="sox voice"):
            parse_sox_voice(bad)
    assert base_family("sox:flite.awb.p-300.t100") == "flite:awb"
    assert base_family("espeak:en+m5") == "espeak:en+m5"


def _f0(wav: bytes) -> float:
    """Median pitch (Hz) by autocorrelation over voiced 40 ms frames: enough to tell a 5-semitone shift."""
    import soundfile as sf

    x, sr = sf.read(io.BytesIO(wav), dtype="float32")
    n = int(0.04 * sr)
    pitches = []
    for i in range(0, len(x) - n, n):
        f = x[i:i + n] - x[i:i + n].mean()
        if np.sqrt((f ** 2).mean()) < 0.02:
            continue
        ac = np.correlate(f, f, "full")[n - 1:]
        lo, hi = sr // 400, sr // 60
        lag = lo + int(np.argmax(ac[lo:hi]))
        if ac[lag] > 0.3 * ac[0]:
            pitches.append(sr / lag)
    return float(np.median(pitches))


@needs_tools
def test_sox_voice_shifts_pitch_and_tempo():
    text = "The quick brown fox jumps over the lazy dog near the river bank."
    _, base, n_base = synthesize("flite", "slt", text, "k")
    speaker, low, n_low = synthesize("sox", "flite.slt.p-500.t100", text, "k")
    _, fast, n_fast = synthesize("sox", "flite.slt.p0.t125", text, "k")
    assert speaker == "sox:flite.slt.p-500.t100"
    assert abs(n_low - n_base) / n_base < 0.03  # pitch shift keeps the duration
    assert 0.75 < n_fast / n_base < 0.85  # tempo 125 %: 1/1.25 of the samples
    ratio = _f0(low) / _f0(base)
    assert 0.66 < ratio < 0.83, ratio  # -500 cents = x0.75


@needs_tools
def test_sox_voice_is_the_same_bytes_every_run():
    """sox dithers with a time-seeded generator unless told to repeat: new bytes every run would give the
    speech probe a new data version each time and recompute the whole audio chain."""
    text = "A sentence that a sox voice speaks twice."
    runs = [synthesize("sox", "flite.kal.p300.t105", text, "k")[1] for _ in range(2)]
    assert runs[0] == runs[1]


@needs_tools
def test_sox_variants_of_a_heldout_voice_are_never_seen(tmp_path):
    text = pa.table({"source": ["s"] * 6, "item": [f"i{k}" for k in range(6)],
                     "text": [f"This is sentence number {w} for the voices to speak." for w in
                              ("one", "two", "three", "four", "five", "six")]})
    spec = DatasetSpec(name="speech-v", modality="audio", sources=["flite", "sox"], heldout_sources=["flite:awb"],
                       text_dataset="t", voices=["flite:slt", "sox:flite.awb.p300.t95", "sox:flite.slt.p-300.t105"],
                       sizes={"tiny": {"items": 6}})
    summary = build_probe_dataset(spec, "tiny", tmp_path, text_table=text)
    table = read_probe_rows(tmp_path)
    assert summary["voice_families"] == 3 and table.num_rows == 6
    for family, split in zip(table["voice_family"].to_pylist(), table["split"].to_pylist()):
        assert (split == "ood") == (family == "sox:flite.awb.p300.t95"), (family, split)


@needs_tools
def test_voices_that_sound_the_same_are_refused(tmp_path):
    text = pa.table({"source": ["s"], "item": ["i"], "text": ["A sentence for the voices to speak aloud."]})
    spec = DatasetSpec(name="speech-d", modality="audio", sources=["espeak"], text_dataset="t",
                       voices=["espeak:en-gb", "espeak:en-gb+m5"], sizes={"tiny": {"items": 1}})
    with pytest.raises(ValueError, match=r"field 'voices'.*identical.*en-gb\+m5"):
        build_probe_dataset(spec, "tiny", tmp_path, text_table=text)
    bad = DatasetSpec(name="speech-b", modality="audio", sources=["sox"], text_dataset="t",
                      voices=["sox:flite.slt"], sizes={"tiny": {"items": 1}})
    with pytest.raises(ValueError, match=r"field 'voices'.*sox voice 'flite.slt'"):
        build_probe_dataset(bad, "tiny", tmp_path, text_table=text)


@needs_tools
def test_registry_speech_voices_are_40_distinct_identities():
    from nexus_assets.core.registry import load_registry
    from nexus_assets.probes.probe_data import _check_voices_distinct

    spec = load_registry().dataset("speech-probe")
    assert len(set(spec.voices)) >= 40
    _check_voices_distinct(spec, spec.voices)
