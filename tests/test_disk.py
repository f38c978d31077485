"""Staging, interrupted saves (raised and killed), stale partials, free-space checks and accounting."""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch

from ckptbench import EIGHT_WAY, CheckpointError, InsufficientDiskSpaceError, disk, get_strategy
from ckptbench.local import Folder
from ckptbench.location import staged
from ckptbench.manifest import MANIFEST, Manifest

from conftest import QUICK, dead_pid, leftovers, load_checkpoint, start


def _ignore(nbytes: int) -> None:
    pass


class InterruptingTensors(Mapping):
    """The tensors, until iteration reaches ``after`` of them; then a KeyboardInterrupt (a user's Ctrl-C)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], after: int, on_interrupt=lambda: None) -> None:
        self._tensors, self._after, self._on_interrupt = tensors, after, on_interrupt

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __len__(self) -> int:
        return len(self._tensors)

    def __iter__(self) -> Iterator[str]:
        for index, name in enumerate(self._tensors):
            if index == self._after:
                self._on_interrupt()
                raise KeyboardInterrupt
            yield name


def _staged(final: Path, save: Callable[[Folder], None]) -> None:
    with staged(Folder(final)) as staging:
        save(staging.partial)


@pytest.mark.parametrize("name", ["tensorstore", "ts+ocdbt"])
def test_interrupted_save_leaves_no_checkpoint_and_no_partial(name, tiny, tmp_path):
    strategy = get_strategy(name)
    final = tmp_path / "ckpts" / name
    written: list[str] = []
    partials: list[Path] = []

    def save(partial: Folder) -> None:
        partials.append(partial.path)
        tensors = InterruptingTensors(tiny.tensors, 5, lambda: written.extend(os.listdir(partial.path)))
        strategy.save(tensors, partial, _ignore)

    with pytest.raises(KeyboardInterrupt):
        _staged(final, save)
    assert [p.name for p in partials] == [f".{name}.partial-{os.getpid()}-0"]
    assert written, "the save was interrupted before it wrote anything"
    assert not final.exists()
    assert leftovers(final.parent) == []
    with pytest.raises(CheckpointError):
        load_checkpoint(strategy, final)


@pytest.mark.parametrize("name", EIGHT_WAY)
def test_interrupt_from_progress_after_data_was_written(name, tiny, tmp_path):
    strategy = get_strategy(name)
    final = tmp_path / name
    seen: list[str] = []

    def save(partial: Folder) -> None:
        def progress(nbytes: int) -> None:
            seen.extend(os.listdir(partial.path))
            raise KeyboardInterrupt

        strategy.save(tiny.tensors, partial, progress)

    with pytest.raises(KeyboardInterrupt):
        _staged(final, save)
    assert seen, "nothing was on disk when the save was interrupted"
    assert leftovers(tmp_path) == []
    with pytest.raises(CheckpointError):
        load_checkpoint(strategy, final)


def test_staged_success_renames_into_place(tiny, tmp_path):
    final = tmp_path / "a" / "b" / "pytorch"
    with staged(Folder(final)) as staging:
        get_strategy("pytorch").save(tiny.tensors, staging.partial, _ignore)
        assert not final.exists()
        staging.commit(Manifest("pytorch", {}, ()))
    assert final.is_dir()
    assert leftovers(final.parent) == ["pytorch"]
    assert sorted(p.name for p in final.iterdir()) == [MANIFEST, "model.pt"]


def test_a_staged_block_that_never_commits_leaves_nothing(tmp_path):
    with staged(Folder(tmp_path / "ckpt")) as staging:
        (staging.partial.path / "data").write_text("written, never committed")
    assert leftovers(tmp_path) == []


def test_staged_never_writes_into_an_existing_partial(tmp_path):
    final = tmp_path / "ckpt"
    old = tmp_path / f".ckpt.partial-{os.getpid()}-0"
    old.mkdir()
    (old / "junk").write_text("someone else's")
    with staged(Folder(final)) as staging:
        partial = staging.partial.path
        assert partial != old
        assert list(partial.iterdir()) == []
        (partial / "data").write_text("new")
        staging.commit(Manifest("none", {}, ()))
    assert leftovers(tmp_path) == [old.name, "ckpt"]
    assert (final / "data").read_text() == "new"
    assert (old / "junk").read_text() == "someone else's"


def test_a_failed_save_whose_library_goes_on_writing_leaves_nothing_and_keeps_its_error(tmp_path):
    """TensorStore resolves a failed write at its first error and then writes its queued chunks, making folders."""
    final = tmp_path / "ckpt"
    stop = threading.Event()

    def late_writes(partial: Path) -> None:
        for n in itertools.count():
            if stop.wait(0.001) or n > 2000:
                return
            chunk = partial / "tensor" / f"{n}.0"
            chunk.parent.mkdir(parents=True, exist_ok=True)
            chunk.write_bytes(b"late")

    writers: list[threading.Thread] = []

    def failing_save() -> None:
        with staged(Folder(final)) as staging:
            writers.append(threading.Thread(target=late_writes, args=(staging.partial.path,)))
            writers[0].start()
            threading.Timer(0.2, stop.set).start()
            time.sleep(0.05)
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        failing_save()
    writers[0].join()
    assert leftovers(tmp_path) == []


def test_discard_renames_before_deleting(tmp_path, monkeypatch):
    final = tmp_path / "ckpt"
    (final / "sub").mkdir(parents=True)
    (final / "ckptbench.json").write_text("{}")
    removing: list[str] = []
    real_remove = disk.remove

    def watching_remove(path):
        removing.append(path.name)
        assert not final.exists(), "deletion started while the checkpoint still had its complete name"
        real_remove(path)

    monkeypatch.setattr(disk, "remove", watching_remove)
    disk.discard(final)
    assert removing
    assert ".partial-" in removing[0]
    assert leftovers(tmp_path) == []


def test_clean_stale_removes_dead_runs_partials_and_working_copies_only(tmp_path):
    dead = tmp_path / f".tensorstore.partial-{dead_pid()}-0"
    dead_working = tmp_path / f".pytorch.work-{dead_pid()}-abc123"
    live = tmp_path / f".tensorstore.partial-{os.getpid()}-0"
    live_working = tmp_path / f".pytorch.work-{os.getpid()}-abc123"
    dead_file = tmp_path / f".disk-probe.partial-{dead_pid()}"
    not_a_pid = tmp_path / ".t5x.partial-abc"
    complete = tmp_path / "tensorstore"
    for directory in (dead, dead_working, live, live_working, not_a_pid, complete):
        (directory / "sub").mkdir(parents=True)
        (directory / "sub" / "chunk").write_bytes(b"x" * 10)
    dead_file.write_bytes(b"y")
    removed = disk.clean_stale(tmp_path)
    assert sorted(removed) == sorted([dead, dead_working, dead_file])
    assert not dead.exists()
    assert not dead_file.exists()
    assert live.is_dir()
    assert live_working.is_dir()
    assert not_a_pid.is_dir()
    assert complete.is_dir()
    assert disk.clean_stale(tmp_path) == []
    assert disk.clean_stale(tmp_path / "absent") == []


def test_benchmark_prepare_cleans_stale_partials(make_bench, tmp_path):
    out = tmp_path / "out"
    dead = out / f".ts+chunks.partial-{dead_pid()}-0"
    live = out / f".ts+chunks.partial-{os.getpid()}-0"
    for directory in (dead, live):
        directory.mkdir(parents=True)
        (directory / "ckptbench.json").write_text("{}")
    messages: list[str] = []
    make_bench(log=messages.append).prepare()
    assert not dead.exists()
    assert live.is_dir()
    assert any(str(dead) in message for message in messages)


@pytest.mark.slow  # a run as a process
def test_killed_save_leaves_only_a_stale_partial_that_the_next_run_removes(make_bench, tmp_path):
    out = tmp_path / "out"
    log = tmp_path / "child.log"
    child = start("run", *QUICK, "--strategies", "tensorstore", "--out", out, cwd=tmp_path, log=log)
    partial = None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None:
            found = list(out.glob(".tensorstore.work-*.partial-*")) if out.is_dir() else []
            if found and any(found[0].iterdir()):  # the save has started writing tensors
                partial = found[0]
                child.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
    finally:
        if child.poll() is None and partial is None:
            child.kill()
        child.wait(timeout=60)
    if partial is None:
        pytest.fail(
            f"no .tensorstore.work-*.partial-* with data appeared before the run ended (exit {child.returncode}); "
            f"the kill was not exercised. Output:\n{log.read_text(errors='replace')[-3000:]}"
        )
    assert child.returncode == -signal.SIGKILL
    assert partial.name.startswith(f".tensorstore.work-{child.pid}-")
    assert f".partial-{child.pid}-" in partial.name
    assert partial.is_dir(), "the partial vanished, so the save was not interrupted by the kill"
    assert not (out / "tensorstore").exists()
    with pytest.raises(CheckpointError):
        load_checkpoint(get_strategy("tensorstore"), partial)
    assert not psutil.pid_exists(child.pid)
    messages: list[str] = []
    make_bench(out=out, log=messages.append).prepare()
    assert not partial.exists()
    assert not list(out.glob(".*.partial-*"))
    assert not list(out.glob(".*.work-*"))
    assert any(str(partial) in message for message in messages)


def _free(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    usage = SimpleNamespace(total=10 * free + 1, used=9 * free + 1, free=free)
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda path: usage)


def test_ensure_free_boundary(tmp_path, monkeypatch):
    _free(monkeypatch, 1000)
    disk.ensure_free(tmp_path, 1000)
    with pytest.raises(InsufficientDiskSpaceError) as info:
        disk.ensure_free(tmp_path, 1001)
    assert (info.value.needed, info.value.free) == (1001, 1000)
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize("warmup", [False, True])
@pytest.mark.parametrize("name", ["pytorch", "tensorstore"])
def test_phase_refuses_before_writing_when_the_disk_is_too_small(name, warmup, make_bench, tiny, tmp_path, monkeypatch):
    bench = make_bench(warmup=warmup)
    bench.prepare()
    before = leftovers(bench.out)
    needed = get_strategy(name).estimate_bytes(tiny.tensors)
    _free(monkeypatch, needed - 1)
    created: list[Path] = []
    real_mkdir = Path.mkdir

    def spy_mkdir(self, *args, **kwargs):
        created.append(self)
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", spy_mkdir)
    phase = bench.run_phase(name)
    assert not phase.ok
    assert phase.error.startswith("InsufficientDiskSpaceError: not enough free disk")
    assert "the next checkpoint needs about" in phase.error
    assert not any(".partial-" in p.name or p.name == name for p in created)
    assert leftovers(bench.out) == sorted([*before, "results.csv"])
    (row,) = bench.results_file.read().itertuples()
    assert row.strategy == name
    assert row.error == phase.error
    assert not row.verified


def test_phase_runs_when_the_estimate_just_fits(make_bench, tiny, monkeypatch):
    bench = make_bench()
    bench.prepare()
    _free(monkeypatch, get_strategy("pytorch").estimate_bytes(tiny.tensors))
    assert bench.run_phase("pytorch").ok
    assert len(bench.results) == 1


def test_probe_refuses_when_the_disk_is_too_small_and_says_it_is_the_probe(make_bench, monkeypatch):
    bench = make_bench(limits=None)
    _free(monkeypatch, 1 << 20)
    with pytest.raises(InsufficientDiskSpaceError, match=r"the disk probe \(64 MiB of streams, small files\) needs"):
        bench.prepare()
    assert leftovers(bench.out) == []


def test_evict_accounts_for_files_and_sizes(tmp_path):
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "a").write_bytes(b"a" * 5000)
    (tmp_path / "d" / "e" / "b").write_bytes(b"b" * 10)
    (tmp_path / "d" / "e" / "c").write_bytes(b"")
    usage = disk.evict(tmp_path / "d")
    assert (usage.bytes, usage.files) == (5010, 3)
    assert usage.bytes_allocated >= 5010
    single = disk.evict(tmp_path / "d" / "a")
    assert (single.bytes, single.files) == (5000, 1)


def test_remove_trees_files_and_absent_paths(tmp_path):
    (tmp_path / "t" / "x" / "y").mkdir(parents=True)
    (tmp_path / "t" / "x" / "y" / "f").write_text("1")
    (tmp_path / "t" / "g").write_text("2")
    (tmp_path / "file").write_text("3")
    disk.remove(tmp_path / "t")
    disk.remove(tmp_path / "file")
    disk.remove(tmp_path / "absent")
    assert leftovers(tmp_path) == []
