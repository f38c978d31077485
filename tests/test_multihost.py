"""A two-host run rehearsed in network namespaces: torchrun per host, gloo over a veth pair, an S3 cluster on host 0.

The rehearsal itself needs root; the refusal and the cleanup of a killed rehearsal's namespaces are checked too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from ckptbench import multihost
from ckptbench.cli import main
from ckptbench.results import read_results

from conftest import dead_pid, environment

ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


def _leftovers(owner: int) -> list[str]:
    """What a rehearsal by ``owner`` left: its namespaces, links of ours outside them, processes inside none."""
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    ours = [n for n in multihost.namespaces() if n.startswith(f"{multihost.PREFIX}{owner}-")]
    return ours + [line for line in links.splitlines() if multihost.PREFIX.rstrip("-") in line]


def _started_by(owner: int) -> list[psutil.Process]:
    """Processes whose command line names the rehearsal (its rendezvous id) or its S3 server's address."""
    marks = (f"{multihost.PREFIX}{owner}", f"{multihost.SUBNET}.1")
    found = []
    for process in psutil.process_iter(["cmdline"]):
        line = " ".join(process.info["cmdline"] or [])
        if any(mark in line for mark in marks):
            found.append(process)
    return found


def test_without_root_the_rehearsal_is_refused_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(SystemExit) as ended:
        main(["hosts", "--", "--preset", "tiny"])
    assert ended.value.code == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert "network namespaces need root" in line


@ROOT
def test_a_dead_rehearsals_namespaces_and_processes_go_with_the_next_one():
    owner = dead_pid()
    name = f"{multihost.PREFIX}{owner}-h0"
    subprocess.run(["ip", "netns", "add", name], check=True)
    inside = subprocess.Popen(["ip", "netns", "exec", name, "sleep", "600"])
    try:
        assert name in multihost.namespaces()
        assert name in multihost.clean_stale()
        assert inside.wait(10) == -signal.SIGKILL
        assert name not in multihost.namespaces()
    finally:
        inside.kill()
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


@pytest.mark.slow
@ROOT
def test_two_hosts_of_two_ranks_save_to_the_cluster_three_ranks_load_and_nothing_is_left(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "ckptbench", "hosts", "--nproc-per-node", "2", "--volumes", "2", "--"]
    command += ["--preset", "tiny", "--load-ranks", "3", "--strategies", "dcp,ts+best,ts+ocdbt", "--out", str(out)]
    command += ["--no-drift", "--no-warmup", "--rank-timeout", "300"]
    launcher = subprocess.Popen(command, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = launcher.communicate(timeout=900)
    assert launcher.returncode == 0, (stdout[-2000:], stderr[-3000:])
    rows = read_results(out / "results.csv")
    assert rows["strategy"].tolist() == ["dcp", "ts+best", "ts+ocdbt", "ts+ocdbt+per-process"]
    assert rows["verified"].all(), rows[["strategy", "error"]]
    assert (rows["ranks"] == 4).all()
    assert (rows["load_ranks"] == 3).all()
    for text in rows["rank_requests"]:
        per_rank = json.loads(text)
        assert [len(per_rank["save"]), len(per_rank["load_cold"])] == [4, 3]
    (recorded,) = (out / "runs").glob("*.json")
    assert json.loads(recorded.read_text())["ranks"]["launcher"] == "torchrun"
    assert _leftovers(launcher.pid) == []
    assert _started_by(launcher.pid) == []


@pytest.mark.slow
@ROOT
@pytest.mark.parametrize("how", ["ctrl-c", "kill"])
def test_an_interrupted_rehearsal_leaves_nothing_after_ctrl_c_or_the_next_run_after_a_kill(how, tmp_path):
    command = [sys.executable, "-m", "ckptbench", "hosts", "--", "--preset", "tiny", "--strategies", "ts+best"]
    command += ["--out", str(tmp_path / "out"), "--no-drift", "--no-warmup"]
    launcher = subprocess.Popen(command, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not [p for p in _started_by(launcher.pid) if "torch.distributed.run" in " ".join(p.cmdline())]:
        assert launcher.poll() is None, launcher.stdout.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    started = _started_by(launcher.pid)
    launcher.send_signal(signal.SIGINT if how == "ctrl-c" else signal.SIGKILL)
    launcher.wait(60)
    _, alive = psutil.wait_procs(started, timeout=30)
    assert not alive, [p.cmdline()[:4] for p in alive]  # ended with the launcher, however it ended
    if how == "kill":  # no chance to remove its namespaces: the next rehearsal does
        assert len(_leftovers(launcher.pid)) == multihost.HOSTS
        assert sorted(multihost.clean_stale()) == [f"{multihost.PREFIX}{launcher.pid}-h{n}" for n in range(2)]
    assert _leftovers(launcher.pid) == []
