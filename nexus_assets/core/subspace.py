"""Per-layer activation subspaces of one teacher, from its cached features (train split only)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from .atomic import write_json
from .feature_store import count_rows, iter_matrix
from .pca import fit_streaming_pca, save_pca

MAX_COMPONENTS = 256
# Per-token LM layers skip position 0: it is an attention sink with activations orders of magnitude
# larger than elsewhere, and would make one direction "explain" 99% of the variance.
FIRST_TOKEN_SKIP = 1


def profile_subspaces(entry: Path, teacher: str, layers: list[str], token_layers: list[str], out_dir: Path,
                      *, batch_rows: int = 2048, log: Callable[[str], None] = print) -> dict:
    """Fit a streaming PCA per cached layer; per-token layers use the token rows (what anchoring sees)."""
    import numpy as np

    from .plots import explained_variance_png

    out_dir.mkdir(parents=True, exist_ok=True)
    layers_out, curves = {}, {}
    sampled = any(Path(entry).glob("token_hidden-*.parquet"))  # per-token layers of a sample of items
    for layer in layers:
        kind = ("token_hidden" if sampled else "tokens") if layer in token_layers else "items"
        column = f"hidden.{layer}"
        skip = FIRST_TOKEN_SKIP if kind != "items" else 0
        batches = iter_matrix(entry, column, kind=kind, batch_rows=batch_rows, teacher=teacher, splits=["train"],
                              min_position=skip)
        first = next(batches, None)
        if first is None:
            raise ValueError(f"teacher {teacher!r} layer {layer!r}: no train rows cached")
        width = first.shape[1]

        def chain(first=first, rest=batches):
            yield first
            yield from rest

        # the full spectrum is kept by the fit; store as many components as anchoring could use, and no
        # more than the rows can support (a rank-n sample has at most n-1 meaningful directions)
        n_rows = count_rows(entry, kind, splits=["train"], min_position=skip)
        k = max(1, min(width, MAX_COMPONENTS, n_rows - 1))
        result = fit_streaming_pca(chain(), k, layer=layer, teacher=teacher)
        path = save_pca(result, out_dir / f"{layer}.safetensors", metadata={"kind": kind})
        dims = {str(t): int(v) for t, v in result.intrinsic_dims().items()}
        layers_out[layer] = {"width": width, "rows": result.n_rows, "kind": kind, "file": path.name,
                             "min_position": skip,
                             "intrinsic_dims": dims, "components": k,
                             "top10_ratio": [round(float(x), 4) for x in result.explained_variance_ratio[:10]]}
        curves[f"{layer} ({kind})"] = np.asarray(result.explained_variance_ratio)
        log(f"[{teacher}] {layer}: width {width}, {result.n_rows} rows, intrinsic dims {dims}")
    png = explained_variance_png(curves, out_dir / "explained_variance.png", title=f"{teacher}: explained variance")
    summary = {"teacher": teacher, "layers": layers_out, "plot": png.name}
    write_json(out_dir / "subspaces.json", summary)
    return summary


def read_subspaces(out_dir: Path) -> dict:
    return json.loads((Path(out_dir) / "subspaces.json").read_text())
