"""The frozen-feature cache: teacher outputs as chunked, zstd Parquet, resumable chunk by chunk.

Layout of one cache entry (`<teacher dir>/<cache_key>/`):
  items-00000.parquet   one row per probe item: row_id, split, embeddings / logits / pooled hidden layers
  tokens-00000.parquet  one row per token (LMs, ASR decoders): row_id, position, top-k logits, logsumexp, ...
  chunk-00000.json      written last, atomically: the chunk is complete only if this exists and matches
  manifest.json         written when every chunk is complete
The cache key covers teacher hash + data hash + extraction config, so a change to any of them lands in a
new entry and stale features are never reused.

Sampled per-token layers (`token_hidden_fraction`): the per-token hidden layers are 80% of an LM token
row even in float16 (1,152 of ~1,400 B for SmolLM2) and only profiling reads them (a PCA needs tens of
thousands of tokens, not every token), so they can go to their own table, token_hidden-00000.parquet
(row_id, position, hidden.*), for a seeded fraction of the items (all of an item's tokens or none).
The tokens table then holds what students and validation read: top-k, logsumexp, ids.

Compact storage: the bulk of a token row (its per-token hidden layers) is written as float16
(`compact=True`, what extract_teacher_features uses) and widened back to float32 by every reader here
(`read_features`, `iter_matrix`, `column_matrix`), so consumers see the same column names, shapes and
float32 dtype either way. A column whose values exceed float16's range stays float32 in that chunk.
Per-token state scores (`state.<layer>`) may instead be stored in 4 or 8 bits (`extraction.state_bits`,
core/quantized_scores.py): uint8 codes plus a `state_scale.<layer>` column, decoded back to float32 scores by
the same readers with the entry's state basis (`decode_states`). The sampled per-token hidden layers may be
stored likewise in 8 or 4 bits (`extraction.hidden_sample_bits`, encoded per chunk: `hidden_code_columns`): uint8
codes, a `hidden_scale.<layer>` column, and the chunk's per-dimension mean and scale in the code field's metadata,
decoded back to float32 by `read_features` and `iter_matrix` (`decode_hidden`). They only feed profiling's PCA.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_path, sha256_file, sha256_json, write_json
from .quantized_scores import bits_of, code_width, component_scale, dequantize_scores, quantize_scores

MANIFEST = "manifest.json"
CURRENT = "current.json"
STATE_BASIS = "state_basis.safetensors"  # the PCA basis of an entry's cached per-token states (state_layers)
STATE, STATE_SCALE = "state.", "state_scale."  # per-token state scores; their block scales when quantized
HIDDEN, HIDDEN_SCALE = "hidden.", "hidden_scale."  # cached hidden layers; the sample's block scales when quantized


class FeatureCacheError(RuntimeError):
    """Feature data is missing, corrupt or non-finite; the message names teacher, file and column."""


def cache_key(teacher_hash: str, data_hash: str, extraction: dict, code_version: str) -> str:
    return sha256_json({"teacher": teacher_hash, "data": data_hash, "extraction": extraction,
                        "code": code_version})[:16]


FLOAT16_SAFE = 65000.0  # float16 tops out at 65504


# Top-k logits stay float32 unless this is set: float16's step is 4.9e-4 at 0.5 and 0.016 at 20, while
# the cache promises 1e-4 agreement with a direct forward (teachers test); at k=32 they are 128 B/token.
HALF_TOPK_LOGITS = False


def is_compact_column(name: str) -> bool:
    """Token-table columns stored as float16 in a compact cache: the per-token hidden layers (the bulk:
    2,304 B/token float32 for SmolLM2's 576-d layer), their PCA scores ("state."), and top-k logits if
    HALF_TOPK_LOGITS."""
    return name.startswith(("hidden.", STATE, STATE_SCALE)) or (HALF_TOPK_LOGITS and name == "topk_logits")


def _column(values: Any, half: bool = False) -> pa.Array:
    """numpy (N,) -> plain column; (N, D) -> fixed-size list column (cheap to read back as a matrix), or
    fixed-size binary for uint8 codes (a list of bytes would cost Parquet ~3 bits of levels per byte: 4-bit state
    codes measured 82 B a layer and token as a list against 64 raw). half: store float32 values as float16 when
    they fit its range."""
    if isinstance(values, list):
        return pa.array(values)
    arr = np.asarray(values)
    if half and arr.dtype == np.float32 and (arr.size == 0 or float(np.abs(arr).max()) < FLOAT16_SAFE):
        arr = arr.astype(np.float16)
    if arr.ndim == 1:
        return pa.array(arr)
    if arr.ndim == 2 and arr.dtype == np.uint8:  # quantized codes: fixed-width bytes, no per-element levels
        return pa.FixedSizeBinaryArray.from_buffers(pa.binary(arr.shape[1]), len(arr),
                                                    [None, pa.py_buffer(np.ascontiguousarray(arr).tobytes())])
    flat = pa.array(arr.reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, int(np.prod(arr.shape[1:])))


def _widen_type(t: pa.DataType) -> pa.DataType:
    if pa.types.is_float16(t):
        return pa.float32()
    if pa.types.is_fixed_size_list(t) and pa.types.is_float16(t.value_type):
        return pa.list_(pa.float32(), t.list_size)
    return t


def widen(table: pa.Table | pa.RecordBatch):
    """float16 columns (compact cache) -> float32, every other column untouched."""
    schema = table.schema
    wide = pa.schema([f.with_type(_widen_type(f.type)) for f in schema], metadata=schema.metadata)
    return table if wide.equals(schema) else table.cast(wide)


def sampled_items(row_ids: Sequence[str], fraction: float) -> np.ndarray:
    """(n,) bool: the items whose per-token hidden layers are kept, a pure function of the row id (so a
    resumed or re-chunked run keeps the same ones)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"token_hidden_fraction must lie in (0, 1], got {fraction}")
    cut = fraction * 2**32
    return np.array([int(hashlib.sha256(r.encode()).hexdigest()[:8], 16) < cut for r in row_ids], dtype=bool)


def hidden_code_columns(name: str, values: np.ndarray, bits: int, fit_rows: np.ndarray | None = None
                        ) -> list[tuple[pa.Field, pa.Array]]:
    """A sampled hidden layer `hidden.<layer>` (N, D) -> [(its code field, codes), (`hidden_scale.<layer>`,
    block scales)] at `bits` bits.

    A raw layer has no basis, and an LM's residual stream has a few channels ~30-1,000x the rest on every
    token: on one grid they would set their block's step for the 31 dimensions beside them. So each dimension
    is first centred and divided by its standard deviation over the rows (`fit_rows`, a mask: the attention
    sink's tokens are left out, they would set the statistics), then each 32 of a token's dimensions get their
    own absmax (core/quantized_scores.py). Mean and scale ride in the code field's metadata (float32, ~4.6 kB a
    576-d layer and chunk), so a chunk file decodes alone (`decode_hidden`)."""
    x = np.asarray(values, np.float32)
    if x.ndim != 2:
        raise ValueError(f"hidden column {name!r} must be (N, D), got {x.shape}")
    fit = x if fit_rows is None or not np.any(fit_rows) else x[np.asarray(fit_rows, bool)]
    mean = fit.mean(axis=0, dtype=np.float64).astype(np.float32) if len(fit) else np.zeros(x.shape[1], np.float32)
    scale = component_scale(fit.var(axis=0, dtype=np.float64) if len(fit) else np.ones(x.shape[1]))
    codes, block_scales = quantize_scores(x - mean, scale, bits)
    meta = {b"dims": str(x.shape[1]).encode(), b"bits": str(bits).encode(),
            b"mean": base64.b64encode(mean.tobytes()), b"scale": base64.b64encode(scale.tobytes())}
    code, scales = _column(codes), _column(block_scales, half=True)
    layer = name[len(HIDDEN):]
    return [(pa.field(name, code.type, metadata=meta), code), (pa.field(HIDDEN_SCALE + layer, scales.type), scales)]


def decode_hidden(table: pa.Table, source: Path | str = "?") -> pa.Table:
    """A table whose quantized `hidden.<layer>` columns (codes + `hidden_scale.<layer>`) are replaced by their
    float32 values; float columns pass through."""
    for name in [n for n in table.column_names if n.startswith(HIDDEN)]:
        field = table.schema.field(name)
        if not code_bytes(field.type):
            continue
        meta = field.metadata or {}
        scale_name = HIDDEN_SCALE + name[len(HIDDEN):]
        if not {b"dims", b"bits", b"mean", b"scale"} <= set(meta) or scale_name not in table.column_names:
            raise FeatureCacheError(f"{source}: quantized column {name!r} needs its {scale_name!r} column and its "
                                    "dims / bits / mean / scale field metadata")
        dims, bits = int(meta[b"dims"]), int(meta[b"bits"])
        mean = np.frombuffer(base64.b64decode(meta[b"mean"]), np.float32)
        scale = np.frombuffer(base64.b64decode(meta[b"scale"]), np.float32)
        if mean.shape != (dims,) or scale.shape != (dims,):
            raise FeatureCacheError(f"{source}: column {name!r}: mean / scale metadata of {mean.shape} / "
                                    f"{scale.shape} values for {dims} dims")
        width, groups = code_width(dims, bits)
        if code_bytes(field.type) != width:
            raise FeatureCacheError(f"{source}: column {name!r}: {code_bytes(field.type)} code bytes a row, "
                                    f"{width} expected for {dims} dims at {bits} bits")
        codes = code_matrix(table.column(name), width)
        scales = column_matrix(table.column(scale_name)).reshape(len(codes), groups)
        values = dequantize_scores(codes, scales, scale, bits) + mean
        i = table.column_names.index(name)
        table = table.set_column(i, name, _column(values))
        table = table.drop_columns([scale_name])
    return table


def outputs_to_tables(row_ids: Sequence[str], splits: Sequence[str], outputs, teacher: str,
                      compact: bool = False, token_hidden_fraction: float | None = None
                      ) -> tuple[pa.Table, pa.Table | None, pa.Table | None]:
    """Turn one batch's TeacherOutputs into (items, tokens, token_hidden) tables keyed by row_id; compact
    stores the token table's top-k logits and hidden layers as float16. token_hidden_fraction: move the
    per-token hidden layers into the token_hidden table, for that fraction of the items only (None: they
    stay in the tokens table, every item, and token_hidden is None)."""
    for name, v in {**outputs.items, **(outputs.tokens or {})}.items():
        if not isinstance(v, list) and not np.isfinite(np.asarray(v)).all():
            raise FeatureCacheError(f"teacher {teacher!r}: non-finite values in output {name!r} for rows "
                                    f"{list(row_ids)[:3]}...")
    items = {"row_id": pa.array(list(row_ids)), "split": pa.array(list(splits))}
    items.update({name: _column(v) for name, v in outputs.items.items()})
    tokens = hidden = None
    if outputs.tokens is not None:
        idx = np.asarray(outputs.tokens["item_index"])
        cols = {"row_id": pa.array([row_ids[i] for i in idx])}
        split_off = {}
        for name, v in outputs.tokens.items():
            if name == "item_index":
                continue
            if token_hidden_fraction is not None and name.startswith("hidden."):
                split_off[name] = np.asarray(v)
                continue
            cols[name] = _column(v, half=compact and is_compact_column(name))
        tokens = pa.table(cols)
        if split_off:
            keep = sampled_items(row_ids, token_hidden_fraction)[idx]  # per token row: its item's draw
            hcols = {"row_id": pa.array([row_ids[i] for i in idx[keep]], type=pa.string())}
            if "position" in outputs.tokens:
                hcols["position"] = pa.array(np.asarray(outputs.tokens["position"])[keep])
            hcols.update({name: _column(v[keep], half=compact) for name, v in split_off.items()})
            hidden = pa.table(hcols)
    return pa.table(items), tokens, hidden


@dataclass
class ChunkPlan:
    index: int
    start: int
    stop: int


def _chunk_files(folder: Path, i: int) -> dict[str, Path]:
    return {"items": folder / f"items-{i:05d}.parquet", "tokens": folder / f"tokens-{i:05d}.parquet",
            "token_hidden": folder / f"token_hidden-{i:05d}.parquet", "marker": folder / f"chunk-{i:05d}.json"}


def chunk_marker(folder: Path, i: int) -> Path:
    """Chunk i's marker: it lists the chunk's files and lands last, so a chunk exists from it on."""
    return _chunk_files(folder, i)["marker"]


def chunk_is_complete(folder: Path, i: int) -> bool:
    """A chunk counts only if its marker exists and every file it lists has the recorded size and hash:
    a truncated or garbage chunk file is detected here and redone on resume."""
    files = _chunk_files(folder, i)
    if not files["marker"].exists():
        return False
    try:
        marker = json.loads(files["marker"].read_text())
        for kind, meta in marker["files"].items():
            p = folder / meta["file"]
            if not p.exists() or p.stat().st_size != meta["bytes"] or sha256_file(p) != meta["sha256"]:
                return False
    except (ValueError, KeyError, OSError):
        return False
    return True


def write_chunk(folder: Path, i: int, items: pa.Table, tokens: pa.Table | None,
                token_hidden: pa.Table | None = None) -> dict:
    files = _chunk_files(folder, i)
    meta: dict[str, Any] = {"index": i, "rows": items.num_rows, "files": {}}
    for kind, table in (("items", items), ("tokens", tokens), ("token_hidden", token_hidden)):
        if table is not None:
            meta["files"][kind] = _write_table(files[kind], table)
    write_json(files["marker"], meta)  # last: the chunk exists for readers only from here on
    return meta


def _write_table(path: Path, table: pa.Table) -> dict:
    """One chunk file, atomically; its entry in the chunk marker."""
    with atomic_path(path) as tmp:
        # dictionary pages only for strings (row ids, splits): on float and id columns they never pay
        # off, cost ~8% of a token table's bytes and double the write time (measured, SmolLM2 tokens)
        strings = [f.name for f in table.schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
        pq.write_table(table, tmp, compression="zstd", use_dictionary=strings)
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path), "rows": table.num_rows}


def link_file(src: Path, dst: Path) -> None:
    """Entries are immutable (every file lands by an atomic rename), so a hard link shares it safely."""
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)


def recode_chunk(src: Path, dst: Path, i: int, basis: dict, bits: int | None,
                 hidden_bits: int | None = None) -> dict:
    """Chunk i of entry `src` into entry `dst` with its state scores re-encoded at `bits` (`encode_states`) and
    its hidden sample at `hidden_bits` (`encode_hidden`); None leaves that table as it is: a file not rewritten
    is linked, the marker lands last."""
    marker = json.loads(chunk_marker(src, i).read_text())
    meta = {**marker, "files": {}}
    for kind, m in marker["files"].items():
        path = src / m["file"]
        if kind == "tokens" and bits is not None:
            meta["files"][kind] = _write_table(Path(dst) / m["file"], encode_states(pq.read_table(path), basis,
                                                                                    bits, path))
        elif kind == "token_hidden" and hidden_bits is not None:
            meta["files"][kind] = _write_table(Path(dst) / m["file"], encode_hidden(pq.read_table(path),
                                                                                    hidden_bits, path))
        else:
            link_file(path, Path(dst) / m["file"])
            meta["files"][kind] = m
    write_json(chunk_marker(dst, i), meta)
    return meta


def encode_hidden(table: pa.Table, bits: int, source: Path | str = "?") -> pa.Table:
    """A hidden-sample table -> the same table with its `hidden.<layer>` columns at `bits` (16: float16; 8 / 4:
    `hidden_code_columns`); codes are decoded first, so any stored width can be re-encoded."""
    table = decode_hidden(widen(table), source)
    fit = None  # the statistics leave out the attention sink (position 0), as profiling does
    if "position" in table.column_names:
        fit = table.column("position").to_numpy() > 0
    for name in [n for n in table.column_names if n.startswith(HIDDEN)]:
        values = column_matrix(table.column(name))
        i = table.column_names.index(name)
        table = table.remove_column(i)
        if bits == 16:
            table = table.add_column(i, name, _column(values, half=True))
            continue
        for j, (field, col) in enumerate(hidden_code_columns(name, values, bits, fit)):
            table = table.add_column(i + j, field, col)
    return table


def cache_features(
    forward: Callable[[list[dict]], Any],
    rows: pa.Table,
    folder: Path,
    *,
    teacher: str,
    batch_size: int,
    chunk_rows: int,
    input_columns: Sequence[str],
    manifest_extra: dict | None = None,
    log: Callable[[str], None] = print,
    compact: bool = False,
    token_hidden_fraction: float | None = None,
    hidden_sample_bits: int = 16,
    batch_by: Callable[[dict], float] | None = None,
) -> dict:
    """Run `forward` over every probe row, chunk by chunk, resuming from the last complete chunk.

    rows: the probe table (row_id, split, + the input columns). compact: token top-k logits and hidden
    layers as float16 (read back as float32). token_hidden_fraction: per-token hidden layers in their own
    table for that fraction of the items (module docstring), at hidden_sample_bits (16: float16 when compact;
    8 / 4: codes). batch_by: a row's length (e.g. its characters):
    rows of a chunk are batched in that order, so a padded batch holds rows of like length and pads little;
    the chunk's tables keep the probe's row order. Returns the manifest.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with _entry_lock(folder, teacher, log):
        return _cache_features_locked(forward, rows, folder, teacher=teacher, batch_size=batch_size,
                                      chunk_rows=chunk_rows, input_columns=input_columns,
                                      manifest_extra=manifest_extra, log=log, compact=compact,
                                      token_hidden_fraction=token_hidden_fraction,
                                      hidden_sample_bits=hidden_sample_bits, batch_by=batch_by)


@contextlib.contextmanager
def _entry_lock(folder: Path, teacher: str, log):
    """One writer per cache entry: a second run of the same partition waits, then finds the chunks done.
    (Without it, two writers could interleave rename and marker and leave a marker over the other's file.)"""
    import fcntl

    with open(folder / "writer.lock", "w") as fh:  # a lock, not a temp file: it stays, empty
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"[{teacher}] another run is caching {folder.name}; waiting for it")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _in_row_order(table: pa.Table | None, order: dict[str, int]) -> pa.Table | None:
    """`table`'s rows sorted by their row_id's place in `order` (stable: a row's tokens keep their order)."""
    if table is None or table.num_rows == 0:
        return table
    key = np.array([order[r] for r in table.column("row_id").to_pylist()])
    return table.take(pa.array(np.argsort(key, kind="stable")))


def _cache_features_locked(forward, rows, folder, *, teacher, batch_size, chunk_rows, input_columns,
                           manifest_extra, log, compact, token_hidden_fraction, hidden_sample_bits=16,
                           batch_by=None) -> dict:
    n = rows.num_rows
    plans = [ChunkPlan(i, s, min(s + chunk_rows, n)) for i, s in enumerate(range(0, n, chunk_rows))]
    done = [p.index for p in plans if chunk_is_complete(folder, p.index)]
    if done:
        log(f"[{teacher}] resuming: {len(done)}/{len(plans)} chunks already complete")
    t0, processed = time.time(), 0
    chunks = []
    for p in plans:
        if p.index in done:
            chunks.append(json.loads(_chunk_files(folder, p.index)["marker"].read_text()))
            continue
        part = rows.slice(p.start, p.stop - p.start).select(["row_id", "split", *input_columns]).to_pylist()
        order = {r["row_id"]: i for i, r in enumerate(part)}
        run = sorted(part, key=batch_by) if batch_by is not None else part  # stable: ties keep row order
        item_tables, token_tables, hidden_tables = [], [], []
        for b in range(0, len(run), batch_size):
            batch = run[b:b + batch_size]
            out = forward(batch)
            it, tk, th = outputs_to_tables([r["row_id"] for r in batch], [r["split"] for r in batch], out, teacher,
                                           compact=compact, token_hidden_fraction=token_hidden_fraction)
            item_tables.append(it)
            if tk is not None:
                token_tables.append(tk)
            if th is not None:
                hidden_tables.append(th)
        items = _concat(item_tables)
        tokens = _concat(token_tables) if token_tables else None
        hidden = _concat(hidden_tables) if hidden_tables else None
        if hidden is not None and hidden_sample_bits < 16:  # per chunk: its codes carry the chunk's statistics
            hidden = encode_hidden(hidden, hidden_sample_bits, _chunk_files(folder, p.index)["token_hidden"])
        if batch_by is not None:
            items, tokens, hidden = (_in_row_order(t, order) for t in (items, tokens, hidden))
        chunks.append(write_chunk(folder, p.index, items, tokens, hidden))
        processed += len(part)
        rate = processed / max(time.time() - t0, 1e-9)
        log(f"[{teacher}] chunk {p.index + 1}/{len(plans)}: {p.stop}/{n} rows, {rate:.1f} rows/s")
    manifest = {
        "teacher": teacher,
        "rows": n,
        "chunks": len(plans),
        "token_rows": sum(c["files"].get("tokens", {}).get("rows", 0) for c in chunks),
        "bytes": sum(m["bytes"] for c in chunks for m in c["files"].values()),
        "token_bytes": sum(c["files"].get("tokens", {}).get("bytes", 0) for c in chunks),
        "token_hidden_bytes": sum(c["files"].get("token_hidden", {}).get("bytes", 0) for c in chunks),
        "token_hidden_rows": sum(c["files"].get("token_hidden", {}).get("rows", 0) for c in chunks),
        "token_hidden_fraction": token_hidden_fraction,
        "hidden_sample_bits": hidden_sample_bits,
        "compact": compact,
        "content_hash": sha256_json([sorted((k, m["sha256"]) for k, m in c["files"].items()) for c in chunks]),
        "seconds_this_run": round(time.time() - t0, 2),
        "rows_computed_this_run": processed,
        **(manifest_extra or {}),
    }
    write_json(folder / MANIFEST, manifest)
    write_json(folder.parent / CURRENT, {"cache_key": folder.name, "content_hash": manifest["content_hash"]})
    return manifest


def _concat(tables: list[pa.Table]) -> pa.Table:
    """Batches of one chunk; if a batch kept a compact column float32 (values beyond float16's range), the
    whole chunk keeps it float32."""
    if all(t.schema.equals(tables[0].schema) for t in tables[1:]):
        return pa.concat_tables(tables)
    return pa.concat_tables([widen(t) for t in tables])


def current_entry(teacher_dir: Path) -> Path:
    """The cache entry the last successful materialization pointed at."""
    cur = Path(teacher_dir) / CURRENT
    if not cur.exists():
        raise FeatureCacheError(f"{teacher_dir}: no features cached; materialize teacher_features first")
    entry = Path(teacher_dir) / json.loads(cur.read_text())["cache_key"]
    if not (entry / MANIFEST).exists():
        raise FeatureCacheError(f"{entry}: feature cache incomplete ({MANIFEST} missing)")
    return entry


def read_features(entry: Path, kind: str = "items", columns: list[str] | None = None,
                  filter_splits: Sequence[str] | None = None) -> pa.Table:
    """One kind of table of a cache entry; `filter_splits` keeps only rows of those probe splits (the split
    column is read for it even when `columns` leaves it out, and then dropped again)."""
    files = sorted(Path(entry).glob(f"{kind}-*.parquet"))
    if not files:
        raise FeatureCacheError(f"{entry}: no {kind} chunks")
    read_cols = columns
    names = pq.read_schema(files[0]).names
    if filter_splits is not None and columns is not None and "split" not in columns:
        read_cols = [*columns, "split"] if "split" in names else columns
    if read_cols is not None:  # a quantized state column is read with its scales
        read_cols = with_scale_columns(read_cols, names)
    basis = _entry_basis(Path(entry)) if any(n.startswith(STATE_SCALE) for n in read_cols or names) else None
    table = pa.concat_tables(decode_hidden(decode_states(widen(pq.read_table(f, columns=read_cols)), basis, f), f)
                             for f in files)
    if filter_splits is not None and "split" in table.column_names:
        import pyarrow.compute as pc

        table = table.filter(pc.is_in(table["split"], pa.array(list(filter_splits))))
        if columns is not None and "split" not in columns:
            table = table.drop_columns(["split"])
    return table


def iter_matrix(entry: Path, column: str, kind: str = "items", batch_rows: int = 4096,
                teacher: str = "?", splits: Sequence[str] | None = None,
                min_position: int = 0) -> Iterator[np.ndarray]:
    """Stream one feature column as float32 (n, D) blocks, never holding every row in memory.

    splits: keep only rows of these probe splits (token rows are matched through their item's row_id),
    so statistics used for training never see held-out data. min_position drops early token rows: an
    LM's first position is an attention sink whose huge activations would swamp every other direction."""
    files = sorted(Path(entry).glob(f"{kind}-*.parquet"))
    if not files:
        raise FeatureCacheError(f"teacher {teacher!r}: {entry}: no {kind} chunks")
    keep = None
    if splits is not None:
        items = read_features(entry, "items", columns=["row_id", "split"], filter_splits=splits)
        keep = pa.array(sorted(set(items["row_id"].to_pylist())))
    for f in files:
        pf = pq.ParquetFile(f, pre_buffer=False)  # pre-buffering would load the whole chunk file
        if column not in pf.schema_arrow.names:
            raise FeatureCacheError(f"teacher {teacher!r}: layer/column {column!r} missing from {f}; "
                                    f"cached columns: {pf.schema_arrow.names}")
        coded = bool(code_bytes(pf.schema_arrow.field(column).type))
        if coded and not column.startswith(HIDDEN):
            raise FeatureCacheError(f"teacher {teacher!r}: {f}: column {column!r} holds quantized codes; read it "
                                    "with read_features, which decodes them")
        cols = [column, "row_id"] + (["position"] if min_position else [])
        cols += with_scale_columns([column], pf.schema_arrow.names)[1:] if coded else []
        for batch in pf.iter_batches(batch_size=batch_rows, columns=cols):
            batch = _filter_rows(batch, keep, min_position)
            if batch.num_rows:
                if coded:  # a quantized hidden sample: decode this block only
                    batch = decode_hidden(pa.Table.from_batches([batch]), f)
                yield column_matrix(batch.column(0))


def _filter_rows(batch, keep, min_position: int):
    import pyarrow.compute as pc

    if keep is not None:
        batch = batch.filter(pc.is_in(batch.column("row_id"), keep))
    if min_position:
        batch = batch.filter(pc.greater_equal(batch.column("position"), min_position))
    return batch


def count_rows(entry: Path, kind: str = "items", splits: Sequence[str] | None = None,
               min_position: int = 0) -> int:
    """Rows `iter_matrix` would yield with the same filters, reading only ids."""
    items = read_features(entry, "items", columns=["row_id", "split"], filter_splits=splits)
    if kind == "items":
        return items.num_rows
    cols = ["row_id"] + (["position"] if min_position else [])
    table = read_features(entry, kind, columns=cols)
    return _filter_rows(table, items["row_id"], min_position).num_rows


def column_matrix(col) -> np.ndarray:
    """Fixed-size-list column -> (n, D) float32 view without a Python loop (float16 widened to float32)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_fixed_size_list(col.type):
        out = col.values.to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
    else:
        out = col.to_numpy(zero_copy_only=False)
    return out.astype(np.float32) if out.dtype == np.float16 else out


def code_bytes(t: pa.DataType) -> int:
    """Bytes per row of a quantized-code column type (fixed-size binary, or a list of uint8 as the first 4-bit
    entries wrote), else 0."""
    if pa.types.is_fixed_size_binary(t):
        return t.byte_width
    if pa.types.is_fixed_size_list(t) and pa.types.is_uint8(t.value_type):
        return t.list_size
    return 0


def code_matrix(col, width: int) -> np.ndarray:
    """A code column -> (n, width) uint8 without a Python loop."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_fixed_size_binary(col.type):
        data = np.frombuffer(col.buffers()[1], np.uint8)
        return data[col.offset * width:(col.offset + len(col)) * width].reshape(len(col), width)
    return column_matrix(col).astype(np.uint8, copy=False)


def with_scale_columns(columns: Sequence[str], available: Sequence[str]) -> list[str]:
    """`columns` plus the block-scale column of each state or hidden column among them that has one in
    `available` (a quantized column is always read with its scales)."""
    scales = [STATE_SCALE + c[len(STATE):] for c in columns if c.startswith(STATE)]
    scales += [HIDDEN_SCALE + c[len(HIDDEN):] for c in columns if c.startswith(HIDDEN)]
    return [*columns, *(c for c in scales if c in available and c not in columns)]


def _entry_basis(entry: Path) -> dict:
    path = entry / STATE_BASIS
    if not path.exists():
        raise FeatureCacheError(f"{entry}: quantized state scores but no {STATE_BASIS} to decode them with")
    return load_state_basis(path)


def decode_states(table: pa.Table, basis: dict | None, source: Path | str = "?") -> pa.Table:
    """A table whose quantized `state.<layer>` columns (uint8 codes + `state_scale.<layer>`) are replaced by
    their float32 scores, decoded with `basis` (the entry's state basis: each component's scale is the
    square root of its variance, as at encoding); float16 / float32 state columns pass through."""
    for name in [n for n in table.column_names if n.startswith(STATE)]:
        width = code_bytes(table.schema.field(name).type)
        if not width:
            continue
        layer, scale_name = name[len(STATE):], STATE_SCALE + name[len(STATE):]
        if basis is None or layer not in basis or scale_name not in table.column_names:
            raise FeatureCacheError(f"{source}: quantized column {name!r} needs {scale_name!r} and layer "
                                    f"{layer!r} in the entry's {STATE_BASIS}")
        c = component_scale(basis[layer]["variances"])
        try:
            bits = bits_of(width, len(c))
        except ValueError as e:
            raise FeatureCacheError(f"{source}: column {name!r}: {e}") from e
        codes = code_matrix(table.column(name), width)
        scales = column_matrix(table.column(scale_name)).reshape(len(codes), code_width(len(c), bits)[1])
        values = dequantize_scores(codes, scales, c, bits)
        table = table.set_column(table.column_names.index(name), name, _column(values))
        table = table.drop_columns([scale_name])
    return table


def encode_states(table: pa.Table, basis: dict, bits: int, source: Path | str = "?") -> pa.Table:
    """A token table with float state scores (`state.<layer>`) -> the same table with them as `bits`-bit codes
    + `state_scale.<layer>`, as `lm_outputs` writes them at `extraction.state_bits`; codes are decoded first,
    so any stored width can be re-encoded (only ever to fewer bits: rounding twice loses nothing more)."""
    table = decode_states(table, basis, source)
    for name in [n for n in table.column_names if n.startswith(STATE)]:
        layer = name[len(STATE):]
        if layer not in basis:
            raise FeatureCacheError(f"{source}: column {name!r} has no layer {layer!r} in the entry's {STATE_BASIS}")
        codes, scales = quantize_scores(column_matrix(table.column(name)), component_scale(basis[layer]["variances"]),
                                        bits)
        i = table.column_names.index(name)
        table = table.set_column(i, name, _column(codes))
        table = table.add_column(i + 1, STATE_SCALE + layer, _column(scales, half=True))
    return table


def save_state_basis(basis: dict, path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({f"{layer}/{k}": v.contiguous() for layer, b in basis.items() for k, v in b.items()}, str(tmp))


def load_state_basis(path: Path) -> dict[str, dict]:
    """What `save_state_basis` wrote: {layer: {"mean", "components", "variances", "total_variance"}}."""
    from safetensors.torch import load_file

    try:
        flat = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - any reader failure is a corrupt file to the caller
        raise FeatureCacheError(f"{path}: unreadable state basis ({e})") from e
    basis: dict[str, dict] = {}
    for key, v in flat.items():
        layer, _, field = key.rpartition("/")
        basis.setdefault(layer, {})[field] = v
    need = {"mean", "components", "variances"}
    bad = sorted(layer for layer, b in basis.items() if not need <= set(b))
    if not basis or bad:
        raise FeatureCacheError(f"{path}: state basis lacks {sorted(need)} for layers {bad or 'all'}")
    return basis
