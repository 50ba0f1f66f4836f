"""Photo-like images from offline Debian packages, for the vision probe data.

| source               | package                | what                                                        | license |
|----------------------|------------------------|-------------------------------------------------------------|---------|
| gcompris             | `gcompris-qt-data`     | photos and paintings inside GCompris' Qt .rcc bundles:      | CC-BY-SA-3.0/4.0, CC-BY-2.0, |
|                      |                        | animals, objects, monuments, musical instruments, paintings | public domain, GPL-3+ (per file) |
| opencv_samples       | `opencv-doc`           | OpenCV's sample photos (fruits, baboon, building, ...)      | Apache-2.0 / BSD-3-Clause (per file) |
| stellarium_landscapes| `stellarium-data`      | panorama slices of the planetarium's landscapes             | GPL-2+ |
| stellarium_nebulae   | `stellarium-data`      | ~550 deep-sky photographs (nebulae, galaxies, clusters)     | GPL-2+; image credits in its copyright file |

`plasma-workspace-wallpapers` needs no reader: its KDE packages land under /usr/share/wallpapers, which
the `wallpapers` source in probe_sources already reads.

A missing package is a noted skip (0 items); a package present but changed shape (an .rcc that is not a
Qt resource bundle, no images left) raises ProbeSourceError naming the source and the file.
"""
from __future__ import annotations

import io
import re
import struct
import zlib
from pathlib import Path
from typing import Iterator

from .probe_sources import ImageItem, ProbeSourceError, _load_picture, hash_order, safe_key

RASTER = (".jpg", ".jpeg", ".png", ".webp")
MIN_SIDE = 96  # smaller pictures (icons, puzzle tiles) carry too little to label


# --------------------------------------------------------------------------------------------------
# Qt resource bundles (.rcc)
# --------------------------------------------------------------------------------------------------

def read_rcc(path: Path | str) -> dict[str, bytes]:
    """Every file in a Qt binary resource bundle, {path inside the bundle: bytes}.

    Format (qtbase rcc.cpp): "qres", u32 version, u32 tree / data / names offsets (big-endian); tree
    nodes of 14 bytes (version 1) or 22 (version >= 2, + u64 mtime): u32 name offset, u16 flags
    (1 zlib, 2 directory, 4 zstd), then a directory's u32 child count + u32 first child, or a file's
    u16 country + u16 language + u32 data offset; data: u32 size + bytes (zlib: u32 size + stream);
    names: u16 length, u32 hash, UTF-16BE."""
    path = Path(path)
    b = path.read_bytes()
    if len(b) < 20 or b[:4] != b"qres":
        raise ProbeSourceError(f"{path}: not a Qt resource bundle (magic {b[:4]!r})")
    version, tree, data, names = struct.unpack(">IIII", b[4:20])
    node = 22 if version >= 2 else 14
    out: dict[str, bytes] = {}

    def name(off: int) -> str:
        (n,) = struct.unpack(">H", b[names + off:names + off + 2])
        return b[names + off + 6:names + off + 6 + 2 * n].decode("utf-16-be")

    def walk(i: int, prefix: str, depth: int) -> None:
        if depth > 64:
            raise ProbeSourceError(f"{path}: resource tree deeper than 64 levels (corrupt?)")
        base = tree + i * node
        noff, flags = struct.unpack(">IH", b[base:base + 6])
        here = f"{prefix}{name(noff)}" if i else ""
        if flags & 2:
            count, first = struct.unpack(">II", b[base + 6:base + 14])
            for child in range(first, first + count):
                walk(child, f"{here}/" if i else "", depth + 1)
            return
        (doff,) = struct.unpack(">I", b[base + 10:base + 14])
        (size,) = struct.unpack(">I", b[data + doff:data + doff + 4])
        blob = b[data + doff + 4:data + doff + 4 + size]
        if flags & 1:
            blob = zlib.decompress(blob[4:])
        elif flags & 4:
            return  # zstd-compressed entries (Qt >= 5.13 option); none in Debian's GCompris
        out[here] = blob

    try:
        walk(0, "", 0)
    except (struct.error, zlib.error, UnicodeDecodeError) as e:
        raise ProbeSourceError(f"{path}: corrupt Qt resource bundle ({type(e).__name__}: {e})") from e
    return out


def _decode(data: bytes):
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        width, height = im.size
        if im.mode == "P":  # palette with transparency: through RGBA, as PIL asks
            im = im.convert("RGBA")
        return im.convert("RGB"), width, height


GCOMPRIS_DIR = Path("/usr/share/gcompris-qt/rcc")
# Puzzle pieces of one painting or photo ("GreatWave_a2", "Neuschwanstein_5") share a group, so every
# piece of a picture lands in one split.
_PIECE = re.compile(r"(?:[-_](?:[a-z]?\d{1,2}|[a-z]))+$")


def read_gcompris(seed: int, notes: list[str], root: Path | str = GCOMPRIS_DIR) -> Iterator[ImageItem]:
    """Raster images of GCompris' activities (~715 of at least 96 px: animals, objects, monuments,
    instruments, paintings); SVG artwork is left out (no rasteriser)."""
    from PIL import Image

    root = Path(root)
    bundles = sorted(root.glob("*.rcc")) if root.is_dir() else []
    if not bundles:
        notes.append(f"gcompris: no .rcc bundles under {root} (apt-get install gcompris-qt-data); skipped, 0 items")
        return
    found: dict[str, tuple[bytes, str]] = {}
    small = 0
    for bundle in bundles:
        try:
            files = read_rcc(bundle)
        except ProbeSourceError as e:
            raise ProbeSourceError(f"source 'gcompris': {e}") from e
        for inner, data in files.items():
            if not inner.lower().endswith(RASTER):
                continue
            try:
                with Image.open(io.BytesIO(data)) as im:
                    if min(im.size) < MIN_SIDE:
                        small += 1
                        continue
            except OSError as e:
                raise ProbeSourceError(f"source 'gcompris': {bundle}:{inner}: undecodable image ({e})") from e
            stem = inner.rsplit("/", 1)[-1].rsplit(".", 1)[0]
            activity = bundle.stem
            group = safe_key(f"{activity}:{_PIECE.sub('', stem) or stem}")
            found[safe_key(f"{activity}:{stem}")] = (data, group)
    if not found:
        raise ProbeSourceError(f"source 'gcompris': {root}: {len(bundles)} bundles but no raster image "
                               f">= {MIN_SIDE} px")
    notes.append(f"gcompris: {len(found)} images from {len(bundles)} bundles ({small} under {MIN_SIDE} px skipped)")
    for key in hash_order(found, seed):
        data, group = found[key]
        yield ImageItem(key, lambda data=data: _decode(data), group=group)


# --------------------------------------------------------------------------------------------------
# Plain image folders
# --------------------------------------------------------------------------------------------------

def _folder_items(source: str, files: list[Path], seed: int, group_of) -> Iterator[ImageItem]:
    from PIL import Image

    by_key: dict[str, Path] = {}
    for p in files:
        try:
            with Image.open(p) as im:
                if min(im.size) < MIN_SIDE:
                    continue
        except OSError as e:
            raise ProbeSourceError(f"source {source!r}: {p}: undecodable image ({e})") from e
        by_key[safe_key(p.stem if p.parent.name in ("data", "default") else f"{p.parent.name}:{p.stem}")] = p
    if not by_key:
        raise ProbeSourceError(f"source {source!r}: {len(files)} files but none a picture >= {MIN_SIDE} px")
    for key in hash_order(by_key, seed):
        p = by_key[key]
        yield ImageItem(key, lambda p=p: _load_picture(p), group=group_of(key))


OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")
# Synthetic test patterns, logos, text, calibration boards (the left/right01..14 stereo calibration
# shots) and a ground-truth disparity map: not photographs.
_OPENCV_SKIP = re.compile(r"(?i:logo|chessboard|digits|sudoku|gradient|mask|imagetext|^ml$|notes|detect_blob|pca_test|"
                          r"ellipses|^box$|^pic\d|alphabet|^text|^cards$|^board$|graf\d|licenseplate|^ela_|"
                          r"^blox$|^smarties$|^stuff$|^(left|right)\d\d$)|GT$")


def read_opencv_samples(seed: int, notes: list[str], root: Path | str = OPENCV_DATA) -> Iterator[ImageItem]:
    """OpenCV's sample photographs (fruits, baboon, building, butterfly, stereo pairs, ...)."""
    root = Path(root)
    if not root.is_dir():
        notes.append(f"opencv_samples: {root} not found (apt-get install opencv-doc); skipped, 0 items")
        return
    files = sorted(p for p in root.iterdir()
                   if p.suffix.lower() in RASTER and p.is_file() and not _OPENCV_SKIP.search(p.stem))
    # Stereo and sequence pairs (aloeL/aloeR, basketball1/2, left/right) are one scene: one group.
    yield from _folder_items("opencv_samples", files, seed,
                             lambda k: re.sub(r"^(left|right)$", "stereo", re.sub(r"(?<=[a-z])(L|R|\d)$", "", k)))


STELLARIUM = Path("/usr/share/stellarium")


def read_stellarium_landscapes(seed: int, notes: list[str], root: Path | str = STELLARIUM) -> Iterator[ImageItem]:
    """Panorama slices of Stellarium's landscapes (ocean, hurricane, guereins, ...); the fog, ground and
    night-illumination layers are overlays, not pictures. One landscape = one group."""
    root = Path(root) / "landscapes"
    if not root.is_dir():
        notes.append(f"stellarium_landscapes: {root} not found (apt-get install stellarium-data); skipped, 0 items")
        return
    files = sorted(p for p in root.glob("*/*") if p.suffix.lower() in RASTER
                   and not re.search(r"fog|illum|ground|-lgt", p.stem, re.I))
    yield from _folder_items("stellarium_landscapes", files, seed, lambda k: k.split(":", 1)[0])


def read_stellarium_nebulae(seed: int, notes: list[str], root: Path | str = STELLARIUM) -> Iterator[ImageItem]:
    """Stellarium's deep-sky photographs (~550 nebulae, galaxies and clusters)."""
    root = Path(root) / "nebulae" / "default"
    if not root.is_dir():
        notes.append(f"stellarium_nebulae: {root} not found (apt-get install stellarium-data); skipped, 0 items")
        return
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in RASTER)
    yield from _folder_items("stellarium_nebulae", files, seed, lambda k: k)


IMAGE_SOURCES = {
    "gcompris": read_gcompris,
    "opencv_samples": read_opencv_samples,
    "stellarium_landscapes": read_stellarium_landscapes,
    "stellarium_nebulae": read_stellarium_nebulae,
}
