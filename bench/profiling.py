"""Benchmark: streaming PCA over Parquet feature chunks vs. a full-matrix SVD, measured in one run.

    .venv/bin/python bench/profiling.py                      # 50k x 576, chunks of 1k / 4k / 16k rows
    .venv/bin/python bench/profiling.py --rows 200000 --chunks 4096 16384

It writes synthetic teacher features (a low-rank signal plus noise, float32, one fixed-size-list
column "x" of width --dim, row groups of --row-group rows) to a temporary Parquet file, then:

* stream/<chunk>: reads the file back `chunk` rows at a time with pyarrow (`iter_batches`) and feeds
  `StreamingPCA` (float64 accumulation). Memory should not grow with the row count.
* svd (baseline): reads the whole table, centres it and runs `torch.linalg.svd` on the full
  (rows, dim) float32 matrix, which is what profiling would do without streaming.

Each case runs in its own subprocesses (--repeat of them; the best time and the worst memory are
reported, because a shared 2-core machine is noisy) so peak RSS (VmHWM) belongs to that case alone;
read-only/<chunk> decodes the chunks without PCA: the I/O floor. The table shows
peak RSS above the process's RSS after imports, the tracemalloc peak (numpy and Python allocations;
torch's allocator is invisible to it), and pyarrow's memory-pool peak. The last columns are ratios to
the baseline, and `ev_err` is the largest relative error of the top-16 eigenvalues vs. the baseline's.

prebuf/<chunk> repeats the first chunk size with pyarrow's default `ParquetFile(pre_buffer=True)`,
which reads every row group's bytes up front: its arrow peak grows with the file. Streaming readers
must pass pre_buffer=False.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TOP = 16


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def write_features(path: Path, rows: int, dim: int, rank: int, row_group: int, seed: int = 0) -> None:
    """(rows, dim) float32 features written chunk by chunk, never whole in memory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, rank)))  # (dim, rank)
    scales = np.geomspace(10.0, 0.5, rank)
    offset = rng.standard_normal(dim) * 3.0
    schema = pa.schema([("x", pa.list_(pa.float32(), dim))])
    with pq.ParquetWriter(path, schema) as w:
        for start in range(0, rows, row_group):
            n = min(row_group, rows - start)
            x = (rng.standard_normal((n, rank)) * scales) @ basis.T  # (n, dim)
            x += 0.05 * rng.standard_normal((n, dim)) + offset
            flat = pa.array(x.astype(np.float32).reshape(-1))
            w.write_table(pa.table({"x": pa.FixedSizeListArray.from_arrays(flat, dim)}))


def _to_numpy(column, dim: int) -> np.ndarray:
    """FixedSizeList<float32>[dim] column -> (n, dim) float32 view (zero-copy without nulls)."""
    return column.flatten().to_numpy().reshape(-1, dim)


def _batches(path: Path, dim: int, chunk: int, pre_buffer: bool):
    import pyarrow.parquet as pq

    # pre_buffer=False: pyarrow's default (True) buffers every row group's bytes up front,
    # so iter_batches' memory grows with the file, which defeats streaming.
    for rb in pq.ParquetFile(path, pre_buffer=pre_buffer).iter_batches(batch_size=chunk, columns=["x"]):
        yield _to_numpy(rb.column(0), dim)  # (<=chunk, dim) float32


def run_read(path: Path, dim: int, chunk: int) -> dict:
    """The I/O floor: decode the chunks and touch them, no PCA."""
    import pyarrow as pa

    t0 = time.perf_counter()
    rows = 0
    for x in _batches(path, dim, chunk, pre_buffer=False):
        rows += x.shape[0]
        x.sum()
    return {"rows": rows, "seconds": time.perf_counter() - t0,
            "arrow_peak_mb": pa.default_memory_pool().max_memory() / 2**20, "top_ev": None, "dims": None}


def run_stream(path: Path, dim: int, chunk: int, pre_buffer: bool = False) -> dict:
    import pyarrow as pa

    from nexus_assets.core.pca import fit_streaming_pca

    def batches():
        yield from _batches(path, dim, chunk, pre_buffer)

    t0 = time.perf_counter()
    res = fit_streaming_pca(batches(), TOP, layer="bench", teacher="synthetic")
    seconds = time.perf_counter() - t0
    return {
        "rows": res.n_rows,
        "seconds": seconds,
        "arrow_peak_mb": pa.default_memory_pool().max_memory() / 2**20,
        "top_ev": res.explained_variance[:TOP].tolist(),
        "dims": {str(k): v for k, v in res.intrinsic_dims().items()},
    }


def run_svd(path: Path, dim: int) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from nexus_assets.core.pca import intrinsic_dimension

    t0 = time.perf_counter()
    table = pq.read_table(path, columns=["x"])
    x = torch.from_numpy(_to_numpy(table.column(0).combine_chunks(), dim))  # (rows, dim) float32
    xc = x - x.mean(0)
    s = torch.linalg.svd(xc, full_matrices=False).S  # U (rows, dim) is materialised too
    ev = (s.double() ** 2 / (x.shape[0] - 1)).numpy()
    seconds = time.perf_counter() - t0
    return {
        "rows": int(x.shape[0]),
        "seconds": seconds,
        "arrow_peak_mb": pa.default_memory_pool().max_memory() / 2**20,
        "top_ev": ev[:TOP].tolist(),
        "dims": {str(k): v for k, v in intrinsic_dimension(ev / ev.sum()).items()},
    }


def child(args) -> None:
    """One measured case; prints one JSON line."""
    import pyarrow  # noqa: F401  (imports before the RSS baseline)
    import torch

    from nexus_assets.core import pca  # noqa: F401

    torch.set_num_threads(args.threads)
    rss0 = _rss_kb("VmRSS")
    tracemalloc.start()
    if args.case == "svd":
        out = run_svd(args.file, args.dim)
    elif args.case == "read":
        out = run_read(args.file, args.dim, args.chunk)
    else:
        out = run_stream(args.file, args.dim, args.chunk, pre_buffer=args.case == "stream-prebuf")
    _, tm_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out.update(
        rss_start_mb=rss0 / 1024,
        peak_rss_mb=_rss_kb("VmHWM") / 1024,
        tracemalloc_peak_mb=tm_peak / 2**20,
    )
    print(json.dumps(out))


def measure(case: str, file: Path, dim: int, threads: int, repeat: int, chunk: int = 0) -> dict:
    """Best time of `repeat` fresh subprocesses (shared machines are noisy); worst memory."""
    runs = []
    for _ in range(repeat):
        cmd = [sys.executable, __file__, "--child", case, "--file", str(file), "--dim", str(dim),
               "--chunk", str(chunk), "--threads", str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"case {case} chunk {chunk} failed:\n{proc.stderr}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    best = min(runs, key=lambda r: r["seconds"])
    for key in ("arrow_peak_mb", "tracemalloc_peak_mb"):
        best[key] = max(r[key] for r in runs)
    best["rss_growth_mb"] = max(r["peak_rss_mb"] - r["rss_start_mb"] for r in runs)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=576)
    p.add_argument("--rank", type=int, default=48, help="rank of the synthetic signal")
    p.add_argument("--row-group", type=int, default=4096)
    p.add_argument("--chunks", type=int, nargs="+", default=[1000, 4000, 16000])
    p.add_argument("--threads", type=int, default=2, help="torch threads in each case")
    p.add_argument("--repeat", type=int, default=3, help="runs per case; the best time is reported")
    p.add_argument("--child", choices=["stream", "stream-prebuf", "read", "svd"], help=argparse.SUPPRESS)
    p.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.case = args.child
        child(args)
        return

    with tempfile.TemporaryDirectory(prefix="nexus-bench-") as tmp:
        path = Path(tmp) / "features.parquet"
        t0 = time.perf_counter()
        write_features(path, args.rows, args.dim, args.rank, args.row_group)
        data_mb = args.rows * args.dim * 4 / 2**20
        print(f"wrote {args.rows} x {args.dim} float32 ({data_mb:.0f} MiB raw, "
              f"{path.stat().st_size / 2**20:.0f} MiB parquet) in {time.perf_counter() - t0:.1f} s; "
              f"python {sys.version.split()[0]}, {args.threads} threads")
        m = lambda case, c=0: measure(case, path, args.dim, args.threads, args.repeat, c)  # noqa: E731
        base = m("svd")
        cases = [("svd (baseline)", base)] + [(f"stream/{c}", m("stream", c)) for c in args.chunks]
        c = args.chunks[0]
        cases += [(f"prebuf/{c}", m("stream-prebuf", c)), (f"read-only/{c}", m("read", c))]

    ref = np.array(base["top_ev"])
    head = (f"{'case':<16}{'seconds':>9}{'rows/s':>11}{'peakRSS+MB':>12}{'tracemal MB':>12}"
            f"{'arrow MB':>10}{'x speed':>9}{'x RSS':>8}{'ev_err':>10}  dims 90/95/99")
    print(head)
    print("-" * len(head))
    base_rss = base["rss_growth_mb"]
    for name, r in cases:
        rss = r["rss_growth_mb"]
        err = f"{np.max(np.abs(np.array(r['top_ev']) - ref) / ref):.1e}" if r["top_ev"] else "-"
        d = r["dims"]
        dims = f"{d['0.9']}/{d['0.95']}/{d['0.99']}" if d else "-"
        print(f"{name:<16}{r['seconds']:>9.2f}{r['rows'] / r['seconds']:>11.0f}{rss:>12.1f}"
              f"{r['tracemalloc_peak_mb']:>12.1f}{r['arrow_peak_mb']:>10.1f}"
              f"{base['seconds'] / r['seconds']:>9.2f}{rss / base_rss:>8.3f}{err:>10}  {dims}")
    print(f"best of {args.repeat} runs per case. x speed = baseline seconds / case seconds; "
          "x RSS = case peak RSS growth / baseline's")


if __name__ == "__main__":
    main()
