"""The results store appends and never clobbers; summarize gives median/min/max per strategy."""

from __future__ import annotations

import dataclasses
import warnings

import pytest

from ckptbench import ResultsStore, summarize
from ckptbench.results import COLUMNS, Row, frame


def make_row(strategy: str = "pytorch", repeat: int = 0, **values) -> Row:
    defaults = {
        "run_id": "run-1",
        "timestamp": "2024-01-01T00:00:00+0000",
        "preset": "tiny",
        "strategy": strategy,
        "repeat": repeat,
        "tensors": 238,
        "params": 6_000_000,
        "model_bytes": 12_000_000,
        "save_s": 1.0,
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


def test_columns_are_the_row_fields():
    assert [f.name for f in dataclasses.fields(Row)] == COLUMNS
    assert list(frame([make_row()]).columns) == COLUMNS
    assert list(frame([]).columns) == COLUMNS


def test_append_accumulates_rows(tmp_path):
    store = ResultsStore(tmp_path / "out")
    assert store.read().empty
    first = [make_row("pytorch", 0), make_row("pytorch", 1)]
    second = [make_row("t5x", 0, run_id="run-2", save_s=3.5)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        store.append(first)
        store.append(second)
    table = store.read()
    assert list(table.columns) == COLUMNS
    assert len(table) == 3
    assert table["run_id"].tolist() == ["run-1", "run-1", "run-2"]
    assert table["strategy"].tolist() == ["pytorch", "pytorch", "t5x"]
    assert table["save_s"].tolist() == [1.0, 1.0, 3.5]
    assert table["verified"].tolist() == [True, True, True]
    assert store.csv.read_text().count("run_id") == 1  # one header


def test_a_file_with_another_schema_is_kept_and_a_new_one_started(tmp_path):
    store = ResultsStore(tmp_path)
    old = "strategy,seconds\npytorch,1.0\ntensorstore,9.0\n"
    store.csv.write_text(old)
    with pytest.warns(UserWarning, match="another schema"):
        store.append([make_row()])
    kept = list(tmp_path.glob("results.*.other-schema.csv"))
    assert len(kept) == 1
    assert kept[0].read_text() == old
    table = store.read()
    assert list(table.columns) == COLUMNS
    assert len(table) == 1


def test_environment_json_per_run(tmp_path):
    store = ResultsStore(tmp_path)
    path = store.write_environment("abc", {"packages": {"torch": "x"}})
    assert path == tmp_path / "runs" / "abc.json"
    assert '"torch": "x"' in path.read_text()


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
        store = ResultsStore(tmp_path)
        store.append(_rows())
        table = store.read()
    summary = summarize(table)
    assert list(summary.index) == ["tensorstore", "pytorch"]  # first seen, without an order
    ts = summary.loc["tensorstore"]
    assert ts["repeats"] == 3
    assert (ts["save_s_median"], ts["save_s_min"], ts["save_s_max"]) == (2.0, 1.0, 3.0)
    assert (ts["load_cold_s_median"], ts["load_cold_s_min"], ts["load_cold_s_max"]) == (20.0, 10.0, 30.0)
    assert (ts["load_warm_s_median"], ts["load_warm_s_min"], ts["load_warm_s_max"]) == (0.2, 0.1, 0.3)
    assert ts["files"] == 7
    assert not ts["verified"]
    assert ts["save_gbps"] == pytest.approx(12_000_000 / 2.0 / 1e9)
    assert ts["load_cold_gbps"] == pytest.approx(12_000_000 / 20.0 / 1e9)
    pt = summary.loc["pytorch"]
    assert pt["repeats"] == 1
    assert pt["save_s_median"] == pt["save_s_min"] == pt["save_s_max"] == 10.0
    assert pt["verified"]


def test_summarize_follows_the_given_order():
    summary = summarize(frame(_rows()), order=["pytorch", "t5x", "tensorstore"])
    assert list(summary.index) == ["pytorch", "tensorstore"]
    summary = summarize(frame(_rows()), order=["pytorch"])
    assert list(summary.index) == ["pytorch", "tensorstore"]
