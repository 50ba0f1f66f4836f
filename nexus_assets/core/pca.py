"""Streaming PCA of teacher activations: the subspace each layer actually uses.

Teacher features are far larger than memory (rows x width, many layers), but the covariance of a
layer is only (width, width). So we stream rows once and keep exactly three things per layer: the
row count, the running mean and the centred scatter matrix M2 = sum_i (x_i - mean)(x_i - mean)^T.
Memory is O(width^2) whatever the number of rows, and the covariance is exact, not sketched.

Why a running mean and not raw sum / X^T X: the textbook `X^T X / n - mean mean^T` subtracts two
large, nearly equal numbers when activations have a large offset (LayerNorm outputs, ReLU features),
and the small eigenvalues we need for the 99% intrinsic dimension drown in cancellation. Each batch
is centred on its own mean and merged with Chan, Golub & LeVeque's pairwise update, which stays
accurate whatever the offset and gives the same answer for any chunking up to rounding.

No Dagster here: `activation_subspace` calls `fit_streaming_pca` and `save_pca`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import torch

from .atomic import atomic_path

FORMAT_VERSION = "1"
DEFAULT_THRESHOLDS = (0.90, 0.95, 0.99)


def _to_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """CPU numpy view of activations; bfloat16 (which numpy lacks) is widened to float32."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu")
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.numpy()
    return np.asarray(x)


@dataclass(frozen=True)
class PCAResult:
    """The principal subspace of one layer's activations.

    Attributes:
        mean: (dim,) float64, the activation mean the components are centred on.
        components: (k, dim) float64, orthonormal rows, sorted by decreasing variance. The sign of
            each row is fixed (its largest-magnitude entry is positive) so reruns are comparable.
        explained_variance: (dim,) float64, every eigenvalue of the sample covariance (divisor
            n - 1), decreasing, not only the k kept, so the intrinsic dimension at any threshold can
            be read from the saved artifact.
        explained_variance_ratio: (dim,) float64, explained_variance / its sum.
        n_rows: number of activation rows (samples x positions) the covariance was built from.
        metadata: free-form strings saved in the safetensors header (teacher, layer, ...).
    """

    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray
    n_rows: int
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])

    def intrinsic_dims(self, thresholds: Iterable[float] = DEFAULT_THRESHOLDS) -> dict[float, int]:
        """`intrinsic_dimension` of this result's variance ratio."""
        return intrinsic_dimension(self.explained_variance_ratio, thresholds)

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Project rows onto the kept components: (n, dim) -> (n, k)."""
        return (np.asarray(x, dtype=np.float64) - self.mean) @ self.components.T


class StreamingPCA:
    """Exact streaming covariance and PCA in O(dim^2) memory.

    Args:
        dim: width of every row fed to `update`.
        dtype: accumulation dtype, np.float64 (default) or np.float32. float32 halves the matmul
            cost but loses the small eigenvalues first; keep float64 unless profiling is too slow.
    """

    def __init__(self, dim: int, dtype: type | np.dtype = np.float64):
        if not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        dtype = np.dtype(dtype)
        if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        self.dim = int(dim)
        self.dtype = dtype
        self.count = 0
        self.mean = np.zeros(self.dim, dtype=dtype)  # (dim,)
        self.m2 = np.zeros((self.dim, self.dim), dtype=dtype)  # (dim, dim) centred scatter

    def update(self, x: np.ndarray | torch.Tensor) -> "StreamingPCA":
        """Fold a batch of rows into the running statistics.

        Args:
            x: (n, dim) activations, numpy or torch (moved to CPU; bfloat16 widened). n may be 0.

        Memory: one (n, dim) temporary in the accumulation dtype (centred in place), freed on return.
        """
        x = _to_numpy(x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected rows of shape (n, {self.dim}), got {x.shape}")
        n_b = x.shape[0]
        if n_b == 0:
            return self
        centred = x.astype(self.dtype, copy=True)  # (n_b, dim), never aliases the caller's array
        mean_b = centred.mean(axis=0)  # (dim,)
        centred -= mean_b
        m2_b = centred.T @ centred  # (dim, dim)
        del centred
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self.mean  # (dim,)
        # Chan et al.: M2 = M2_a + M2_b + delta delta^T * n_a n_b / n
        self.m2 += m2_b
        self.m2 += np.outer(delta, delta) * (n_a * n_b / n)
        self.mean += delta * (n_b / n)
        self.count = n
        return self

    def covariance(self) -> np.ndarray:
        """(dim, dim) float64 sample covariance (divisor n - 1), symmetrised."""
        if self.count < 2:
            raise ValueError(f"need at least 2 rows for a covariance, have {self.count}")
        cov = self.m2.astype(np.float64) / (self.count - 1)
        return (cov + cov.T) / 2

    def finalize(self, n_components: int) -> PCAResult:
        """Eigendecompose the covariance and keep the top `n_components` directions.

        Eigenvalues of a PSD matrix that come out slightly negative through rounding are clipped to 0.
        """
        if not isinstance(n_components, (int, np.integer)) or not 1 <= n_components <= self.dim:
            raise ValueError(f"n_components must be an int in [1, {self.dim}], got {n_components!r}")
        if self.count < max(2, n_components):
            raise ValueError(
                f"need at least max(2, n_components={n_components}) rows, have {self.count}"
            )
        evals, evecs = np.linalg.eigh(self.covariance())  # ascending; evecs columns
        order = np.argsort(evals)[::-1]
        evals = np.clip(evals[order], 0.0, None)  # (dim,)
        comps = evecs[:, order[:n_components]].T  # (k, dim)
        # Deterministic sign: the largest-magnitude entry of each component is positive.
        pivot = np.abs(comps).argmax(axis=1)
        comps = comps * np.sign(comps[np.arange(n_components), pivot])[:, None]
        total = evals.sum()
        ratio = evals / total if total > 0 else np.zeros_like(evals)
        return PCAResult(
            mean=self.mean.astype(np.float64).copy(),
            components=np.ascontiguousarray(comps),
            explained_variance=evals,
            explained_variance_ratio=ratio,
            n_rows=int(self.count),
        )


def intrinsic_dimension(
    ratio: np.ndarray | torch.Tensor, thresholds: Iterable[float] = DEFAULT_THRESHOLDS
) -> dict[float, int]:
    """Smallest k whose top-k cumulative explained-variance ratio reaches each threshold.

    Args:
        ratio: (dim,) explained-variance ratios, sorted decreasing, summing to ~1.
        thresholds: fractions in (0, 1].

    Returns:
        {threshold: k}. `{str(t): k}` gives the "0.9" / "0.95" / "0.99" keys `sizing` reads.
        A cumulative sum a hair under the threshold through rounding (1e-12) still counts, and
        threshold 1.0 maps to at most dim.
    """
    r = ratio.detach().cpu().numpy() if isinstance(ratio, torch.Tensor) else np.asarray(ratio)
    r = r.astype(np.float64)
    if r.ndim != 1 or r.size == 0:
        raise ValueError(f"ratio must be a non-empty 1-D array, got shape {r.shape}")
    if not np.all(np.isfinite(r)) or np.any(r < 0):
        raise ValueError("ratio must be finite and non-negative")
    cum = np.cumsum(r)
    out: dict[float, int] = {}
    for t in thresholds:
        t = float(t)
        if not 0.0 < t <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {t}")
        k = int(np.searchsorted(cum, t - 1e-12, side="left")) + 1
        out[t] = min(k, r.size)
    return out


def fit_streaming_pca(
    batches: Iterable[np.ndarray | torch.Tensor],
    n_components: int,
    *,
    layer: str,
    teacher: str,
    dtype: type | np.dtype = np.float64,
) -> PCAResult:
    """Fit a `StreamingPCA` over batches of one teacher layer, validating every batch.

    Profiling runs for hours over many layers, so a bad batch must say where it came from: every
    error names the teacher, the layer and (where one is at fault) the 0-based batch index.

    Args:
        batches: iterable of (n_i, dim) rows; dim is taken from the first batch. Consumed once,
            batches are not retained.
        n_components: components to keep, 1 <= n_components <= dim and <= total rows.
        layer, teacher: names for errors and for `PCAResult.metadata`.
        dtype: accumulation dtype (see `StreamingPCA`).

    Raises:
        ValueError: non-2-D batch, width different from the first batch, NaN or Inf values,
            no batches, or fewer total rows than n_components.
    """
    where = f"teacher {teacher!r} layer {layer!r}"
    pca: StreamingPCA | None = None
    for i, batch in enumerate(batches):
        batch = _to_numpy(batch)
        if batch.ndim != 2:
            raise ValueError(f"{where} batch {i}: expected a 2-D (rows, dim) array, got shape {batch.shape}")
        if not np.issubdtype(batch.dtype, np.number):
            raise ValueError(f"{where} batch {i}: expected numeric activations, got dtype {batch.dtype}")
        if pca is None:
            if batch.shape[1] < 1:
                raise ValueError(f"{where} batch {i}: zero-width rows")
            pca = StreamingPCA(batch.shape[1], dtype=dtype)
        elif batch.shape[1] != pca.dim:
            raise ValueError(
                f"{where} batch {i}: width {batch.shape[1]} differs from the first batch's width {pca.dim}"
            )
        # Fast path: NaN/Inf poison a float64 sum, so only a non-finite sum pays for the
        # element-wise scan (which also rules out a false alarm from overflow of huge values).
        if not np.isfinite(batch.sum(dtype=np.float64)):
            finite = np.isfinite(batch)  # (n, dim) bool
            if not finite.all():
                bad_rows = np.flatnonzero(~finite.all(axis=1))
                n_nan = int(np.isnan(batch).sum())
                raise ValueError(
                    f"{where} batch {i}: {n_nan} NaN and {int((~finite).sum()) - n_nan} Inf values "
                    f"in {bad_rows.size} rows (first row {int(bad_rows[0])})"
                )
        pca.update(batch)
    if pca is None:
        raise ValueError(f"{where}: no batches")
    if not isinstance(n_components, (int, np.integer)) or not 1 <= n_components <= pca.dim:
        raise ValueError(f"{where}: n_components must be an int in [1, {pca.dim}], got {n_components!r}")
    if pca.count < max(2, n_components):
        raise ValueError(
            f"{where}: only {pca.count} rows in total, fewer than max(2, n_components={n_components})"
        )
    result = pca.finalize(n_components)
    return PCAResult(
        mean=result.mean,
        components=result.components,
        explained_variance=result.explained_variance,
        explained_variance_ratio=result.explained_variance_ratio,
        n_rows=result.n_rows,
        metadata={"teacher": str(teacher), "layer": str(layer)},
    )


def save_pca(result: PCAResult, path: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
    """Write `result` as safetensors (mean, components, explained_variance), atomically.

    The header metadata carries format_version, n_rows, dim, n_components, the intrinsic dims
    (JSON) and `result.metadata` updated with `metadata`, so the file alone says what it is.
    """
    from safetensors.numpy import save_file

    meta = {str(k): str(v) for k, v in dict(result.metadata).items()}
    meta.update({str(k): str(v) for k, v in dict(metadata or {}).items()})
    meta.update(
        format_version=FORMAT_VERSION,
        n_rows=str(result.n_rows),
        dim=str(result.dim),
        n_components=str(result.n_components),
        intrinsic_dims=json.dumps({str(t): k for t, k in result.intrinsic_dims().items()}),
    )
    tensors = {
        "mean": np.ascontiguousarray(result.mean, dtype=np.float64),
        "components": np.ascontiguousarray(result.components, dtype=np.float64),
        "explained_variance": np.ascontiguousarray(result.explained_variance, dtype=np.float64),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


_RESERVED = {"format_version", "n_rows", "dim", "n_components", "intrinsic_dims"}


def load_pca(path: str | Path) -> PCAResult:
    """Read a file written by `save_pca`; shape mismatches raise ValueError naming the file."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="numpy") as f:
        meta = dict(f.metadata() or {})
        try:
            mean, comps, ev = (f.get_tensor(k) for k in ("mean", "components", "explained_variance"))
        except Exception as e:  # safetensors raises its own error type for a missing key
            raise ValueError(f"{path}: not a PCA artifact ({e})") from e
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION!r}")
    dim = mean.shape[0]
    if mean.ndim != 1 or comps.ndim != 2 or comps.shape[1] != dim or ev.shape != (dim,):
        raise ValueError(
            f"{path}: inconsistent shapes mean {mean.shape}, components {comps.shape}, "
            f"explained_variance {ev.shape}"
        )
    total = ev.sum()
    return PCAResult(
        mean=mean,
        components=comps,
        explained_variance=ev,
        explained_variance_ratio=ev / total if total > 0 else np.zeros_like(ev),
        n_rows=int(meta["n_rows"]),
        metadata={k: v for k, v in meta.items() if k not in _RESERVED},
    )
