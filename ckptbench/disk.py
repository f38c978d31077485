"""Filesystem work around a checkpoint: durability, cache eviction, accounting, partial names, removal.

The study's 64-element chunks make hundreds of thousands of files per float32 checkpoint, so the
walks here spread the top-level entries over many threads and touch each file once.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil

from .errors import InsufficientDiskSpaceError, OutputFolderError, UsageError

_libc = ctypes.CDLL(None, use_errno=True)
PARTIAL = ".partial-"
"""Marks a directory being written or being deleted: never a complete checkpoint."""
WORKING = ".work-"
"""Marks a complete checkpoint a live run is measuring; its process id follows, so others leave it alone."""
_OWNER = re.compile(rf"(?:{re.escape(PARTIAL)}|{re.escape(WORKING)})(\d+)")
_WORKERS = 64
"""Threads for the walks over a checkpoint's top-level entries: syscall-bound (unlink, fadvise), so many help
(deleting 100k files in 200 folders: 64 threads were quicker than 8 or 32 on this machine)."""
_AT_FDCWD, _RENAME_NOREPLACE, _RENAME_EXCHANGE = -100, 1, 2
_QUIET_S = 0.25
"""How long a failed save's folder must stay gone before its writer's library is taken to have stopped."""
_QUIET_TIMEOUT_S = 60.0
_SYNC_FILE_RANGE_WRITE = 2


def sync_filesystem(path: Path) -> None:
    """Flush every dirty page of the filesystem holding ``path`` (syncfs; os.sync if unavailable).

    One flush at the end of every timed save makes durability cost the same for all strategies. A
    failed writeback (EIO, ENOSPC) is raised: the checkpoint must not then be called complete.
    """
    if not hasattr(_libc, "syncfs"):
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"syncfs: {os.strerror(code)}", str(path))
    finally:
        os.close(fd)


def sync_files(path: Path) -> None:
    """Write every file under ``path`` back and fsync it and its folders, all from this process's threads.

    A save under the I/O throttle is made durable this way, so its bytes are its own I/O, inside its
    throttle group: syncfs hands the writeback to the kernel's flusher threads, which cgroup v1 charges
    to no group (a save escaped its write cap), and an ext4 journal commit writes the data of files
    whose blocks it allocated from its own thread. So every file's writeback is started first
    (sync_file_range), then each file is fsync'd with nothing dirty left for a commit to write.
    """
    entries = _entries(path)
    with ThreadPoolExecutor(_WORKERS) as pool:
        list(pool.map(lambda entry: _each(entry, start_writeback, folders=False), entries))
        list(pool.map(lambda entry: _each(entry, _fsync, folders=True), entries))
    if path.is_dir():
        fsync_directory(path)


def _each(path: Path, act: Callable[[str], None], folders: bool) -> None:
    """``act`` on every file under ``path`` (and on its folders, deepest first, with ``folders``)."""
    if not path.is_dir():
        act(str(path))
        return
    for root, _, files in os.walk(path, topdown=False):
        for name in files:
            act(os.path.join(root, name))
        if folders:
            act(root)


def start_writeback(path: str) -> None:
    """Start writing ``path``'s dirty pages back from this thread (sync_file_range), not waiting for them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.sync_file_range(fd, ctypes.c_int64(0), ctypes.c_int64(0), _SYNC_FILE_RANGE_WRITE) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"sync_file_range: {os.strerror(code)}", path)
    finally:
        os.close(fd)


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(path: Path) -> None:
    _fsync(path)


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


def remove_failed(path: Path, failure: BaseException) -> None:
    """Delete what a failed save wrote, again and again until it stays gone; ``failure`` stays the error.

    A library can report a failure before the writes it queued have ended: TensorStore resolves a
    failed write at its first error, then still writes every chunk it had queued, creating their
    folders again (and other ranks may still be writing theirs). A removal racing those writes meets a
    folder that fills up as it empties. If it never empties, what stopped the save is still the news:
    the leftover is named in a note, and a later run removes this dead writer's partial.
    """
    deadline = time.monotonic() + _QUIET_TIMEOUT_S
    while True:
        try:
            remove(path)
        except OSError as err:  # a file appeared (ENOTEMPTY) or vanished (ENOENT) under the walk
            if err.errno in (errno.ENOTEMPTY, errno.ENOENT) and time.monotonic() < deadline:
                continue
            failure.add_note(f"{path} was left behind: {err}")
            return
        time.sleep(_QUIET_S)
        if not path.exists():
            return
        if time.monotonic() > deadline:
            failure.add_note(f"{path} was left behind: still written to {_QUIET_TIMEOUT_S:g} s after the save failed")
            return


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


def _doom(path: Path) -> None:
    """Rename to this process's partial name, then delete; FileNotFoundError if someone else took it first."""
    doomed = partial_name(path)
    os.replace(path, doomed)
    remove(doomed)


def discard(path: Path) -> None:
    """Delete a checkpoint, first renaming it to a partial name: interrupted, it never looks complete."""
    if path.exists():
        _doom(path)


def _renameat2(source: Path, target: Path, flags: int) -> None:
    if not hasattr(_libc, "renameat2"):  # a C library older than glibc 2.28
        raise OSError(errno.ENOSYS, "renameat2 is not available", str(source))
    if _libc.renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(source), None, str(target))


def install(source: Path, final: Path) -> None:
    """Put the complete checkpoint ``source`` at ``final``, replacing one there.

    An atomic exchange (renameat2), so ``final`` is at every moment the old or the new checkpoint,
    and two runs installing at once both succeed; the old one leaves under a partial name. A
    filesystem without exchange (NFS) gets two renames, with a moment when ``final`` is absent.
    """
    try:
        replaced = _exchange(source, final)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOSYS):
            raise
        _install_in_two_steps(source, final)
        return
    fsync_directory(final.parent)
    if replaced:
        discard(source)  # the old checkpoint, now under the working name


def _exchange(source: Path, final: Path) -> bool:
    """Atomically put ``source`` at ``final``; whether an old checkpoint came back in its place."""
    while True:
        try:
            _renameat2(source, final, _RENAME_EXCHANGE)
            return True
        except FileNotFoundError:  # nothing at ``final`` yet
            try:
                _renameat2(source, final, _RENAME_NOREPLACE)
                return False
            except FileExistsError:  # another run installed one meanwhile: exchange with that
                continue


def _install_in_two_steps(source: Path, final: Path) -> None:
    old = None
    if final.exists():
        old = partial_name(final)
        os.replace(final, old)
    os.replace(source, final)
    fsync_directory(final.parent)
    if old is not None:
        remove(old)


def clean_stale(directory: Path) -> list[Path]:
    """Remove partial and working checkpoints left by runs that no longer run; a live run's are left alone.

    Each is renamed before it is deleted (a working copy is complete until then), and one that another
    run starting at the same time takes first is left to it.
    """
    stale = []
    if directory.is_dir():
        for entry in directory.iterdir():
            owners = _OWNER.findall(entry.name)  # the last one named it: a live run renames what it deletes
            if owners and not psutil.pid_exists(int(owners[-1])):
                try:
                    _doom(entry)
                except FileNotFoundError:
                    continue
                stale.append(entry)
    return stale


def refuse_file_in_the_way(path: Path, what: str = "output folder") -> None:
    """A folder that is, or would be under, a regular file is a mistake the user can correct."""
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UsageError(f"{what} {path}: {blocker} is a file, not a folder")


def check_folder(path: Path) -> None:
    """Refuse an output folder that cannot be made or written, before anything is built or measured.

    Creates nothing: ``access`` on the folder or its nearest existing parent, which answers for root
    too (a read-only filesystem, including a read-only bind mount, is refused; permission bits are not).
    """
    refuse_file_in_the_way(path)
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        reason = "read-only file system" if os.statvfs(existing).f_flag & os.ST_RDONLY else "permission denied"
        raise OutputFolderError(f"cannot write into the output folder {path}: {existing}: {reason}")
