"""The results file: appends never clobber, glue or lose a row; older files are appended to, foreign ones kept aside."""

from __future__ import annotations

import csv
import dataclasses
import json
import multiprocessing
import shutil
import warnings
from pathlib import Path

import pytest

from ckptbench import ResultsFile, environment, get_strategy, read_results, summarize
from ckptbench.errors import ResultsFileError
from ckptbench.measure import COUNTERS, Measurement
from ckptbench.objectstore import Requests
from ckptbench.results import (
    COLUMNS,
    GROUPED,
    HEADER,
    SCHEMA_VERSION,
    Measured,
    Row,
    config_json,
    configs,
    frame,
    row,
)

COMMITTED = Path(__file__).resolve().parents[1] / "docs" / "results"


def make_row(strategy: str = "pytorch", repeat: int = 0, **values) -> Row:
    defaults = {
        "run_id": "run-1",
        "timestamp": "2024-01-01T00:00:00+0000",
        "preset": "tiny",
        "strategy": strategy,
        "config": config_json({"library": "test", "name": strategy}),
        "repeat": repeat,
        "tensors": 238,
        "params": 6_000_000,
        "model_bytes": 12_000_000,
        "save_s": 1.0,
        "save_blocking_s": 1.0,
        "load_cold_s": 0.5,
        "load_warm_s": 0.25,
        "bytes": 12_500_000,
        "bytes_allocated": 12_582_912,
        "files": 1,
        "peak_rss_save": 1000,
        "peak_rss_load": 2000,
        "verified": True,
        "disk_write_gbps": 1.5,
        "disk_read_gbps": 2.5,
        "overhead_s": 0.1,
        "cpu_save_s": 1.5,
        "cpu_load_cold_s": 0.6,
        "cpu_load_warm_s": 0.4,
    }
    return Row(**{**defaults, **values})


def test_a_file_has_the_row_fields_and_reads_with_each_feature_spread_into_its_columns():
    assert [f.name for f in dataclasses.fields(Row)] == HEADER
    assert {"s3", "ranked", "rusage", "config"} <= set(HEADER)
    assert not {"requests_put", "ranks", "minor_faults_save"} & set(HEADER)
    assert len(GROUPED["s3"]) == 9
    assert len(GROUPED["ranked"]) == 7
    assert set(COLUMNS) == set(HEADER) - set(GROUPED) | {c for keys in GROUPED.values() for c in keys}
    assert list(frame([make_row()]).columns) == COLUMNS
    assert list(frame([]).columns) == COLUMNS
    assert "config" in COLUMNS
    assert "schema_version" in COLUMNS
    assert "error" in COLUMNS


def test_append_accumulates_rows_under_one_header(tmp_path):
    store = ResultsFile(tmp_path / "out")
    assert store.read().empty
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        store.append([make_row("pytorch", 0), make_row("pytorch", 1)])
        store.append([make_row("t5x", 0, run_id="run-2", save_s=3.5)])
    table = store.read()
    assert list(table.columns) == COLUMNS
    assert table["run_id"].tolist() == ["run-1", "run-1", "run-2"]
    assert table["save_s"].tolist() == [1.0, 1.0, 3.5]
    assert table["verified"].tolist() == [True, True, True]
    assert (table["schema_version"] == SCHEMA_VERSION).all()
    assert store.csv.read_text().count("run_id") == 1


def test_a_failed_row_round_trips_with_its_error_and_no_numbers(tmp_path):
    store = ResultsFile(tmp_path)
    failed = Row("run-1", "t", "tiny", "pytorch", "{}", 0, 238, 1, 2, error="DiskFullError: disk full, needs 1 GB")
    store.append([failed, make_row()])
    table = store.read()
    assert table["error"].tolist() == ["DiskFullError: disk full, needs 1 GB", ""]
    assert table["save_s"].isna().tolist() == [True, False]
    assert table["verified"].tolist() == [False, True]


def test_configs_become_columns():
    rows = frame([make_row(config=config_json({"library": "tensorstore", "chunk_bytes": 1024})), make_row()])
    table = configs(rows)
    assert table["library"].tolist() == ["tensorstore", "test"]
    assert table["chunk_bytes"].iloc[0] == 1024


def test_a_file_of_the_previous_schema_is_appended_to_and_keeps_every_row(tmp_path):
    """A committed schema-2 file with S3 and rank columns flat: rewritten once under today's header, rows kept."""
    store = ResultsFile(tmp_path)
    for committed in ("2026-11-30-ranks-openllama-3b/results.csv", "2026-11-30-cloud-openllama-3b-2l/results.csv"):
        shutil.copy(COMMITTED / committed, store.csv)
        before = read_results(store.csv)
        assert before["schema_version"].eq(2).all()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            store.append([make_row("t5x", 0, run_id="new")])
        assert not list(tmp_path.glob("results.*.csv"))  # nothing set aside
        assert next(csv.reader([store.csv.read_text().splitlines()[0]])) == HEADER
        after = store.read()
        assert len(after) == len(before) + 1
        assert after.iloc[:-1].equals(before)  # every old row, every value, as it read before
        assert after["run_id"].iloc[-1] == "new"
        assert after["minor_faults_save"].isna().all()  # measured since: empty in old rows and this one
    assert after["requests_put"].notna().iloc[:-1].all()
    assert before["ranks"].isna().all()


def test_a_schema_1_file_is_appended_to_with_its_configs_from_the_registry(tmp_path):
    store = ResultsFile(tmp_path)
    store.csv.write_text(SCHEMA_1)
    store.append([make_row()])
    table = store.read()
    assert table["schema_version"].tolist() == [1, 1, SCHEMA_VERSION]
    assert json.loads(table["config"].iloc[0]) == get_strategy("ts+chunks").config()
    assert table["save_s"].tolist() == [1.5, 1.5, 1.0]


def _region(seconds: float, faults: int) -> Measurement:
    counters = dict(zip(COUNTERS, (faults, 1, 2, 3), strict=True))
    machine = {"machine_cpu_s": seconds * 2, "steal_s": 0.01}
    return Measurement(seconds=seconds, peak_rss=100 * faults, cpu_s=seconds / 2, **counters, **machine)


def test_a_cycle_record_becomes_one_row_slowest_rank_times_summed_cpu_and_rusage(tmp_path):
    measured = Measured(
        save=[_region(2.0, 10), _region(3.0, 20)],
        cold=[_region(1.0, 30), _region(0.5, 40)],
        warm=[_region(0.25, 50), _region(0.75, 60)],
        bytes=7,
        bytes_allocated=8,
        files=2,
        verified=True,
        requests=(Requests(put=4, bytes_sent=9), Requests(get=5, head=1, bytes_received=9)),
        rank_times={"save_s": [1.9, 2.9], "load_cold_s": [0.9, 0.4], "load_warm_s": [0.2, 0.7]},
        untimed={"evict_s": 0.1, "verify_s": 0.2},
    )
    identity = {"run_id": "r", "timestamp": "t", "preset": "tiny", "strategy": "dcp", "config": "{}", "repeat": 0}
    sizes = {"tensors": 238, "params": 1, "model_bytes": 7, "ranks": 2, "load_ranks": 2, "injected_rtt_ms": 0.0}
    made = row({**identity, **sizes}, measured)
    assert json.loads(made.ranked)["ranks"] == 2
    store = ResultsFile(tmp_path)
    store.append([made])
    (read,) = store.read().to_dict("records")
    assert (read["save_s"], read["load_cold_s"], read["load_warm_s"]) == (3.0, 1.0, 0.75)
    assert read["save_blocking_s"] == 3.0
    assert (read["peak_rss_save"], read["peak_rss_save_sum"]) == (2000, 3000)
    assert read["peak_rss_load"] == 6000
    assert read["cpu_save_s"] == pytest.approx(2.5)
    assert (read["minor_faults_save"], read["minor_faults_load_cold"], read["minor_faults_load_warm"]) == (30, 70, 110)
    assert (read["major_faults_save"], read["voluntary_switches_save"], read["involuntary_switches_save"]) == (2, 4, 6)
    assert read["others_cpu_save"] == pytest.approx(6.0 - 2.5)  # the widest view of the machine less both ranks'
    assert read["steal_load_cold"] == 0.01
    assert json.loads(read["rank_times"])["save_s"] == [1.9, 2.9]
    assert (read["requests_put"], read["requests_get"], read["requests_head"], read["requests_save"]) == (4, 5, 1, 4)
    assert (read["objects"], read["bytes_sent"], read["injected_rtt_ms"]) == (2, 9, 0.0)
    assert (read["evict_s"], read["verify_s"], read["error"]) == (0.1, 0.2, "")
    failed = row({**identity, **sizes}, error="RankFailed: rank 1")
    assert (failed.error, failed.save_s, json.loads(failed.ranked)) == (
        "RankFailed: rank 1",
        None,
        {"ranks": 2, "load_ranks": 2},
    )


def test_a_file_with_another_schema_is_kept_and_a_new_one_started(tmp_path):
    store = ResultsFile(tmp_path)
    old = "strategy,seconds\npytorch,1.0\ntensorstore,9.0\n"
    store.csv.write_text(old)
    with pytest.warns(UserWarning, match="another schema"):
        store.append([make_row()])
    (kept,) = tmp_path.glob("results.*.other-schema.csv")
    assert kept.read_text() == old
    assert len(store.read()) == 1


def test_a_file_cut_short_is_ended_before_the_next_row(tmp_path):
    store = ResultsFile(tmp_path)
    store.append([make_row("pytorch", 0)])
    with open(store.csv, "a") as f:
        f.write("run-1,2024,tiny,pytorch,{},1,238")  # a writer killed mid-row
    store.append([make_row("t5x", 0)])
    with pytest.warns(UserWarning, match=r"line 3 \(7 fields"):
        table = store.read()
    assert table["strategy"].tolist() == ["pytorch", "t5x"]


def test_a_non_utf8_file_is_kept_aside_before_anything_is_measured(tmp_path):
    store = ResultsFile(tmp_path)
    store.csv.write_bytes(b"\xff\xfe not a csv \x00\x01")
    with pytest.warns(UserWarning, match="not a UTF-8"):
        kept = store.check()
    assert kept is not None
    assert kept.read_bytes().startswith(b"\xff\xfe")
    assert not store.csv.exists()
    store.append([make_row()])
    assert len(store.read()) == 1


def test_a_bad_cell_skips_its_row_only_and_names_the_line(tmp_path):
    store = ResultsFile(tmp_path)
    store.append([make_row("pytorch", 0), make_row("pytorch", 1), make_row("t5x", 0)])
    lines = store.csv.read_text().splitlines()
    lines[2] = lines[2].replace(",1.0,", ",fast,", 1)
    store.csv.write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match="line 3"):
        table = store.read()
    assert table["strategy"].tolist() == ["pytorch", "t5x"]
    assert summarize(table).loc["pytorch", "save_s_median"] == 1.0


def test_a_binary_file_is_not_results(tmp_path):
    path = tmp_path / "results.csv"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(ResultsFileError, match="not a ckptbench results file"):
        read_results(path)
    with pytest.raises(ResultsFileError, match="does not exist"):
        read_results(tmp_path / "absent.csv")


SCHEMA_1 = (
    "run_id,timestamp,preset,strategy,repeat,tensors,params,model_bytes,save_s,load_cold_s,load_warm_s,bytes,"
    "bytes_allocated,files,peak_rss_save,peak_rss_load,verified,disk_write_gbps,disk_read_gbps\n"
    "old,2026,tiny,ts+chunks,0,238,1,2,1.5,0.5,0.25,3,4,5,6,7,True,1.0,2.0\n"
    "old,2026,tiny,ts[chunk_bytes=1M],0,238,1,2,1.5,0.5,0.25,3,4,5,6,7,True,1.0,2.0\n"
)


def test_a_schema_2_file_from_before_a_column_was_added_reads_with_it_missing(tmp_path):
    path = tmp_path / "results.csv"
    header = COLUMNS[: COLUMNS.index("schema_version") + 1]
    row = dataclasses.asdict(make_row())
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, ["" if row[c] is None else row[c] for c in header]])
    table = read_results(path)
    assert list(table.columns) == COLUMNS
    assert table["schema_version"].tolist() == [SCHEMA_VERSION]
    assert table["config"].tolist() == [row["config"]]
    assert table["disk_files_per_s"].isna().all()


def test_a_schema_1_file_reads_with_configs_from_the_registry(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text(SCHEMA_1)
    table = read_results(path)
    assert list(table.columns) == COLUMNS
    assert table["schema_version"].tolist() == [1, 1]
    assert json.loads(table["config"].iloc[0]) == get_strategy("ts+chunks").config()
    assert table["config"].isna().iloc[1]  # a name the registry does not know has no config
    assert table["cpu_save_s"].isna().all()
    assert table["save_s"].tolist() == [1.5, 1.5]
    assert table["load_into"].tolist() == ["fresh", "fresh"]


def test_a_schema_2_file_from_before_load_into_reads_as_fresh_loads(tmp_path):
    path = tmp_path / "results.csv"
    written = COLUMNS[: COLUMNS.index("load_into")]  # a file from before this column and every later one
    frame([make_row(), make_row(repeat=1)])[written].to_csv(path, index=False)
    table = read_results(path)
    assert list(table.columns) == COLUMNS
    assert table["load_into"].tolist() == ["fresh", "fresh"]
    assert table["schema_version"].tolist() == [SCHEMA_VERSION, SCHEMA_VERSION]
    assert table["config"].tolist() == [make_row().config] * 2


def test_the_load_mode_round_trips(tmp_path):
    store = ResultsFile(tmp_path)
    store.append([make_row(load_into="existing"), make_row(repeat=1)])
    assert store.read()["load_into"].tolist() == ["existing", "fresh"]


def test_environment_json_per_run(tmp_path):
    store = ResultsFile(tmp_path)
    path = store.write_environment("abc", {"packages": {"torch": "x"}})
    assert path == tmp_path / "runs" / "abc.json"
    assert json.loads(path.read_text()) == {"packages": {"torch": "x"}}
    assert list((tmp_path / "runs").iterdir()) == [path]


def _append_many(directory: str, name: str, count: int) -> None:
    store = ResultsFile(directory)
    for i in range(count):
        store.append([make_row(name, i, config=config_json({"padding": "x" * 3000}))])


@pytest.mark.slow  # two processes, each importing the package
def test_two_processes_appending_at_once_lose_no_row(tmp_path):
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_append_many, args=(str(tmp_path), name, 150)) for name in ("a", "b")]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(120)
        assert writer.exitcode == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = ResultsFile(tmp_path).read()
    assert sorted(table.groupby("strategy").size().items()) == [("a", 150), ("b", 150)]
    assert sorted(table[table["strategy"] == "a"]["repeat"]) == list(range(150))
    assert ResultsFile(tmp_path).csv.read_text().count("run_id") == 1


def _rows() -> list[Row]:
    return [
        make_row("tensorstore", 0, save_s=3.0, load_cold_s=30.0, load_warm_s=0.3),
        make_row("pytorch", 0, save_s=10.0, load_cold_s=1.0, load_warm_s=1.0),
        make_row("tensorstore", 1, save_s=1.0, load_cold_s=10.0, load_warm_s=0.1),
        make_row("tensorstore", 2, save_s=2.0, load_cold_s=20.0, load_warm_s=0.2, files=7, verified=False),
    ]


@pytest.mark.parametrize("via_csv", [False, True])
def test_summarize_median_min_max(tmp_path, via_csv):
    table = frame(_rows())
    if via_csv:
        store = ResultsFile(tmp_path)
        store.append(_rows())
        table = store.read()
    summary = summarize(table)
    assert list(summary.index) == ["tensorstore", "pytorch"]
    ts = summary.loc["tensorstore"]
    assert ts["repeats"] == 3
    assert (ts["save_s_median"], ts["save_s_min"], ts["save_s_max"]) == (2.0, 1.0, 3.0)
    assert (ts["load_cold_s_median"], ts["load_cold_s_min"], ts["load_cold_s_max"]) == (20.0, 10.0, 30.0)
    assert ts["files"] == 7
    assert not ts["verified"]
    assert ts["save_gbps"] == pytest.approx(12_000_000 / 2.0 / 1e9)
    pt = summary.loc["pytorch"]
    assert pt["save_s_median"] == pt["save_s_min"] == pt["save_s_max"] == 10.0
    assert pt["verified"]


def test_summarize_follows_the_given_order():
    assert list(summarize(frame(_rows()), order=["pytorch", "t5x", "tensorstore"]).index) == ["pytorch", "tensorstore"]
    assert list(summarize(frame(_rows()), order=["pytorch"]).index) == ["pytorch", "tensorstore"]


def test_the_environment_records_huge_pages_and_the_memory_settings_a_run_had(tmp_path, monkeypatch):
    """torch's huge-page allocator switch and the kernel's mode move fresh loads severalfold: a run must say them."""
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    recorded = environment.collect(tmp_path)
    assert recorded["memory_env"]["THP_MEM_ALLOC_ENABLE"] == "1"
    assert "MALLOC_ARENA_MAX" not in recorded["memory_env"]
    assert f"[{recorded['transparent_hugepage']}]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    monkeypatch.setattr(environment, "_THP", tmp_path / "absent")
    assert environment.huge_pages() is None
