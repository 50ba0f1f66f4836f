"""The `nexus` console script from a fresh shell (the installed entry point, not main())."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nexus_assets_tests.runtime.tiny import png_bytes, wav_bytes

NEXUS = Path(sys.executable).parent / "nexus"


def nexus(*args, check=True):
    if not NEXUS.exists():
        pytest.skip(f"console script {NEXUS} not installed (pip install -e .)")
    res = subprocess.run(["bash", "-c", " ".join(f"'{a}'" for a in [str(NEXUS), *args])], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if check:
        assert res.returncode == 0, res.stdout + res.stderr
    return res


def test_info(bundle_dir):
    out = nexus("info", "--bundle", str(bundle_dir), "--verify").stdout
    assert "verified   False" in out and "quantized  int8" in out and "sha256 ok" in out
    for cap in ("text.generate", "text.embed", "vision.classify", "audio.speaker_embed", "audio.transcribe"):
        assert cap in out
    info = json.loads(nexus("info", "--bundle", str(bundle_dir), "--json").stdout)
    assert set(info["towers"]) == {"text", "vision", "audio"}


def test_run_each_capability(bundle_dir, tmp_path):
    img, wav = tmp_path / "photo.png", tmp_path / "voice.wav"
    img.write_bytes(png_bytes(2))
    wav.write_bytes(wav_bytes(0.5))
    assert isinstance(nexus("run", "--bundle", str(bundle_dir), "text.generate", "w1 w2 w3",
                            "--max-new-tokens", "3").stdout, str)
    assert len(json.loads(nexus("run", "--bundle", str(bundle_dir), "text.embed", "w1 w2").stdout)[0]) == 384
    lines = nexus("run", "--bundle", str(bundle_dir), "vision.classify", str(img), "--top-k", "2").stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("class_")
    assert len(json.loads(nexus("run", "--bundle", str(bundle_dir), "audio.speaker_embed", str(wav)).stdout)) == 256
    nexus("run", "--bundle", str(bundle_dir), "audio.transcribe", str(wav))


def test_errors_exit_2_with_message(bundle_dir, tmp_path):
    res = nexus("run", "--bundle", str(bundle_dir), "vision.classify", "a sentence", check=False)
    assert res.returncode == 2 and "runs on the vision tower" in res.stderr
    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    (copy / "router" / "router.json").write_text("{}")
    res = nexus("info", "--bundle", str(copy), check=False)
    assert res.returncode == 2 and "router/router.json: sha256 mismatch" in res.stderr
