import io
import shutil
from collections import defaultdict

import numpy as np
import pytest

from nexus_assets.probes.probe_data import (
    build_probe_dataset,
    read_probe_rows,
    sentences_from_text,
    split_of,
    table_content_hash,
)
from nexus_assets.probes.probe_sources import (
    paragraphs_to_passages,
    read_wallpapers,
    speakable_sentences,
)
from nexus_assets.core.registry import DatasetSpec

SPLIT = {"train": 0.8, "val": 0.1, "heldout": 0.1}


def text_spec(**kw):
    base = dict(name="text-t", modality="text", sources=["pydoc_topics", "fortunes", "manpages"],
                heldout_sources=["manpages"], sizes={"tiny": {"items": 30}})
    return DatasetSpec(**{**base, **kw})


def image_spec(**kw):
    base = dict(name="image-t", modality="vision", sources=["skimage", "sklearn_samples", "lfw_subset"],
                heldout_sources=["sklearn_samples"], sizes={"tiny": {"items": 9, "views": 3}})
    return DatasetSpec(**{**base, **kw})


def speech_spec(**kw):
    base = dict(name="speech-t", modality="audio", sources=["flite", "espeak"], heldout_sources=["flite:awb"],
                text_dataset="text-t", voices=["flite:slt", "flite:awb", "espeak:en-us", "espeak:en-gb+m3"],
                sizes={"tiny": {"items": 8}})
    return DatasetSpec(**{**base, **kw})


@pytest.fixture(scope="module")
def text_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("text")
    return build_probe_dataset(text_spec(), "tiny", out), read_probe_rows(out)


@pytest.fixture(scope="module")
def image_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("image")
    return build_probe_dataset(image_spec(), "tiny", out), read_probe_rows(out)


def assert_items_in_one_split(table):
    splits = defaultdict(set)
    for source, item, split in zip(table["source"].to_pylist(), table["item"].to_pylist(), table["split"].to_pylist()):
        splits[(source, item)].add(split)
    assert all(len(s) == 1 for s in splits.values()), {k: v for k, v in splits.items() if len(v) > 1}


# ---------------------------------------------------------------- splits


def test_split_of_is_deterministic_and_ignores_dict_order():
    reordered = {"heldout": 0.1, "train": 0.8, "val": 0.1}
    keys = [f"src/item{i}" for i in range(2000)]
    assert [split_of(k, SPLIT) for k in keys] == [split_of(k, reordered) for k in keys]
    counts = {s: sum(split_of(k, SPLIT) == s for k in keys) for s in SPLIT}
    assert 1500 < counts["train"] < 1700 and 120 < counts["val"] < 280 and 120 < counts["heldout"] < 280


@pytest.mark.parametrize("fractions, expected", [
    ({"train": 1.0, "val": 0.0, "heldout": 0.0}, "train"),
    ({"train": 0.0, "val": 0.0, "heldout": 1.0}, "heldout"),
])
def test_split_of_degenerate_fractions(fractions, expected):
    assert {split_of(f"k{i}", fractions) for i in range(200)} == {expected}


# ---------------------------------------------------------------- text


def test_text_rows_balanced_unique_and_split_by_item(text_build):
    summary, table = text_build
    assert table.num_rows == 30 == summary["rows"]
    assert summary["rows_per_source"] == {"pydoc_topics": 10, "fortunes": 10, "manpages": 10}
    ids = table["row_id"].to_pylist()
    assert len(set(ids)) == len(ids)
    assert all(r == f"{s}/{i}/0" for r, s, i in zip(ids, table["source"].to_pylist(), table["item"].to_pylist()))
    assert_items_in_one_split(table)
    for source, split, text in zip(table["source"].to_pylist(), table["split"].to_pylist(), table["text"].to_pylist()):
        assert (split == "ood") == (source == "manpages")
        assert text.strip()
    assert summary["content_sha256"] == table_content_hash(table)


def test_text_build_is_reproducible_and_seed_changes_the_draw(tmp_path, text_build):
    summary, table = text_build
    again = build_probe_dataset(text_spec(), "tiny", tmp_path / "a")
    assert again["content_sha256"] == summary["content_sha256"]
    other = build_probe_dataset(text_spec(), "tiny", tmp_path / "b", seed=1)
    assert other["content_sha256"] != summary["content_sha256"]
    # The split of an item depends on its key alone, never on the seed that drew it.
    t0, t1 = table, read_probe_rows(tmp_path / "b")
    split0 = dict(zip(t0["row_id"].to_pylist(), t0["split"].to_pylist()))
    shared = [(r, s) for r, s in zip(t1["row_id"].to_pylist(), t1["split"].to_pylist()) if r in split0]
    assert all(split0[r] == s for r, s in shared)


def test_passages_have_bounded_length():
    paras = ["word " * 5, "This is a sentence of prose. " * 30, "x = [1, 2, 3] + {4: 5} ** 6 // 7 % 8 " * 3]
    out = paragraphs_to_passages(paras)
    assert out and all(20 <= len(p.split()) <= 60 for p in out)
    assert not any("//" in p for p in out)


# ---------------------------------------------------------------- vision


def test_images_are_224_rgb_and_views_share_a_split(image_build):
    from PIL import Image

    summary, table = image_build
    assert table.num_rows == 27 and summary["items"] == 9
    # sklearn has only two photos; round-robin hands its third turn to the others.
    assert summary["items_per_source"] == {"skimage": 4, "sklearn_samples": 2, "lfw_subset": 3}
    assert_items_in_one_split(table)
    for png, w, h in zip(table["image"].to_pylist(), table["width"].to_pylist(), table["height"].to_pylist()):
        im = Image.open(io.BytesIO(png))
        assert im.size == (224, 224) and im.mode == "RGB"
        assert w > 0 and h > 0
    per_item = defaultdict(list)
    for s, i, v in zip(table["source"].to_pylist(), table["item"].to_pylist(), table["view"].to_pylist()):
        per_item[(s, i)].append(v)
    assert all(sorted(v) == [0, 1, 2] for v in per_item.values())
    # Augmented views differ from the plain view of the same item.
    shas = defaultdict(set)
    for s, i, c in zip(table["source"].to_pylist(), table["item"].to_pylist(), table["content_sha"].to_pylist()):
        shas[(s, i)].add(c)
    assert all(len(c) == 3 for c in shas.values())
    for source, split in zip(table["source"].to_pylist(), table["split"].to_pylist()):
        assert (split == "ood") == (source == "sklearn_samples")


def test_image_build_is_reproducible(tmp_path, image_build):
    summary, _ = image_build
    assert build_probe_dataset(image_spec(), "tiny", tmp_path)["content_sha256"] == summary["content_sha256"]


def test_wallpapers_absent_yield_nothing_and_say_so(tmp_path):
    notes = []
    assert list(read_wallpapers(0, notes, roots=[str(tmp_path / "none")])) == []
    assert any("none installed" in n for n in notes)


def test_wallpaper_resolution_variants_count_once(tmp_path):
    from PIL import Image

    (tmp_path / "set").mkdir()
    for name, size in [("Sea.jpg", (64, 48)), ("Sea_3840x2160.jpg", (96, 54)), ("Hill-l.png", (50, 80)),
                       ("Hill-d.png", (50, 80))]:
        Image.new("RGB", size, (10, 200, 30)).save(tmp_path / "set" / name)
    (tmp_path / "logo.svg").write_text("<svg/>")
    notes = []
    items = list(read_wallpapers(0, notes, roots=[str(tmp_path)]))
    assert sorted(i.item for i in items) == ["set:Hill-d", "set:Hill-l", "set:Sea"]
    # Light and dark variants are two items but one split group.
    assert {i.group for i in items} == {"set:Hill", "set:Sea"}
    im, w, h = next(i for i in items if i.item == "set:Sea").load()
    assert (w, h) == (64, 48) and im.mode == "RGB"
    assert any("SVG" in n for n in notes)


# ---------------------------------------------------------------- audio


@pytest.mark.parametrize("text, expected", [
    ("The cat sat on the mat. It was warm.", ["the cat sat on the mat"]),
    ("Use HTTP for this request now.", []),
    ("There are 3 apples on the table.", []),
    ("Don't panic, it's only a test!", ["don't panic it's only a test"]),
    ("Too short.", []),
])
def test_speakable_sentences(text, expected):
    assert speakable_sentences(text) == expected


@pytest.mark.skipif(not (shutil.which("flite") and shutil.which("espeak-ng")),
                    reason="speech synthesis needs Debian flite and espeak-ng (scripts/setup.sh)")
def test_speech_rows_decode_and_heldout_voice_is_ood(tmp_path, text_build):
    import soundfile as sf

    _, text_table = text_build
    spec = speech_spec()
    summary = build_probe_dataset(spec, "tiny", tmp_path / "a", text_table=text_table)
    table = read_probe_rows(tmp_path / "a")
    assert table.num_rows == 8 and summary["rows_per_source"] == {"flite": 4, "espeak": 4}
    assert set(table["voice_family"].to_pylist()) == set(spec.voices)
    for row in table.to_pylist():
        audio, sr = sf.read(io.BytesIO(row["wav"]), dtype="float32")
        assert sr == 16000 and audio.ndim == 1
        assert len(audio) > 16000 * 0.5 and float(np.sqrt(np.mean(audio**2))) > 0.01
        assert row["transcript"].strip() and row["speaker"].startswith(row["voice_family"])
        assert (row["split"] == "ood") == (row["voice_family"] == "flite:awb")
    ids = table["row_id"].to_pylist()
    assert len(set(ids)) == len(ids)
    # A passage's sentences never land in two splits (ood aside, which is decided by voice).
    split_by_passage = defaultdict(set)
    for r in table.to_pylist():
        if r["split"] != "ood":
            split_by_passage[r["text_row_id"]].add(r["split"])
    assert all(len(s) == 1 for s in split_by_passage.values())
    assert build_probe_dataset(spec, "tiny", tmp_path / "b", text_table=text_table)["content_sha256"] == \
        summary["content_sha256"]


def test_sentences_keep_their_passage(text_build):
    _, text_table = text_build
    sents = sentences_from_text(text_table, seed=0)
    assert sents
    ids = set(text_table["row_id"].to_pylist())
    assert all(s["text_row_id"] in ids and 4 <= len(s["transcript"].split()) <= 16 for s in sents)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("spec, profile, text_table, field", [
    (text_spec(), "huge", None, "'sizes'"),
    (text_spec(sources=["pydoc_topics", "wikipedia"], heldout_sources=[]), "tiny", None, "'sources'"),
    (image_spec(sources=["skimage", "imagenet"], heldout_sources=[]), "tiny", None, "'sources'"),
    (text_spec(heldout_sources=["manpage"]), "tiny", None, "'heldout_sources'"),
    (text_spec(sizes={"tiny": {"items": 3, "views": 2}}), "tiny", None, "'sizes.tiny.views'"),
    (speech_spec(), "tiny", None, "'text_dataset'"),
    (speech_spec(voices=["festival:kal"]), "tiny", None, "'voices'"),
])
def test_errors_name_dataset_and_field(tmp_path, spec, profile, text_table, field):
    with pytest.raises(ValueError) as err:
        build_probe_dataset(spec, profile, tmp_path, text_table=text_table)
    assert repr(spec.name) in str(err.value) and field in str(err.value)
    assert not (tmp_path / "rows.parquet").exists()


def test_unknown_source_error_lists_known_ones(tmp_path):
    with pytest.raises(ValueError, match=r"known: \['brown', 'debian_handbook', 'debian_reference', 'fortunes', 'gcide', "
                                         r"'gnome_help', 'gnu_info', 'manpages', 'moby_dick', 'py_docstrings', 'pydoc_topics', 'sotu', "
                                         r"'wordnet_glosses'\]"):
        build_probe_dataset(text_spec(sources=["nope"], heldout_sources=[]), "tiny", tmp_path)


def test_registered_source_and_variant_groups_share_a_split(tmp_path, monkeypatch):
    from PIL import Image

    from nexus_assets.probes.probe_sources import IMAGE_SOURCES

    for i in range(12):
        for variant, colour in (("l", 230), ("d", 20)):
            Image.new("RGB", (40 + i, 40), (colour, i * 20, 90)).save(tmp_path / f"pic{i}-{variant}.png")
    monkeypatch.setitem(IMAGE_SOURCES, "my_walls",
                        lambda seed, notes: read_wallpapers(seed, notes, roots=[str(tmp_path)]))
    spec = image_spec(sources=["my_walls"], heldout_sources=[], sizes={"tiny": {"items": 24, "views": 2}})
    build_probe_dataset(spec, "tiny", tmp_path / "out")
    table = read_probe_rows(tmp_path / "out")
    by_group = defaultdict(set)
    for item, split in zip(table["item"].to_pylist(), table["split"].to_pylist()):
        by_group[item.rsplit("-", 1)[0]].add(split)
    assert len(by_group) == 12 and all(len(s) == 1 for s in by_group.values())
    assert len({s for v in by_group.values() for s in v}) > 1  # the groups do spread over splits
