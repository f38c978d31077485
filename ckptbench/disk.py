"""Filesystem work around a checkpoint: durability, cache eviction, accounting, staging, probing.

The study's 64-element chunks make ~840,000 files per float32 checkpoint of the 3B model, so the
walks here run one thread per top-level entry and touch each file once.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

from .errors import InsufficientDiskSpaceError

_libc = ctypes.CDLL(None, use_errno=True)
_PARTIAL = ".partial-"
_WORKERS = 8


def sync_filesystem(path: Path) -> None:
    """Flush every dirty page of the filesystem holding ``path`` (syncfs; os.sync if unavailable).

    One flush at the end of every timed save makes durability cost the same for all strategies.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        if not hasattr(_libc, "syncfs") or _libc.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class DiskUsage:
    bytes: int
    """Logical size: the sum of file sizes."""
    bytes_allocated: int
    """Blocks the filesystem allocated."""
    files: int


def _entries(path: Path) -> list[Path]:
    return [Path(e.path) for e in os.scandir(path)] if path.is_dir() else [path]


def _walk_files(path: Path) -> Iterator[str]:
    if not path.is_dir():
        yield str(path)
        return
    for root, _, files in os.walk(path):
        for name in files:
            yield os.path.join(root, name)


def _evict_and_count(path: Path) -> DiskUsage:
    size = allocated = files = 0
    for file in _walk_files(path):
        fd = os.open(file, os.O_RDONLY)
        try:
            stat = os.fstat(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        size, allocated, files = size + stat.st_size, allocated + stat.st_blocks * 512, files + 1
    return DiskUsage(size, allocated, files)


def evict(path: Path) -> DiskUsage:
    """Drop a durable checkpoint's pages from the page cache and account for its size in one pass.

    Needs no privileges: POSIX_FADV_DONTNEED discards clean pages, which they are after a sync.
    """
    with ThreadPoolExecutor(_WORKERS) as pool:
        parts = list(pool.map(_evict_and_count, _entries(path)))
    return DiskUsage(sum(p.bytes for p in parts), sum(p.bytes_allocated for p in parts), sum(p.files for p in parts))


def remove(path: Path) -> None:
    """Delete a checkpoint (file or tree), top-level entries in parallel."""
    if not path.exists():
        return
    if not path.is_dir():
        path.unlink()
        return
    with ThreadPoolExecutor(_WORKERS) as pool:
        list(pool.map(lambda p: shutil.rmtree(p) if p.is_dir() else p.unlink(), _entries(path)))
    path.rmdir()


def ensure_free(directory: Path, needed: int) -> None:
    """Refuse before writing when ``needed`` bytes will not fit."""
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise InsufficientDiskSpaceError(str(directory), needed, free)


@contextmanager
def staged(final: Path) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``final`` only when the block succeeds.

    The temporary name carries the writer's pid, so an interrupted save is never mistaken for a
    complete checkpoint and a later run can tell a dead writer's leftovers from a live one's.
    """
    partial = final.with_name(f".{final.name}{_PARTIAL}{os.getpid()}")
    remove(partial)
    partial.mkdir(parents=True)
    try:
        yield partial
        sync_filesystem(partial)
        os.replace(partial, final)
        fsync_directory(final.parent)
    except BaseException:
        remove(partial)
        raise


def clean_stale(directory: Path) -> list[Path]:
    """Remove partial checkpoints left by writers that no longer run."""
    stale = []
    if directory.is_dir():
        for entry in directory.iterdir():
            pid = entry.name.rpartition(_PARTIAL)[2]
            if _PARTIAL in entry.name and pid.isdigit() and not psutil.pid_exists(int(pid)):
                remove(entry)
                stale.append(entry)
    return stale


@dataclass(frozen=True)
class DiskLimits:
    """What the disk itself allows, measured with large sequential files in the same run."""

    write_gbps: float
    """Durable sequential write (write + fsync)."""
    read_gbps: float
    """Sequential read after evicting the file from the page cache."""
    probe_bytes: int


def _timed(action: Callable[[], None]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def probe(directory: Path, size: int, repeats: int = 3, block: int = 64 << 20) -> DiskLimits:
    """Median of ``repeats`` durable writes and cold reads of a ``size``-byte file of random bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    ensure_free(directory, size)
    data = os.urandom(min(block, size))
    path = directory / f".disk-probe{_PARTIAL}{os.getpid()}"
    buffer = bytearray(len(data))

    def write() -> None:
        with open(path, "wb", buffering=0) as f:
            for offset in range(0, size, len(data)):
                f.write(data[: size - offset])
            os.fsync(f.fileno())

    def read() -> None:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass

    writes, reads = [], []
    try:
        for _ in range(repeats):
            writes.append(_timed(write))
            evict(path)
            reads.append(_timed(read))
    finally:
        path.unlink(missing_ok=True)
    return DiskLimits(size / statistics.median(writes) / 1e9, size / statistics.median(reads) / 1e9, size)
