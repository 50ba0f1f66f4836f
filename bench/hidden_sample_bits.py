"""Does storing the hidden sample (`extraction.token_hidden_fraction`) in 8 or 4 bits change what profiling
finds in it?

Profiling (`core/subspace.py`) fits a PCA per per-token layer on the sampled hidden states; that sample is the
only reader of them. This re-encodes a finished cache entry's sample at each `--bits` into a temporary entry
(`feature_store.recode_chunk`: the token and item tables are linked, only the sample is rewritten), fits the
same PCA on each as profiling does, and prints per layer: the sample's bytes per sampled token, the
intrinsic dimensions at 90 / 95 / 99% of the variance, the top-k subspace overlap with the float16 sample's
(||U16^T Ub||_F^2 / k, 1 = the same subspace) at k = the 95% dimension and at 128, and the largest angle
between their k-th components. A known-answer version of the same comparison is a test
(nexus_assets_tests/core/test_hidden_sample_codes.py).

    .venv/bin/python bench/hidden_sample_bits.py                  # the pipeline's SmolLM2 entry
    .venv/bin/python bench/hidden_sample_bits.py --entry data/artifacts/teacher_features/smollm2-135m/<key> --bits 8 4
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entry", help="a finished cache entry with a float16 hidden sample (default: the pipeline's "
                    "current SmolLM2 entry)")
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4], choices=[4, 8])
    args = ap.parse_args()

    import numpy as np

    from nexus_assets.core.feature_store import MANIFEST, chunk_is_complete, current_entry, recode_chunk
    from nexus_assets.core.paths import artifact_dir
    from nexus_assets.core.pca import load_pca
    from nexus_assets.core.subspace import profile_subspaces

    entry = Path(args.entry) if args.entry else current_entry(artifact_dir("teacher_features", args.teacher))
    m = json.loads((entry / MANIFEST).read_text())
    if not m.get("token_hidden_rows"):
        raise SystemExit(f"{entry}: no hidden sample (token_hidden_fraction unset)")
    layers = m["extraction"]["token_layers"]
    chunks = [j for j in range(m["chunks"]) if chunk_is_complete(entry, j)]
    tmp = Path(tempfile.mkdtemp(prefix="nexus-hidden-bits-"))
    fits, nbytes = {}, {16: m["token_hidden_bytes"]}
    for bits in [16, *args.bits]:
        e = entry
        if bits != 16:
            e = tmp / f"entry{bits}"
            e.mkdir()
            nbytes[bits] = sum(recode_chunk(entry, e, j, {}, None, bits)["files"]["token_hidden"]["bytes"]
                               for j in chunks)
        s = profile_subspaces(e, args.teacher, layers, layers, tmp / f"sub{bits}", log=lambda s: None)
        fits[bits] = {layer: (s["layers"][layer], load_pca(tmp / f"sub{bits}" / s["layers"][layer]["file"]))
                      for layer in layers}
    rows = m["token_hidden_rows"]
    print(f"entry {entry.name}: {rows} sampled tokens of {m['token_rows']} ({len(chunks)} chunks)")
    print(f"{'layer':12s} {'bits':>4s} {'B/sampled tok':>13s} {'B/token':>8s} {'dims 90/95/99':>14s} "
          f"{'overlap@d95':>11s} {'overlap@128':>11s} {'min cos d95':>11s}")
    for layer in layers:
        ref_info, ref = fits[16][layer]
        d95 = ref_info["intrinsic_dims"]["0.95"]
        for bits in [16, *args.bits]:
            info, got = fits[bits][layer]
            dims = "/".join(str(info["intrinsic_dims"][t]) for t in ("0.9", "0.95", "0.99"))
            over = []
            for k in (d95, min(128, len(ref.components), len(got.components))):
                a, b = np.asarray(ref.components[:k]), np.asarray(got.components[:k])
                over.append(float(np.sum((a @ b.T) ** 2) / k))
            cos = np.abs(np.sum(np.asarray(ref.components[:d95]) * np.asarray(got.components[:d95]), axis=1))
            print(f"{layer:12s} {bits:4d} {nbytes[bits] / rows:13.0f} {nbytes[bits] / m['token_rows']:8.0f} "
                  f"{dims:>14s} {over[0]:11.5f} {over[1]:11.5f} {float(cos.min()):11.4f}")


if __name__ == "__main__":
    main()
