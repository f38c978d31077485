"""What the disk allows, measured in the same run as the strategies it is compared with."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .disk import PARTIAL, ensure_free, evict


@dataclass(frozen=True)
class Limits:
    write_gbps: float
    """Durable sequential write of one large file (write + fsync): one stream, so parallel writers may beat it."""
    read_gbps: float
    """Sequential read of that file after evicting it from the page cache."""
    probe_bytes: int
    probe_s: float = 0.0
    """Seconds spent inside the probe's own timed regions."""


def _timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def probe(directory: Path, size: int, repeats: int = 3, block: int = 64 << 20) -> Limits:
    """Medians of ``repeats`` durable writes and cold reads of one ``size``-byte file of random bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    ensure_free(directory, size, f"the {size / 2**20:.0f} MiB disk probe")
    data = os.urandom(min(block, size))
    path = directory / f".disk-probe{PARTIAL}{os.getpid()}"
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
    return Limits(
        write_gbps=size / statistics.median(writes) / 1e9,
        read_gbps=size / statistics.median(reads) / 1e9,
        probe_bytes=size,
        probe_s=sum(writes) + sum(reads),
    )
