"""Bounded inputs and exact errors (issue 24): each fault of the probe tried again on a real ``python -m ckptbench``.

Out-of-range numbers, odd paths and odd flags are refused in one line before anything starts; SIGTERM
and Ctrl-C end a run within seconds; a failed rank is named with the cause that came first; a cut or
edited manifest is damage; the S3 server wrapper notices its server die; tables fit a terminal.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
from test_faults import _tmpfs

from ckptbench import disk, get_strategy, read_results
from ckptbench.manifest import MANIFEST
from ckptbench.results import Row, frame

from conftest import QUICK, one_line_error, run, save_checkpoint, start

pytestmark = pytest.mark.slow  # every test here runs ckptbench as a process
_TIMEOUT = 600


# --- numbers and paths refused before anything starts -------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", *QUICK, "--ranks", "999"], r"ranks must be 1 to \d+ \(4 per core of \d+\), got 999"),
        (["run", *QUICK, "--ranks", "2", "--load-ranks", "999"], r"load_ranks must be 1 to \d+ .*got 999"),
        (["sweep", *QUICK, "--knob", "chunk_bytes=0"], r"--knob chunk_bytes: '0' is below its minimum, 4K"),
        (["sweep", *QUICK, "--knob", "concurrency=0"], r"--knob concurrency: '0' is below its minimum, 1"),
        (["s3-server", "--bucket", "Bad_Bucket"], r"bucket 'Bad_Bucket': S3 bucket names are 3 to 63 lowercase"),
        (["s3-server", "--port", "99999"], r"port 99999: a TCP port is 1 to 65535"),
        (["s3-server", "--dir", "a-file"], r"data folder a-file: a-file is a file, not a folder"),
        (["verify", "a-file"], r"a-file: a file, not a checkpoint folder"),
    ],
    ids=["ranks", "load-ranks", "chunk-bytes-0", "concurrency-0", "bucket", "port", "dir-a-file", "verify-a-file"],
)
def test_out_of_range_inputs_are_one_line_and_exit_2(args, expected, tmp_path):
    (tmp_path / "a-file").write_text("mine")
    started = time.monotonic()
    result = run(*args, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert re.search(expected, one_line_error(result.stderr)), result.stderr
    assert time.monotonic() - started < 60  # refused before any model, probe or server
    assert sorted(os.listdir(tmp_path)) == ["a-file"]
    assert (tmp_path / "a-file").read_text() == "mine"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", *QUICK, "--model-path", "a-file", "--out", "out"], "model directory a-file is a file, not a folder"),
        (["plot", "--results", "a-folder"], "results file a-folder is a folder, not a file (give the CSV inside it)"),
    ],
    ids=["model-path-a-file", "plot-a-folder"],
)
def test_a_file_or_folder_in_the_wrong_place_is_named_as_such(args, expected, tmp_path):
    (tmp_path / "a-file").write_text("mine")
    (tmp_path / "a-folder").mkdir()
    result = run(*args, cwd=tmp_path, timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    assert one_line_error(result.stderr).endswith(expected)


def test_a_space_message_shows_digits_enough_to_differ(tmp_path):
    with _tmpfs(tmp_path / "small", "66m") as mount:  # just short of the probe's 64 MiB plus its small files
        result = run("run", *QUICK, "--strategies", "pytorch", "--out", mount / "out", cwd=tmp_path)
    line = one_line_error(result.stderr)
    found = re.search(r"needs about ([\d.]+) GB, ([\d.]+) GB are free", line)
    assert result.returncode == 1, line
    assert found, line
    assert found[1] != found[2]
    assert float(found[1]) > float(found[2])


# --- odd flags: merged as the help says -----------------------------------------------------------------------


def test_a_strategy_named_twice_runs_once_per_repeat(tmp_path):
    result = run("run", *QUICK, "--strategies", "pytorch,pytorch", "--repeats", "2", "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_results(tmp_path / "out" / "results.csv")["strategy"].tolist() == ["pytorch", "pytorch"]


def test_a_knob_given_twice_sweeps_the_values_of_both(tmp_path):
    log = tmp_path / "sweep.log"
    child = start("sweep", *QUICK, "--knob", "chunk_bytes=64K", "--knob", "chunk_bytes=1M", "--out", "out",
                  cwd=tmp_path, log=log)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while "configurations of" not in log.read_text() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        child.kill()
        child.wait()
    assert log.read_text().splitlines()[0] == "2 configurations of chunk_bytes"


# --- tables that fit ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["list"], ["list", "--ranks"]], ids=["list", "list-ranks"])
def test_list_fits_a_100_column_terminal_and_wide_shows_every_knob(args, tmp_path):
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) >= 20
    assert max(map(len, lines)) <= 100
    assert lines[0].strip()  # no blank header row; a blank line may part two tables further down
    assert lines[1].strip()
    assert lines[1].split()[0] == "pytorch" if args == ["list"] else lines[0].startswith("pytorch")
    wide = run("list", "--wide", cwd=tmp_path)
    assert "file_io_concurrency" in wide.stdout.splitlines()[0]


def test_non_finite_cells_are_skipped_and_named_like_other_damage(tmp_path):
    measured = {"save_s": 1.0, "load_cold_s": 0.5, "load_warm_s": 0.2, "bytes": 10**7, "verified": True}
    rows = [
        Row("r", "t", "tiny", name, "{}", 0, 238, 1, 10**7, **measured) for name in ("pytorch", "dcp", "tensorstore")
    ]
    csv = tmp_path / "results.csv"
    frame(rows).to_csv(csv, index=False)
    table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    table.loc[1, "save_s"], table.loc[2, "bytes"] = "nan", "-1e999"
    table.to_csv(csv, index=False)
    result = run("plot", "--results", csv, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped 2 damaged row(s): line 3 (save_s='nan' is not a finite number); line 4 (bytes='-1e999'" in (
        result.stderr
    )
    assert "RuntimeWarning" not in result.stderr
    assert "inf" not in (tmp_path / "summary.csv").read_text()
    assert pd.read_csv(tmp_path / "summary.csv", index_col="strategy").index.tolist() == ["pytorch"]


# --- verify: the manifest itself ------------------------------------------------------------------------------


def _cut(tensors: int):
    def edit(body: dict) -> dict:
        return {**body, "tensors": body["tensors"][:tensors]}

    return edit


def _unsealed(body: dict) -> dict:
    return {k: v for k, v in body.items() if k != "manifest_digest"}


@pytest.mark.parametrize("name", ["tensorstore", "ts+ocdbt", "pytorch", "safetensors", "dcp"])
def test_verify_finds_a_cut_or_edited_manifest_and_reads_an_older_one(name, tiny, tmp_path):
    saved = tmp_path / "saved"
    save_checkpoint(get_strategy(name), tiny.tensors, saved)
    body = json.loads((saved / MANIFEST).read_text())
    assert "manifest_digest" in body
    intact = run("verify", saved, cwd=tmp_path)
    assert intact.returncode == 0, intact.stdout + intact.stderr
    assert intact.stdout.strip().endswith("238 tensors, intact"), intact.stdout

    def verify(text: str) -> subprocess.CompletedProcess[str]:
        (saved / MANIFEST).write_text(text)
        return run("verify", saved, cwd=tmp_path)

    original = json.dumps(body)
    for edit in (_cut(100), _cut(0)):
        damaged = verify(json.dumps(edit(body)))  # still carries the digest of the full list
        assert damaged.returncode == 1, damaged.stdout + damaged.stderr
        assert f"DAMAGED {MANIFEST}: " in damaged.stdout
        assert "edited or cut" in damaged.stdout
    truncated = verify(original[: len(original) // 2])
    assert truncated.returncode == 1, truncated.stdout + truncated.stderr
    assert "malformed manifest" in truncated.stdout
    older = verify(json.dumps(_unsealed(body)))  # before manifests carried their digest
    assert older.returncode == 0, older.stdout + older.stderr
    assert "238 tensors, intact (a manifest without its own digest" in older.stdout
    cut_older = verify(json.dumps(_cut(100)(_unsealed(body))))  # the format's own index still tells
    assert cut_older.returncode == 1, cut_older.stdout + cut_older.stderr
    assert f"names 100 tensors but the {name} data holds 238: 138 unnamed" in cut_older.stdout


# --- interrupted: SIGTERM as Ctrl-C, and within seconds --------------------------------------------------------


def _partial(out: Path, pid: int | str = "", files: int = 1) -> Path | None:
    """The partial folder of process ``pid`` (any, by default) once it holds at least ``files`` entries (counted
    one level down)."""
    for entry in os.listdir(out) if out.is_dir() else []:
        if f"{disk.PARTIAL}{pid}" in entry:
            try:
                count = sum(len(os.listdir(sub)) for sub in os.scandir(out / entry) if sub.is_dir())
            except FileNotFoundError:
                return None
            return out / entry if count >= files else None
    return None


def _interrupt(args: list, sig: signal.Signals, files: int, tmp_path: Path) -> tuple[int, float, str, Path]:
    """Start a run, send ``sig`` once its partial holds ``files`` files: exit code, seconds to exit, output, partial."""
    out, log = tmp_path / "out", tmp_path / "run.log"
    child = start(*args, "--out", out, cwd=tmp_path, log=log)
    try:
        deadline = time.monotonic() + _TIMEOUT
        while (partial := _partial(out, child.pid, files)) is None and child.poll() is None:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        assert partial is not None, log.read_text()[-3000:]
        child.send_signal(sig)
        sent = time.monotonic()
        child.wait(timeout=120)
        return child.returncode, time.monotonic() - sent, log.read_text(errors="replace"), partial
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_sigterm_ends_a_run_as_ctrl_c_does_and_the_next_run_removes_its_partial(tmp_path):
    code, seconds, text, partial = _interrupt(
        ["run", *QUICK, "--strategies", "tensorstore"], signal.SIGTERM, 1, tmp_path
    )
    assert code == 128 + signal.SIGTERM, text[-3000:]
    assert "interrupted: an unfinished checkpoint is left only under a .partial- name" in text
    assert "Traceback" not in text
    assert seconds < 10
    assert partial.exists()
    again = run("run", *QUICK, "--strategies", "pytorch", "--out", tmp_path / "out", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (again.stdout + again.stderr).count(f"removed the leftovers of an interrupted run: {partial}") == 1
    assert not partial.exists()
    assert read_results(tmp_path / "out" / "results.csv")["strategy"].tolist() == ["pytorch"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_save_of_many_thousand_files_stops_within_seconds(sig, tmp_path):
    """4 KiB chunks of the 2-layer model: ~450,000 files; the interrupt lands once 20,000 are written."""
    args = ["sweep", "--preset", "openllama-3b-2l", "--no-warmup", "--no-drift", "--knob", "chunk_bytes=4K"]
    code, seconds, text, _ = _interrupt(args, sig, 20_000, tmp_path)
    assert code == 128 + sig, text[-3000:]
    assert seconds < 5, f"{seconds:.1f} s"
    assert "interrupted: " in text
    assert "Traceback" not in text


# --- a failed rank: the first cause ------------------------------------------------------------------------------


def _ranks(parent: int) -> list[psutil.Process]:
    """The spawned ranks of a run, rank 0 first (started in rank order)."""
    children = [p for p in psutil.Process(parent).children() if "spawn_main" in " ".join(p.cmdline())]
    return sorted(children, key=lambda p: p.create_time())


def _fail_a_rank(strategy: str, rank: int, sig: signal.Signals, tmp_path: Path, *extra: str) -> tuple[int, str]:
    out, log = tmp_path / "out", tmp_path / "run.log"
    child = start("run", *QUICK, "--ranks", "2", "--strategies", strategy, *extra, "--out", out, cwd=tmp_path, log=log)
    try:
        deadline = time.monotonic() + _TIMEOUT
        while _partial(out) is None and child.poll() is None:  # rank 0 names it, with its own pid
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.02)
        ranks = _ranks(child.pid)
        assert len(ranks) == 2, log.read_text()[-3000:]
        ranks[rank].send_signal(sig)
        child.wait(timeout=_TIMEOUT)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return child.returncode, log.read_text(errors="replace")


def test_a_stopped_rank_is_named_with_the_timeout_not_the_kill_that_ended_it(tmp_path):
    code, text = _fail_a_rank("ts+chunks", 1, signal.SIGSTOP, tmp_path, "--rank-timeout", "10")
    assert code == 1, text[-3000:]
    line = one_line_error(text)
    assert "rank 1 failed: " in line, line
    assert "10 s" in line, line
    assert "SIGKILL" not in line


@pytest.mark.parametrize("attempt", range(3))
def test_a_killed_ocdbt_rank_0_is_blamed_not_the_rank_that_lost_its_coordinator(attempt, tmp_path):
    code, text = _fail_a_rank("ts+ocdbt", 0, signal.SIGKILL, tmp_path)
    assert code == 1, text[-3000:]
    line = one_line_error(text)
    assert "rank 0 failed: killed by SIGKILL" in line, line
    assert not re.search(r"^W\d{4} ", text, flags=re.MULTILINE), text[-3000:]  # no torch C++ warnings


# --- the S3 server wrapper ---------------------------------------------------------------------------------------


def test_s3_server_ends_in_one_line_when_its_server_dies(tmp_path):
    log = tmp_path / "server.log"
    child = start("s3-server", "--dir", tmp_path / "data", cwd=tmp_path, log=log)
    try:
        deadline = time.monotonic() + 120
        while "Ctrl-C stops it." not in log.read_text() and child.poll() is None:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        (weed,) = [p for p in psutil.Process(child.pid).children() if "weed" in p.name()]
        weed.kill()
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    text = log.read_text(errors="replace")
    assert child.returncode == 1, text[-3000:]
    assert "the S3 server (weed mini, pid" in one_line_error(text)
    assert "killed by SIGKILL" in text
