"""Each round in a fresh worker process: the same rows as one process, and a worker's failure is a row."""

from __future__ import annotations

import os
import re

import pandas as pd
import pytest
from worker_faults import Killed, Raising

from ckptbench import Benchmark, RunConfig, UsageError
from ckptbench.cli import _parser
from ckptbench.results import COLUMNS
from ckptbench.worker import Worker, WorkerError

from conftest import FAKE_LIMITS

TWO = ["pytorch", "ts+chunks"]


@pytest.fixture(scope="module")
def both(tiny, tmp_path_factory) -> dict[bool, pd.DataFrame]:
    """The same two strategies, two shuffled rounds, measured here and with a fresh process per round."""
    runs = {}
    for fresh in (False, True):
        out = tmp_path_factory.mktemp("fresh" if fresh else "here") / "out"
        config = RunConfig(
            preset="tiny", out=out, repeats=2, order="shuffled", progress=False, drift=True, fresh_process=fresh
        )
        bench = Benchmark(config, checkpoint=tiny, limits=FAKE_LIMITS, log=lambda message: None)
        assert all(phase.ok for phase in bench.run(TWO))
        runs[fresh] = bench.results_file.read()
    return runs


def test_rounds_in_fresh_processes_give_rows_of_the_same_shape_verified(both):
    here, fresh = both[False], both[True]
    assert list(fresh.columns) == list(here.columns) == COLUMNS
    assert fresh[["strategy", "repeat"]].equals(here[["strategy", "repeat"]])  # the same seeded order
    assert fresh["verified"].all()
    assert (fresh["error"] == "").all()
    filled = [c for c in COLUMNS if c != "worker_s"]
    assert fresh[filled].notna().equals(here[filled].notna())
    assert here["worker_s"].isna().all()
    firsts = fresh.groupby("repeat").head(1).index
    assert (fresh.loc[firsts, "worker_s"] > 0).all()  # each round started a process
    assert (fresh.drop(index=firsts)["worker_s"] == 0).all()
    assert (fresh["warmup_s"] > 0).all()  # every process warms each strategy up; one process does it once
    assert here.loc[here["repeat"] == 1, "warmup_s"].max() < fresh.loc[fresh["repeat"] == 1, "warmup_s"].min()
    assert (fresh["overhead_s"] >= fresh["worker_s"] + fresh["warmup_s"]).all()


def test_a_killed_worker_is_a_failed_row_and_the_round_goes_on(make_bench):
    bench = make_bench(repeats=2, fresh_process=True)
    killed = Killed("killed")
    phases = {p.strategy: p for p in bench.run([killed, "pytorch"])}
    assert [r.error for r in phases["killed"].rows] == [
        "the worker process died (killed by signal 9) while measuring killed [1/2]"
    ]
    assert not phases["killed"].ok
    assert phases["pytorch"].ok
    assert len(phases["pytorch"].rows) == 2
    assert phases["pytorch"].rows[0].worker_s > 0  # a new process took over the rest of the round
    stored = bench.results_file.read()
    assert stored["strategy"].tolist() == ["killed", "pytorch", "pytorch"]


def test_an_error_in_a_worker_is_recorded_as_one_process_records_it(make_bench, tmp_path):
    errors = {}
    for fresh in (False, True):
        bench = make_bench(fresh_process=fresh, out=tmp_path / str(fresh))
        (phase,) = bench.run([Raising("raising")])
        errors[fresh] = phase.error
    pattern = (
        r"^CheckpointError: .*/{}/\.raising\.work-\d+-[0-9a-f]+\.partial-\d+-0: raising save failed: ValueError: boom"
    )
    for fresh, error in errors.items():  # the same line but for the folder and the writer's pid
        assert re.match(pattern.format(fresh), error), error


def test_a_worker_that_cannot_start_names_why():
    with Worker(os._exit, 3) as worker, pytest.raises(WorkerError, match=r"died \(exit code 3\) while starting"):
        worker.measure(1, "nothing")


def test_ranks_measure_in_their_own_processes_already(tmp_path):
    with pytest.raises(UsageError, match="--ranks measures in processes of their own"):
        RunConfig(preset="tiny", out=tmp_path, ranks=2, fresh_process=True)


def test_run_and_bench_measure_in_their_own_process_unless_told_otherwise():
    for command in ("run", "bench"):
        assert _parser().parse_args([command]).process == "same"
        assert _parser().parse_args([command, "--process", "fresh"]).process == "fresh"


def test_rounds_in_fresh_processes_measure_on_s3_with_request_counts(s3, tiny, tmp_path):
    config = RunConfig(
        preset="tiny",
        out=tmp_path / "out",
        repeats=2,
        progress=False,
        warmup=False,
        drift=False,
        store="s3://ckpt/fresh",
        s3_endpoint=s3.endpoint,
        fresh_process=True,
    )
    bench = Benchmark(config, checkpoint=tiny, limits=FAKE_LIMITS, log=lambda message: None)
    (phase,) = bench.run(["ts+chunks"])
    assert phase.ok, phase.error
    results = bench.results
    assert (results["store"] == "s3://ckpt/fresh").all()
    assert (results["requests_put"] > 0).all()  # counted in the worker, where the requests were made
    assert (results["worker_s"] > 0).all()  # one round each
