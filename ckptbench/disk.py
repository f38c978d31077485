"""Filesystem work around a checkpoint: durability, cache eviction, accounting, staging.

The study's 64-element chunks make ~840,000 files per float32 checkpoint of the 3B model, so the
walks here run one thread per top-level entry and touch each file once.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import re
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

from .errors import InsufficientDiskSpaceError

_libc = ctypes.CDLL(None, use_errno=True)
PARTIAL = ".partial-"
"""Marks a directory being written or being deleted: never a complete checkpoint."""
WORKING = ".work-"
"""Marks a complete checkpoint a live run is measuring; its process id follows, so others leave it alone."""
_OWNER = re.compile(rf"(?:{re.escape(PARTIAL)}|{re.escape(WORKING)})(\d+)")
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


def ensure_free(directory: Path, needed: int, what: str = "the next checkpoint") -> None:
    """Refuse before writing when ``needed`` bytes will not fit."""
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise InsufficientDiskSpaceError(str(directory), needed, free, what)


def working_name(directory: Path, name: str, token: str) -> Path:
    """Where a run keeps a complete checkpoint while it measures it: its own, whoever else shares the folder."""
    return directory / f".{name}{WORKING}{os.getpid()}-{token}"


def partial_name(path: Path) -> Path:
    """A free name beside ``path`` marking a checkpoint being written or deleted by this process."""
    return next(
        candidate
        for n in itertools.count()
        if not (candidate := path.with_name(f".{path.name.lstrip('.')}{PARTIAL}{os.getpid()}-{n}")).exists()
    )


def discard(path: Path) -> None:
    """Delete a checkpoint, first renaming it to a partial name: interrupted, it never looks complete."""
    if not path.exists():
        return
    doomed = partial_name(path)
    os.replace(path, doomed)
    remove(doomed)


def install(source: Path, final: Path) -> None:
    """Put the complete checkpoint ``source`` at ``final``, replacing one there; each step leaves no lie."""
    old = None
    if final.exists():
        old = partial_name(final)
        os.replace(final, old)
    os.replace(source, final)
    fsync_directory(final.parent)
    if old is not None:
        remove(old)


@contextmanager
def staged(final: Path) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``final`` only when the block succeeds.

    The temporary name carries the writer's pid, so an interrupted save is never mistaken for a
    complete checkpoint and a later run can tell a dead writer's leftovers from a live one's.
    """
    partial = partial_name(final)
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
    """Remove partial and working checkpoints left by runs that no longer run; a live run's are left alone."""
    stale = []
    if directory.is_dir():
        for entry in directory.iterdir():
            owner = _OWNER.search(entry.name)
            if owner and not psutil.pid_exists(int(owner[1])):
                remove(entry)
                stale.append(entry)
    return stale
