"""Image probe sources (Qt .rcc bundles, OpenCV samples, Stellarium) and the function-matching views."""
import functools
import io
import struct
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nexus_assets.core.registry import DatasetSpec
from nexus_assets.probes import probe_sources
from nexus_assets.probes.image_corpora import (
    GCOMPRIS_DIR,
    OPENCV_DATA,
    STELLARIUM,
    read_gcompris,
    read_opencv_samples,
    read_rcc,
    read_stellarium_landscapes,
    read_stellarium_nebulae,
)
from nexus_assets.probes.probe_data import build_probe_dataset, is_mix_view, mix_images, read_probe_rows
from nexus_assets.probes.probe_sources import ProbeSourceError


def png(w: int, h: int, colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="PNG")
    return buf.getvalue()


def write_rcc(path: Path, files: dict[str, bytes], compress: set[str] = frozenset(), version: int = 2) -> None:
    """A Qt resource bundle with one folder 'img' holding `files` (the layout rcc writes)."""
    names, name_off = b"", {}
    for n in ["img", *files]:
        name_off[n] = len(names)
        enc = n.encode("utf-16-be")
        names += struct.pack(">HI", len(n), 0) + enc
    data, data_off = b"", {}
    for n, blob in files.items():
        data_off[n] = len(data)
        if n in compress:
            blob = struct.pack(">I", len(blob)) + zlib.compress(blob)
        data += struct.pack(">I", len(blob)) + blob
    pad = b"\0" * 8 if version >= 2 else b""
    tree = struct.pack(">IHII", 0, 2, 1, 1) + pad + struct.pack(">IHII", name_off["img"], 2, len(files), 2) + pad
    for n in files:
        tree += struct.pack(">IHHHI", name_off[n], 1 if n in compress else 0, 0, 0, data_off[n]) + pad
    header = 20 + (4 if version >= 3 else 0)
    t_off, d_off = header, header + len(tree)
    n_off = d_off + len(data)
    head = b"qres" + struct.pack(">IIII", version, t_off, d_off, n_off) + (b"\0" * 4 if version >= 3 else b"")
    path.write_bytes(head + tree + data + names)


@pytest.mark.parametrize("version", [1, 2])
def test_read_rcc_raw_and_zlib_entries(tmp_path, version):
    files = {"a.png": png(120, 100), "b.txt": b"hello " * 50}
    write_rcc(tmp_path / "x.rcc", files, compress={"b.txt"}, version=version)
    assert read_rcc(tmp_path / "x.rcc") == {"img/a.png": files["a.png"], "img/b.txt": files["b.txt"]}


def test_read_rcc_rejects_other_files_naming_them(tmp_path):
    (tmp_path / "bad.rcc").write_bytes(b"PK\x03\x04 a zip, not a bundle")
    with pytest.raises(ProbeSourceError, match=r"bad\.rcc.*not a Qt resource bundle"):
        read_rcc(tmp_path / "bad.rcc")
    write_rcc(tmp_path / "cut.rcc", {"a.png": png(120, 100)}, compress={"a.png"})
    raw = (tmp_path / "cut.rcc").read_bytes()
    (tmp_path / "cut.rcc").write_bytes(raw[:60] + b"\xff" * 20 + raw[80:])  # garbage in the zlib stream
    with pytest.raises(ProbeSourceError, match=r"cut\.rcc.*corrupt"):
        read_rcc(tmp_path / "cut.rcc")


def test_gcompris_sample_skips_small_and_groups_puzzle_pieces(tmp_path):
    write_rcc(tmp_path / "paintings.rcc", {
        "GreatWave_a1.webp": png(200, 150), "GreatWave_b2.webp": png(200, 150, (0, 0, 255)),
        "icon.png": png(32, 32), "readme.txt": b"x",
    })
    notes = []
    items = list(read_gcompris(0, notes, tmp_path))
    assert sorted(it.item for it in items) == ["paintings:GreatWave_a1", "paintings:GreatWave_b2"]
    assert {it.group for it in items} == {"paintings:GreatWave"}
    im, w, h = items[0].load()
    assert im.mode == "RGB" and (w, h) == (200, 150)
    assert "1 under 96 px skipped" in notes[0]
    empty = []
    assert list(read_gcompris(0, empty, tmp_path / "none")) == [] and "gcompris-qt-data" in empty[0]
    write_rcc(tmp_path / "paintings.rcc", {"icon.png": png(32, 32)})
    with pytest.raises(ProbeSourceError, match=r"gcompris.*no raster image"):
        list(read_gcompris(0, [], tmp_path))


def test_folder_sources_filter_non_photos(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("fruits.jpg", "baboon.jpg", "opencv-logo.png", "chessboard.png", "aloeL.jpg", "aloeR.jpg",
                 "aloeGT.png", "left03.jpg", "tiny.png"):
        Image.new("RGB", (40, 40) if name == "tiny.png" else (160, 120)).save(data / name)
    items = list(read_opencv_samples(0, [], data))
    assert sorted(it.item for it in items) == ["aloeL", "aloeR", "baboon", "fruits"]
    assert {it.item: it.group for it in items}["aloeL"] == {it.item: it.group for it in items}["aloeR"]
    land = tmp_path / "landscapes" / "ocean"
    land.mkdir(parents=True)
    for name in ("ocean1.png", "ocean2.png", "fog.png"):
        Image.new("RGB", (256, 128)).save(land / name)
    items = list(read_stellarium_landscapes(0, [], tmp_path))
    assert sorted(it.item for it in items) == ["ocean:ocean1", "ocean:ocean2"] and {it.group for it in items} == {"ocean"}
    (data / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    with pytest.raises(ProbeSourceError, match=r"opencv_samples.*broken\.jpg"):
        list(read_opencv_samples(0, [], data))


@pytest.mark.parametrize("reader, installed, at_least", [
    (read_gcompris, GCOMPRIS_DIR.is_dir(), 600),
    (read_opencv_samples, OPENCV_DATA.is_dir(), 25),
    (read_stellarium_landscapes, (STELLARIUM / "landscapes").is_dir(), 30),
    (read_stellarium_nebulae, (STELLARIUM / "nebulae").is_dir(), 500),
])
def test_installed_image_packages_give_distinct_pictures(reader, installed, at_least):
    if not installed:
        pytest.skip(f"{reader.__name__}: package not installed (scripts/setup.sh installs it)")
    items = list(reader(0, []))
    assert len(items) >= at_least and len({it.item for it in items}) == len(items)
    for it in items[:3]:
        im, w, h = it.load()
        assert im.mode == "RGB" and min(w, h) >= 96


def test_mix_images_mixup_and_cutmix():
    a, b = Image.new("RGB", (224, 224), (200, 0, 0)), Image.new("RGB", (224, 224), (0, 0, 200))
    kinds = set()
    for s in range(20):
        out, kind, lam = mix_images(a, b, np.random.default_rng(s))
        x = np.asarray(out).astype(int)
        kinds.add(kind)
        if kind == "mixup":
            assert 0.3 <= lam <= 0.7 and np.allclose(x[..., 0], round(200 * lam), atol=1)
        else:
            from_b = (x[..., 2] == 200).mean()
            assert 0.2 - 0.02 <= from_b <= 0.5 + 0.02 and abs((1 - from_b) - lam) < 1e-6
    assert kinds == {"mixup", "cutmix"}
    assert [v for v in range(7) if is_mix_view(v)] == [2, 4, 6]


def test_mix_views_never_cross_splits(tmp_path, monkeypatch):
    """Black pictures are the never-seen source, white ones the training source: a mix view of either
    must stay one colour, or a held-out picture has leaked into training inputs (or the reverse)."""
    for name, colour in (("dark", 0), ("light", 255)):
        folder = tmp_path / name / "data"
        folder.mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (160 + 8 * i, 120), (colour,) * 3).save(folder / f"{name}{'abcdefgh'[i]}shot.png")
        monkeypatch.setitem(probe_sources.IMAGE_SOURCES, name,
                            functools.partial(read_opencv_samples, root=folder))
    spec = DatasetSpec(name="mix-t", modality="vision", sources=["dark", "light"], heldout_sources=["dark"],
                       sizes={"tiny": {"items": 16, "views": 3}})
    summary = build_probe_dataset(spec, "tiny", tmp_path / "out")
    table = read_probe_rows(tmp_path / "out")
    assert table.num_rows == 48 and summary["items"] == 16
    import re

    mixup, cutmix, planned = map(int, re.search(r"(\d+) mixup \+ (\d+) cutmix of (\d+) planned",
                                                summary["notes"]["_views"][0]).groups())
    assert planned == 16 and mixup + cutmix >= 8  # the 8 never-seen pictures always have partners
    values = defaultdict(set)
    for src, image in zip(table["source"].to_pylist(), table["image"].to_pylist()):
        values[src] |= set(np.unique(np.asarray(Image.open(io.BytesIO(image)))).tolist())
    # colour jitter keeps a uniform white picture >= 191; a black partner would pull it below 180
    assert values["dark"] == {0} and min(values["light"]) >= 190
