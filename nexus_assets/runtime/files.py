"""A bundle's files, read as if the bundle were hostile: every path stays inside the bundle, no symlink
is followed, the manifest is checked field by field, safetensors headers are checked before any tensor
is built, and what is loaded is exactly what was hashed.

Why: a bundle is something users download and hand to the runtime. Before issue 13 a manifest path
`../outside` loaded files from outside the bundle (and `info --verify` said "sha256 ok"), a `null`
manifest or a missing `sha256` crashed with a traceback, and files were hashed, then reopened to load
(a swap window). Each function here closes one of those; errors are `BundleError` naming file and field.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Mapping

from nexus_assets.core.paths import NAME_PATTERN

__all__ = ["BundleError", "MANIFEST", "read_manifest", "safe_rel", "check_no_symlinks", "read_checked",
           "hash_checked", "snapshot", "safetensors_header", "read_header", "parse_header", "header_shapes",
           "tree_files", "ADAPTER_NAME"]

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 << 20
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit for the JSON header
SHA256 = re.compile(r"^[0-9a-f]{64}$")
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a single folder name: `text_generate`
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
               "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}


class BundleError(RuntimeError):
    """A bundle or tower folder is missing, incomplete, corrupted or unsafe; the message names the file."""


# -- the manifest -------------------------------------------------------------------------------------


def safe_rel(rel: Any, where: str) -> str:
    """A relative POSIX path inside its root: no `..`, no absolute path, no empty or `.` parts, no NUL or
    backslash (a manifest tower path `../outside` used to load files outside the bundle)."""
    if not isinstance(rel, str) or not rel:
        raise BundleError(f"{where}: must be a non-empty relative path, got {rel!r}")
    p = PurePosixPath(rel)
    if p.is_absolute() or "\\" in rel or "\0" in rel or any(part in ("..", ".", "") for part in rel.split("/")):
        raise BundleError(f"{where}: path {rel!r} leaves the bundle or is not a plain relative path")
    return str(p)


def _entry(obj: Any, where: str) -> dict:
    if not isinstance(obj, dict):
        raise BundleError(f"{where}: must be an object, got {type(obj).__name__}")
    return obj


def _check_files(files: Any, mf: Path) -> None:
    for rel, f in _entry(files, f"{mf}: field 'files'").items():
        where = f"{mf}: field 'files[{rel!r}]'"
        safe_rel(rel, where)
        _entry(f, where)
        if "sha256" not in f:
            raise BundleError(f"{where}.sha256: missing")
        if not isinstance(f["sha256"], str) or not SHA256.match(f["sha256"]):
            raise BundleError(f"{where}.sha256: not a sha256 hex digest: {str(f['sha256'])[:80]!r}")
        if "bytes" in f and (isinstance(f["bytes"], bool) or not isinstance(f["bytes"], int) or f["bytes"] < 0):
            raise BundleError(f"{where}.bytes: not a size in bytes: {f['bytes']!r}")


def _check_entries(m: dict, mf: Path) -> None:
    router = _entry(m["router"], f"{mf}: field 'router'")
    if "path" not in router:
        raise BundleError(f"{mf}: field 'router.path': missing")
    safe_rel(router["path"], f"{mf}: field 'router.path'")
    for name, t in _entry(m["towers"], f"{mf}: field 'towers'").items():
        if not re.match(NAME_PATTERN, name):
            raise BundleError(f"{mf}: field 'towers': tower name {name!r} does not match {NAME_PATTERN}")
        _entry(t, f"{mf}: field 'towers.{name}'")
        if "path" not in t:
            raise BundleError(f"{mf}: field 'towers.{name}.path': missing")
        safe_rel(t["path"], f"{mf}: field 'towers.{name}.path'")
        for key in ("modality", "capabilities"):
            if key not in t:
                raise BundleError(f"{mf}: field 'towers.{name}.{key}': missing")


def read_manifest(root: Path) -> dict:
    """manifest.json checked field by field; null, non-UTF-8, non-object and missing fields are named."""
    mf = root / MANIFEST
    data = read_checked(root, MANIFEST, None, limit=MAX_MANIFEST_BYTES, what="manifest")
    try:
        m = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BundleError(f"{mf}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise BundleError(f"{mf}: not valid JSON: {e}") from None
    if not isinstance(m, dict):
        raise BundleError(f"{mf}: must be a JSON object, got {type(m).__name__ if m is not None else 'null'}")
    for key in ("files", "towers", "router"):
        if key not in m:
            raise BundleError(f"{mf}: no {key!r} entry")
    _check_files(m["files"], mf)
    _check_entries(m, mf)
    return m


# -- reading files without leaving the root -----------------------------------------------------------


def check_no_symlinks(root: Path, rel: str) -> None:
    """Every component of root/rel must be a real file or folder: a symlink inside a bundle is refused
    (it used to be followed silently, to anywhere)."""
    p = root
    for part in PurePosixPath(rel).parts:
        p = p / part
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return  # the caller reports the missing file
        if stat.S_ISLNK(st.st_mode):
            raise BundleError(f"{p}: is a symbolic link; a bundle may not contain links")


@contextlib.contextmanager
def _open(root: Path, rel: str, what: str) -> Iterator[Any]:
    check_no_symlinks(root, rel)
    p = root / rel
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise BundleError(f"{p}: missing (not a NEXUS bundle folder)" if what == "manifest"
                          else f"{p}: missing file (listed in {MANIFEST})") from None
    except OSError as e:
        raise BundleError(f"{p}: cannot be opened: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise BundleError(f"{p}: not a regular file")
        yield f


def read_checked(root: Path, rel: str, entry: Mapping | None, *, limit: int = 1 << 34, what: str = "file") -> bytes:
    """The bytes of root/rel, read once; with a manifest entry, their sha256 (and size) checked. The
    caller loads these same bytes, so nothing can be swapped between the check and the load."""
    with _open(root, rel, what) as f:
        size = os.fstat(f.fileno()).st_size
        want = entry.get("bytes") if entry else None
        if size > limit or (want is not None and size != want):
            raise BundleError(f"{root / rel}: sha256 mismatch (the file is {size:,} bytes, the manifest says "
                              f"{want:,}): the file was changed or corrupted after the bundle was built"
                              if want is not None else f"{root / rel}: {size:,} bytes, over the {limit:,} byte limit")
        data = f.read(min(size, limit) + 1)  # read(n) allocates n up front: never the limit itself
    if len(data) > limit:
        raise BundleError(f"{root / rel}: over the {limit:,} byte limit")
    if entry is not None:
        _compare(root / rel, entry["sha256"], hashlib.sha256(data).hexdigest())
    return data


def hash_checked(root: Path, rel: str, entry: Mapping) -> None:
    """Stream-hash root/rel against the manifest (info --verify: no need to hold every file in memory)."""
    h = hashlib.sha256()
    with _open(root, rel, "file") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    _compare(root / rel, entry["sha256"], h.hexdigest())


def _compare(p: Path, want: str, got: str) -> None:
    if got != want:
        raise BundleError(f"{p}: sha256 mismatch (manifest {want[:16]}..., file {got[:16]}...): "
                          "the file was changed or corrupted after the bundle was built")


def tree_files(root: Path, prefix: str) -> set[str]:
    """Every file under root/prefix (relative to root); a symlink anywhere in it is refused."""
    out = set()
    check_no_symlinks(root, prefix)
    for dirpath, dirnames, filenames in os.walk(root / prefix, followlinks=False):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            if p.is_symlink():
                raise BundleError(f"{p}: is a symbolic link; a bundle may not contain links")
        out.update(str((Path(dirpath) / n).relative_to(root)) for n in filenames)
    return out


@contextlib.contextmanager
def snapshot(files: Mapping[str, bytes]) -> Iterator[Path]:
    """A private temporary folder holding exactly `files` (verified bytes): loaders that need a path
    (peft adapters, tokenizers, the router) read what was hashed, not what is on disk now."""
    tmp = Path(tempfile.mkdtemp(prefix="nexus-verified-"))  # mode 0700
    try:
        for rel, data in files.items():
            p = tmp / safe_rel(rel, "snapshot")
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- safetensors headers ------------------------------------------------------------------------------


def safetensors_header(data: bytes, name: str) -> dict:
    """The JSON header of safetensors `data`, checked the way the loader would trust it."""
    if len(data) < 8:
        raise BundleError(f"{name}: not a safetensors file ({len(data)} bytes)")
    n = int.from_bytes(data[:8], "little")
    return parse_header(data[8:8 + n] if n <= len(data) - 8 else b"", n, len(data), name)


def read_header(root: Path, rel: str) -> dict:
    """The checked header of root/rel, reading only the header bytes: weights stay on disk."""
    with _open(root, rel, "file") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0:
            raise BundleError(f"{root / rel}: not a safetensors file ({size} bytes)")
        return parse_header(f.read(n) if n <= min(size - 8, MAX_HEADER_BYTES) else b"", n, size, str(root / rel))


def parse_header(raw: bytes, n: int, size: int, name: str) -> dict:
    """Checks that the header length fits, every tensor's dtype and shape match its byte range, and the
    ranges tile the data: a header truncated (with its manifest hash updated to match) is a BundleError,
    not a traceback from the loader."""
    if n > min(size - 8, MAX_HEADER_BYTES) or len(raw) != n:
        raise BundleError(f"{name}: safetensors header of {n:,} bytes does not fit the {size:,} byte file")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{name}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise BundleError(f"{name}: safetensors header is not an object")
    _check_ranges(header, size - 8 - n, name)
    return header


def _check_ranges(header: dict, body: int, name: str) -> None:
    spans = []
    for key, t in header.items():
        if key == "__metadata__":
            if not isinstance(t, dict) or not all(isinstance(v, str) for v in t.values()):
                raise BundleError(f"{name}: safetensors __metadata__ must map str to str")
            continue
        ok = isinstance(t, dict) and t.get("dtype") in DTYPE_BYTES and isinstance(t.get("shape"), list) \
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in t["shape"]) \
            and isinstance(t.get("data_offsets"), list) and len(t["data_offsets"]) == 2 \
            and all(isinstance(o, int) and not isinstance(o, bool) for o in t["data_offsets"])
        if not ok:
            raise BundleError(f"{name}: safetensors entry {key!r} is malformed")
        a, b = t["data_offsets"]
        numel = 1
        for d in t["shape"]:
            numel *= d
        if not 0 <= a <= b <= body or b - a != numel * DTYPE_BYTES[t["dtype"]]:
            raise BundleError(f"{name}: safetensors tensor {key!r} {t['dtype']}{t['shape']} does not match its "
                              f"bytes [{a}, {b}) of {body}")
        spans.append((a, b))
    end = 0
    for a, b in sorted(spans):
        if a != end:
            raise BundleError(f"{name}: safetensors tensors overlap or leave gaps at byte {end}")
        end = b
    if end != body:
        raise BundleError(f"{name}: safetensors data is {body:,} bytes, the tensors cover {end:,}")


def header_shapes(header: dict) -> dict[str, list[int]]:
    """Tensor name -> shape as the model will see it (a quantized `k.__q` / `k.__scale` pair -> `k` with
    its original shape from the `nexus_shapes` metadata)."""
    meta = header.get("__metadata__") or {}
    try:
        shapes = json.loads(meta.get("nexus_shapes", "{}"))
    except json.JSONDecodeError:
        shapes = None
    if not isinstance(shapes, dict):
        raise BundleError("safetensors metadata 'nexus_shapes' is not a JSON object")
    out = {k: t["shape"] for k, t in header.items() if k != "__metadata__" and not k.endswith((".__q", ".__scale"))}
    out.update(shapes)
    return out
