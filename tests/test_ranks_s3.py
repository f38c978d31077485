"""Ranks writing to one object store: each rank through its library's own S3 path, a reshard on load, bit-exact.

Every run here starts real processes (gloo) against a real S3 server (SeaweedFS), so every test is slow.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from ranks_faults import Faulty

import ckptbench
from ckptbench import launch, ranked
from ckptbench.manifest import MANIFEST
from ckptbench.results import read_results
from ckptbench.strategies import get_strategy

from conftest import FAKE_LIMITS, environment

ON_S3 = ["dcp", "ts+best", "ts+ocdbt", "ts+ocdbt+per-process"]
"""What ``--strategies dcp,ts+best,ts+ocdbt`` runs with ranks: OCDBT both ways."""


def _keys(s3, prefix: str) -> list[str]:
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.mark.slow
def test_two_ranks_save_to_s3_and_one_loads_bit_exact_with_requests_per_rank(s3, tmp_path):
    """The issue's own command: dcp through torch's writer over boto3, TensorStore's s3 kvstore per rank."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "ckptbench", "run", "--preset", "tiny", "--ranks", "2", "--load-ranks", "1"]
    command += ["--strategies", "dcp,ts+best,ts+ocdbt", "--store", "s3://ckpt/ranks", "--s3-endpoint", s3.endpoint]
    command += ["--out", str(out), "--no-drift", "--no-warmup"]
    done = subprocess.run(command, capture_output=True, text=True, env=environment(), timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "NOT VERIFIED" not in done.stdout
    rows = read_results(out / "results.csv")
    assert rows["strategy"].tolist() == ON_S3
    assert rows["verified"].all(), rows[["strategy", "error"]]
    assert (rows["store"] == "s3://ckpt/ranks").all()
    for row in rows.itertuples():
        per_rank, moved = json.loads(row.rank_requests), json.loads(row.rank_bytes)
        assert [len(per_rank["save"]), len(per_rank["load_cold"])] == [2, 1]
        assert all(n > 0 for n in per_rank["save"]), (row.strategy, per_rank)  # every rank wrote its own rows
        assert sum(per_rank["save"]) == row.requests_save
        assert sum(per_rank["save"]) + sum(per_rank["load_cold"]) == (
            row.requests_put + row.requests_get + row.requests_head + row.requests_delete
        )
        assert sum(moved["save"]) == row.bytes_sent >= row.bytes * 0.9, row.strategy  # OCDBT rewrites its index
        assert 0 < sum(moved["load_cold"]) <= row.bytes_received  # the column adds what the save read
        assert moved["save"][1] > 0.3 * row.bytes_sent  # rank 1 wrote a share of the bytes, not rank 0 alone
    assert _keys(s3, "ranks/") == []  # every working prefix removed


@pytest.mark.slow
def test_a_killed_rank_on_s3_ends_the_run_naming_it_and_leaves_no_checkpoint(s3, tmp_path):
    faulty = Faulty("faulty", get_strategy("ts+chunks"), fault="kill")
    config = ckptbench.RunConfig(
        preset="tiny", out=tmp_path / "out", ranks=2, warmup=False, drift=False, progress=False,
        rank_timeout_s=120.0, store="s3://ckpt/killed", s3_endpoint=s3.endpoint,
    )  # fmt: skip
    started = time.time()
    with pytest.raises(launch.RankFailed) as failure:
        ranked.run(config, ["ts+chunks", faulty], limits=FAKE_LIMITS)
    assert str(failure.value) == "rank 1 failed: killed by SIGKILL, without a Python error"
    assert time.time() - started < 60
    rows = read_results(config.out / "results.csv")
    assert rows["verified"].tolist() == [True, False]
    assert rows["error"].iloc[1] == str(failure.value)
    assert not [k for k in _keys(s3, "killed/") if k.endswith(MANIFEST)]
    assert _keys(s3, "killed/") == []  # the dead run's working prefix was removed
