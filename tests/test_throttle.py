"""Disk profiles through the kernel's I/O throttle: caps parsed and refused, held when probed, groups removed.

The throttle needs root and a blkio (cgroup v1) or io (cgroup2) controller; CI runs as root. Where
they are missing the tests that need them are skipped with the reason, never passed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckptbench import limits, profiles, throttle, yourdisk
from ckptbench.errors import UsageError
from ckptbench.local import Folder
from ckptbench.profiles import Caps
from tests.conftest import QUICK, one_line_error, rows, run, start


def _groups() -> set[str]:
    """Every throttle group ckptbench could have made, in whichever hierarchy the machine has."""
    try:
        root = throttle.hierarchy().root
    except throttle.ThrottleError:
        return set()
    return {p.name for p in root.iterdir() if p.name.startswith(throttle.PREFIX)}


@pytest.fixture
def no_group_left() -> Iterator[None]:
    """Fails the test that leaves a throttle group behind (this process is taken out of its own first)."""
    before = _groups()
    yield
    throttle.leave()
    left = _groups() - before
    assert not left, f"throttle groups left behind: {sorted(left)}"


@pytest.fixture
def root_and_controller() -> None:
    if os.geteuid() != 0:
        pytest.skip("the I/O throttle needs root (CI runs as root)")
    try:
        throttle.hierarchy()
    except throttle.ThrottleError as err:
        pytest.skip(str(err))


def test_caps_parse_units_and_refuse_nonsense() -> None:
    caps = Caps.parse("read=300M, write=1.5Gi, riops=3k, wiops=250")
    assert caps == Caps(300_000_000, round(1.5 * 2**30), 3000, 250)
    assert Caps.parse(caps.spec()) == caps
    for bad in ("read=fast", "speed=300M", "", "read=0"):
        with pytest.raises(UsageError, match="disk-limit"):
            Caps.parse(bad)
    with pytest.raises(UsageError, match="give one of them"):
        profiles.resolve("gp3-baseline", "read=300M")
    with pytest.raises(UsageError, match="unknown disk profile"):
        profiles.resolve("gp9")


def test_every_profile_says_where_its_figures_come_from() -> None:
    for name, profile in profiles.PROFILES.items():
        if name == profiles.NONE:
            assert profile.caps.empty
            continue
        assert not profile.caps.empty, name
        assert "https://" in profile.source, name


def test_refusals_are_one_line_saying_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(throttle.ThrottleError, match=r"above this disk's measured write ceiling .*choose"):
        throttle.refuse_above(Caps(write_bps=3_000_000_000), read_gbps=2.0, write_gbps=1.0)
    throttle.refuse_above(Caps(read_bps=1_000_000_000, write_bps=900_000_000), read_gbps=2.0, write_gbps=1.0)
    if Path("/dev/shm").is_dir() and "tmpfs" in Path("/proc/self/mounts").read_text():
        with pytest.raises(throttle.ThrottleError, match="no block device to throttle") as refused:
            throttle.device(Path("/dev/shm/ckptbench-out"))
        assert "\n" not in str(refused.value)
    assert throttle.device(tmp_path).major > 0
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(throttle.ThrottleError, match="needs root"):
        throttle.check(tmp_path)


@pytest.mark.slow  # a run as a process
def test_cli_refuses_a_profile_on_tmpfs_in_one_line(tmp_path: Path) -> None:
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm (tmpfs) on this machine")
    out = Path("/dev/shm") / f"ckptbench-test-{os.getpid()}"
    try:
        done = run("run", *QUICK, "--strategies", "pytorch", "--disk-profile", "st1", "--out", out, cwd=tmp_path)
    finally:
        subprocess.run(["rm", "-rf", str(out)], check=True)
    assert done.returncode == 1
    assert "no block device to throttle" in one_line_error(done.stderr)


@pytest.mark.slow
@pytest.mark.usefixtures("root_and_controller", "no_group_left")
@pytest.mark.parametrize(
    "caps",
    [Caps(read_bps=200_000_000, write_bps=200_000_000), Caps(read_iops=2000, write_iops=2000)],
    ids=["bandwidth", "operations"],
)
def test_the_probe_finds_the_ceilings_at_the_caps(caps: Caps, tmp_path: Path) -> None:
    """Reads and writes throttled, probed by the same probe a run uses: every ceiling within 10 % of its cap.

    Bandwidth and operations are capped apart: capped together, the kernel's split of writeback into small
    requests lets the operations cap bind first and the bandwidth probe reads low for a reason of its own.
    The writes start their own writeback (sync_file_range): cgroup v1 charged the kernel's to no group, and
    the probe's buffered writes ran past the write cap."""
    group = throttle.enter(tmp_path, caps)
    assert group is not None
    assert group.path.is_dir()
    assert str(os.getpid()) in (group.path / "cgroup.procs").read_text().split()
    settings = limits.ProbeSettings(streams=(1, 4, 16), writers=(16,), small_files=2048, copy_threads=(1,))
    measured = limits.probe(tmp_path / "probe", settings.under(caps))
    if caps.read_iops is not None:
        assert measured.read_iops is not None
        assert measured.write_iops is not None
    assert limits.missed_caps(measured, caps) == [], measured.describe()
    if caps.write_bps is not None:
        assert all("sync_file_range" in how for key, how in measured.parameters["how"].items() if "write/" in key)
    throttle.leave()
    assert not group.path.exists()


@pytest.mark.slow
@pytest.mark.usefixtures("root_and_controller", "no_group_left")
def test_a_save_made_durable_under_a_write_cap_is_held_to_it(tmp_path: Path) -> None:
    """The harness's durability step keeps a save's writeback inside the group: through syncfs, cgroup v1 had
    the kernel's flusher threads write it back outside any group and the save beat its write cap."""
    cap = 20_000_000
    throttle.enter(tmp_path, Caps(write_bps=cap))
    assert throttle.active()
    saved = Folder(tmp_path / "checkpoint")
    (saved.path / "shards").mkdir(parents=True)
    files = [saved.path / "one", *(saved.path / "shards" / str(i) for i in range(4))]
    for file, size in zip(files, (16 << 20, *[4 << 20] * 4), strict=True):
        file.write_bytes(os.urandom(size))
    written = sum(f.stat().st_size for f in files)
    started = time.perf_counter()
    saved.sync()
    elapsed = time.perf_counter() - started
    assert written / elapsed < 1.1 * cap, f"{written / elapsed / 1e6:.0f} MB/s through a {cap / 1e6:.0f} MB/s cap"
    throttle.leave()
    assert not throttle.active()


@pytest.mark.slow
@pytest.mark.usefixtures("root_and_controller", "no_group_left")
def test_a_run_under_a_limit_records_it_and_no_row_beats_it(tmp_path: Path) -> None:
    """Every row carries the caps it ran under, and the run itself checks that none wrote or read faster than
    1.05 x them (the throttle's first slice granted), as this test checks from the rows."""
    out, caps = tmp_path / "out", Caps.parse("read=50M,write=50M")
    done = run(
        "run", *QUICK, "--strategies", "pytorch,ts+best", "--disk-limit", caps.spec(), "--out", out, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = rows(out / "results.csv")
    assert set(results["disk_caps"]) == {caps.spec()}
    assert set(results["disk_profile"]) == {profiles.CUSTOM}
    assert yourdisk.over_caps(results).empty, yourdisk.rates(results).to_string()
    assert f"caps check: none of {len(results)} rows" in done.stdout


@pytest.mark.slow
@pytest.mark.usefixtures("root_and_controller", "no_group_left")
def test_the_next_run_removes_the_group_of_a_run_killed_with_9(tmp_path: Path) -> None:
    out = tmp_path / "out"
    killed = start(
        "run", *QUICK, "--strategies", "pytorch", "--disk-limit", "read=100M,write=100M", "--out", out,
        cwd=tmp_path, log=tmp_path / "killed.log",
    )  # fmt: skip
    name = f"{throttle.PREFIX}{killed.pid}-"
    deadline = time.monotonic() + 300
    while not any(g.startswith(name) for g in _groups()):
        assert killed.poll() is None, (tmp_path / "killed.log").read_text()[-2000:]
        assert time.monotonic() < deadline, "the run never made its throttle group"
        time.sleep(0.1)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    (left,) = [g for g in _groups() if g.startswith(name)]
    done = run("run", *QUICK, "--strategies", "pytorch", "--out", out, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"removed the leftovers of an interrupted run: {throttle.hierarchy().root / left}" in done.stdout
    assert left not in _groups()
