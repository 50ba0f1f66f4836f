"""Transcription retention skips utterances with no reference (recordings of unknown content)."""
import pyarrow as pa
import pytest

from nexus_assets.core.feature_store import write_chunk
from nexus_assets.release import validation


class _Heard:
    """A runtime stand-in whose transcript of each clip is known."""

    def __init__(self, said: dict):
        self.said = said

    def audio_transcribe(self, wav):
        return self.said[wav]


def test_asr_retention_ignores_utterances_without_a_transcript(tmp_path):
    rows = ["u0", "u1", "k0"]
    write_chunk(tmp_path, 0, pa.table({"row_id": rows, "split": ["heldout"] * 3,
                                       "transcript": ["Turn off the lights.", "open the door", "bah boo"]}), None)
    probe = {"u0": {"wav": b"0", "transcript": "turn off the lights"},
             "u1": {"wav": b"1", "transcript": "open the door please"},
             "k0": {"wav": b"k", "transcript": ""}}
    student = _Heard({b"0": "turn off the light", b"1": "open the door please", b"k": "anything at all here"})
    res = validation._asr(student, tmp_path, rows, probe, n_boot=50, seed=0)
    # 8 reference words; the teacher misses 1 ("please"), the student 1 ("lights"); k0 is not scored
    assert res["n"] == 2 and res["n_units"] == 8 and res["reported"]["without_transcript"] == 1
    assert res["teacher_score"] == pytest.approx(7 / 8) and res["retention"] == pytest.approx(1.0)
    none = validation._asr(student, tmp_path, ["k0"], probe, n_boot=50, seed=0)
    assert none["retention"] is None and "none of the 1 utterances has a transcript" in none["note"]
