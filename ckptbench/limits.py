"""What the disk and memory allow, measured in the same run as the strategies compared with them.

A checkpoint is written by many writers at once, so one sequential stream is not the disk's limit:
``probe`` measures durable sequential write and cold sequential read with 1 to 64 concurrent streams
(a parallel checkpoint writer beat 16 but never 64), the rate at which small files can be created
and made durable, and the rate of copying into fresh memory (what a fresh load's page faults
allow). The best of each is the limit a share is divided by. ``measured`` keeps a probe per
filesystem and day in the output folder, so repeated runs pay for it once; ``stream`` is the cheap
single-stream probe that tracks how the disk drifts during a run.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import probes
from .disk import PARTIAL, ensure_free, evict, remove
from .environment import filesystem
from .profiles import Caps

CACHE_DIR = "limits"
"""Where in the output folder the probes of the day are kept, one file per filesystem and day."""
_MIB = 1 << 20


@dataclass(frozen=True)
class ProbeSettings:
    """How much the probe writes and at which concurrencies; a cached probe is reused only for the same settings."""

    total_bytes: int = 1 << 30
    """Bytes written and read back at each stream count, split evenly over its streams."""
    streams: tuple[int, ...] = (1, 4, 16, 64)
    block: int = _MIB
    writers: tuple[int, ...] = (1, 16)
    """Concurrent small-file writers; TensorStore writes its chunk files several at a time."""
    small_file_bytes: int = 16 << 10
    """One chunk file of the study's baseline: 64 x 64 float32."""
    small_files: int = 8192
    small_seconds: float = 0.5
    """Each writer count stops after this long: the file-creation rate drifts, so it is capped by time."""
    copy_bytes: int = 256 * _MIB
    copy_threads: tuple[int, ...] = (1, 2)
    throttle: str = ""
    """The caps the probe runs under (``Caps.spec``), empty on the raw disk: a throttled disk is another disk."""
    iops_jobs: int = 16
    iops_block: int = 16 << 10
    """Random operations of one 16 KiB chunk: what a cloud volume's IOPS figures count."""
    iops_seconds: float = 0.0
    """How long each operation-rate probe runs; 0 measures none (only an IOPS cap needs them)."""

    @classmethod
    def for_checkpoint(cls, nbytes: int) -> ProbeSettings:
        """Sized like the checkpoint (64 MiB to 1 GiB of streams), so a small model's probe stays small."""
        return cls(
            total_bytes=min(max(nbytes, 64 * _MIB), 1 << 30),
            copy_bytes=min(max(nbytes // 4, 16 * _MIB), 256 * _MIB),
        )

    def under(self, caps: Caps) -> ProbeSettings:
        """These settings under ``caps``: capped bandwidth is probed for about four seconds at the cap per
        stream count (up to 4 GiB; the throttle lets a short burst through, which a one-second probe
        would take for the ceiling), and a capped operation rate is measured too."""
        if caps.empty:
            return self
        slowest = min(b for b in (caps.read_bps, caps.write_bps) if b) if caps.read_bps or caps.write_bps else None
        total = self.total_bytes if slowest is None else min(max(64 * _MIB, 4 * slowest), 4 << 30)
        return replace(
            self, throttle=caps.spec(), total_bytes=total // _MIB * _MIB, iops_seconds=2.0 if caps.iops else 0.0
        )


@dataclass(frozen=True)
class Limits:
    """The limits a run's shares and floors use, each the best over the concurrencies probed."""

    write_gbps: float
    """Durable sequential write, buffered then fsync'd: the best over the stream counts (the ceiling)."""
    read_gbps: float
    """Cold sequential read of those files: the best over the stream counts."""
    probe_bytes: int
    probe_s: float = 0.0
    """Seconds this run spent inside the probe's measurements; 0 when the limits came from the cache."""
    files_per_s: float | None = None
    """Small files created, written and fsync'd per second: the best over the writer counts."""
    fresh_copy_gbps: float | None = None
    """Copy into never-touched memory, page faults included: the best over the thread counts."""
    read_iops: float | None = None
    """Random O_DIRECT reads of one 16 KiB block per second (measured only under an operation cap)."""
    write_iops: float | None = None
    """Random O_DIRECT writes of one 16 KiB block per second (likewise)."""
    tool: str = ""
    """``fio 3.33`` when fio measured the disk, ``builtin`` when Python threads did; on S3, one object through boto3."""
    write_by_streams: dict[int, float] = field(default_factory=dict)
    read_by_streams: dict[int, float] = field(default_factory=dict)
    files_by_writers: dict[int, float] = field(default_factory=dict)
    fresh_copy_by_threads: dict[int, float] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)
    """``settings`` as probed and, under ``how``, each measurement's fio command line or the calls made."""
    filesystem: str | None = None
    measured_at: str = ""
    """When it was measured (UTC, ISO 8601)."""
    cached: bool = False
    """Read from the output folder's cache instead of measured in this run."""
    throttle: dict[str, Any] = field(default_factory=dict)
    """Under a disk profile: the profile, its caps and their source, the group, the raw disk's ceilings and
    the caps the measured ceilings missed (``missed``); empty on the raw disk."""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Limits:
        """The inverse of ``asdict`` through JSON, which turns the tables' integer keys into strings."""
        tables = ("write_by_streams", "read_by_streams", "files_by_writers", "fresh_copy_by_threads")
        return cls(**{**data, **{name: {int(k): v for k, v in data.get(name, {}).items()} for name in tables}})

    def describe(self) -> str:
        """One line: the ceilings, where they were reached, and by what."""
        text = (
            f"{self.write_gbps:.3g} GB/s durable write{_best(self.write_by_streams)}, "
            f"{self.read_gbps:.3g} GB/s cold read{_best(self.read_by_streams)}"
        )
        if self.files_per_s is not None:
            text += f", {self.files_per_s:,.0f} files/s created"
        if self.fresh_copy_gbps is not None:
            text += f", {self.fresh_copy_gbps:.3g} GB/s copy into fresh memory"
        for what, rate in (("read", self.read_iops), ("write", self.write_iops)):
            if rate is not None:
                text += f", {rate:,.0f} random {what} IOPS"
        source = f"cached, measured {self.measured_at}" if self.cached else "measured now"
        under = f" under disk profile {self.throttle['profile']} ({self.throttle['caps']})" if self.throttle else ""
        return f"{text} [{self.tool or 'unknown tool'}, {source}]{under}"


def _best(table: dict[int, float]) -> str:
    """`` (N streams)``: the concurrency that reached the ceiling, when it is known."""
    if not table:
        return ""
    streams = max(table, key=table.get)
    return f" ({streams} stream{'' if streams == 1 else 's'})"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def probe(directory: Path, settings: ProbeSettings, backend: probes.Backend | None = None) -> Limits:
    """Measure every limit now, in ``directory``, with fio when installed; leaves nothing behind."""
    backend = backend or probes.backend()
    directory.mkdir(parents=True, exist_ok=True)
    needed = settings.total_bytes + settings.small_files * max(settings.small_file_bytes, 4096)
    ensure_free(directory, needed, f"the disk probe ({settings.total_bytes / _MIB:.0f} MiB of streams, small files)")
    work = directory / f".limits-probe{PARTIAL}{os.getpid()}"
    taken: dict[str, probes.Measured] = {}
    try:
        for streams in settings.streams:
            files = _fresh(work / f"streams-{streams}")
            size = max(settings.block, settings.total_bytes // streams // settings.block * settings.block)
            taken[f"write/{streams}"] = backend.write(files, streams, size, settings.block)
            taken[f"read/{streams}"] = backend.read(files, streams, size, settings.block)
            if settings.iops_seconds and streams == settings.streams[0]:
                file, jobs, block = files / probes.STREAM.format(0), settings.iops_jobs, settings.iops_block
                for direction in ("read", "write"):
                    taken[f"iops-{direction}"] = backend.iops(file, direction, jobs, block, settings.iops_seconds)
            remove(files)
        for writers in settings.writers:
            files = _fresh(work / f"files-{writers}")
            taken[f"files/{writers}"] = backend.small_files(
                files, writers, settings.small_files, settings.small_file_bytes, settings.small_seconds
            )
            remove(files)
    finally:
        remove(work)
    for threads in settings.copy_threads:
        taken[f"copy/{threads}"] = probes.fresh_copy(settings.copy_bytes, threads)

    def table(kind: str) -> dict[int, float]:
        return {int(key.split("/")[1]): m.value for key, m in taken.items() if key.startswith(f"{kind}/")}

    write, read, files, copy = table("write"), table("read"), table("files"), table("copy")
    return Limits(
        write_gbps=max(write.values()),
        read_gbps=max(read.values()),
        probe_bytes=settings.total_bytes,
        probe_s=sum(m.seconds for m in taken.values()),
        files_per_s=max(files.values(), default=None),
        fresh_copy_gbps=max(copy.values(), default=None),
        read_iops=taken["iops-read"].value if "iops-read" in taken else None,
        write_iops=taken["iops-write"].value if "iops-write" in taken else None,
        tool=backend.tool,
        write_by_streams=write,
        read_by_streams=read,
        files_by_writers=files,
        fresh_copy_by_threads=copy,
        parameters={"settings": _plain(settings), "how": {key: m.how for key, m in taken.items()}},
        filesystem=filesystem(directory),
        measured_at=_now(),
    )


def _fresh(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def cache_path(directory: Path, filesystem: str | None, day: str, throttle: str = "") -> Path:
    """The cache file for the filesystem holding ``directory`` on ``day`` (YYYY-MM-DD, UTC), under ``throttle``."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", filesystem or f"device {os.stat(directory).st_dev}").strip("-")
    under = f"_throttled-{re.sub(r'[^A-Za-z0-9]+', '-', throttle)}" if throttle else ""
    return directory / CACHE_DIR / f"{day}_{slug}{under}.json"


def _read_cache(path: Path) -> Limits | None:
    try:
        return Limits.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, AttributeError):  # absent or damaged: measure again
        return None


def measured(
    directory: Path,
    settings: ProbeSettings,
    *,
    reprobe: bool = False,
    backend: probes.Backend | None = None,
    day: str | None = None,
) -> Limits:
    """Today's limits of the filesystem holding ``directory``: its cached probe when one was made with these
    settings and tool, else probed now (``reprobe`` always probes) and cached for the next run."""
    backend = backend or probes.backend()
    directory.mkdir(parents=True, exist_ok=True)
    path = cache_path(directory, filesystem(directory), day or datetime.now(UTC).date().isoformat(), settings.throttle)
    kept = None if reprobe else _read_cache(path)
    if kept is not None and kept.tool == backend.tool and kept.parameters.get("settings") == _plain(settings):
        return replace(kept, probe_s=0.0, cached=True)
    limits = probe(directory, settings, backend)
    path.parent.mkdir(exist_ok=True)
    partial = path.with_name(f".{path.name}{PARTIAL}{os.getpid()}")
    partial.write_text(json.dumps(asdict(limits), indent=2))
    os.replace(partial, path)
    return limits


def _plain(settings: ProbeSettings) -> dict[str, Any]:
    """The settings as they read back from JSON (tuples become lists)."""
    return json.loads(json.dumps(asdict(settings)))


@dataclass(frozen=True)
class Stream:
    write_gbps: float
    read_gbps: float
    seconds: float
    """Seconds inside the two timed regions."""


def stream(directory: Path, size: int, block: int = 64 * _MIB) -> Stream:
    """One durable write and one cold read of a ``size``-byte file: cheap, to track how the disk drifts.

    One stream is not the disk's ceiling (``probe`` is); repeated before every repeat, it shows change.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ensure_free(directory, size, f"the {size / _MIB:.0f} MiB drift probe")
    data = os.urandom(min(block, size))
    buffer = bytearray(len(data))
    path = directory / f".drift-probe{PARTIAL}{os.getpid()}"
    try:
        start = time.perf_counter()
        with open(path, "wb", buffering=0) as f:
            for offset in range(0, size, len(data)):
                f.write(data[: size - offset])
            os.fsync(f.fileno())
        written = time.perf_counter() - start
        evict(path)
        start = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass
        read = time.perf_counter() - start
    finally:
        path.unlink(missing_ok=True)
    return Stream(size / written / 1e9, size / read / 1e9, written + read)


MISS = 0.10
"""A measured ceiling further than this from its cap: the throttle did not hold the disk to the profile."""


def missed_caps(limits: Limits, caps: Caps) -> list[str]:
    """Each cap the ceilings measured under it miss by more than ``MISS``, as one phrase each.

    Bandwidth is compared with the best over the stream counts, operations with the random 16 KiB probe.
    Above a cap means I/O escaped the throttle (writeback the kernel did for no group); below, that the
    disk or the workload could not reach it.
    """
    pairs = (
        ("read", caps.read_bps, limits.read_gbps * 1e9, 1e6, " MB/s"),
        ("write", caps.write_bps, limits.write_gbps * 1e9, 1e6, " MB/s"),
        ("read IOPS", caps.read_iops, limits.read_iops, 1, ""),
        ("write IOPS", caps.write_iops, limits.write_iops, 1, ""),
    )
    return [
        f"{what} cap {cap / scale:,.0f}{unit}, measured {value / scale:,.0f}{unit} ({value / cap - 1:+.0%})"
        for what, cap, value, scale, unit in pairs
        if cap is not None and value is not None and abs(value / cap - 1) > MISS
    ]
