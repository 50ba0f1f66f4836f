"""Bundle: manifest, hashes, lazy loading, one method per capability, routing errors."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from nexus_assets.runtime import Bundle, BundleError, InputError, RoutingError
from nexus_assets_tests.runtime.tiny import png_bytes, wav_bytes


@pytest.fixture
def files(tmp_path):
    img, wav = tmp_path / "photo.png", tmp_path / "voice.wav"
    img.write_bytes(png_bytes(3))
    wav.write_bytes(wav_bytes(0.5))
    return img, wav


def test_manifest_contents(bundle_dir):
    m = json.loads((bundle_dir / "manifest.json").read_text())
    assert m["quantization"]["scheme"] == "int8"
    assert m["verified"] is False and m["override_failed_contracts"] is True  # random towers fail
    assert set(m["towers"]) == {"text", "vision", "audio"}
    assert "towers/text/backbone.safetensors" in m["files"] and "router/router.json" in m["files"]
    assert all(len(f["sha256"]) == 64 for f in m["files"].values())
    r = m["retention"]["vision.classify"]
    assert r["min_retention"] == 0.97 and r["after_quantization"]["splits"]["heldout"]["n"] == 6
    assert m["versions"]["torch"].startswith("2.")
    for t in m["towers"].values():
        assert t["bytes"] < t["bytes_fp32"]  # int8 really shrinks the files


def test_lazy_loading(bundle_dir):
    b = Bundle.load(bundle_dir)
    assert b.loaded_towers == []
    b.text_embed("w1 w2")
    assert b.loaded_towers == ["text"]  # vision and audio never read


def test_capability_outputs(bundle_dir, files):
    img, wav = files
    b = Bundle.load(bundle_dir)
    assert isinstance(b.text_generate("w1 w2 w3", max_new_tokens=4), str)
    assert b.text_embed("w1 w2").shape == (1, 384)
    e = b.text_embed(["w1 w2", "w3 w4 w5"])
    assert e.shape == (2, 384) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    top = b.vision_classify(img, top_k=3)
    assert len(top) == 3 and all(lbl.startswith("class_") for lbl, _ in top)
    assert top[0][1] >= top[1][1] >= top[2][1]
    arr = np.random.default_rng(0).integers(0, 256, (50, 60, 3), dtype=np.uint8)
    assert len(b.vision_classify(arr)) == 5
    assert b.audio_speaker_embed(wav).shape == (256,)
    assert b.audio_speaker_embed(np.zeros(8000, np.float32) + 0.01).shape == (256,)
    assert isinstance(b.audio_transcribe(wav), str)
    assert b.run("audio.speaker_embed", str(wav)).shape == (256,)
    assert b.run("auto", str(img))[0][0].startswith("class_")
    assert isinstance(b.run("auto", "Write a poem about the sea"), (str, np.ndarray))


def test_routing_errors(bundle_dir, files):
    img, wav = files
    b = Bundle.load(bundle_dir)
    with pytest.raises(RoutingError, match="runs on the vision tower"):
        b.run("vision.classify", "just some text")
    with pytest.raises(RoutingError, match="unknown capability 'text.translate'"):
        b.run("text.translate", "hello")
    with pytest.raises(RoutingError, match="the input is audio"):
        b.text_embed(np.zeros(100, np.float32))
    with pytest.raises(RoutingError):
        b.vision_classify(str(wav))


def test_unreadable_inputs_name_the_file(bundle_dir, tmp_path):
    b = Bundle.load(bundle_dir)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(InputError, match="broken.png"):
        b.vision_classify(bad)
    with pytest.raises(InputError, match="missing.wav"):
        b.audio_transcribe(tmp_path / "missing.wav")


def test_hash_mismatch_names_the_file(bundle_dir, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    f = copy / "towers" / "vision" / "heads.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    b = Bundle.load(copy)
    b.text_embed("w1")  # other towers still load
    with pytest.raises(BundleError, match=r"towers/vision/heads.safetensors: sha256 mismatch"):
        b.vision_classify(png_bytes(1))


def test_missing_file_and_manifest(bundle_dir, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    (copy / "towers" / "audio" / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match=r"towers/audio/tokenizer/tokenizer.json: missing file"):
        Bundle.load(copy).audio_transcribe(wav_bytes())
    with pytest.raises(BundleError, match="manifest.json: missing"):
        Bundle.load(tmp_path)


def test_dynamic_int8_load(bundle_dir):
    a = Bundle.load(bundle_dir).text_embed(["w1 w2 w3"])
    b = Bundle.load(bundle_dir, int8_compute="dynamic").text_embed(["w1 w2 w3"])
    assert b.shape == a.shape and float((a @ b.T)[0, 0]) > 0.9


def test_text_log_probs_batches_rows_without_changing_them(bundle_dir):
    """Validation scores thousands of rows through text_log_probs: rows of one length share a forward pass,
    and each row's figures must be those of text_logits on that row alone."""
    import torch

    rt = Bundle.load(bundle_dir).tower("text")
    rows = [[5, 6, 7], [8, 9], [10, 11, 12], [13]]  # lengths 3, 2, 3, 1: two rows batched together
    got = rt.text_log_probs(rows, batch_size=2)
    assert [tuple(g.shape[:1]) for g in got] == [(3,), (2,), (3,), (1,)]
    for row, lp in zip(rows, got):
        want = torch.log_softmax(torch.from_numpy(rt.text_logits(row)), dim=-1)
        assert torch.allclose(lp, want, atol=1e-4)
        assert torch.allclose(lp.exp().sum(-1), torch.ones(len(row)), atol=1e-4)
    assert not torch.allclose(got[0], got[2][:3])  # different rows, different figures
    with pytest.raises(InputError, match="at least one token"):
        rt.text_log_probs([[1, 2], []])
