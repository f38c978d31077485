"""What people see: tables in units with three significant digits, and the notebook's phases."""

from __future__ import annotations

import pandas as pd
import pytest

from ckptbench import report
from ckptbench.benchmark import PhaseResult
from ckptbench.results import Row, config_json


def _row(repeat: int, **values) -> Row:
    identity = ("run", "t", "tiny", "pytorch", config_json({"library": "torch"}), repeat, 238, 1, 12_600_000)
    return Row(*identity, **values)


def test_sig_keeps_three_significant_digits_without_exponents():
    assert [report.sig(v) for v in (0.012345, 1.23456, 12.3456, 123.456, 839390.0)] == [
        "0.0123",
        "1.23",
        "12.3",
        "123",
        "839,390",
    ]
    assert report.sig(float("nan")) == report.sig(None) == ""


def test_a_phase_table_is_compact_and_says_why_a_repeat_failed():
    done = _row(0, save_s=1.234567, load_cold_s=0.5, load_warm_s=0.25, bytes=12_600_000, files=2, verified=True)
    failed = _row(1, error="DiskFullError: disk full")
    table = report.phase_table(PhaseResult("pytorch", [done, failed], "DiskFullError: disk full"))
    assert list(table.columns) == [
        "save s",
        "cold load s",
        "warm load s",
        "size GB",
        "files",
        "verified",
        "error",
    ]
    assert table.index.tolist() == ["pytorch [1]", "pytorch [2]"]
    assert table.iloc[0].tolist()[:6] == ["1.23", "0.5", "0.25", "0.0126", "2", "yes"]
    assert table.iloc[1]["verified"] == "NO"
    assert table.iloc[1]["error"] == "DiskFullError: disk full"
    assert "error" not in report.phase_table(PhaseResult("pytorch", [done])).columns


def test_the_targets_table_reads_met_as_words():
    table = pd.DataFrame(
        {"key": ["a", "b", "c"], "label": ["A", "B", "C"], "value": [0.5, 2.0, 1.0], "target": ["<= 1", "<= 1", ""]}
    ).assign(met=[True, False, None])
    shown = report.targets_table(table)
    assert shown["met"].tolist() == ["yes", "NO", ""]
    assert shown["value"].tolist() == ["0.5", "2", "1"]


@pytest.mark.slow
def test_phases_show_the_measured_run_then_measure_again_when_re_run(make_bench):
    bench = make_bench()
    phases = report.Phases(bench, "pytorch,ts+chunks")
    summary = phases.measure_all()
    assert list(summary.index) == ["pytorch", "ts+chunks"]
    assert len(bench.store.read()) == 2
    shown = phases("pytorch")
    assert shown.ok
    assert len(bench.store.read()) == 2
    again = phases("pytorch")
    assert again.ok
    assert len(bench.store.read()) == 3
    assert phases("t5x") is None  # not selected
