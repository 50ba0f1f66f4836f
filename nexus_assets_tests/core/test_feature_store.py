"""The compact feature cache: per-token hidden layers stored as float16 and read back as float32 with the
same column names and shapes by every reader."""
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nexus_assets.core import feature_store as fs
from nexus_assets.core.feature_store import (
    cache_features,
    column_matrix,
    count_rows,
    iter_matrix,
    outputs_to_tables,
    read_features,
)

H, K = 256, 8


def lm_forward(batch, scale: float = 1.0):
    """A fake LM: 5 tokens per item, deterministic in the row id."""
    items, tok = {}, {k: [] for k in ("item_index", "position", "token_id", "topk_ids", "topk_logits", "logsumexp",
                                       "hidden.layers.1")}
    pooled = []
    for b, row in enumerate(batch):
        rng = np.random.default_rng(abs(hash(row["row_id"])) % 2**32)
        h = (rng.standard_normal((5, H)) * scale).astype(np.float32)
        pooled.append(h.mean(0))
        tok["item_index"] += [b] * 5
        tok["position"] += list(range(5))
        tok["token_id"] += list(rng.integers(0, 49152, 5))
        tok["topk_ids"].append(rng.integers(0, 49152, (5, K)).astype(np.int32))
        tok["topk_logits"].append(np.sort(rng.normal(15, 3, (5, K)), axis=1)[:, ::-1].astype(np.float32))
        tok["logsumexp"] += list(rng.normal(20, 1, 5).astype(np.float32))
        tok["hidden.layers.1"].append(h)
    items["hidden.layers.1"] = np.stack(pooled)
    tokens = {k: (np.concatenate(v) if isinstance(v[0], np.ndarray) and v[0].ndim == 2 else np.asarray(v))
              for k, v in tok.items()}
    tokens["token_id"] = tokens["token_id"].astype(np.int32)
    tokens["logsumexp"] = tokens["logsumexp"].astype(np.float32)
    return SimpleNamespace(items=items, tokens=tokens)


def probe(n: int = 12) -> pa.Table:
    return pa.table({"row_id": [f"src/i{i}/0" for i in range(n)], "split": ["train", "val", "heldout"] * (n // 3),
                     "text": [f"t{i}" for i in range(n)]})


def build(tmp_path, name, compact, forward=lm_forward):
    return cache_features(forward, probe(), tmp_path / name, teacher="fake-lm", batch_size=4, chunk_rows=6,
                          input_columns=["text"], log=lambda s: None, compact=compact)


def test_compact_tokens_store_float16_and_read_back_float32(tmp_path):
    wide, small = build(tmp_path, "wide", False), build(tmp_path, "small", True)
    assert small["compact"] and not wide["compact"] and small["token_rows"] == wide["token_rows"] == 60
    schema = pq.read_schema(tmp_path / "small" / "tokens-00000.parquet")
    assert schema.field("hidden.layers.1").type == pa.list_(pa.float16(), H)
    assert schema.field("topk_logits").type.value_type == pa.float32()  # KD targets stay exact
    assert pq.read_schema(tmp_path / "small" / "items-00000.parquet").field("hidden.layers.1").type.value_type \
        == pa.float32()  # item-level columns untouched
    assert small["token_bytes"] < 0.65 * wide["token_bytes"]

    a, b = read_features(tmp_path / "wide", "tokens"), read_features(tmp_path / "small", "tokens")
    assert a.schema.equals(b.schema), (a.schema, b.schema)  # same names, shapes and float32 dtype
    ha, hb = column_matrix(a["hidden.layers.1"]), column_matrix(b["hidden.layers.1"])
    assert hb.dtype == np.float32 and hb.shape == ha.shape == (60, H)
    np.testing.assert_allclose(hb, ha, rtol=2 ** -11, atol=1e-7)
    assert not np.array_equal(hb, ha)  # it really went through float16
    for col in ("topk_logits", "topk_ids", "token_id", "logsumexp", "position", "row_id"):
        assert a[col].equals(b[col]), col

    blocks = list(iter_matrix(tmp_path / "small", "hidden.layers.1", kind="tokens", batch_rows=7,
                              splits=["train"], min_position=1))
    assert all(x.dtype == np.float32 and x.shape[1] == H for x in blocks)
    assert sum(len(x) for x in blocks) == count_rows(tmp_path / "small", "tokens", ["train"], min_position=1) == 16
    filtered = read_features(tmp_path / "small", "tokens", columns=["hidden.layers.1"], filter_splits=["val"])
    assert filtered.column_names == ["hidden.layers.1"] and filtered.schema.field(0).type.value_type == pa.float32()


def test_values_beyond_float16_range_stay_float32(tmp_path):
    def forward(batch):
        out = lm_forward(batch)
        if batch[0]["row_id"] == "src/i4/0":  # one batch of the first chunk has an attention-sink outlier
            out.tokens["hidden.layers.1"][0, 0] = 1e6
        return out

    build(tmp_path, "big", True, forward)
    t0 = pq.read_schema(tmp_path / "big" / "tokens-00000.parquet")
    t1 = pq.read_schema(tmp_path / "big" / "tokens-00001.parquet")
    assert t0.field("hidden.layers.1").type.value_type == pa.float32()  # the whole chunk stays wide
    assert t1.field("hidden.layers.1").type.value_type == pa.float16()
    h = column_matrix(read_features(tmp_path / "big", "tokens")["hidden.layers.1"])
    assert h.dtype == np.float32 and h.max() == np.float32(1e6)


def test_outputs_to_tables_compacts_only_when_asked():
    out = lm_forward([{"row_id": "a"}, {"row_id": "b"}])
    _, tok, hid = outputs_to_tables(["a", "b"], ["train", "train"], out, "fake-lm")
    assert tok.schema.field("hidden.layers.1").type.value_type == pa.float32() and hid is None
    _, tok, _ = outputs_to_tables(["a", "b"], ["train", "train"], out, "fake-lm", compact=True)
    assert tok.schema.field("hidden.layers.1").type.value_type == pa.float16()


def test_half_topk_switch(tmp_path, monkeypatch):
    monkeypatch.setattr(fs, "HALF_TOPK_LOGITS", True)
    build(tmp_path, "k16", True)
    assert pq.read_schema(tmp_path / "k16" / "tokens-00000.parquet").field("topk_logits").type.value_type == pa.float16()
    assert read_features(tmp_path / "k16", "tokens").schema.field("topk_logits").type.value_type == pa.float32()


def test_duckdb_views_read_compact_columns_as_float(tmp_path):
    pytest.importorskip("duckdb")
    import json

    from nexus_assets.core.feature_views import build_feature_views

    build(tmp_path / "feat" / "fake-lm", "k", True)
    (tmp_path / "feat" / "fake-lm" / "current.json").write_text(json.dumps({"cache_key": "k"}))
    db, views = build_feature_views(tmp_path / "feat", tmp_path / "cat.duckdb")
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    types = dict(con.execute('DESCRIBE SELECT * FROM "fake-lm_tokens"').fetchall() and
                 [(r[0], r[1]) for r in con.execute('DESCRIBE SELECT * FROM "fake-lm_tokens"').fetchall()])
    assert types["hidden.layers.1"].startswith("FLOAT") and con.execute(
        'SELECT count(*) FROM "fake-lm_tokens"').fetchone()[0] == 60


def test_sampled_token_hidden_table_holds_a_stable_fraction_of_items_and_feeds_profiling(tmp_path):
    """token_hidden_fraction moves the per-token hidden layers out of the tokens table, for a row-id-seeded
    fraction of the items (all of an item's tokens or none); everything else in the tokens table is the same."""
    n = 300
    rows = pa.table({"row_id": [f"src/i{i}/0" for i in range(n)], "split": ["train"] * n,
                     "text": [f"t{i}" for i in range(n)]})
    kw = dict(teacher="fake-lm", batch_size=16, chunk_rows=64, input_columns=["text"], log=lambda s: None,
              compact=True)
    full = cache_features(lm_forward, rows, tmp_path / "full", **kw)
    part = cache_features(lm_forward, rows, tmp_path / "part", token_hidden_fraction=0.25, **kw)
    tok = read_features(tmp_path / "part", "tokens")
    assert "hidden.layers.1" not in tok.column_names and tok.num_rows == 5 * n
    ref = read_features(tmp_path / "full", "tokens")
    for col in tok.column_names:
        assert tok[col].equals(ref[col]), col
    hid = read_features(tmp_path / "part", "token_hidden")
    items = sorted(set(hid["row_id"].to_pylist()))
    assert 0.15 * n < len(items) < 0.35 * n and hid.num_rows == 5 * len(items)  # whole items
    assert part["token_hidden_rows"] == hid.num_rows
    keep = fs.sampled_items(rows["row_id"].to_pylist(), 0.25)
    assert items == sorted(r for r, k in zip(rows["row_id"].to_pylist(), keep) if k)
    # the same values as the full cache's, on those items
    by_key = {(r, p): i for i, (r, p) in enumerate(zip(ref["row_id"].to_pylist(), ref["position"].to_pylist()))}
    at = [by_key[(r, p)] for r, p in zip(hid["row_id"].to_pylist(), hid["position"].to_pylist())]
    np.testing.assert_array_equal(column_matrix(hid["hidden.layers.1"]), column_matrix(ref["hidden.layers.1"])[at])
    per_token = lambda m: (m["token_bytes"] + m["token_hidden_bytes"]) / m["token_rows"]
    assert per_token(part) < 0.5 * per_token(full)

    from nexus_assets.core.subspace import profile_subspaces
    summary = profile_subspaces(tmp_path / "part", "fake-lm", ["layers.1"], ["layers.1"], tmp_path / "sub",
                                log=lambda s: None)
    assert summary["layers"]["layers.1"]["kind"] == "token_hidden"
    assert summary["layers"]["layers.1"]["rows"] == 4 * len(items)  # position 0 skipped
    with pytest.raises(ValueError, match="token_hidden_fraction"):
        fs.sampled_items(["a"], 0.0)


def test_batch_by_groups_rows_of_like_length_and_keeps_the_cache_in_row_order(tmp_path):
    """Padded text batches cost their longest row: batch_by batches a chunk's rows by length, yet the cached
    tables are those of the probe order (the same rows, positions and values, in the same order)."""
    n = 24
    lengths = [(7 * i) % 13 + 1 for i in range(n)]
    rows = pa.table({"row_id": [f"src/i{i}/0" for i in range(n)], "split": ["train"] * n,
                     "text": ["x" * k for k in lengths]})
    seen = []

    def forward(batch):
        seen.append([len(r["text"]) for r in batch])
        return lm_forward(batch)

    kw = dict(teacher="fake-lm", batch_size=4, chunk_rows=12, input_columns=["text"], log=lambda s: None,
              compact=True)
    plain = cache_features(lm_forward, rows, tmp_path / "plain", **kw)
    by_len = cache_features(forward, rows, tmp_path / "by_len", batch_by=lambda r: len(r["text"]), **kw)
    assert by_len["token_rows"] == plain["token_rows"] == 5 * n
    for kind in ("items", "tokens"):
        a, b = read_features(tmp_path / "plain", kind), read_features(tmp_path / "by_len", kind)
        assert a.column_names == b.column_names
        for col in a.column_names:
            assert a[col].equals(b[col]), (kind, col)
    # within each chunk of 12, the forward saw its rows shortest first; the padded width (a batch's longest
    # row) summed over batches is below the probe order's
    for chunk in (seen[:3], seen[3:]):
        flat = [k for batch in chunk for k in batch]
        assert flat == sorted(flat)
    padded = lambda batches: sum(max(b) * len(b) for b in batches)
    plain_batches = [lengths[s:s + 4] for c in (0, 12) for s in range(c, c + 12, 4)]
    assert padded(seen) < padded(plain_batches)
