"""Feature-cache overhead: a bare teacher forward over N probe rows vs `cache_features` over the same rows
(forward + Arrow conversion + zstd Parquet + chunk markers), measured in the same run, per default teacher.

    .venv/bin/python bench/feature_cache.py                 # all five default teachers, N=32
    .venv/bin/python bench/feature_cache.py --teachers minilm-l6 --rows 64
    .venv/bin/python bench/feature_cache.py --teachers smollm2-135m --rows 256 --state-bits 16  # override
    .venv/bin/python bench/feature_cache.py --teachers smollm2-135m --rows 256 --state-bits 4 --hidden-sample-bits 8

Prints the ratio (goal <= 1.05), bytes per cached row and, for sequence teachers (LM, ASR decoder), bytes
per token on disk (token table + sampled per-token hidden table): float32 with every item's per-token
layers (the cache before code version 3), float16 with every item's (code version 3), and the registry's
layout (float16, per-token layers for `token_hidden_fraction` of the items only, plus the per-token state
scores of `extraction.state_layers` at `state_rank` and `state_bits` (--state-bits overrides the registry's)
where the teacher has them, the sample at `hidden_sample_bits` (--hidden-sample-bits overrides it), their basis fitted first on
the same rows' train split, not timed), all on the same rows in this run; the timed cached pass is that
registry layout, so the ratio includes projecting the states; "of it sample" is the part that is the sampled
per-token hidden layers (profiling's PCA sample, not a training target). Use --rows 256 or more for the sampled
layout: on few rows the sampled fraction is noisy.
Snapshots and probe data are built into a temporary folder first (not timed); the teacher is loaded once
and shared by every measurement. `--profile` picks the probe-data size profile the rows are drawn from.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teachers", nargs="*")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--profile", default="tiny", help="probe-data profile the rows come from (tiny builds fast)")
    ap.add_argument("--state-bits", type=int, choices=[4, 8, 16], help="store state scores in these bits instead "
                    "of the registry's extraction.state_bits")
    ap.add_argument("--hidden-sample-bits", type=int, choices=[4, 8, 16], help="store the sampled per-token "
                    "hidden layers in these bits instead of the registry's extraction.hidden_sample_bits")
    args = ap.parse_args()

    from nexus_assets.core.feature_store import cache_features
    from nexus_assets.probes.probe_data import build_probe_dataset, read_probe_rows
    from nexus_assets.core.registry import load_registry
    from nexus_assets.teachers.base import load_teacher
    from nexus_assets.teachers.features import COMPACT_CACHE, INPUT_COLUMNS, state_basis_for_entry
    from nexus_assets.teachers.snapshot import build_snapshot

    reg = load_registry()
    names = args.teachers or [t.name for t in reg.enabled_teachers()]
    tmp = Path(tempfile.mkdtemp(prefix="nexus-bench-"))
    probes: dict = {}
    print(f"{'teacher':20s} {'rows':>5s} {'bare s':>8s} {'cached s':>9s} {'ratio':>6s} {'bytes/row':>10s} "
          f"{'tokens':>7s} {'B/token f32':>12s} {'B/token f16':>12s} {'B/token cached':>15s} {'of it sample':>13s}")
    for name in names:
        spec = reg.teacher(name)
        if args.state_bits and spec.extraction.state_layers:
            spec = spec.model_copy(update={"extraction": spec.extraction.model_copy(
                update={"state_bits": args.state_bits})})
            print(f"{name}: state scores in {args.state_bits} bits")
        if args.hidden_sample_bits and spec.extraction.token_hidden_fraction:
            spec = spec.model_copy(update={"extraction": spec.extraction.model_copy(
                update={"hidden_sample_bits": args.hidden_sample_bits})})
            print(f"{name}: hidden sample in {args.hidden_sample_bits} bits")
        ds = reg.dataset(spec.dataset)
        if ds.name not in probes:
            text = None
            if ds.text_dataset:
                build_probe_dataset(reg.dataset(ds.text_dataset), args.profile, tmp / "probe" / ds.text_dataset)
                text = read_probe_rows(tmp / "probe" / ds.text_dataset)
            build_probe_dataset(ds, args.profile, tmp / "probe" / ds.name, text_table=text)
            probes[ds.name] = read_probe_rows(tmp / "probe" / ds.name)
        rows = probes[ds.name].slice(0, args.rows)
        snap = tmp / "snap" / name
        build_snapshot(spec, snap, log=lambda s: None)
        teacher = load_teacher(spec, snap)
        cols = ["row_id", "split", *INPUT_COLUMNS[spec.modality]]
        bs = spec.extraction.batch_size
        teacher.forward(rows.slice(0, min(bs, rows.num_rows)).select(cols).to_pylist())  # warm-up
        # the registry's per-token state scores: fitted once here (the pipeline fits them once per entry)
        basis = None
        if spec.extraction.state_layers:
            (tmp / "basis" / name).mkdir(parents=True)
            basis = state_basis_for_entry(teacher, spec, rows, tmp / "basis" / name, log=print)
        bare, cached, nbytes = [], [], 0
        for r in range(args.repeats):  # alternate so machine noise hits both alike
            if basis is not None:
                teacher.state_basis = None
            t0 = time.perf_counter()
            part = rows.select(cols).to_pylist()
            for b in range(0, len(part), bs):
                teacher.forward(part[b:b + bs])
            bare.append(time.perf_counter() - t0)
            if basis is not None:
                teacher.state_basis = basis
            t0 = time.perf_counter()
            m = cache_features(teacher.forward, rows, tmp / "feat" / name / str(r), teacher=name, batch_size=bs,
                               chunk_rows=spec.extraction.chunk_rows, input_columns=INPUT_COLUMNS[spec.modality],
                               log=lambda s: None, compact=COMPACT_CACHE,
                               token_hidden_fraction=spec.extraction.token_hidden_fraction,
                               hidden_sample_bits=spec.extraction.hidden_sample_bits)
            cached.append(time.perf_counter() - t0)
            nbytes = m["bytes"]
        b, c = min(bare), min(cached)
        line = f"{name:20s} {rows.num_rows:5d} {b:8.2f} {c:9.2f} {c / b:6.3f} {nbytes / rows.num_rows:10.0f}"
        if m["token_rows"]:
            if basis is not None:
                teacher.state_basis = None  # the older layouts never had state scores
            per_token = lambda x: (x["token_bytes"] + x.get("token_hidden_bytes", 0)) / x["token_rows"]
            layouts = [per_token(cache_features(
                teacher.forward, rows, tmp / "feat" / name / f"all-{half}", teacher=name, batch_size=bs,
                chunk_rows=spec.extraction.chunk_rows, input_columns=INPUT_COLUMNS[spec.modality],
                log=lambda s: None, compact=half)) for half in (False, True)]
            line += (f" {m['token_rows']:7d} {layouts[0]:12.0f} {layouts[1]:12.0f} {per_token(m):15.0f}"
                     f" {m.get('token_hidden_bytes', 0) / m['token_rows']:13.0f}")
        print(line, flush=True)
        del teacher


if __name__ == "__main__":
    main()
