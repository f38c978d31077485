"""How each limit is measured: by fio when it is installed, else by threads making the same system calls.

Both write, read and create files the way a checkpoint does: buffered writes into fresh files made
durable by fsync (O_DIRECT would measure the device, not the page-cache path every writer takes; under
the I/O throttle the writer starts its own writeback as it goes, as a save's durability step does, so
cgroup v1 charges it to the group and not to no one),
reads after POSIX_FADV_DONTNEED, and small files created, written and fsync'd one at a time by each
of several writers. Every measurement says how it was taken (fio's command line, or the calls), so
a run records exactly what its limits mean. The copy into fresh memory is timed in-process by both.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import random
import re
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from . import throttle
from .disk import evict, start_writeback
from .errors import CkptbenchError

STREAM = "stream.{}"
"""Stream ``i`` writes and reads ``directory / STREAM.format(i)`` (fio's ``stream.$jobnum``)."""
_MIB = 1 << 20
WRITEBACK_BLOCKS = 8
"""Under the throttle, fio starts the writeback of its last this many blocks as it writes (sync_file_range)."""


class ProbeError(CkptbenchError):
    """The tool measuring the disk failed; the message carries its own."""


@dataclass(frozen=True)
class Measured:
    value: float
    """GB/s, or files/s for small files."""
    seconds: float
    """Wall time of the measurement itself (tool start-up included): the probe's timed I/O."""
    how: str
    """The exact command line, or the calls made."""


class Backend(Protocol):
    tool: str

    def write(self, directory: Path, streams: int, size: int, block: int) -> Measured:
        """Durable sequential write: ``streams`` concurrent writers, one new ``size``-byte file each."""

    def read(self, directory: Path, streams: int, size: int, block: int) -> Measured:
        """Cold sequential read of the files ``write`` left, evicted from the page cache first."""

    def small_files(self, directory: Path, writers: int, files: int, size: int, seconds: float) -> Measured:
        """Files/s created, written and fsync'd by ``writers`` concurrent writers; at most ``seconds`` long."""

    def iops(self, file: Path, direction: str, jobs: int, block: int, seconds: float) -> Measured:
        """Operations/s of ``jobs`` concurrent random ``block``-byte O_DIRECT reads or writes of ``file``.

        O_DIRECT takes every operation to the device (a page cache would answer repeated reads and hold
        writes back): the device's operation rate, which a cap holds. ``file`` is one the stream probe
        wrote, so nothing is laid out first.
        """


def _run_threads(count: int, work: Callable[[int], object]) -> float:
    """Run ``work(0) … work(count - 1)`` on threads released together; seconds until the last one ends."""
    barrier = threading.Barrier(count + 1)
    errors: list[BaseException] = []

    def body(index: int) -> None:
        barrier.wait()
        try:
            work(index)
        except BaseException as err:  # re-raised in the caller's thread below
            errors.append(err)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return elapsed


@dataclass(frozen=True)
class Threads:
    """The built-in probe: one Python thread per stream or writer; every call used releases the GIL."""

    tool: str = "builtin"

    def write(self, directory: Path, streams: int, size: int, block: int) -> Measured:
        data = memoryview(os.urandom(block))
        own = throttle.active()

        def write(index: int) -> None:
            fd = os.open(directory / STREAM.format(index), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                for offset in range(0, size, block):
                    os.pwrite(fd, data[: size - offset], offset)
                if own:
                    start_writeback(str(directory / STREAM.format(index)))
                os.fsync(fd)
            finally:
                os.close(fd)

        seconds = _run_threads(streams, write)
        started = ", sync_file_range(WRITE)" if own else ""
        how = f"{streams} threads: os.pwrite of {block} B blocks into a new {size} B file each{started}, fsync, close"
        return Measured(streams * size / seconds / 1e9, seconds, how)

    def read(self, directory: Path, streams: int, size: int, block: int) -> Measured:
        evict(directory)
        buffers = [bytearray(block) for _ in range(streams)]  # touched up front: the disk is timed, not memory

        def read(index: int) -> None:
            fd = os.open(directory / STREAM.format(index), os.O_RDONLY)
            try:
                offset = 0
                while got := os.preadv(fd, [buffers[index]], offset):
                    offset += got
            finally:
                os.close(fd)

        seconds = _run_threads(streams, read)
        how = f"posix_fadvise(DONTNEED) on every file, then {streams} threads: os.preadv of {block} B blocks"
        return Measured(streams * size / seconds / 1e9, seconds, how)

    def small_files(self, directory: Path, writers: int, files: int, size: int, seconds: float) -> Measured:
        data = os.urandom(size)
        done = [0] * writers
        deadline: list[float] = []

        def create(index: int) -> None:
            if not deadline:
                deadline.append(time.perf_counter() + seconds)
            for number in range(files // writers):
                if time.perf_counter() > deadline[0]:
                    return
                fd = os.open(directory / f"{index}.{number}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                done[index] += 1

        elapsed = _run_threads(writers, create)
        how = f"{writers} threads, each: open(O_CREAT|O_EXCL), write {size} B, fsync, close; up to {seconds} s"
        return Measured(sum(done) / elapsed, elapsed, how)

    def iops(self, file: Path, direction: str, jobs: int, block: int, seconds: float) -> Measured:
        blocks = os.stat(file).st_size // block
        done = [0] * jobs
        deadline: list[float] = []
        writing = direction == "write"

        def operate(index: int) -> None:
            if not deadline:
                deadline.append(time.perf_counter() + seconds)
            buffer = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT needs
            fd = os.open(file, (os.O_WRONLY if writing else os.O_RDONLY) | os.O_DIRECT)
            try:
                chooser = random.Random(index)
                while time.perf_counter() < deadline[0]:
                    offset = chooser.randrange(blocks) * block
                    (os.pwritev if writing else os.preadv)(fd, [buffer], offset)
                    done[index] += 1
            finally:
                os.close(fd)
                buffer.close()

        elapsed = _run_threads(jobs, operate)
        call = "pwritev" if writing else "preadv"
        how = f"{jobs} threads, each for {seconds} s: O_DIRECT {call} of one {block} B block at a random offset"
        return Measured(sum(done) / elapsed, elapsed, how)


@dataclass(frozen=True)
class Fio:
    """fio, one invocation per measurement (a read job beside its write job would be laid out untimed)."""

    executable: str
    tool: str
    """``fio 3.33``: the version measured with, recorded with the run."""

    @classmethod
    def find(cls) -> Fio | None:
        executable = shutil.which("fio")
        if executable is None:
            return None
        found = subprocess.run([executable, "--version"], capture_output=True, text=True, check=False)
        version = re.search(r"\d+(?:\.\d+)+", found.stdout)
        return cls(executable, f"fio {version[0]}" if version else found.stdout.strip() or "fio")

    def _common(self, directory: Path, jobs: int) -> list[str]:
        return [
            self.executable,
            "--output-format=json",
            "--group_reporting=1",  # one result for all jobs: summed bytes, the slowest job's runtime
            f"--directory={str(directory).replace(':', chr(92) + ':')}",  # fio splits directory= on ':'
            f"--numjobs={jobs}",
            "--ioengine=psync",
        ]

    def _run(self, command: list[str]) -> tuple[dict, float]:
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            problem = (done.stderr.strip() or done.stdout.strip()).splitlines()
            raise ProbeError(f"fio failed measuring the disk ({problem[-1] if problem else done.returncode})")
        try:
            report = json.loads(done.stdout[done.stdout.index("{") :])  # notes may precede the JSON
            return report["jobs"][0], seconds
        except (ValueError, KeyError, IndexError) as err:
            raise ProbeError(f"fio's report could not be read ({err})") from None

    def _stream(self, direction: str, directory: Path, streams: int, size: int, block: int, *job: str) -> Measured:
        command = [
            *self._common(directory, streams),
            f"--name={direction}",
            f"--rw={direction}",
            f"--size={size}",
            f"--bs={block}",
            f"--filename_format={STREAM.format('$jobnum')}",
            *job,
        ]
        report, seconds = self._run(command)
        result = report[direction]
        if not result["runtime"]:
            raise ProbeError(f"fio reported no {direction} time")
        # io_bytes / runtime is bw_bytes without its rounding (runtime in ms, of the slowest job)
        return Measured(result["io_bytes"] / (result["runtime"] / 1e3) / 1e9, seconds, shlex.join(command))

    def write(self, directory: Path, streams: int, size: int, block: int) -> Measured:
        # fallocate=none: a checkpoint allocates as it writes; end_fsync: the runtime includes the final fsync;
        # under the throttle, sync_file_range every WRITEBACK_BLOCKS writes: the writeback is fio's own.
        own = (f"--sync_file_range=write:{WRITEBACK_BLOCKS}",) if throttle.active() else ()
        return self._stream("write", directory, streams, size, block, "--end_fsync=1", "--fallocate=none", *own)

    def read(self, directory: Path, streams: int, size: int, block: int) -> Measured:
        # invalidate=1: fio calls posix_fadvise(DONTNEED) on each file as it opens it; the pages are clean.
        return self._stream("read", directory, streams, size, block, "--invalidate=1")

    def small_files(self, directory: Path, writers: int, files: int, size: int, seconds: float) -> Measured:
        command = [
            *self._common(directory, writers),
            "--name=write",
            "--rw=write",
            f"--nrfiles={max(1, files // writers)}",
            f"--filesize={size}",
            f"--bs={size}",
            "--create_on_open=1",
            "--openfiles=1",
            "--file_service_type=sequential",
            "--fsync=1",
            "--fallocate=none",
            f"--runtime={round(seconds * 1000)}ms",
        ]
        report, elapsed = self._run(command)
        result = report["write"]
        return Measured(result["total_ios"] / (max(result["runtime"], 1) / 1e3), elapsed, shlex.join(command))

    def iops(self, file: Path, direction: str, jobs: int, block: int, seconds: float) -> Measured:
        kind = "randwrite" if direction == "write" else "randread"
        command = [
            *self._common(file.parent, jobs),
            f"--name={kind}",
            f"--rw={kind}",
            f"--filename={file.name}",
            f"--bs={block}",
            "--time_based=1",
            f"--runtime={round(seconds * 1000)}ms",
            "--direct=1",
        ]
        report, elapsed = self._run(command)
        result = report[direction]
        return Measured(result["total_ios"] / (max(result["runtime"], 1) / 1e3), elapsed, shlex.join(command))


def backend() -> Backend:
    """fio when it is on the PATH, else the built-in threads."""
    return Fio.find() or Threads()


_memmove = ctypes.memmove  # a foreign call: the GIL is released while it copies


def _address(buffer: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))  # the temporary export ends with the statement


def fresh_copy(nbytes: int, threads: int) -> Measured:
    """GB/s copying ``nbytes`` from resident memory into a new anonymous mapping, every page faulted in.

    A fresh load does the same: its tensors are new memory, and each page costs a fault before the copy.
    """
    nbytes = max(mmap.PAGESIZE, nbytes // mmap.PAGESIZE * mmap.PAGESIZE)
    source, target = mmap.mmap(-1, nbytes), mmap.mmap(-1, nbytes)
    try:
        chunk = os.urandom(min(nbytes, _MIB))
        for offset in range(0, nbytes, len(chunk)):
            source[offset : offset + len(chunk)] = chunk[: nbytes - offset]
        src, dst = _address(source), _address(target)
        part = nbytes // threads // mmap.PAGESIZE * mmap.PAGESIZE

        def copy(index: int) -> None:
            start = index * part
            _memmove(dst + start, src + start, nbytes - start if index == threads - 1 else part)

        seconds = _run_threads(threads, copy)
    finally:
        source.close()
        target.close()
    how = f"{threads} threads: memmove of {nbytes} B from resident memory into a new anonymous mapping"
    return Measured(nbytes / seconds / 1e9, seconds, how)
