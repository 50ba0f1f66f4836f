"""Issue 13, part 2: a hostile or broken bundle is a `BundleError` naming the file and field; no path
leaves the bundle, no symlink is followed, configs are checked against the weights before anything is
allocated, and the bytes loaded are the bytes hashed."""
from __future__ import annotations

import hashlib
import json
import shutil
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from nexus_assets.runtime import Bundle, BundleError, cli
from nexus_assets_tests.runtime.tiny import png_bytes


@pytest.fixture
def copy(bundle_dir, tmp_path) -> Path:
    out = tmp_path / "b"
    shutil.copytree(bundle_dir, out)
    return out


def manifest(b: Path) -> dict:
    return json.loads((b / "manifest.json").read_text())


def save_manifest(b: Path, m) -> None:
    (b / "manifest.json").write_text(json.dumps(m))


def rehash(b: Path, rel: str) -> None:
    """What an attacker does after editing a file: update its manifest entry so the hash matches."""
    m = manifest(b)
    data = (b / rel).read_bytes()
    m["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    save_manifest(b, m)


# -- malformed manifests ------------------------------------------------------------------------------


@pytest.mark.parametrize("content,needle", [
    (b"null", "must be a JSON object, got null"),
    (b"[1, 2]", "must be a JSON object, got list"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b"{not json", "not valid JSON"),
])
def test_malformed_manifest(copy, content, needle):
    (copy / "manifest.json").write_bytes(content)
    with pytest.raises(BundleError, match=needle):
        Bundle.load(copy)


def test_manifest_fields_are_named(copy):
    m = manifest(copy)
    rel = "towers/text/config.json"
    cases = [
        (lambda m: m["files"][rel].pop("sha256"), r"field 'files\['towers/text/config.json'\]'.sha256: missing"),
        (lambda m: m["files"][rel].update(sha256="abc"), "not a sha256 hex digest"),
        (lambda m: m["files"].update({rel: None}), "must be an object, got NoneType"),
        (lambda m: m["router"].pop("path"), "field 'router.path': missing"),
        (lambda m: m["towers"]["text"].pop("path"), "field 'towers.text.path': missing"),
        (lambda m: m.update(towers=None), "field 'towers': must be an object"),
        (lambda m: m["towers"].update({"../x": m["towers"]["text"]}), "tower name '../x' does not match"),
        (lambda m: m["files"][rel].update(bytes=-1), "not a size in bytes"),
    ]
    for mutate, needle in cases:
        mm = json.loads(json.dumps(m))
        mutate(mm)
        save_manifest(copy, mm)
        with pytest.raises(BundleError, match=needle):
            Bundle.load(copy)


# -- paths inside the bundle --------------------------------------------------------------------------


def test_tower_path_outside_the_bundle(copy, tmp_path, capsys):
    """`../outside` used to load and run files outside the bundle, and `info --verify` said ok."""
    outside = tmp_path / "outside"
    shutil.copytree(copy / "towers" / "text", outside)
    m = manifest(copy)
    for rel in [r for r in m["files"] if r.startswith("towers/text/")]:
        m["files"]["../outside/" + rel[len("towers/text/"):]] = m["files"].pop(rel)
    m["towers"]["text"]["path"] = "../outside"
    save_manifest(copy, m)
    with pytest.raises(BundleError, match="leaves the bundle"):
        Bundle.load(copy)
    assert cli.main(["info", "--bundle", str(copy), "--verify"]) == 2
    err = capsys.readouterr().err
    assert "leaves the bundle" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("bad", ["/tmp/x", "towers/text/../../../../etc/hostname", "towers//text", "./towers",
                                 "towers\\text"])
def test_file_and_tower_paths_are_plain_relative(copy, bad):
    m = manifest(copy)
    m["files"][bad] = {"sha256": "0" * 64}
    save_manifest(copy, m)
    with pytest.raises(BundleError, match="leaves the bundle|not a plain relative path"):
        Bundle.load(copy)
    m = manifest(copy)
    del m["files"][bad]
    m["towers"]["text"]["path"] = bad
    save_manifest(copy, m)
    with pytest.raises(BundleError, match="towers.text.path"):
        Bundle.load(copy)


def test_symlinks_are_refused(copy, tmp_path):
    f = copy / "towers" / "vision" / "classes.json"
    real = tmp_path / "classes.json"
    shutil.move(f, real)
    f.symlink_to(real)  # same bytes, so the hash still matches: refused for being a link
    b = Bundle.load(copy)
    with pytest.raises(BundleError, match="classes.json: is a symbolic link"):
        b.vision_classify(png_bytes(1))
    with pytest.raises(BundleError, match="symbolic link"):
        b.verify_all()
    f.unlink()
    shutil.move(real, f)
    d = copy / "towers" / "audio" / "tokenizer"
    shutil.move(d, tmp_path / "tok")
    d.symlink_to(tmp_path / "tok", target_is_directory=True)
    with pytest.raises(BundleError, match="tokenizer: is a symbolic link"):
        Bundle.load(copy).audio_transcribe(np.zeros(8000, np.float32) + 0.01)


def test_unlisted_file_refused(copy):
    (copy / "towers" / "text" / "extra.bin").write_bytes(b"x")
    with pytest.raises(BundleError, match="files not listed"):
        Bundle.load(copy).text_embed("w1")


def test_adapter_name_outside_the_tower(copy):
    rel = "towers/text/config.json"
    cfg = json.loads((copy / rel).read_text())
    cap = next(iter(cfg["adapters"]))
    cfg["adapters"][cap] = "../../x"
    (copy / rel).write_text(json.dumps(cfg))
    rehash(copy, rel)
    with pytest.raises(BundleError, match=r"field 'adapters\.text\.\w+': '../../x' is not a folder name"):
        Bundle.load(copy).text_embed("w1")


# -- weights ------------------------------------------------------------------------------------------


def test_truncated_safetensors_header_with_matching_hash(copy):
    rel = "towers/vision/heads.safetensors"
    data = (copy / rel).read_bytes()
    n = int.from_bytes(data[:8], "little")
    (copy / rel).write_bytes(data[:8] + data[8:8 + n // 2])  # header cut in half, no data
    rehash(copy, rel)
    with pytest.raises(BundleError, match="heads.safetensors: safetensors header"):
        Bundle.load(copy).vision_classify(png_bytes(1))
    (copy / rel).write_bytes(data[:-7])  # header intact, data short
    rehash(copy, rel)
    with pytest.raises(BundleError, match="does not match its bytes|tensors cover"):
        Bundle.load(copy).vision_classify(png_bytes(1))


def test_config_sizes_checked_before_building(copy):
    """width 65536 used to try to allocate 48 GiB before any shape check."""
    rel = "towers/text/config.json"
    cfg = json.loads((copy / rel).read_text())
    for width, needle in ((65536, "over 16384"), (16384, "has shape"), (64, "has shape")):
        cfg["tower"]["width"] = width
        (copy / rel).write_text(json.dumps(cfg))
        rehash(copy, rel)
        tracemalloc.start()
        t0 = time.perf_counter()
        with pytest.raises(BundleError, match=needle):
            Bundle.load(copy).text_embed("w1")
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 200 << 20 and time.perf_counter() - t0 < 30, (width, peak)


def test_total_parameters_checked(copy):
    """A config whose extra parameters have no tensor of the same name is still caught by the total."""
    rel = "towers/vision/config.json"
    cfg = json.loads((copy / rel).read_text())
    cfg["tower"]["depth"] = 200
    (copy / rel).write_text(json.dumps(cfg))
    rehash(copy, rel)
    with pytest.raises(BundleError, match="parameters but the weight files hold|has shape|missing|unexpected"):
        Bundle.load(copy).vision_classify(png_bytes(1))


def test_hash_what_you_load(copy, bundle_dir, monkeypatch):
    """A file swapped on disk right after it was hashed does not reach the model."""
    import nexus_assets.runtime.bundle as rb

    want = Bundle.load(bundle_dir).vision_classify(png_bytes(4), top_k=3)
    real = rb.read_checked

    def read_then_swap(root, rel, entry, **kw):
        data = real(root, rel, entry, **kw)
        if rel.endswith(".safetensors") or rel.endswith(".json"):
            (Path(root) / rel).write_bytes(b"\0" * len(data))  # the attacker's swap, after the hash
        return data
    monkeypatch.setattr(rb, "read_checked", read_then_swap)
    got = Bundle.load(copy).vision_classify(png_bytes(4), top_k=3)
    assert got == want


def test_router_malformed_but_hashed(copy):
    (copy / "router" / "router.json").write_text('{"routes": 5}')
    rehash(copy, "router/router.json")
    with pytest.raises(BundleError, match="router.json|cannot load the router"):
        Bundle.load(copy)


def test_clean_bundle_still_verifies(bundle_dir):
    out = Bundle.load(bundle_dir).verify_all()
    assert set(out) >= {"router", "towers/text", "towers/vision", "towers/audio"}
