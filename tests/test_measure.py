"""measure(): wall time of the block, its CPU time, and the resident memory it added at its peak."""

from __future__ import annotations

import gc
import math
import mmap
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from ckptbench.measure import COUNTERS, measure, other_work

MB = 1 << 20


def test_times_a_sleep():
    with measure() as timing:
        time.sleep(0.2)
    assert 0.2 <= timing.seconds < 5


def test_peak_rss_grows_when_allocating_and_touching_200_mb():
    """A fresh anonymous mapping: an allocator could hand back pages earlier tests left resident."""
    gc.collect()  # garbage of earlier tests freed inside the block would offset the growth
    with measure() as timing, mmap.mmap(-1, 200 * MB) as fresh:
        block = np.frombuffer(fresh, dtype=np.uint8)
        block[:] = 1  # every page is written
        time.sleep(0.05)
        assert int(block[::4096].sum()) == math.ceil(200 * MB / 4096)
        del block
    assert timing.peak_rss >= 150 * MB, f"peak {timing.peak_rss / MB:.0f} MB above the start"


def test_memory_an_earlier_region_freed_is_not_lent_to_the_next():
    """Heap pages freed before a region stay resident unless returned; reused inside it, they would hide its growth."""
    freed, survivors = [], []
    for _ in range(3000):
        freed.append(np.ones(100_000, np.uint8))
        survivors.append(np.ones(2000, np.uint8))  # keeps each freed piece off the top of the heap, where it stays
    del freed
    with measure() as timing:
        held = [np.ones(100_000, np.uint8) for _ in range(3000)]  # below malloc's mmap threshold: from its heap
    assert timing.peak_rss >= 200 * MB, f"peak {timing.peak_rss / MB:.0f} MB above the start for 300 MB allocated"
    del held, survivors


def test_peak_rss_is_small_without_allocation():
    with measure() as timing:
        time.sleep(0.05)
    assert 0 <= timing.peak_rss < 50 * MB


def test_peak_is_relative_to_the_start_of_the_block():
    held = np.ones(200 * MB, dtype=np.uint8)
    with measure() as timing:
        time.sleep(0.05)
    assert timing.peak_rss < 50 * MB
    del held


def test_a_failing_block_fills_in_nothing():
    with pytest.raises(RuntimeError, match="boom"), measure() as timing:
        raise RuntimeError("boom")
    assert math.isnan(timing.seconds)
    assert timing.peak_rss == 0


def test_cpu_time_tells_waiting_from_working():
    with measure() as waiting:
        time.sleep(0.3)
    with measure() as working:  # spin for CPU time, not wall time: a busy machine may lend the CPU elsewhere
        start = time.process_time()
        while time.process_time() - start < 0.3:
            pass
    assert waiting.cpu_s < 0.15  # the memory sampler's polling, at most
    assert working.cpu_s >= 0.25  # clock-tick granularity below the 0.3 s spun


def test_a_failing_block_records_no_cpu_time():
    with pytest.raises(RuntimeError, match="boom"), measure() as timing:
        raise RuntimeError("boom")
    assert math.isnan(timing.cpu_s)


def test_counts_the_page_faults_and_context_switches_of_the_block(tmp_path):
    """Fresh memory faults once a page (minor); a mapped file read after eviction waits for the disk (major)."""
    with measure() as fresh, mmap.mmap(-1, 64 * MB) as memory:
        np.frombuffer(memory, dtype=np.uint8)[:] = 1
    assert fresh.minor_faults >= 64 * MB // 4096 * 0.9
    with measure() as sleeping:
        time.sleep(0.05)
    assert sleeping.voluntary_switches >= 1
    assert sleeping.minor_faults < fresh.minor_faults / 10
    path = tmp_path / "data"
    path.write_bytes(np.random.default_rng(0).bytes(8 * MB))
    os.sync()
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        with measure() as mapped, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as view:
            assert sum(view[i] for i in range(0, len(view), 4096)) >= 0
    assert mapped.major_faults >= 1
    assert all(getattr(m, c) >= 0 for m in (fresh, sleeping, mapped) for c in COUNTERS)


def test_other_work_on_the_machine_is_told_from_the_block_own():
    """A busy neighbour process shows as others' CPU (machine busy less own), the block's own spinning does not."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)
        with measure() as waiting:
            time.sleep(1.0)
        neighbour = other_work(1.0)
    finally:
        spinner.kill()
        spinner.wait()
    assert waiting.machine_cpu_s - waiting.cpu_s >= 0.5
    assert neighbour >= 0.5
    with measure() as working:
        deadline = time.perf_counter() + 0.5
        while time.perf_counter() < deadline:
            pass
    assert working.machine_cpu_s >= working.cpu_s * 0.9
    assert working.steal_s >= 0
