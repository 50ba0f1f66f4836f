"""4- and 8-bit per-token state scores: known grids decode exactly, the rounding error stays within half a
step, one token's outlier costs only its own block, and dividing by the component scales is what keeps the
low-variance components."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from nexus_assets.core.feature_store import FeatureCacheError, decode_states
from nexus_assets.core.quantized_scores import (GROUP, bits_of, code_width, component_scale, dequantize_scores,
                                                quantize_scores)


def decaying(n=2000, r=128, seed=0):
    """Scores whose standard deviations fall as a power law, like a PCA spectrum (10x within the first block)."""
    std = (10.0 * np.arange(1, r + 1) ** -0.7).astype(np.float32)
    return np.random.default_rng(seed).normal(size=(n, r)).astype(np.float32) * std, std


def test_code_width_is_a_quarter_or_a_half_of_float16_plus_one_scale_per_group():
    assert code_width(128, 4) == (64, 4) and code_width(128, 8) == (128, 4)
    assert code_width(100, 4) == (64, 4)  # padded to whole groups
    assert bits_of(64, 128) == 4 and bits_of(128, 128) == 8
    with pytest.raises(ValueError, match="code bytes"):
        bits_of(100, 128)


@pytest.mark.parametrize("bits", [4, 8])
def test_scores_on_the_grid_decode_exactly(bits):
    qmax = 2 ** (bits - 1) - 1
    rng = np.random.default_rng(1)
    c = rng.uniform(0.5, 3.0, size=64).astype(np.float32)
    k = rng.integers(-qmax, qmax + 1, size=(5, 64))
    k[:, 0], k[:, GROUP] = qmax, -qmax  # each group reaches the grid's end, so its step is exactly 0.25
    scores = (k * 0.25 * c).astype(np.float32)
    codes, scales = quantize_scores(scores, c, bits)
    assert codes.dtype == np.uint8 and codes.shape == (5, code_width(64, bits)[0])
    np.testing.assert_allclose(scales, 0.25, rtol=1e-6)
    np.testing.assert_allclose(dequantize_scores(codes, scales, c, bits), scores, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits,max_rel_mse", [(4, 0.02), (8, 1e-4)])
def test_rounding_error_is_within_half_a_step_and_small_against_the_signal(bits, max_rel_mse):
    scores, std = decaying()
    c = component_scale(std ** 2)
    codes, scales = quantize_scores(scores, c, bits)
    back = dequantize_scores(codes, scales, c, bits)
    step = np.repeat(scales, GROUP, axis=1) * c  # each score's step in its own units
    assert bool((np.abs(back - scores) <= step / 2 + 1e-5).all())
    rel = ((back - scores) ** 2).mean(axis=0) / scores.var(axis=0)  # per component
    assert float(rel.max()) < max_rel_mse
    assert float(np.mean(back * scores) / np.mean(scores * scores)) == pytest.approx(1.0, abs=0.01)  # unbiased


def test_dividing_by_the_component_scales_keeps_the_weak_components():
    scores, std = decaying()
    err = {}
    for name, c in {"scaled": component_scale(std ** 2), "raw": np.ones_like(std)}.items():
        back = dequantize_scores(*quantize_scores(scores, c, 4), c, 4)
        weak = slice(GROUP // 2, GROUP)  # the first block's weaker half: 3-10x under its first component
        err[name] = float((((back - scores)[:, weak] ** 2).mean(axis=0) / scores[:, weak].var(axis=0)).max())
    # on one grid per block the first component sets the step, and the weak ones drown in it
    assert err["scaled"] < 0.02 and err["raw"] > 0.2


def test_an_outlier_widens_only_its_own_tokens_block():
    scores, std = decaying(n=4)
    c = component_scale(std ** 2)
    clean = dequantize_scores(*quantize_scores(scores, c, 4), c, 4)
    sink = scores.copy()
    sink[0, 3] = 2000.0 * std[3]  # an attention sink in token 0's first block
    back = dequantize_scores(*quantize_scores(sink, c, 4), c, 4)
    np.testing.assert_array_equal(back[1:], clean[1:])  # other tokens: untouched
    np.testing.assert_array_equal(back[0, GROUP:], clean[0, GROUP:])  # the token's other blocks: untouched
    assert back[0, 3] == pytest.approx(sink[0, 3], rel=1e-3)
    zeros = dequantize_scores(*quantize_scores(np.zeros((2, 64), np.float32), np.ones(64), 4), np.ones(64), 4)
    assert not zeros.any()  # the attention sink's own row, stored as zeros, stays zeros


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="bits"):
        quantize_scores(np.zeros((1, 4), np.float32), np.ones(4), 5)
    with pytest.raises(ValueError, match="component scale"):
        quantize_scores(np.zeros((1, 4), np.float32), np.ones(3), 4)
    with pytest.raises(ValueError, match="finite"):
        quantize_scores(np.full((1, 4), np.nan, np.float32), np.ones(4), 4)
    with pytest.raises(ValueError, match="> 0"):
        quantize_scores(np.zeros((1, 4), np.float32), np.zeros(4), 4)
    codes, scales = quantize_scores(np.ones((2, 64), np.float32), np.ones(64), 4)
    with pytest.raises(ValueError, match="codes"):
        dequantize_scores(codes[:, :10], scales, np.ones(64), 4)


def _fsl(a):
    return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])


def test_decode_states_restores_float_scores_and_names_what_is_missing():
    import torch

    scores, std = decaying(n=6, r=64)
    basis = {"layers.3": {"variances": torch.from_numpy(std ** 2)}}
    codes, scales = quantize_scores(scores, component_scale(std ** 2), 8)
    table = pa.table({"position": np.arange(6, dtype=np.int32), "state.layers.3": _fsl(codes),
                      "state_scale.layers.3": _fsl(scales.astype(np.float16)),
                      "state.layers.9": _fsl(scores.astype(np.float16))})  # a float16 column passes through
    out = decode_states(table, basis, "tokens-00000.parquet")
    assert out.column_names == ["position", "state.layers.3", "state.layers.9"]
    got = np.stack(out["state.layers.3"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(got, scores, rtol=0.02, atol=0.02 * float(std.max()))
    empty = decode_states(table.slice(0, 0), basis, "tokens-00000.parquet")  # an empty chunk decodes to no rows
    assert empty.num_rows == 0 and empty.schema.field("state.layers.3").type.list_size == 64
    with pytest.raises(FeatureCacheError, match="tokens-00000.parquet.*state_scale.layers.3"):
        decode_states(table.drop_columns(["state_scale.layers.3"]), basis, "tokens-00000.parquet")
    with pytest.raises(FeatureCacheError, match="layers.3"):
        decode_states(table, {}, "tokens-00000.parquet")


def test_iter_matrix_refuses_codes_it_cannot_decode(tmp_path):
    from nexus_assets.core.feature_store import iter_matrix, write_chunk

    codes, scales = quantize_scores(np.ones((3, 32), np.float32), np.ones(32), 4)
    items = pa.table({"row_id": ["a"], "split": ["train"]})
    tokens = pa.table({"row_id": ["a"] * 3, "position": np.arange(3, dtype=np.int32), "state.layers.1": _fsl(codes),
                       "state_scale.layers.1": _fsl(scales)})
    write_chunk(tmp_path, 0, items, tokens)
    with pytest.raises(FeatureCacheError, match="state.layers.1.*quantized.*read_features"):
        next(iter_matrix(tmp_path, "state.layers.1", kind="tokens", teacher="t"))


def test_read_features_decodes_an_8_bit_rank_that_is_not_a_multiple_of_the_group(tmp_path):
    import torch

    from nexus_assets.core.feature_store import STATE_BASIS, read_features, save_state_basis, write_chunk

    scores, std = decaying(n=40, r=100)
    codes, scales = quantize_scores(scores, component_scale(std ** 2), 8)
    items = pa.table({"row_id": ["a"], "split": ["train"]})
    tokens = pa.table({"row_id": ["a"] * 40, "position": np.arange(40, dtype=np.int32), "state.layers.1": _fsl(codes),
                       "state_scale.layers.1": _fsl(scales.astype(np.float16))})
    write_chunk(tmp_path, 0, items, tokens)
    save_state_basis({"layers.1": {"mean": torch.zeros(8), "components": torch.zeros(100, 8),
                                   "variances": torch.from_numpy(std ** 2)}}, tmp_path / STATE_BASIS)
    for cols in (None, ["state.layers.1"], ["state.layers.1", "state_scale.layers.1"]):
        got = read_features(tmp_path, "tokens", columns=cols)
        assert "state_scale.layers.1" not in got.column_names
        back = np.stack(got["state.layers.1"].to_numpy(zero_copy_only=False))
        assert back.shape == (40, 100)
        np.testing.assert_allclose(back, scores, atol=float(std.max()) * 0.05)
        assert float(((back - scores) ** 2).mean() / (scores ** 2).mean()) < 1e-4


def test_codes_are_stored_as_fixed_width_bytes_and_decode_from_any_slice():
    import torch

    from nexus_assets.core.feature_store import _column

    scores, std = decaying(n=9, r=64)
    codes, scales = quantize_scores(scores, component_scale(std ** 2), 4)
    col = _column(codes)
    assert col.type == pa.binary(32)  # no list levels: the bytes are the codes
    table = pa.table({"state.layers.1": col, "state_scale.layers.1": _column(scales)})
    basis = {"layers.1": {"variances": torch.from_numpy(std ** 2)}}
    whole = np.stack(decode_states(table, basis)["state.layers.1"].to_numpy(zero_copy_only=False))
    part = np.stack(decode_states(table.slice(3, 4), basis)["state.layers.1"].to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(part, whole[3:7])  # a sliced column (offset 3) reads its own rows
    step = np.repeat(scales, GROUP, axis=1) * component_scale(std ** 2)
    assert bool((np.abs(whole - scores) <= step / 2 + 1e-5).all())
