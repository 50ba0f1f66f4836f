"""Atomic, durable artifact writes: every file or folder is written under a temporary name, fsynced and
renamed (or exchanged) into place, so a killed run or a crash never leaves a half-written artifact where
a reader would find it, and concurrent writers of one folder take turns (nexus_assets_tests/core/
test_atomic_race.py: 2 writers + 1 reader, no missing read, no writer error)."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it onto `final` only if the block succeeds.
    The file and then its folder are fsynced, so after a crash the name holds old or new bytes, never
    a zero-length file."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)  # mkstemp's 0600 would hide artifacts from other users of the box
        _fsync(tmp_path)
        os.replace(tmp_path, final)
        _fsync(final.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `final`; swap it in for `final` only if the block succeeds.

    Why each step: the temporary name is unique per writer (mkdtemp), so two writers never share one;
    the contents are fsynced before the swap; the swap holds an flock on a sibling `.<name>.lock` (removed after), so
    writers take turns; an existing folder is replaced by one atomic exchange (Linux renameat2
    RENAME_EXCHANGE), so a reader never finds `final` missing (two renames through a fixed `.old`
    name used to leave a window: 272 missing reads in 9,785 with 2 writers); the old contents, now
    under the writer's own temporary name, are deleted after the lock is released.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        _fsync_tree(tmp)
        with _locked(final.parent / f".{final.name}.lock"):
            _swap_in(tmp, final)
            _fsync(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    """An exclusive flock on `lock_file`, removed again on release so no lock files pile up beside
    artifacts. A waiter that wakes holding a lock on an already-removed file retries on the new one
    (the inode check), so two writers never hold the lock at once."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the exchange is still atomic where the OS offers it
        yield
        return
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.stat(lock_file).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        os.unlink(lock_file)  # while still locked: the next writer re-creates it
        os.close(fd)


def _swap_in(tmp: Path, final: Path) -> None:
    """Put `tmp` at `final`; the previous `final` (if any) ends up at `tmp`, for the caller to delete."""
    if not os.path.lexists(final):
        os.replace(tmp, final)
        return
    if _exchange(tmp, final):
        return
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
    os.replace(final, old / "x")  # fallback without renameat2: a short window, but a unique old name
    os.replace(tmp, final)
    os.replace(old / "x", tmp)
    old.rmdir()


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (renameat2 RENAME_EXCHANGE); False where the OS or libc lacks it."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0:  # AT_FDCWD, RENAME_EXCHANGE
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False  # e.g. a file system without exchange support
    raise OSError(err, f"renameat2({a}, {b}): {os.strerror(err)}")


@functools.lru_cache(maxsize=1)
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _fsync(path: Path) -> None:
    """fsync one file or folder (a folder's fsync makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems refuse fsync on folders; the data files were synced
        if e.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file, then every folder (deepest first), under `root` before it is swapped in."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for n in filenames:
            p = Path(dirpath) / n
            if not p.is_symlink():
                _fsync(p)
        _fsync(Path(dirpath))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def sha256_file(path: str | os.PathLike, block: int = 1 << 22) -> str:
    """Streamed sha256, so multi-GB shards never sit in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
