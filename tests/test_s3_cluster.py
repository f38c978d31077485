"""SeaweedFS as a cluster (a master, volume servers, a filer and S3, each a process), and servers that end with
the process that started them. Every test starts real SeaweedFS processes, so every test is slow."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ckptbench import Benchmark, RunConfig, s3server
from ckptbench.manifest import MANIFEST
from ckptbench.s3server import S3Server

from conftest import FAKE_LIMITS, environment


def _keys(server: S3Server, prefix: str) -> list[str]:
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=server.bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.mark.slow
def test_a_volume_server_stopped_mid_save_fails_the_save_in_one_line_and_leaves_nothing_complete(
    tiny, tmp_path, monkeypatch, fault_mid_save
):
    with S3Server("ckpt", volumes=2) as server:
        assert [d.role for d in server.daemons] == ["master", "volume 1", "volume 2", "filer", "s3"]
        assert len({d.process.pid for d in server.daemons}) == 5
        for name, value in server.env.items():
            monkeypatch.setenv(name, value)

        config = RunConfig(
            preset="tiny", out=tmp_path / "out", progress=False, warmup=False, drift=False,
            store="s3://ckpt/dying", s3_endpoint=server.endpoint,
        )  # fmt: skip
        bench = Benchmark(config, checkpoint=tiny, limits=FAKE_LIMITS, log=lambda message: None)
        started = time.perf_counter()
        (phase,) = bench.run([fault_mid_save(lambda: server.stop_volume(1))])
        took = time.perf_counter() - started
        (row,) = phase.rows
        assert row.error, "the save went on as if nothing happened"
        assert "\n" not in row.error
        assert not row.verified
        assert server.daemons[1].ended() is not None  # the volume server is down, the rest still answer
        assert not [k for k in _keys(server, "dying/") if k.endswith(MANIFEST)]
        assert took < 300  # bounded retries (124 s measured here, cleanup included), not the default quarter hour


@pytest.mark.slow
@pytest.mark.parametrize("volumes", [None, 2])
def test_a_server_whose_parent_is_killed_by_sigterm_stops_and_its_folder_goes_with_the_next(volumes, tmp_path):
    script = (
        "import sys, time; from ckptbench.s3server import S3Server\n"
        f"server = S3Server(volumes={volumes}).start()\n"
        "print(server.data_dir, *(d.process.pid for d in server.daemons), flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], env=environment(), stdout=subprocess.PIPE, text=True)
    folder, *pids = parent.stdout.readline().split()
    weeds = [psutil.Process(int(pid)) for pid in pids]
    assert len(weeds) == (1 if volumes is None else 5)
    parent.send_signal(signal.SIGTERM)  # Python's default: die at once, no finally, no stop()
    assert parent.wait(10) == -signal.SIGTERM
    _, alive = psutil.wait_procs(weeds, timeout=20)
    assert not alive, [p.cmdline()[:2] for p in alive]
    assert Path(folder).is_dir()  # nobody removed it...
    assert Path(folder) in s3server.clean_stale_data()  # ...until the next server starts
    assert not Path(folder).exists()
    assert os.getpid() != parent.pid
