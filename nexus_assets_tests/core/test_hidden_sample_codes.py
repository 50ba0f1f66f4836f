"""The hidden sample (`token_hidden_fraction`) in 8 or 4 bits: codes that decode alone (no basis), read back by
every reader as float32, and a PCA on them that finds what the float16 sample finds."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nexus_assets.core.feature_store import (FeatureCacheError, decode_hidden, encode_hidden, hidden_code_columns,
                                             iter_matrix, outputs_to_tables, read_features, write_chunk)
from nexus_assets.core.pca import fit_streaming_pca


def known_states(n=6000, d=64, seed=0):
    """Tokens with a known spectrum (variances 2^-i on a random rotation) plus one outlier channel, as an LM's
    residual stream has: a dimension ~30x the others on every token."""
    rng = np.random.default_rng(seed)
    q = np.linalg.qr(rng.normal(size=(d, d)))[0]
    var = 2.0 ** -np.arange(d, dtype=np.float64) * 4
    x = (rng.normal(size=(n, d)) * np.sqrt(var)) @ q.T
    x[:, 5] += 30.0 + rng.normal(size=n) * 0.1
    return x.astype(np.float32), q, var


def table_of(x, bits, name="hidden.layers.1"):
    fields, arrays = [], []
    for f, a in hidden_code_columns(name, x, bits):
        fields.append(f)
        arrays.append(a)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


@pytest.mark.parametrize("bits", [8, 4])
def test_codes_decode_within_half_a_step_of_their_block(bits):
    x, _, _ = known_states(n=500)
    t = table_of(x, bits)
    assert t.schema.field("hidden.layers.1").type == pa.binary(64 * bits // 8)
    back = np.stack(decode_hidden(t)["hidden.layers.1"].to_numpy(zero_copy_only=False))
    assert back.dtype == np.float32 and back.shape == x.shape
    qmax = 2 ** (bits - 1) - 1
    sd = x.std(axis=0)  # each dimension is centred and scaled first: the outlier channel gets its own grid
    z = (x - x.mean(axis=0)) / sd
    step = np.repeat(np.abs(z.reshape(500, 2, 32)).max(axis=2) / qmax, 32, axis=1) * sd  # two blocks a token
    # half a step, plus the float16 rounding of the block scale (a relative 2^-11 of up to qmax steps)
    assert (np.abs(back - x) <= step * (0.5 + qmax * 2.0 ** -11) + 1e-5).all()
    # the outlier channel (~30) no longer sets its block's step: one grid would err by up to 0.5 * 30 / qmax
    assert np.abs(back - x)[:, :32].max() < 0.1 * 30 / qmax
    assert "hidden_scale.layers.1" not in decode_hidden(t).column_names


def test_a_pca_on_the_8_bit_sample_finds_the_float16_sample_s_components():
    x, q, var = known_states()
    fits = {}
    for bits in (16, 8, 4):
        if bits == 16:
            y = x.astype(np.float16).astype(np.float32)
        else:
            y = np.stack(decode_hidden(table_of(x, bits))["hidden.layers.1"].to_numpy(zero_copy_only=False))
        fits[bits] = fit_streaming_pca(iter([y[:3000], y[3000:]]), 16, layer="l", teacher="t")
    ref = fits[16]
    for bits, tol in ((8, 1e-3), (4, 0.05)):
        got = fits[bits]
        # each of the top 8 components is the float16 sample's, up to sign
        cos = np.abs(np.sum(np.asarray(got.components[:8]) * np.asarray(ref.components[:8]), axis=1))
        assert (cos > 1 - tol).all(), (bits, cos)
        dims, want = got.intrinsic_dims(), ref.intrinsic_dims()
        if bits == 8:
            assert dims == want
        else:  # 4 bits: ~1% of the variance is rounding noise, so the 99% count grows; the coarser ones hold
            assert dims[0.9] == want[0.9] and dims[0.95] == want[0.95] and dims[0.99] >= want[0.99]
    # and the float16 sample's components are the known ones (the test's data has the answer)
    assert np.abs(np.asarray(ref.components[0]) @ q[:, 0]) > 0.99


def test_a_sample_chunk_reads_back_decoded_by_every_reader(tmp_path):
    x, _, _ = known_states(n=40)
    ids = [f"r{i // 10}" for i in range(40)]
    items = pa.table({"row_id": [f"r{i}" for i in range(4)], "split": ["train", "train", "heldout", "train"]})

    class Out:
        items = {}
        tokens = {"item_index": np.repeat(np.arange(4), 10), "position": np.tile(np.arange(10), 4),
                  "hidden.layers.1": x}

    folders = {}
    for bits in (16, 8):
        _, tokens, hidden = outputs_to_tables([f"r{i}" for i in range(4)], ["train", "train", "heldout", "train"],
                                              Out, "t", compact=True, token_hidden_fraction=1.0)
        assert tokens.column_names == ["row_id", "position"] and hidden.num_rows == 40
        folders[bits] = tmp_path / str(bits)
        folders[bits].mkdir()
        write_chunk(folders[bits], 0, items, tokens, hidden if bits == 16 else encode_hidden(hidden, bits))
    raw = pq.read_table(folders[8] / "token_hidden-00000.parquet")
    assert raw.schema.field("hidden.layers.1").type == pa.binary(64)
    a = np.concatenate(list(iter_matrix(folders[16], "hidden.layers.1", "token_hidden", splits=["train"],
                                        min_position=1, batch_rows=7)))
    b = np.concatenate(list(iter_matrix(folders[8], "hidden.layers.1", "token_hidden", splits=["train"],
                                        min_position=1, batch_rows=7)))
    assert a.shape == b.shape == (27, 64) and b.dtype == np.float32  # 3 train items, positions 1..9
    assert np.abs(a - b).max() < 0.05
    full = read_features(folders[8], "token_hidden", columns=["row_id", "hidden.layers.1"])
    assert full.column_names == ["row_id", "hidden.layers.1"] and full.num_rows == 40


def test_re_encoding_a_sample_and_bad_codes():
    x, _, _ = known_states(n=64)
    t16 = pa.table({"row_id": ["a"] * 64})
    t16 = t16.append_column("hidden.layers.1", encode_hidden(table_of(x, 8), 16).column("hidden.layers.1"))
    assert t16.schema.field("hidden.layers.1").type.value_type == pa.float16()
    t4 = encode_hidden(t16, 4)
    assert t4.schema.field("hidden.layers.1").type == pa.binary(32)
    back = np.stack(decode_hidden(t4)["hidden.layers.1"].to_numpy(zero_copy_only=False))
    assert np.abs(back - x).max() < 0.5 * np.abs(x - x.mean(axis=0)).max() / 7 + 0.01  # half a 4-bit step
    empty = decode_hidden(t4.slice(0, 0))  # an empty chunk decodes to no rows
    assert empty.num_rows == 0 and "hidden_scale.layers.1" not in empty.column_names
    with pytest.raises(FeatureCacheError, match="hidden_scale.layers.1"):
        decode_hidden(t4.drop_columns(["hidden_scale.layers.1"]), "token_hidden-00003.parquet")
    stripped = t4.cast(pa.schema([f.with_metadata({}) for f in t4.schema]))
    with pytest.raises(FeatureCacheError, match="token_hidden-00003.parquet.*mean"):
        decode_hidden(stripped, "token_hidden-00003.parquet")
