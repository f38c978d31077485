"""Faults a user meets, each tried on a real ``python -m ckptbench`` process with the tiny preset.

Killed (SIGKILL) and interrupted (SIGINT) at each moment of a checkpoint's life, a filesystem that
fills during a save, damaged results files, two runs sharing a folder, and the mistakes a user can
make. Whatever happens, nothing under a complete-looking name is incomplete, no measured row is
lost, and every failure is one line. The moments are found by watching the output folder, as a
user could: the product has no hooks for tests.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import io
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from ckptbench import checkpoint, disk, plot, read_results
from ckptbench.limits import CACHE_DIR
from ckptbench.manifest import MANIFEST
from ckptbench.results import COLUMNS

from conftest import QUICK, dead_pid, one_line_error, rows, run, start

pytestmark = pytest.mark.slow  # every test here runs ckptbench as a process, several of them more than once
_TIMEOUT = 600


@pytest.fixture(scope="module")
def kept(tmp_path_factory) -> Path:
    """An output folder as a finished ``--keep-checkpoints`` run leaves it: two kept checkpoints, two rows."""
    out = tmp_path_factory.mktemp("kept") / "out"
    result = run(
        "run", *QUICK, "--strategies", "tensorstore,pytorch", "--keep-checkpoints", "--out", out, cwd=out.parent
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


def _assert_nothing_lies(out: Path) -> None:
    """Every folder under a complete-looking name (no partial marker) is a complete checkpoint, intact."""
    for entry in sorted(out.iterdir()):
        if entry.is_dir() and entry.name not in ("runs", CACHE_DIR) and disk.PARTIAL not in entry.name:
            assert (entry / MANIFEST).is_file(), f"{entry} looks complete but has no manifest: {os.listdir(entry)}"
            found = checkpoint.verify(entry)
            assert found.intact, f"{entry}: {found.damage[:3]}"


def _owned_by(out: Path, pid: int) -> list[Path]:
    """What a run left in the output folder under its own partial or working names."""
    return sorted(p for p in out.iterdir() if f"{disk.PARTIAL}{pid}" in p.name or f"{disk.WORKING}{pid}" in p.name)


# --- interrupted at every moment --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Moment:
    """A moment of a checkpoint's life, recognised from the run's own partial and working folders."""

    name: str
    strategy: str
    reached: Callable[[Path | None, Path | None, bool], Path | None]
    """(its partial folder, its working checkpoint, whether the working checkpoint was seen) -> what shows it."""
    keep: bool = False
    delay: float = 0.0
    lasting: bool = True
    """Whether the moment lasts long enough that its folder is still there when the kill lands."""


def _written(partial: Path | None) -> bool:
    try:
        return partial is not None and any(os.scandir(partial))
    except FileNotFoundError:
        return False


MOMENTS = (
    Moment("save", "tensorstore", lambda partial, work, seen: partial if not seen and _written(partial) else None),
    Moment(
        "final sync and rename",  # the manifest is written: only the sync and the rename are left
        "pytorch",
        lambda partial, work, seen: partial if partial and not seen and (partial / MANIFEST).exists() else None,
        lasting=False,  # one syncfs: on a fast disk the rename may land first; then the kill hits the working copy
    ),
    Moment("load", "tensorstore", lambda partial, work, seen: work, delay=0.1),
    Moment("deletion after the repeat", "tensorstore", lambda partial, work, seen: partial if seen else None),
    Moment(
        "replace of the kept checkpoint",  # the old one is deleted once the new one took its name
        "tensorstore",
        lambda partial, work, seen: partial if seen else None,
        keep=True,
    ),
)


def _interrupt_at(moment: Moment, sig: signal.Signals, out: Path, log: Path) -> tuple[subprocess.Popen, Path]:
    """Run one strategy and send ``sig`` at ``moment``; the process (ended) and the folder that showed it."""
    args = ["run", *QUICK, "--strategies", moment.strategy, "--out", out, *(["--keep-checkpoints"] * moment.keep)]
    child = start(*args, cwd=out.parent, log=log)
    prefix = f".{moment.strategy}{disk.WORKING}{child.pid}-"
    seen = False
    hit = None
    try:
        deadline = time.monotonic() + _TIMEOUT
        while hit is None and child.poll() is None and time.monotonic() < deadline:
            names = os.listdir(out)
            partial = next((out / n for n in names if n.startswith(prefix) and disk.PARTIAL in n), None)
            work = next((out / n for n in names if n.startswith(prefix) and disk.PARTIAL not in n), None)
            seen = seen or work is not None
            hit = moment.reached(partial, work, seen)
        if hit is not None:
            time.sleep(moment.delay)
            child.send_signal(sig)
    finally:
        if hit is None:
            child.kill()
        child.wait(timeout=_TIMEOUT)
    if hit is None:
        pytest.fail(f"{moment.name}: never reached (exit {child.returncode}):\n{_tail(log)}")
    return child, hit


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_interrupted_at_every_moment_no_checkpoint_lies_and_the_next_run_cleans_up(sig, kept, tmp_path):
    out = shutil.copytree(kept, tmp_path / "out")
    before = rows(out / "results.csv")
    leftovers: list[Path] = []
    for number, moment in enumerate(MOMENTS):
        kept_inode = (out / "tensorstore").stat().st_ino
        log = tmp_path / f"{number}.log"
        child, hit = _interrupt_at(moment, sig, out, log)
        text = log.read_text(errors="replace")
        for path in leftovers:  # this run started by removing what the last interrupted one left
            assert f"removed the leftovers of an interrupted run: {path}" in text, f"{moment.name}: {path}"
            assert not path.exists()
        if sig == signal.SIGKILL:
            assert child.returncode == -signal.SIGKILL, _tail(log)
            if not hit.exists():  # only a moment too short to outlast the kill may be over when it lands:
                assert not moment.lasting, f"{moment.name}: {hit.name} was gone when the kill landed"
                renamed = hit.with_name(hit.name.split(disk.PARTIAL)[0])  # the rename came first
                assert (renamed / MANIFEST).is_file(), f"{moment.name}: neither {hit.name} nor {renamed.name} is left"
        else:
            assert child.returncode == 130, _tail(log)
            assert "Traceback" not in text
            assert "interrupted: an unfinished checkpoint is left only under a .partial- name" in text
        _assert_nothing_lies(out)
        assert (out / "tensorstore").is_dir(), f"{moment.name}: the kept checkpoint is gone"
        if moment.keep:  # interrupted while the old one was deleted: the new one had taken its place
            assert (out / "tensorstore").stat().st_ino != kept_inode
        table = rows(out / "results.csv")
        assert len(table) == len(before), f"{moment.name}: an interrupted repeat left a row"
        pd.testing.assert_frame_equal(table, before)
        leftovers = _owned_by(out, child.pid)
    final = run("run", *QUICK, "--strategies", "pytorch", "--out", out, cwd=tmp_path)
    assert final.returncode == 0, final.stderr[-3000:]
    for path in leftovers:
        assert f"removed the leftovers of an interrupted run: {path}" in final.stderr + final.stdout
    assert not [p.name for p in out.iterdir() if disk.PARTIAL in p.name or disk.WORKING in p.name]
    _assert_nothing_lies(out)
    after = rows(out / "results.csv")
    pd.testing.assert_frame_equal(after.head(len(before)), before)
    assert len(after) == len(before) + 1
    assert after["verified"].iloc[-1]


# --- a filesystem that fills up during a save -------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_MS_REMOUNT = 32


@contextlib.contextmanager
def _tmpfs(directory: Path, size: str, *options: str) -> Iterator[Path]:
    """A small filesystem of its own (root only), unmounted whatever happens."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CAP_SYS_ADMIN); run the fault suite as root to try full disks")
    directory.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(directory)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)


def _squeeze(mount: Path, room: int) -> None:
    """Shrink a mounted tmpfs to what it holds plus ``room`` bytes: one syscall, so a running save is caught."""
    stat = os.statvfs(mount)
    used = (stat.f_blocks - stat.f_bfree) * stat.f_frsize
    if _libc.mount(b"tmpfs", os.fsencode(mount), b"tmpfs", _MS_REMOUNT, f"size={used + room}".encode()) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(mount))


@pytest.mark.parametrize(
    ("failing", "strategies", "room"),
    [
        ("tensorstore", "tensorstore,pytorch", 20 << 20),  # ~42 MB of chunks do not fit; then pytorch's 13 MB do
        ("pytorch", "safetensors,pytorch", 2 << 20),  # torch.save's "unexpected pos" must read as a full disk
    ],
    ids=["tensorstore", "torch.save"],
)
def test_a_disk_that_fills_during_a_save_fails_that_strategy_in_one_line_and_the_run_goes_on(
    failing, strategies, room, tmp_path
):
    with _tmpfs(tmp_path / "small", "300m") as mount:  # room for the disk probe; squeezed as the save starts
        out = mount / "out"
        log = tmp_path / "run.log"
        child = start("run", *QUICK, "--strategies", strategies, "--out", out, cwd=tmp_path, log=log)
        squeezed = False
        try:
            while not squeezed and child.poll() is None:
                names = os.listdir(out) if out.is_dir() else []
                if any(n.startswith(f".{failing}{disk.WORKING}") and disk.PARTIAL in n for n in names):
                    _squeeze(mount, room)
                    squeezed = True
            child.wait(timeout=_TIMEOUT)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        text = log.read_text(errors="replace")
        assert squeezed, text[-3000:]
        assert child.returncode == 1, text[-3000:]
        assert "Traceback" not in text
        (line,) = [line for line in text.splitlines() if line.startswith("error: ")]
        assert line.startswith(f"error: {failing}: DiskFullError: disk full under {out} during the {failing} save")
        assert "it needs about 0.0" in line
        table = rows(out / "results.csv")
        assert table["strategy"].tolist() == strategies.split(",")
        outcome = table.set_index("strategy")
        assert outcome.loc[failing, "error"].startswith("DiskFullError: disk full")
        assert not outcome.loc[failing, "verified"]
        assert outcome.drop(index=failing)["verified"].all(), "the run did not go on after the full disk"
        summary = pd.read_csv(out / "summary.csv", index_col="strategy")
        assert summary.loc[failing, "error"].startswith("DiskFullError")
        assert (out / "8way_performance_comparison.png").stat().st_mtime >= (out / "results.csv").stat().st_mtime
        labels = [t.get_text() for t in plot.comparison_figure(table).axes[0].get_xticklabels()]
        assert f"{failing} (FAILED)" in labels
        assert not [p.name for p in out.iterdir() if disk.PARTIAL in p.name or disk.WORKING in p.name]


def test_a_filesystem_too_small_for_the_disk_probe_says_so(tmp_path):
    with _tmpfs(tmp_path / "tiny-fs", "20m") as mount:
        result = run("run", *QUICK, "--strategies", "pytorch", "--out", mount / "out", cwd=tmp_path)
        assert result.returncode == 1
        line = one_line_error(result.stderr)
        assert line.startswith(f"error: not enough free disk under {mount / 'out'}: the disk probe (64 MiB of streams")
        assert not [p.name for p in (mount / "out").iterdir() if p.name != "results.csv"]


def test_an_output_folder_that_cannot_be_written_is_refused_before_anything_runs(tmp_path):
    with _tmpfs(tmp_path / "read-only", "1m", "ro") as mount:
        for out in (mount, mount / "new"):
            result = run("run", *QUICK, "--strategies", "pytorch", "--out", out, cwd=tmp_path)
            assert result.returncode == 1
            assert one_line_error(result.stderr) == (
                f"error: cannot write into the output folder {out}: {mount}: read-only file system"
            )


# --- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--out", "a-file"], "output folder a-file: a-file is a file, not a folder"),
        (["--out", "a-file/sub"], "output folder a-file/sub: a-file is a file, not a folder"),
        (["--seed", "-5"], "seed must be 0 or more, got -5"),
    ],
    ids=["out-is-a-file", "out-under-a-file", "negative-seed"],
)
def test_bad_arguments_are_one_line_and_exit_2(args, expected, tmp_path):
    (tmp_path / "a-file").write_text("mine")
    result = run("run", *QUICK, "--strategies", "pytorch", *args, cwd=tmp_path)
    assert result.returncode == 2
    assert one_line_error(result.stderr).endswith(f"error: {expected}")
    assert sorted(os.listdir(tmp_path)) == ["a-file"]
    assert (tmp_path / "a-file").read_text() == "mine"


# --- damaged results files --------------------------------------------------------------------------------------


def _cut_final_newline(data: bytes) -> bytes:
    return data[:-1]


def _bad_cell(data: bytes) -> bytes:
    lines = list(csv.reader(io.StringIO(data.decode())))
    lines[1][COLUMNS.index("save_s")] = "fast"
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(lines)
    return text.getvalue().encode()


def _not_utf8(data: bytes) -> bytes:
    header, first, rest = data.split(b"\n", 2)
    return b"\n".join([header, first.replace(b"tiny", b"t\xefny", 1), rest])


def _binary(data: bytes) -> bytes:
    return bytes(range(256)) * 8


@pytest.mark.parametrize(
    ("damage", "kept_aside"),
    [(_cut_final_newline, False), (_bad_cell, False), (_not_utf8, True), (_binary, True)],
    ids=["no-final-newline", "bad-cell", "not-utf8", "binary"],
)
def test_a_damaged_results_file_loses_no_row(damage, kept_aside, kept, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    original = (kept / "results.csv").read_bytes()
    before = rows(kept / "results.csv")
    damaged = damage(original)
    (out / "results.csv").write_bytes(damaged)
    measured = run("run", *QUICK, "--strategies", "pytorch", "--out", out, cwd=tmp_path)
    assert measured.returncode == 0, measured.stderr[-3000:]
    assert "Traceback" not in measured.stderr
    aside = sorted(out.glob("results.*.unreadable.csv"))
    if kept_aside:
        (kept_file,) = aside
        assert kept_file.read_bytes() == damaged
        assert f"kept it as {kept_file.name}" in measured.stderr + measured.stdout
        assert rows(out / "results.csv")["strategy"].tolist() == ["pytorch"]
    else:
        assert not aside
        if damage is _bad_cell:
            with pytest.warns(UserWarning, match=r"skipped 1 damaged row\(s\): line 2 "):
                table = read_results(out / "results.csv")
            survivors = before.iloc[1:]
        else:
            table = rows(out / "results.csv")
            survivors = before
        assert table["run_id"].iloc[:-1].tolist() == survivors["run_id"].tolist()
        assert table["strategy"].tolist() == [*survivors["strategy"], "pytorch"]
        assert table["verified"].all()
    drawn = run("plot", "--results", out / "results.csv", cwd=tmp_path)
    assert drawn.returncode == 0, drawn.stderr[-3000:]
    assert "Traceback" not in drawn.stderr
    if damage is _bad_cell:
        assert "skipped 1 damaged row(s): line 2 (" in drawn.stderr
    if damage is _binary:
        refused = run("plot", "--results", aside[0], cwd=tmp_path)
        assert refused.returncode == 1
        assert "is not a ckptbench results file" in one_line_error(refused.stderr)


# --- two runs, one folder -------------------------------------------------------------------------------------


def test_two_runs_on_one_folder_both_finish_and_lose_no_row(kept, tmp_path):
    out = shutil.copytree(kept, tmp_path / "out")
    dead = dead_pid()
    stale = [
        out / f".tensorstore{disk.WORKING}{dead}-abc123",
        out / f".pytorch{disk.WORKING}{dead}-abc123{disk.PARTIAL}{dead}-0",
    ]
    for path in stale:  # a killed run's leftovers, which both runs find when they start
        shutil.copytree(kept / "tensorstore", path)
    before = rows(out / "results.csv")
    args = ["run", *QUICK, "--strategies", "ts+chunks,pytorch", "--repeats", "3", "--keep-checkpoints", "--out", out]
    logs = [tmp_path / f"run-{n}.log" for n in (1, 2)]
    children = [start(*args, cwd=tmp_path, log=log) for log in logs]
    for child, log in zip(children, logs, strict=True):
        child.wait(timeout=_TIMEOUT)
        assert child.returncode == 0, _tail(log)
    printed = "".join(log.read_text(errors="replace") for log in logs)
    for path in stale:
        assert printed.count(f"removed the leftovers of an interrupted run: {path}") == 1
    table = rows(out / "results.csv")
    pd.testing.assert_frame_equal(table.head(len(before)), before)
    new = table.iloc[len(before) :]
    assert new.groupby("run_id").size().tolist() == [6, 6]
    assert new["verified"].all(), new[["strategy", "error"]]
    assert not [p.name for p in out.iterdir() if disk.PARTIAL in p.name or disk.WORKING in p.name]
    _assert_nothing_lies(out)
    assert {"ts+chunks", "pytorch", "tensorstore"} <= {p.name for p in out.iterdir()}
