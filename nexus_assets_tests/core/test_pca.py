"""StreamingPCA against the full-matrix reference (torch.linalg.svd) on data of known rank."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from nexus_assets.core.pca import (
    StreamingPCA,
    fit_streaming_pca,
    intrinsic_dimension,
    load_pca,
    save_pca,
)

DIM, RANK, ROWS = 48, 6, 3000


def low_rank_data(rows=ROWS, dim=DIM, rank=RANK, noise=1e-3, offset=50.0, seed=0) -> np.ndarray:
    """(rows, dim): `rank` latent factors with stds 1..3 through a random orthonormal map, plus
    isotropic noise, around a large offset (the case naive X^T X/n - mean^2 gets wrong)."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, rank)))  # (dim, rank)
    z = rng.standard_normal((rows, rank)) * np.linspace(3.0, 1.0, rank)  # (rows, rank)
    x = z @ basis.T + noise * rng.standard_normal((rows, dim)) + offset * rng.standard_normal(dim)
    return x


def reference(x: np.ndarray):
    """mean (dim,), components (dim, dim) rows, explained variance (dim,) from the full SVD."""
    xt = torch.from_numpy(x)
    mean = xt.mean(0)
    _, s, vh = torch.linalg.svd(xt - mean, full_matrices=False)
    return mean, vh, s**2 / (x.shape[0] - 1)


def sign_align(comps: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    signs = torch.sign((comps * ref).sum(1, keepdim=True))
    return comps * signs


def chunks(x: np.ndarray, n: int):
    return np.array_split(x, n)


def test_intrinsic_dimension_of_known_rank_is_rank():
    res = fit_streaming_pca(chunks(low_rank_data(), 7), RANK, layer="l3", teacher="t")
    dims = res.intrinsic_dims()
    assert dims[0.99] == RANK
    assert dims[0.90] <= dims[0.95] <= dims[0.99]


def test_matches_full_svd_reference():
    x = low_rank_data()
    res = fit_streaming_pca(chunks(x, 13), RANK, layer="l", teacher="t")
    mean, vh, ev = reference(x)
    torch.testing.assert_close(torch.from_numpy(res.mean), mean, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(torch.from_numpy(res.explained_variance), ev, rtol=1e-7, atol=1e-10)
    comps = torch.from_numpy(res.components)
    torch.testing.assert_close(sign_align(comps, vh[:RANK]), vh[:RANK], rtol=0, atol=1e-7)
    torch.testing.assert_close(comps @ comps.T, torch.eye(RANK, dtype=torch.float64), rtol=0, atol=1e-12)
    ratio = torch.from_numpy(res.explained_variance_ratio)
    torch.testing.assert_close(ratio, ev / ev.sum(), rtol=1e-7, atol=1e-12)
    assert res.n_rows == ROWS and res.components.shape == (RANK, DIM)


def test_torch_input_is_accepted():
    x = low_rank_data()
    a = StreamingPCA(DIM).update(torch.from_numpy(x).float()).finalize(3)
    b = StreamingPCA(DIM).update(x.astype(np.float32)).finalize(3)
    np.testing.assert_array_equal(a.explained_variance, b.explained_variance)
    bf16 = torch.from_numpy(x).bfloat16()
    c = fit_streaming_pca([bf16[:1000], bf16[1000:]], 3, layer="l", teacher="t")
    ref = StreamingPCA(DIM).update(bf16.float().numpy()).finalize(3)
    np.testing.assert_allclose(c.mean, ref.mean, rtol=1e-12)
    np.testing.assert_allclose(c.explained_variance, ref.explained_variance, rtol=1e-9, atol=1e-12)


def test_float32_accumulation_is_close_to_float64():
    x = low_rank_data(offset=0.0)
    f64 = fit_streaming_pca(chunks(x, 10), RANK, layer="l", teacher="t")
    f32 = fit_streaming_pca(chunks(x, 10), RANK, layer="l", teacher="t", dtype=np.float32)
    np.testing.assert_allclose(f32.explained_variance[:RANK], f64.explained_variance[:RANK], rtol=1e-4)
    assert f32.intrinsic_dims() == f64.intrinsic_dims()


@pytest.mark.parametrize("n_chunks", [50, 7])
def test_chunking_does_not_change_the_result(n_chunks):
    x = low_rank_data()
    one = fit_streaming_pca([x], RANK, layer="l", teacher="t")
    many = fit_streaming_pca(chunks(x, n_chunks), RANK, layer="l", teacher="t")
    assert one.n_rows == many.n_rows == ROWS
    np.testing.assert_allclose(many.mean, one.mean, rtol=1e-13, atol=1e-11)
    np.testing.assert_allclose(many.explained_variance, one.explained_variance, rtol=1e-9, atol=1e-12)
    # Same sign convention, so the components agree without alignment.
    np.testing.assert_allclose(many.components, one.components, rtol=0, atol=1e-9)


def test_intrinsic_dimension_on_hand_made_ratios():
    ratio = np.array([0.5, 0.3, 0.1, 0.05, 0.04, 0.01])
    assert intrinsic_dimension(ratio) == {0.90: 3, 0.95: 4, 0.99: 5}
    assert intrinsic_dimension(ratio, thresholds=(0.5, 1.0)) == {0.5: 1, 1.0: 6}
    with pytest.raises(ValueError, match="threshold"):
        intrinsic_dimension(ratio, thresholds=(1.5,))


def test_memory_is_independent_of_row_count():
    dim, rows, updates = 64, 1000, 200
    batch_bytes = rows * dim * 8
    rng = np.random.default_rng(0)
    pca = StreamingPCA(dim)
    tracemalloc.start()
    try:
        for _ in range(updates):
            pca.update(rng.standard_normal((rows, dim)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert pca.count == rows * updates
    total_bytes = batch_bytes * updates  # 102 MB streamed
    # batch + centred copy + (dim, dim) temporaries: a handful of batches, not the data.
    assert peak < 4 * batch_bytes, (peak, batch_bytes)
    assert peak < total_bytes / 50


def test_nan_error_names_teacher_layer_and_batch():
    x = low_rank_data()
    bad = x[1000:2000].copy()
    bad[17, 3] = np.nan
    with pytest.raises(ValueError, match=r"teacher 'smollm2' layer 'blocks.4' batch 2: 1 NaN"):
        fit_streaming_pca([x[:500], x[500:1000], bad], 4, layer="blocks.4", teacher="smollm2")
    bad[17, 3] = np.inf
    with pytest.raises(ValueError, match=r"'smollm2'.*'blocks.4'.*batch 2: 0 NaN and 1 Inf"):
        fit_streaming_pca([x[:500], x[500:1000], bad], 4, layer="blocks.4", teacher="smollm2")


def test_width_error_names_teacher_layer_and_batch():
    x = low_rank_data()
    with pytest.raises(ValueError, match=r"teacher 'effnet' layer 'stage2' batch 1: width 47 differs .* 48"):
        fit_streaming_pca([x[:10], x[10:20, :47]], 4, layer="stage2", teacher="effnet")


def test_too_few_rows_error_names_teacher_and_layer():
    x = low_rank_data()
    with pytest.raises(ValueError, match=r"teacher 'effnet' layer 'stage2': only 5 rows"):
        fit_streaming_pca([x[:2], x[2:5]], 8, layer="stage2", teacher="effnet")
    with pytest.raises(ValueError, match=r"teacher 'effnet' layer 'stage2': no batches"):
        fit_streaming_pca([], 8, layer="stage2", teacher="effnet")


def test_save_load_round_trip(tmp_path):
    res = fit_streaming_pca(chunks(low_rank_data(), 3), RANK, layer="l7", teacher="smollm2")
    path = save_pca(res, tmp_path / "pca" / "l7.safetensors", metadata={"content_hash": "abc"})
    assert [p.name for p in path.parent.iterdir()] == ["l7.safetensors"]  # no temp file left
    back = load_pca(path)
    np.testing.assert_array_equal(back.mean, res.mean)
    np.testing.assert_array_equal(back.components, res.components)
    np.testing.assert_array_equal(back.explained_variance, res.explained_variance)
    np.testing.assert_allclose(back.explained_variance_ratio, res.explained_variance_ratio, rtol=1e-15)
    assert back.n_rows == res.n_rows
    assert dict(back.metadata) == {"teacher": "smollm2", "layer": "l7", "content_hash": "abc"}


# Plots live beside PCA because the explained-variance curve is PCA's main picture.
def test_explained_variance_png(tmp_path):
    from nexus_assets.core.plots import explained_variance_png, training_curve_png

    res = fit_streaming_pca([low_rank_data()], RANK, layer="l", teacher="t")
    out = explained_variance_png({"t/l": res.explained_variance_ratio}, tmp_path / "ev.png", "t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = training_curve_png({"loss": [3.0, 2.0, 1.5], "val": [3.1, 2.5, 2.0]}, tmp_path / "c.png", "d")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "ev.png"]
    with pytest.raises(ValueError, match="no curves"):
        explained_variance_png({}, tmp_path / "x.png", "t")
