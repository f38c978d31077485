"""The timed region: wall time, CPU time, page faults, context switches, peak resident memory above its start, and
how busy the rest of the machine was meanwhile."""

from __future__ import annotations

import ctypes
import gc
import resource
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_libc = ctypes.CDLL(None)


@dataclass
class Measurement:
    seconds: float = float("nan")
    peak_rss: int = 0
    """Bytes of resident memory above the level at the start of the region."""
    cpu_s: float = float("nan")
    """User + system CPU seconds of this process, all threads: near wall x cores means CPU-bound."""
    minor_faults: int | None = None
    """Page faults served without I/O (getrusage, all threads): fresh memory being touched, pages already cached."""
    major_faults: int | None = None
    """Page faults that waited for the disk (getrusage): a mapped file read on first touch."""
    voluntary_switches: int | None = None
    """Context switches where a thread gave up the CPU to wait (I/O, locks); ``involuntary_switches``: preempted."""
    involuntary_switches: int | None = None
    machine_cpu_s: float | None = None
    """Busy CPU seconds of the whole machine, every process: minus ``cpu_s``, what other work took during the
    region, the first suspect when a second run disagrees."""
    steal_s: float | None = None
    """CPU seconds the hypervisor gave to other guests while this one wanted to run (a VM's hidden neighbour)."""


COUNTERS: tuple[str, ...] = ("minor_faults", "major_faults", "voluntary_switches", "involuntary_switches")
"""The getrusage counters every timed region records, as ``Measurement`` names them."""
_RUSAGE = {
    "minor_faults": "ru_minflt",
    "major_faults": "ru_majflt",
    "voluntary_switches": "ru_nvcsw",
    "involuntary_switches": "ru_nivcsw",
}


def _reset_high_water_mark() -> bool:
    """Reset the kernel's VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def return_freed_memory() -> None:
    """Free what the last region dropped and hand it back to the kernel: Python's cycle collector, then glibc's
    malloc_trim (a no-op elsewhere).

    Objects in reference cycles live until the collector runs: a training state loaded with ``pytorch`` and
    resumed stayed resident after ``del`` until ``gc.collect()`` (found by trial), so the next load's memory
    check counted a second copy. malloc keeps freed heap pages resident: a load that left its buffers there
    would lend them to the next region, whose own allocations then never show in its RSS, and they would count
    against the machine for the rest of the run.
    """
    gc.collect()
    if hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)


def machine_busy() -> tuple[float, float]:
    """Busy and stolen CPU seconds of the whole machine since boot, summed over cores (psutil, /proc/stat)."""
    times = psutil.cpu_times()
    busy = times.user + times.nice + times.system + getattr(times, "irq", 0.0) + getattr(times, "softirq", 0.0)
    return busy, getattr(times, "steal", 0.0)


def other_work(seconds: float = 1.0) -> float:
    """Cores kept busy by other processes over ``seconds`` of this one idling: a busy machine's timings move."""
    own = psutil.Process().cpu_times()
    busy, _ = machine_busy()
    time.sleep(seconds)
    own_end = psutil.Process().cpu_times()
    used = sum(own_end[:4]) - sum(own[:4])
    return max(0.0, machine_busy()[0] - busy - used) / seconds


def _high_water_mark() -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class _Sampler(threading.Thread):
    """Polls RSS, the fallback where VmHWM cannot be reset and a cross-check where it can."""

    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak = interval, 0
        self._process = psutil.Process()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop_event.wait(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, self._process.memory_info().rss)


@contextmanager
def measure(interval: float = 0.01) -> Iterator[Measurement]:
    """Time the block; the result is filled in when it exits without error."""
    result = Measurement()
    process = psutil.Process()
    return_freed_memory()
    start_rss = process.memory_info().rss
    kernel_hwm = _reset_high_water_mark()
    sampler = _Sampler(interval)
    sampler.start()
    start_cpu = process.cpu_times()
    start_usage = resource.getrusage(resource.RUSAGE_SELF)
    start_busy, start_steal = machine_busy()
    start = time.perf_counter()
    try:
        yield result
    finally:
        seconds = time.perf_counter() - start
        end_cpu = process.cpu_times()
        end_usage = resource.getrusage(resource.RUSAGE_SELF)
        end_busy, end_steal = machine_busy()
        peak = sampler.stop()
    if kernel_hwm:
        peak = max(peak, _high_water_mark())
    result.seconds, result.peak_rss = seconds, max(0, peak - start_rss)
    result.cpu_s = (end_cpu.user - start_cpu.user) + (end_cpu.system - start_cpu.system)
    result.machine_cpu_s, result.steal_s = end_busy - start_busy, end_steal - start_steal
    for counter, field in _RUSAGE.items():
        setattr(result, counter, getattr(end_usage, field) - getattr(start_usage, field))
