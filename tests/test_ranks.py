"""Runs with ranks: N processes save their row shards, M load them back (a reshard when M differs), bit-exact.

The runs launch real processes (torch.distributed, gloo) on the tiny preset, so they are slow; the
row arithmetic, the layouts, the refusals and the figure are checked without any.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import ranks_rows
import torch
from ranks_faults import FAULT_TIME, Faulty

import ckptbench
from ckptbench import checkpoint, docs, launch, model, ranked, scaling, study
from ckptbench.cli import main
from ckptbench.errors import UsageError
from ckptbench.results import COLUMNS, Row, config_json, frame, read_results, row
from ckptbench.shards import block_rows, contiguous_stride, row_range
from ckptbench.strategies import Strategy, TensorStoreOptions, from_config, get_strategy, sharded

from conftest import FAKE_LIMITS, environment, leftovers, written

PLANNED = ["dcp", "ts+chunks", "ts+ocdbt", "ts+ocdbt+per-process"]
"""What ``--strategies dcp,ts+chunks,ts+ocdbt`` runs with ranks: OCDBT both ways."""


def _config(tmp_path: Path, ranks: int, load_ranks: int | None = None, **settings) -> ckptbench.RunConfig:
    settings = {"warmup": False, "drift": False, "progress": False, "rank_timeout_s": 120.0, **settings}
    return ckptbench.RunConfig(preset="tiny", out=tmp_path / "out", ranks=ranks, load_ranks=load_ranks, **settings)


def _check_rows(rows: pd.DataFrame, names: list[str], ranks: int, load_ranks: int) -> None:
    assert rows["strategy"].tolist() == names
    assert rows["verified"].all(), rows[["strategy", "error"]]
    assert (rows["error"] == "").all()
    assert (rows["ranks"] == ranks).all()
    assert (rows["load_ranks"] == load_ranks).all()
    assert (rows["tensors"] == 238).all()
    for text in rows["rank_times"]:
        times = json.loads(text)
        assert [len(times[k]) for k in ("save_s", "load_cold_s", "load_warm_s")] == [ranks, load_ranks, load_ranks]
    assert (rows["save_s"] >= rows["rank_times"].map(lambda t: max(json.loads(t)["save_s"]))).all()
    assert (rows["peak_rss_save_sum"] >= rows["peak_rss_save"]).all()
    assert all("sharded" in json.loads(c) for c in rows["config"])


def test_rows_follow_torch_chunk():
    for rows in (0, 1, 2, 5, 7, 10, 17, 136, 2000):
        for ranks in (1, 2, 3, 4):
            expected = [len(c) for c in torch.arange(rows).chunk(ranks)] + [0] * ranks
            assert [hi - lo for lo, hi in (row_range(rows, ranks, r) for r in range(ranks))] == expected[:ranks]
            assert row_range(rows, ranks, ranks - 1)[1] == rows
    assert [row_range(5, 4, r) for r in range(4)] == [(0, 2), (2, 4), (4, 5), (5, 5)]
    assert contiguous_stride((7, 3, 2)) == torch.empty(7, 3, 2).stride()


def test_build_each_draws_build_bit_for_bit_one_tensor_at_a_time(tiny):
    shapes, each = model.build_each("tiny")
    assert shapes.params == tiny.params
    assert shapes.nbytes == tiny.nbytes
    assert all(t.device.type == "meta" for n, t in shapes.tensors.items() if n != model.ROTARY_BUFFER)
    names = []
    for name, tensor in each:
        names.append(name)
        want = tiny.tensors[name]
        assert tensor.dtype == want.dtype
        assert torch.equal(tensor.view(torch.uint8), want.view(torch.uint8)), name
    assert names == list(tiny.tensors)


@pytest.mark.parametrize("fmt", ["zarr", "zarr3"])
@pytest.mark.parametrize("chunk_bytes", [None, 1 << 20])
def test_no_chunk_or_shard_has_two_writers(fmt, chunk_bytes, tiny):
    options = TensorStoreOptions(format=fmt, chunk_bytes=chunk_bytes)
    for writers in (2, 3, 4):
        for tensor in tiny.tensors.values():
            shape, block = list(tensor.shape), block_rows(tensor.shape[0], writers)
            metadata = options.metadata(shape, tensor.dtype, block)
            if fmt == "zarr":
                assert block % metadata["chunks"][0] == 0 or block >= shape[0]
            else:
                shard = metadata["chunk_grid"]["configuration"]["chunk_shape"][0]
                inner = metadata["codecs"][0]["configuration"]["chunk_shape"][0]
                assert shard == block or block >= shape[0]
                assert shard % inner == 0
    alone = options.metadata([136, 360], torch.float16, 136)
    assert alone == options.metadata([136, 360], torch.float16)


def test_every_registered_strategy_has_a_form_and_ocdbt_has_two():
    for name, strategy in ckptbench.STRATEGIES.items():
        if isinstance(strategy, ckptbench.Orbax):  # one process by design: refused by name, left out of groups
            with pytest.raises(UsageError, match="has no form with ranks"):
                study.forms(name)
        else:
            assert sharded.forms(get_strategy(name))
    assert [f.name for f in study.forms("dcp,ts+chunks,ts+ocdbt")] == PLANNED
    assert [f.name for f in study.forms("ts+ocdbt+per-process")] == ["ts+ocdbt+per-process"]
    assert "gather to rank 0, save there" in study.forms("pytorch")[0].knobs()["ranks"]
    assert "gather to rank 0, save there" in study.forms("safetensors")[0].knobs()["ranks"]
    for form in study.forms("every"):
        assert from_config(form.name, form.config()) == form


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ts+chunks", "ts+zarr3", "ts+ocdbt", "ts+ocdbt+per-process"])
def test_rows_written_by_three_ranks_read_back_by_two_and_by_four(name, tmp_path):
    """Four real ranks (gloo): three write their rows at once, then two and four read theirs back, bit-exact,
    each verified on its own rank; a tensor has fewer rows than ranks, so some ranks hold none of it."""
    form = study.forms(name)[0]  # ts+ocdbt: its shared database, through the coordinator
    mailbox = launch.Mailbox.serve(ranks_rows.TIMEOUT_S)
    launch.spawn(mailbox, ranks_rows.write_then_read, 4, form, tmp_path, 3, [2, 4], timeout_s=ranks_rows.TIMEOUT_S)
    assert sorted(p.name for p in tmp_path.iterdir()), "nothing was written"


class _Unsharded(Strategy):
    name = "unsharded"
    config = knobs = save = load = estimate_bytes = None


def test_a_strategy_without_a_form_is_refused_and_an_unknown_name_too():
    with pytest.raises(ckptbench.UsageError, match="unsharded has no form with ranks"):
        study.forms([_Unsharded()])
    with pytest.raises(ckptbench.UnknownChoiceError, match="ts\\+ocdbt\\+per-process"):
        study.forms("nosuch")


def test_ranks_loading_into_existing_tensors_are_refused_in_one_line(tmp_path, capsys):
    """Every rank loads fresh tensors: a row saying load_into=existing would not be true, so none is made."""
    message = "--load-into existing is one process's live model; with --ranks every rank loads fresh"
    with pytest.raises(ckptbench.UsageError, match=message):
        _config(tmp_path, 2, load_into="existing")
    out = tmp_path / "cli"
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--preset", "tiny", "--out", str(out), "--ranks", "2", "--load-into", "existing"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"python -m ckptbench: error: {message}"
    assert not out.exists()  # refused before anything was measured or written


def test_bad_rank_settings_are_refused_before_anything_runs(tmp_path, capsys):
    with pytest.raises(ckptbench.UsageError, match="ranks must be at least 1"):
        _config(tmp_path, 0)
    with pytest.raises(ckptbench.UsageError, match="load_ranks needs ranks"):
        ckptbench.RunConfig(preset="tiny", load_ranks=2)
    with pytest.raises(ckptbench.UsageError, match="needs ranks"):
        ranked.run(ckptbench.RunConfig(preset="tiny", out=tmp_path))
    out = str(tmp_path / "cli")
    for argv in (["--load-ranks", "2"], ["--ranks", "0"], ["--ranks", "2", "--strategies", "nosuch"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["run", "--preset", "tiny", "--out", out, *argv])
        assert exit_info.value.code == 2
    assert "unknown strategy 'nosuch'" in capsys.readouterr().err
    assert not (tmp_path / "cli" / "results.csv").exists()


def test_under_torchrun_the_world_must_hold_every_rank(tmp_path, monkeypatch):
    env = {"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "3", "MASTER_ADDR": "h"}
    for name, value in {**env, "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    assert launch.under_torchrun()
    with pytest.raises(ckptbench.UsageError, match="torchrun started 3 processes; --ranks 2 --load-ranks 1 needs 2"):
        ranked.run(_config(tmp_path, 2, 1), "ts+chunks")


def test_bad_rank_counts_and_several_under_torchrun_are_refused_before_anything_runs(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "cli")
    for bad in ("1,x", "2,0", ""):
        with pytest.raises(SystemExit) as exit_info:
            main(["run", "--preset", "tiny", "--out", out, "--ranks", bad])
        assert exit_info.value.code == 2
    assert "a number of ranks (at least 1), or several separated by commas" in capsys.readouterr().err
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h"}
    for name, value in {**env, "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--preset", "tiny", "--out", out, "--ranks", "1,2"])
    assert exit_info.value.code == 2
    assert "give --ranks one count" in capsys.readouterr().err
    assert not (tmp_path / "cli").exists()


def test_a_results_file_from_before_the_rank_columns_still_reads(tmp_path):
    older = COLUMNS[: COLUMNS.index("schema_version") + 1]
    written = frame([Row("r", "t", "tiny", "pytorch", config_json({}), 0, 238, 1, 2, save_s=1.0, verified=True)])
    path = tmp_path / "results.csv"
    written[older].to_csv(path, index=False)
    read = read_results(path)
    assert list(read.columns) == COLUMNS
    assert read["save_s"].tolist() == [1.0]
    assert read["ranks"].isna().all()
    assert read["rank_times"].tolist() == [""]


SIZES = {"repeat": 0, "tensors": 238, "params": 1, "model_bytes": 10**7}


def _ranked_rows() -> pd.DataFrame:
    rows = []
    for ranks, load_ranks, seconds in ((1, 1, 4.0), (2, 2, 2.5), (4, 4, 2.0), (2, 1, 3.0)):
        for name in ("dcp", "ts+chunks"):
            measured = {"save_s": seconds, "load_cold_s": seconds / 2, "ranks": ranks, "load_ranks": load_ranks}
            identity = {"run_id": "r", "timestamp": "t", "preset": "tiny", "strategy": name, "config": "{}"}
            rows.append(row({**identity, **SIZES, "verified": True, **measured}))
    return frame(rows)


def test_the_scaling_figure_and_table_put_time_against_ranks(tmp_path, capsys):
    rows = _ranked_rows()
    figure = scaling.figure(rows)
    save_ax, load_ax = figure.axes
    assert [t.get_text() for t in save_ax.get_xticklabels()] == ["1", "2", "4"]
    assert len(save_ax.lines) >= 2  # a line per strategy
    assert len(load_ax.lines) >= 4  # resharded points apart
    table = scaling.table(rows)
    assert table.loc["dcp", "save s, 4->4 ranks"] == "2"
    assert table.loc["dcp", "save s, 2->1 ranks"] == "3"

    results = tmp_path / "results.csv"
    rows.to_csv(results, index=False)
    assert main(["plot", "--by", "ranks", "--results", str(results)]) == 0
    assert (tmp_path / f"{scaling.STEM}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows.assign(ranks=None, load_ranks=None).to_csv(results, index=False)
    assert main(["plot", "--by", "ranks", "--results", str(results)]) == 1
    assert "no completed results with ranks" in capsys.readouterr().err


def test_a_plan_whose_every_repeat_failed_says_failed_in_the_table():
    identity = {"run_id": "r", "timestamp": "t", "preset": "tiny", "strategy": "ts+best", "config": "{}", **SIZES}
    killed = row({**identity, "ranks": 2, "load_ranks": 2}, error="rank 1 failed")
    table = scaling.table(pd.concat([_ranked_rows(), frame([killed])], ignore_index=True))
    assert table.loc["ts+best", "save s, 2->2 ranks"] == "failed"
    assert table.loc["ts+best", "cold load s, 2->2 ranks"] == "failed"
    assert table.loc["dcp", "save s, 2->2 ranks"] == "2.5"


def test_the_docs_blocks_for_ranks_come_from_the_forms_and_a_results_file(tmp_path):
    assert "`ts+ocdbt+per-process` | each rank writes its rows into its own OCDBT database" in docs.render("forms")
    results = tmp_path / "results.csv"
    _ranked_rows().to_csv(results, index=False)
    assert "| `dcp` | 4 | 3 | 2.5 | 2 | 2 | 1.5 | 1.25 | 1 |" in docs.render(f"ranks {results}")


def _rounds_of(plans: dict[tuple[int, int], list[float]], name: str = "dcp", **extra) -> pd.DataFrame:
    """One run per plan, a row per round with these save seconds (cold loads half of them)."""
    rows = []
    for (ranks, load_ranks), seconds in plans.items():
        for repeat, each in enumerate(seconds):
            identity = {"run_id": f"r{ranks}", "timestamp": "t", "preset": "tiny", "strategy": name, "config": "{}"}
            timed = {"save_s": each, "load_cold_s": each / 2, "ranks": ranks, "load_ranks": load_ranks}
            rows.append(row({**identity, **SIZES, "repeat": repeat, "verified": True, **timed, **extra}))
    return frame(rows)


def test_the_intervals_table_names_the_fastest_plan_only_where_the_rounds_keep_it_apart():
    apart = scaling.intervals(_rounds_of({(1, 1): [4.0, 4.2, 4.1], (2, 2): [2.0, 2.1, 2.2], (4, 4): [3.0, 3.1, 3.2]}))
    assert apart.loc["dcp", "save s, 2->2 ranks"] == "2.1 [2-2.2]"
    assert apart.loc["dcp", "fastest save"] == "2->2"
    assert apart.loc["dcp", "fastest cold load"] == "2->2"
    assert "min-max of 3 rounds" in apart.loc["dcp", "intervals"]
    overlapping = scaling.intervals(_rounds_of({(1, 1): [4.0, 4.5, 4.2], (2, 2): [2.0, 3.0, 2.2], (4, 4): [2.5, 3.5]}))
    assert overlapping.loc["dcp", "fastest save"] == "tie: 2->2, 4->4"
    killed = row({"run_id": "r8", "timestamp": "t", "preset": "tiny", "strategy": "dcp", "config": "{}", **SIZES,
                  "ranks": 8, "load_ranks": 8}, error="rank 3 failed")  # fmt: skip
    with_failure = scaling.intervals(pd.concat([_rounds_of({(1, 1): [4.0]}), frame([killed])], ignore_index=True))
    assert with_failure.loc["dcp", "save s, 8->8 ranks"] == "failed"
    assert with_failure.loc["dcp", "fastest save"] == "1->1"


def test_the_requests_table_shows_each_ranks_own_requests_and_bytes(tmp_path):
    per_rank = {"rank_requests": json.dumps({"save": [10, 30], "load_cold": [5, 7]}), "objects": 4}
    per_rank["rank_bytes"] = json.dumps({"save": [2e6, 6e6], "load_cold": [1e6, 3e6]})
    rows = _rounds_of({(2, 2): [1.0, 1.1]}, **per_rank)
    (line,) = scaling.requests(rows).to_dict("records")
    assert line["ranks"] == "2->2"
    assert line["repeats"] == 2
    assert line["save requests per rank"] == "10 / 30"
    assert line["cold-load requests per rank"] == "5 / 7"
    assert line["save MB sent per rank"] == "2 / 6"
    assert line["cold-load MB received per rank"] == "1 / 3"
    results = tmp_path / "results.csv"
    rows.to_csv(results, index=False)
    assert "| `dcp` | 2->2 | 2 | 4 | 10 / 30 | 5 / 7 | 2 / 6 | 1 / 3 |" in docs.render(f"rank-requests {results}")
    assert "| `dcp` | 1.05 [1-1.1] | 1->1" not in docs.render(f"ranks-intervals {results}")
    assert "| `dcp` | 1.05 [1-1.1] | 2->2 |" in docs.render(f"ranks-intervals {results}")
    with pytest.raises(ValueError, match="no completed results with per-rank requests"):
        scaling.requests(_ranked_rows())


@pytest.mark.slow
def test_two_ranks_save_and_one_loads_from_the_command_line(tmp_path):
    """The issue's own command, bit-exact for dcp, ts+chunks and OCDBT both ways."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "ckptbench", "run", "--preset", "tiny", "--ranks", "2", "--load-ranks", "1"]
    command += ["--strategies", "dcp,ts+chunks,ts+ocdbt", "--out", str(out), "--no-drift", "--no-warmup"]
    done = subprocess.run(command, capture_output=True, text=True, env=environment(), timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    assert "2->1 ranks" in done.stdout
    assert "NOT VERIFIED" not in done.stdout
    _check_rows(read_results(out / "results.csv"), PLANNED, 2, 1)
    assert leftovers(out) == sorted(["results.csv", *written(done.stdout)])  # no checkpoint, nothing partial
    assert (out / f"{scaling.STEM}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_one_rank_saves_and_two_load_and_a_corrupted_rank_fails_the_row(tmp_path):
    corrupt = Faulty("ts+chunks+corrupt", get_strategy("ts+chunks"), fault="corrupt")
    outcome = ranked.run(_config(tmp_path, 1, 2), [*PLANNED[:3], corrupt], limits=FAKE_LIMITS)
    rows = read_results(tmp_path / "out" / "results.csv")
    _check_rows(rows[rows["strategy"] != corrupt.name], PLANNED, 1, 2)
    (bad,) = rows[rows["strategy"] == corrupt.name].itertuples()
    assert not bad.verified  # rank 0's rows were right; rank 1's were not
    assert bad.error == ""
    assert [p.ok for p in outcome.phases] == [True] * 4 + [False]
    assert leftovers(tmp_path / "out") == ["results.csv"]


@pytest.mark.slow
def test_two_ranks_save_and_load_and_kept_checkpoints_verify_in_one_process(tmp_path):
    strategies = "dcp,ts+chunks,ts+ocdbt,pytorch,safetensors"
    config = _config(tmp_path, 2, keep_checkpoints=True)
    outcome = ranked.run(config, strategies, limits=FAKE_LIMITS)
    names = [*PLANNED, "pytorch", "safetensors"]
    assert [p.strategy for p in outcome.phases] == names
    _check_rows(read_results(config.out / "results.csv"), names, 2, 2)
    recorded = json.loads((config.out / "runs" / f"{outcome.run_id}.json").read_text())
    assert recorded["ranks"]["save"] == 2
    assert recorded["ranks"]["launcher"] == "spawn"
    assert len(list((config.out / "dcp").glob("*.distcp"))) == 2 * 4  # two ranks, four writer threads each
    assert sorted(p.name for p in (config.out / "ts+ocdbt+per-process").glob("ocdbt.process_*")) == [
        "ocdbt.process_0",
        "ocdbt.process_1",
    ]
    for name in names:
        found = checkpoint.verify(config.out / name)
        assert found.intact, (name, found.damage)
        assert found.tensors == 238


def _fails(tmp_path: Path, fault: str, **settings) -> tuple[launch.RankFailed, float]:
    """Run a strategy that fails on rank 1; the error and how long after the fault it ended the run."""
    faulty = Faulty("faulty", get_strategy("ts+chunks"), fault=fault)
    config = _config(tmp_path, 2, **settings)
    with pytest.raises(launch.RankFailed) as failure:
        ranked.run(config, ["ts+chunks", faulty], limits=FAKE_LIMITS)
    after = time.time() - float((config.out / FAULT_TIME).read_text())
    rows = read_results(config.out / "results.csv")
    assert rows["strategy"].tolist() == ["ts+chunks", "faulty"]  # the interrupted repeat is a failed row
    assert rows["verified"].tolist() == [True, False]
    assert rows["error"].iloc[1] == str(failure.value)
    assert leftovers(config.out) == sorted([FAULT_TIME, "results.csv"])  # no checkpoint, complete or partial
    return failure.value, after


@pytest.mark.slow
def test_a_killed_rank_ends_the_run_at_once_naming_it(tmp_path):
    failure, after = _fails(tmp_path, "kill")
    assert failure.rank == 1
    assert str(failure) == "rank 1 failed: killed by SIGKILL, without a Python error"
    assert after < 15


@pytest.mark.slow
def test_a_rank_that_raises_ends_the_run_with_its_message(tmp_path):
    failure, after = _fails(tmp_path, "raise")
    assert str(failure) == "rank 1 failed: ValueError: boom on rank 1"
    assert after < 15


@pytest.mark.slow
def test_a_rank_that_hangs_is_named_after_the_timeout(tmp_path):
    failure, after = _fails(tmp_path, "hang", rank_timeout_s=10.0)
    assert failure.rank == 1
    assert "did not reach a barrier within 10 s" in str(failure)
    assert 10 <= after < 10 + 15


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
def test_torchrun_starts_the_same_command_as_ranks(tmp_path):
    """What runs across hosts: torchrun starts every process, each joins as its rank, rank 0 records."""
    out = tmp_path / "out"
    command = ["torchrun", "--standalone", "--nproc-per-node", "2", "-m", "ckptbench", "run", "--preset", "tiny"]
    command += ["--strategies", "ts+ocdbt", "--out", str(out), "--no-drift", "--no-warmup"]
    done = subprocess.run(command, capture_output=True, text=True, env=environment(), timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_results(out / "results.csv")
    _check_rows(rows, ["ts+ocdbt", "ts+ocdbt+per-process"], 2, 2)
    (recorded,) = (out / "runs").glob("*.json")
    assert json.loads(recorded.read_text())["ranks"]["launcher"] == "torchrun"
