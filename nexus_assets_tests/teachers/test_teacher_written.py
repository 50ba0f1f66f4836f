"""Teacher-written text (sequence-level KD): prompts from train rows only, sampled continuations cached
chunk by chunk and resumable, then featurised with the probe rows as one more train source."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from nexus_assets.core.feature_store import read_features
from nexus_assets.core.registry import RegistryError, TeacherSpec, load_registry
from nexus_assets.probes.probe_data import SCHEMAS
from nexus_assets.teachers.features import (TEACHER_WRITTEN, extract_teacher_features, feature_cache_key,
                                            teacher_written_prompts, write_teacher_text)
from nexus_assets.teachers.snapshot import build_snapshot, verify_snapshot
from nexus_assets_tests.helpers import tiny_llama_dir

TW = {"prompts": {"tiny": 5, "default": 7}, "prompt_tokens": 3, "max_new_tokens": 4, "batch_size": 2,
      "chunk_prompts": 2}


def spec_for(path, teacher_written=TW, **extraction) -> TeacherSpec:
    ex = {"layers": ["layers.1", "layers.3"], "token_layers": ["layers.1"], "top_k": 5, "batch_size": 3,
          "chunk_rows": 4, "max_length": 16, **extraction}
    if teacher_written is not None:
        ex["teacher_written"] = teacher_written
    return TeacherSpec.model_validate(dict(
        name="tiny-llama", modality="text", tower="text", family="causal_lm", capabilities=["text.generate"],
        dataset="text-probe", source={"kind": "path", "path": str(path)}, extraction=ex))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "model")


def probe_rows(n=12) -> pa.Table:
    rng = np.random.default_rng(1)
    texts = [" ".join(f"w{i}" for i in rng.integers(0, 290, size=rng.integers(4, 10))) for _ in range(n)]
    splits = (["train"] * 8 + ["val", "heldout", "ood", "train"])[:n]
    ids = [f"t/{i}/0" for i in range(n)]
    # the probe dataset's own schema (non-null fields): written rows must be concatenated onto it
    return pa.table({"row_id": ids, "source": ["t"] * n, "item": ids, "view": [0] * n, "split": splits,
                     "content_sha": ["0" * 64] * n, "text": texts}, schema=SCHEMAS["text"])


def test_prompts_come_from_train_rows_only_and_are_a_stable_seeded_draw(llama_dir):
    rows = probe_rows()
    spec = spec_for(llama_dir)
    got = teacher_written_prompts(spec, rows, 5)
    train = {r for r, s in zip(rows["row_id"].to_pylist(), rows["split"].to_pylist()) if s == "train"}
    assert len(got) == 5 and {r for r, _ in got} <= train
    assert got == teacher_written_prompts(spec, rows, 5)
    assert len(teacher_written_prompts(spec, rows, 100)) == len(train)  # capped at the train rows
    other_seed = spec_for(llama_dir, teacher_written={**TW, "seed": 3})
    assert [r for r, _ in teacher_written_prompts(other_seed, rows, 5)] != [r for r, _ in got]
    no_train = rows.filter(pc.not_equal(rows["split"], "train"))
    with pytest.raises(ValueError, match="tiny-llama.*no non-empty train row"):
        teacher_written_prompts(spec, no_train, 3)


class CountingTeacher:
    """A stand-in that records what it was asked to write."""

    def __init__(self):
        self.calls = 0

    def prompt_prefixes(self, texts, n):
        return [" ".join(t.split()[:n]) for t in texts]

    def write_continuations(self, prompts, *, max_new_tokens, temperature, top_p, seed):
        self.calls += 1
        return [f"{p} cont{seed}_{i}" for i, p in enumerate(prompts)]


def test_written_text_is_cached_per_chunk_and_a_killed_run_resumes(llama_dir, tmp_path):
    spec = spec_for(llama_dir)
    prompts = teacher_written_prompts(spec, probe_rows(), 5)
    t = CountingTeacher()
    table = write_teacher_text(t, spec, prompts, tmp_path / "tw", log=lambda s: None)
    assert table.num_rows == 5 and t.calls == 3  # 3 chunks of <= 2 prompts, one generate call each
    assert set(table["split"].to_pylist()) == {"train"}
    assert table["row_id"].to_pylist() == [f"{TEACHER_WRITTEN}/{r}" for r, _ in prompts]
    assert all(txt.startswith(p) and len(txt) > len(p) for p, txt in zip(table["prompt"].to_pylist(),
                                                                      table["text"].to_pylist()))
    (tmp_path / "tw" / "part-00002.parquet").unlink()  # killed before its last chunk
    t2 = CountingTeacher()
    again = write_teacher_text(t2, spec, prompts, tmp_path / "tw", log=lambda s: None)
    assert t2.calls == 1 and again.equals(table)


def test_a_teacher_that_cannot_write_is_named(llama_dir, tmp_path):
    with pytest.raises(ValueError, match="tiny-llama.*cannot write text"):
        write_teacher_text(object(), spec_for(llama_dir), [("a", "w1 w2")], tmp_path, log=lambda s: None)


def test_registry_refuses_a_negative_prompt_count(llama_dir):
    with pytest.raises(Exception, match="prompts"):
        spec_for(llama_dir, teacher_written={**TW, "prompts": {"default": -1}})


def test_teacher_written_rows_are_featurised_as_train_rows(llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NEXUS_PROFILE", "tiny")
    spec = spec_for(llama_dir)
    build_snapshot(spec, tmp_path / "snap", log=lambda s: None)
    rows = probe_rows()
    entry, m = extract_teacher_features(spec, tmp_path / "snap", rows, "data1", tmp_path / "feat", log=lambda s: None)
    assert m["teacher_written_rows"] == 5 and m["rows"] == rows.num_rows + 5
    items = read_features(entry)
    written = [r for r in items["row_id"].to_pylist() if r.startswith(f"{TEACHER_WRITTEN}/")]
    assert len(written) == 5
    assert set(read_features(entry, filter_splits=["train"])["row_id"].to_pylist()) >= set(written)
    assert not set(read_features(entry, filter_splits=["val", "heldout", "ood"])["row_id"].to_pylist()) & set(written)
    # the real model wrote something: each written row has more tokens than its 3-token prompt
    tok = read_features(entry, "tokens").to_pydict()
    for r in written:
        assert sum(1 for x in tok["row_id"] if x == r) > 3
    # the profile's prompt count is part of the cache key; a teacher without the setting keeps its old key
    assert feature_cache_key(spec, "s", "d", "tiny") != feature_cache_key(spec, "s", "d", "default")
    plain = spec_for(llama_dir, teacher_written=None)
    assert "teacher_written" not in plain.extraction.model_dump(exclude_none=True)


def test_a_profile_that_writes_nothing_keys_as_if_the_setting_were_absent(llama_dir):
    """Its rows do not depend on the writing settings, so tuning them for the long profiles (temperature,
    batch size) must not recompute the default's features; where the profile writes, they are in the key."""
    silent = {**TW, "prompts": {"tiny": 0, "default": 7}}
    plain = feature_cache_key(spec_for(llama_dir, teacher_written=None), "s", "d", "tiny")
    assert feature_cache_key(spec_for(llama_dir, teacher_written=silent), "s", "d", "tiny") == plain
    hotter = {**silent, "temperature": 0.5, "batch_size": 4}
    assert feature_cache_key(spec_for(llama_dir, teacher_written=hotter), "s", "d", "tiny") == plain
    writing = feature_cache_key(spec_for(llama_dir, teacher_written=silent), "s", "d", "default")
    assert writing != plain
    assert feature_cache_key(spec_for(llama_dir, teacher_written=hotter), "s", "d", "default") != writing
    assert feature_cache_key(spec_for(llama_dir, teacher_written=silent), "s", "d", "default", prompts=0) == plain


def test_registry_smollm2_writes_text_on_the_long_profiles():
    tw = load_registry().teacher("smollm2-135m").extraction.teacher_written
    assert tw is not None and tw.prompts_for("full") > 0 and tw.prompts_for("gpu") >= tw.prompts_for("full")
    assert tw.prompt_tokens + tw.max_new_tokens <= load_registry().teacher("smollm2-135m").extraction.max_length


def test_sampled_per_token_layers_from_the_registry_setting(llama_dir, tmp_path):
    """extraction.token_hidden_fraction reaches the cache: per-token layers leave the tokens table and are
    kept for about that fraction of the items; 0 or > 1 is refused by the registry."""
    spec = spec_for(llama_dir, teacher_written=None, token_hidden_fraction=0.5)
    build_snapshot(spec, tmp_path / "snap", log=lambda s: None)
    rows = probe_rows()
    entry, m = extract_teacher_features(spec, tmp_path / "snap", rows, "d", tmp_path / "feat", log=lambda s: None)
    assert "hidden.layers.1" not in read_features(entry, "tokens").column_names
    hidden = read_features(entry, "token_hidden")
    assert 0 < len(set(hidden["row_id"].to_pylist())) < rows.num_rows and m["token_hidden_rows"] == hidden.num_rows
    for bad in (0.0, 1.5):
        with pytest.raises(Exception, match="token_hidden_fraction"):
            spec_for(llama_dir, token_hidden_fraction=bad)


def test_more_prompts_reuse_the_sibling_entry_and_match_a_fresh_run(llama_dir, tmp_path, monkeypatch):
    """Raising the prompt count (tiny 5 -> default 7) computes only what changed: the probe rows' chunks and
    the complete written chunks come from the 5-prompt entry, and the result equals a run from nothing."""
    spec = spec_for(llama_dir)
    build_snapshot(spec, tmp_path / "snap", log=lambda s: None)
    rows = probe_rows()
    monkeypatch.setenv("NEXUS_PROFILE", "tiny")
    first, m1 = extract_teacher_features(spec, tmp_path / "snap", rows, "d", tmp_path / "feat", log=lambda s: None)
    before = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    monkeypatch.setenv("NEXUS_PROFILE", "default")
    logs = []
    entry, m = extract_teacher_features(spec, tmp_path / "snap", rows, "d", tmp_path / "feat", log=logs.append)
    assert entry != first and m["rows"] == rows.num_rows + 7
    # 12 probe rows + 2 complete written chunks of 2 prompts = 16 rows = 4 feature chunks of 4 reused
    assert m["seeded_from"] == {"entry": first.name, "chunks": 4, "written_chunks": 2}
    assert m["rows_computed_this_run"] == 3 and any("reusing 4 feature chunks" in s for s in logs)
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == before  # the sibling is untouched
    fresh, mf = extract_teacher_features(spec, tmp_path / "snap", rows, "d", tmp_path / "fresh", log=lambda s: None)
    assert mf["seeded_from"] is None and mf["rows_computed_this_run"] == rows.num_rows + 7
    for table in ("items", "tokens"):
        assert read_features(entry, table).equals(read_features(fresh, table))
    # another sampling temperature writes other text: its entry reuses nothing from either
    hot = spec_for(llama_dir, teacher_written={**TW, "temperature": 0.5})
    _, mh = extract_teacher_features(hot, tmp_path / "snap", rows, "d", tmp_path / "feat", log=lambda s: None)
    assert mh["seeded_from"] is None and mh["rows_computed_this_run"] == rows.num_rows + 7


def test_a_killed_runs_own_written_text_is_never_paired_with_the_siblings_features(llama_dir, tmp_path, monkeypatch):
    """The new entry already holds a written chunk of its own (a run killed while writing) that differs from
    the sibling's: the sibling's features for those rows are not linked; only the probe rows' chunks are."""
    spec = spec_for(llama_dir)
    build_snapshot(spec, tmp_path / "snap", log=lambda s: None)
    rows = probe_rows()
    monkeypatch.setenv("NEXUS_PROFILE", "tiny")
    first, _ = extract_teacher_features(spec, tmp_path / "snap", rows, "d", tmp_path / "feat", log=lambda s: None)
    monkeypatch.setenv("NEXUS_PROFILE", "default")
    entry = tmp_path / "feat" / feature_cache_key(spec, verify_snapshot(tmp_path / "snap")["content_hash"], "d",
                                                  "default")
    own = pq.read_table(first / TEACHER_WRITTEN / "part-00000.parquet")
    own = own.set_column(own.schema.get_field_index("text"), "text",
                         pa.array([t + " and other words" for t in own["text"].to_pylist()]))
    (entry / TEACHER_WRITTEN).mkdir(parents=True)
    pq.write_table(own, entry / TEACHER_WRITTEN / "part-00000.parquet")
    got, m = extract_teacher_features(spec, tmp_path / "snap", rows, "d", tmp_path / "feat", log=lambda s: None)
    assert got == entry and m["seeded_from"] == {"entry": first.name, "chunks": 3, "written_chunks": 0}
    assert m["rows_computed_this_run"] == 7  # every written row featurised from this entry's own text
    tok = read_features(entry, "tokens").to_pydict()
    theirs = read_features(first, "tokens").to_pydict()
    r = f"{TEACHER_WRITTEN}/{own['prompt_row_id'][0].as_py()}"
    assert sum(x == r for x in tok["row_id"]) > sum(x == r for x in theirs["row_id"])  # its longer text


def test_a_corrupt_sibling_chunk_is_recomputed_not_linked(llama_dir, tmp_path, monkeypatch):
    """Only the chosen sibling's chunks that verify (sizes and hashes in their markers) are linked: a
    garbage file there makes its chunk count as missing, and the new entry computes those rows itself."""
    spec = spec_for(llama_dir)
    build_snapshot(spec, tmp_path / "snap", log=lambda s: None)
    rows = probe_rows()
    monkeypatch.setenv("NEXUS_PROFILE", "tiny")
    first, _ = extract_teacher_features(spec, tmp_path / "snap", rows, "d", tmp_path / "feat", log=lambda s: None)
    victim = first / "items-00001.parquet"
    victim.write_bytes(b"garbage" + victim.read_bytes()[7:])  # same size, other bytes
    monkeypatch.setenv("NEXUS_PROFILE", "default")
    entry, m = extract_teacher_features(spec, tmp_path / "snap", rows, "d", tmp_path / "feat", log=lambda s: None)
    assert m["seeded_from"] == {"entry": first.name, "chunks": 3, "written_chunks": 2}
    assert m["rows_computed_this_run"] == 4 + 3  # chunk 1's four rows, then the three new written rows
    assert (entry / "items-00001.parquet").stat().st_ino != victim.stat().st_ino
    fresh, _ = extract_teacher_features(spec, tmp_path / "snap", rows, "d", tmp_path / "fresh", log=lambda s: None)
    for table in ("items", "tokens"):
        assert read_features(entry, table).equals(read_features(fresh, table))
