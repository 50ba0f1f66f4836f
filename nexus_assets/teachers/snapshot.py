"""Teacher snapshots: locate or fetch a teacher's weights file by file, hash every file, catalog every
tensor, and convert slow formats once. The snapshot folder is the only place teachers load from.

Files are linked (or stream-copied) one at a time, never all shards in memory; the folder appears
atomically, so a killed fetch leaves no half-snapshot where a reader would find it.
"""
from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import json
import os
import shutil
import struct
import time
from pathlib import Path
from typing import Callable

from nexus_assets.core.atomic import atomic_dir, atomic_path, sha256_file, sha256_json, write_json
from nexus_assets.core.registry import HfSource, PackageSource, PathSource, TeacherSpec
from nexus_assets.teachers.base import TeacherLoadError, family_module

MANIFEST = "manifest.json"
CATALOG = "catalog.parquet"


class SnapshotError(TeacherLoadError):
    """A snapshot file is missing or does not match its recorded hash; the message names the file."""


def _select(folder: Path, patterns: list[str]) -> list[Path]:
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    rel = [(p, str(p.relative_to(folder))) for p in files]
    return [p for p, r in rel if any(fnmatch.fnmatch(r, pat) or fnmatch.fnmatch(p.name, pat) for pat in patterns)]


def _resolve_locator(spec: TeacherSpec, src: PackageSource) -> Path:
    if src.locate is None:
        found = importlib.util.find_spec(src.package)
        if found is None or not found.submodule_search_locations:
            raise TeacherLoadError(
                f"teacher {spec.name!r}: field 'source.package': package {src.package!r} is not installed "
                f"(run scripts/setup.sh)"
            )
        return Path(list(found.submodule_search_locations)[0])
    module, _, attr = src.locate.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return Path(obj())
    except (ImportError, AttributeError) as e:
        raise TeacherLoadError(
            f"teacher {spec.name!r}: field 'source.locate': cannot resolve {src.locate!r}: {e}"
        ) from e


def locate_files(spec: TeacherSpec) -> tuple[Path, list[Path]]:
    """Return (source folder, selected files). For `hf` sources this fetches into the hub cache, file by
    file; with HF_HUB_OFFLINE=1 it reads only the local cache (and says so when the files are absent)."""
    src = spec.source
    if isinstance(src, PackageSource):
        loc = _resolve_locator(spec, src)
        folder = loc if loc.is_dir() else loc.parent
    elif isinstance(src, PathSource):
        folder = Path(src.path).expanduser()
        if not folder.is_dir():
            raise TeacherLoadError(f"teacher {spec.name!r}: field 'source.path': {folder} is not a folder")
    elif isinstance(src, HfSource):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        try:
            folder = Path(snapshot_download(
                src.repo_id, revision=src.revision, allow_patterns=src.files, local_files_only=offline
            ))
        except LocalEntryNotFoundError as e:
            raise TeacherLoadError(
                f"teacher {spec.name!r}: {src.repo_id}@{src.revision} is not in the local hub cache and "
                f"HF_HUB_OFFLINE is set: {e}"
            ) from e
    else:  # pragma: no cover - the registry's discriminated union makes this unreachable
        raise TeacherLoadError(f"teacher {spec.name!r}: unknown source {src!r}")
    files = _select(folder, src.files)
    if not files:
        raise TeacherLoadError(f"teacher {spec.name!r}: no files in {folder} match source.files {src.files}")
    return folder, files


def _link_or_copy(src: Path, dst: Path, link: bool) -> None:
    """Hard-link hub-cache blobs (immutable; no second copy of a multi-GB shard), else stream-copy,
    so that nothing done to the snapshot can touch an installed package's files."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        if not link:
            raise OSError("copy requested")
        os.link(src.resolve(), dst)
    except OSError:
        with open(src, "rb") as fi, open(dst, "wb") as fo:
            shutil.copyfileobj(fi, fo, length=1 << 22)


def tensor_catalog(folder: Path, files: list[Path]) -> list[dict]:
    """One row per tensor: name, shape, dtype, file, bytes. Reads headers only, never tensor data."""
    rows: list[dict] = []
    for f in files:
        rel = str(f.relative_to(folder))
        if f.suffix == ".safetensors":
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                a, b = meta["data_offsets"]
                rows.append(dict(name=name, shape=list(meta["shape"]), dtype=meta["dtype"], file=rel, bytes=b - a))
        elif f.suffix == ".gguf":
            import gguf

            for t in gguf.GGUFReader(str(f)).tensors:
                rows.append(dict(name=t.name, shape=[int(x) for x in t.shape], dtype=t.tensor_type.name,
                                 file=rel, bytes=int(t.n_bytes)))
        elif f.suffix in (".pt", ".pth", ".bin") and f.name != "model.bin":
            import torch

            try:  # mmap keeps big checkpoints out of RAM; legacy (non-zip) files cannot be mapped
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:
                state = torch.load(f, map_location="cpu", weights_only=True)
            state = state.get("model_state", state) if isinstance(state, dict) else state
            for name, t in state.items():
                if hasattr(t, "shape"):
                    rows.append(dict(name=name, shape=list(t.shape), dtype=str(t.dtype).replace("torch.", ""),
                                     file=rel, bytes=t.numel() * t.element_size()))
    return rows


def build_snapshot(spec: TeacherSpec, out_dir: Path, log: Callable[[str], None] = print) -> dict:
    """Materialize `out_dir` for one teacher: files, manifest (sha256 per file), tensor catalog, conversion."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t0 = time.time()
    folder, files = locate_files(spec)
    reused = _reuse_existing(spec, out_dir, folder, files)
    if reused is not None:
        log(f"[{spec.name}] snapshot {reused['content_hash'][:12]} unchanged (source files hash the same, "
            f"every snapshot file verified): conversion skipped")
        return reused
    with atomic_dir(out_dir) as tmp:
        entries = []
        for i, f in enumerate(files, 1):
            rel = f.relative_to(folder)
            _link_or_copy(f, tmp / rel, link=isinstance(spec.source, HfSource))
            digest = sha256_file(tmp / rel)
            entries.append({"file": str(rel), "sha256": digest, "bytes": (tmp / rel).stat().st_size})
            log(f"[{spec.name}] file {i}/{len(files)} {rel}: {entries[-1]['bytes'] / 1e6:.1f} MB sha256 {digest[:12]}")
        conv = family_module(spec).convert(spec, tmp)
        derived = [{"file": r, "sha256": sha256_file(tmp / r), "bytes": (tmp / r).stat().st_size}
                   for r in conv.files if (tmp / r).is_file()]
        weight_files = [tmp / e["file"] for e in entries + derived]
        catalog = tensor_catalog(tmp, weight_files)
        with atomic_path(tmp / CATALOG) as cat_tmp:
            pq.write_table(pa.Table.from_pylist(catalog, schema=pa.schema([
                ("name", pa.string()), ("shape", pa.list_(pa.int64())), ("dtype", pa.string()),
                ("file", pa.string()), ("bytes", pa.int64())])), cat_tmp)
        content_hash = sha256_json(sorted((e["file"], e["sha256"]) for e in entries))
        manifest = {
            "teacher": spec.name,
            "family": spec.family,
            "source": spec.source.model_dump(),
            "source_folder": str(folder),
            "files": entries,
            "derived_files": derived,
            "conversion": conv.info,
            "content_hash": content_hash,
            "weight_bytes": sum(e["bytes"] for e in entries),
            "tensors": len(catalog),
            "tensor_bytes": sum(r["bytes"] for r in catalog),
            "seconds": round(time.time() - t0, 2),
        }
        write_json(tmp / MANIFEST, manifest)
    log(f"[{spec.name}] snapshot {content_hash[:12]}: {len(entries)} files, {len(catalog)} tensors, "
        f"{manifest['weight_bytes'] / 1e6:.1f} MB in {manifest['seconds']} s")
    return manifest


def _reuse_existing(spec: TeacherSpec, out_dir: Path, folder: Path, files: list[Path]) -> dict | None:
    """The existing snapshot, if the source files hash exactly as recorded and it verifies; else None."""
    try:
        manifest = verify_snapshot(out_dir)
    except (SnapshotError, OSError, ValueError, KeyError):
        return None
    recorded = {e["file"]: e["sha256"] for e in manifest["files"]}
    current = {str(f.relative_to(folder)): f for f in files}
    if set(recorded) != set(current) or manifest.get("source") != spec.source.model_dump():
        return None
    if any(sha256_file(current[r]) != h for r, h in recorded.items()):
        return None
    return manifest


def read_manifest(snapshot_dir: Path) -> dict:
    path = Path(snapshot_dir) / MANIFEST
    if not path.exists():
        raise SnapshotError(f"snapshot {snapshot_dir}: {MANIFEST} missing; materialize teacher_snapshot first")
    return json.loads(path.read_text())


def verify_snapshot(snapshot_dir: Path) -> dict:
    """Re-hash every file against the manifest; a missing or corrupted file is named in the error."""
    manifest = read_manifest(snapshot_dir)
    for e in manifest["files"] + manifest["derived_files"]:
        path = Path(snapshot_dir) / e["file"]
        if not path.exists():
            raise SnapshotError(f"teacher {manifest['teacher']!r}: weight file {path} is missing")
        if path.stat().st_size != e["bytes"] or sha256_file(path) != e["sha256"]:
            raise SnapshotError(
                f"teacher {manifest['teacher']!r}: weight file {path} is corrupted "
                f"(sha256 differs from the snapshot manifest); re-materialize teacher_snapshot"
            )
    return manifest
