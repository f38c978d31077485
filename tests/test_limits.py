"""The limits probe: fio or the built-in threads, the same quantities, recorded, cached per filesystem and day."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from ckptbench import limits, probes
from ckptbench.cli import _parser
from ckptbench.errors import InsufficientDiskSpaceError
from ckptbench.limits import Limits, ProbeSettings

TINY = ProbeSettings(
    total_bytes=4 << 20,
    streams=(1, 4),
    writers=(1, 2),
    small_files=32,
    small_seconds=0.2,
    copy_bytes=1 << 20,
    copy_threads=(1, 2),
)
FIO = probes.Fio.find()
needs_fio = pytest.mark.skipif(FIO is None, reason="fio is not installed (apt-get install fio)")


def _assert_measured(measured: Limits, directory: Path) -> None:
    """Every quantity at every concurrency, the ceilings the best of them, and nothing left behind."""
    assert set(measured.write_by_streams) == set(measured.read_by_streams) == set(TINY.streams)
    assert set(measured.files_by_writers) == set(TINY.writers)
    assert set(measured.fresh_copy_by_threads) == set(TINY.copy_threads)
    for table in (
        measured.write_by_streams,
        measured.read_by_streams,
        measured.files_by_writers,
        measured.fresh_copy_by_threads,
    ):
        assert all(value > 0 for value in table.values())
    assert measured.write_gbps == max(measured.write_by_streams.values())
    assert measured.read_gbps == max(measured.read_by_streams.values())
    assert measured.files_per_s == max(measured.files_by_writers.values())
    assert measured.fresh_copy_gbps == max(measured.fresh_copy_by_threads.values())
    assert measured.probe_bytes == TINY.total_bytes
    assert measured.probe_s > 0
    assert not measured.cached
    assert measured.parameters["settings"] == json.loads(json.dumps(asdict(TINY)))
    assert set(measured.parameters["how"]) == {
        *(f"{kind}/{n}" for kind in ("write", "read") for n in TINY.streams),
        *(f"files/{n}" for n in TINY.writers),
        *(f"copy/{n}" for n in TINY.copy_threads),
    }
    assert list(directory.iterdir()) == []


@needs_fio
def test_fio_measures_every_limit_with_a_checkpoints_settings(tmp_path):
    measured = limits.probe(tmp_path, TINY, FIO)
    _assert_measured(measured, tmp_path)
    assert measured.tool.startswith("fio 3")
    how = measured.parameters["how"]
    for option in ("--numjobs=4", "--rw=write", "--end_fsync=1", "--fallocate=none", "--ioengine=psync"):
        assert option in how["write/4"]
    assert "--direct=1" not in how["write/4"]  # buffered, like every checkpoint writer
    assert "--rw=read" in how["read/4"]
    assert "--invalidate=1" in how["read/4"]
    for option in ("--numjobs=2", "--create_on_open=1", "--fsync=1", "--filesize=16384"):
        assert option in how["files/2"]


def test_the_builtin_probe_measures_the_same_limits(tmp_path):
    measured = limits.probe(tmp_path, TINY, probes.Threads())
    _assert_measured(measured, tmp_path)
    assert measured.tool == "builtin"
    assert "fsync" in measured.parameters["how"]["write/4"]
    assert "DONTNEED" in measured.parameters["how"]["read/4"]


def test_without_fio_on_the_path_the_builtin_probe_is_used(monkeypatch):
    monkeypatch.setenv("PATH", "")
    assert probes.Fio.find() is None
    assert isinstance(probes.backend(), probes.Threads)


@pytest.mark.parametrize("backend", [pytest.param(FIO, marks=needs_fio, id="fio"), probes.Threads()])
def test_a_backend_reads_the_very_files_it_wrote(tmp_path, backend):
    written = backend.write(tmp_path, 3, 1 << 20, 1 << 19)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [probes.STREAM.format(i) for i in range(3)]
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    read = backend.read(tmp_path, 3, 1 << 20, 1 << 19)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamps  # read, not laid out again
    assert all(p.stat().st_size == 1 << 20 for p in tmp_path.iterdir())
    assert written.value > 0
    assert read.value > 0


@pytest.mark.parametrize("backend", [pytest.param(FIO, marks=needs_fio, id="fio"), probes.Threads()])
def test_small_files_are_created_whole_and_counted(tmp_path, backend):
    measured = backend.small_files(tmp_path, 2, 8, 4096, 10.0)
    files = list(tmp_path.iterdir())
    assert len(files) == 8
    assert all(f.stat().st_size == 4096 for f in files)
    assert measured.value >= 8 / measured.seconds * 0.99  # the rate's time is within the call's


def test_a_fio_failure_is_one_clear_error(tmp_path):
    broken = probes.Fio(executable="false", tool="fio 0")
    with pytest.raises(probes.ProbeError, match="fio failed measuring the disk"):
        broken.write(tmp_path, 1, 1 << 20, 1 << 20)


def test_the_copy_into_fresh_memory_is_timed():
    measured = probes.fresh_copy(4 << 20, 2)
    assert measured.value > 0
    assert measured.seconds > 0
    assert "new anonymous mapping" in measured.how


def test_the_drift_probe_is_one_cheap_stream_and_cleans_up(tmp_path):
    drift = limits.stream(tmp_path, 4 << 20, block=1 << 20)
    assert drift.write_gbps > 0
    assert drift.read_gbps > 0
    assert drift.seconds > 0
    assert list(tmp_path.iterdir()) == []


def test_probe_refuses_a_disk_without_room(tmp_path, monkeypatch):
    def refuse(directory: Path, needed: int, what: str) -> None:
        raise InsufficientDiskSpaceError(str(directory), needed, 0, what)

    monkeypatch.setattr(limits, "ensure_free", refuse)
    with pytest.raises(InsufficientDiskSpaceError, match=r"the disk probe \(4 MiB of streams"):
        limits.probe(tmp_path, TINY, probes.Threads())
    assert list(tmp_path.iterdir()) == []


def test_settings_follow_the_checkpoint_within_bounds():
    assert ProbeSettings.for_checkpoint(10 << 20).total_bytes == 64 << 20
    assert ProbeSettings.for_checkpoint(500 << 20).total_bytes == 500 << 20
    assert ProbeSettings.for_checkpoint(20 << 30).total_bytes == 1 << 30
    assert ProbeSettings.for_checkpoint(20 << 30).streams[-1] == 64


@pytest.fixture
def counted(monkeypatch, tmp_path):
    """``limits.probe`` replaced by a quick fake that counts its calls; a different value each time."""
    calls: list[ProbeSettings] = []

    def fake(directory: Path, settings: ProbeSettings, backend: probes.Backend | None = None) -> Limits:
        calls.append(settings)
        return Limits(
            write_gbps=float(len(calls)),
            read_gbps=2.0,
            probe_bytes=settings.total_bytes,
            probe_s=0.5,
            files_per_s=1000.0,
            fresh_copy_gbps=1.0,
            tool=(backend or probes.backend()).tool,
            write_by_streams={1: 0.1, 64: float(len(calls))},
            parameters={"settings": asdict(settings), "how": {}},
        )

    monkeypatch.setattr(limits, "probe", fake)
    return calls


def _measured(directory: Path, **kwargs) -> Limits:
    return limits.measured(directory, TINY, backend=probes.Threads(), **{"day": "2026-11-30", **kwargs})


def test_a_second_probe_the_same_day_reads_the_cache(tmp_path, counted):
    first = _measured(tmp_path)
    second = _measured(tmp_path)
    assert len(counted) == 1
    assert not first.cached
    assert second.cached
    assert second.probe_s == 0  # no measurement in this run
    assert second.write_gbps == first.write_gbps
    assert second.write_by_streams == {1: 0.1, 64: first.write_gbps}  # integer keys survive the JSON
    (kept,) = (tmp_path / limits.CACHE_DIR).iterdir()
    assert kept.name.startswith("2026-11-30_")
    assert json.loads(kept.read_text())["probe_s"] == 0.5


def test_reprobe_measures_again_and_replaces_the_cache(tmp_path, counted):
    _measured(tmp_path)
    again = _measured(tmp_path, reprobe=True)
    assert len(counted) == 2
    assert not again.cached
    assert _measured(tmp_path).write_gbps == again.write_gbps == 2.0


def test_another_day_filesystem_settings_or_tool_is_measured_anew(tmp_path, counted, monkeypatch):
    _measured(tmp_path)
    _measured(tmp_path, day="2026-12-01")
    assert len(counted) == 2
    monkeypatch.setattr(limits, "filesystem", lambda path: "/dev/other (xfs) on /data")
    _measured(tmp_path)
    assert len(counted) == 3
    limits.measured(tmp_path, replace(TINY, streams=(1, 64)), backend=probes.Threads(), day="2026-11-30")
    assert len(counted) == 4
    limits.measured(tmp_path, TINY, backend=probes.Fio("fio", "fio 9.99"), day="2026-11-30")
    assert len(counted) == 5


def test_a_damaged_cache_is_measured_anew(tmp_path, counted):
    _measured(tmp_path)
    (kept,) = (tmp_path / limits.CACHE_DIR).iterdir()
    kept.write_text("{not json")
    assert not _measured(tmp_path).cached
    assert len(counted) == 2


def test_a_real_probe_round_trips_through_the_cache(tmp_path):
    first = limits.measured(tmp_path, TINY, backend=probes.Threads())
    second = limits.measured(tmp_path, TINY, backend=probes.Threads())
    assert second == replace(first, probe_s=0.0, cached=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [limits.CACHE_DIR]


@pytest.mark.parametrize("command", ["run", "bench", "sweep"])
def test_reprobe_is_an_option_of_every_measuring_command(command):
    extra = ["--knob", "sync=on"] if command == "sweep" else []
    assert _parser().parse_args([command, *extra, "--reprobe"]).reprobe is True
    assert _parser().parse_args([command, *extra]).reprobe is False


def test_a_session_measures_once_per_day_unless_told_to_reprobe(make_bench, counted):
    first = make_bench(limits=None)
    first.prepare()
    assert len(counted) == 1
    assert first.probe_s == 0.5  # the probe's timed I/O counts as measurement
    assert counted[0] == ProbeSettings.for_checkpoint(first.checkpoint.nbytes)
    second = make_bench(limits=None)
    second.prepare()
    assert len(counted) == 1
    assert second.limits.cached
    assert second.probe_s == 0  # nothing measured in this session
    third = make_bench(limits=None, reprobe=True)
    third.prepare()
    assert len(counted) == 2
    assert not third.limits.cached
