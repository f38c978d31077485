"""What people see: tables in units with three significant digits, and the notebook's phases."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest

from ckptbench import notebook, report
from ckptbench.benchmark import PhaseResult
from ckptbench.formatting import sig
from ckptbench.results import Row, config_json


def _row(repeat: int, **values) -> Row:
    identity = ("run", "t", "tiny", "pytorch", config_json({"library": "torch"}), repeat, 238, 1, 12_600_000)
    return Row(*identity, **values)


def test_sig_keeps_three_significant_digits_without_exponents():
    assert [sig(v) for v in (0.012345, 1.23456, 12.3456, 123.456, 839390.0)] == [
        "0.0123",
        "1.23",
        "12.3",
        "123",
        "839,390",
    ]
    assert sig(float("nan")) == sig(None) == ""


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
    phases = notebook.Phases(bench, "pytorch,ts+chunks")
    summary = phases.measure_all()
    assert list(summary.index) == ["pytorch", "ts+chunks"]
    assert len(bench.results_file.read()) == 2
    shown = phases("pytorch")
    assert shown.result.ok
    assert "pytorch [1]" in shown._repr_html_()
    assert len(bench.results_file.read()) == 2
    again = phases("pytorch")
    assert again.result.ok
    assert len(bench.results_file.read()) == 3
    assert phases("t5x") is None  # not selected


def test_time_spent_sums_each_part_per_strategy_and_spans_the_rows():
    rows = [
        _row(0, save_s=60.0, load_cold_s=30.0, load_warm_s=30.0, evict_s=6.0, verify_s=12.0, cleanup_s=18.0),
        _row(1, save_s=60.0, load_cold_s=30.0, load_warm_s=30.0, evict_s=6.0, verify_s=12.0, cleanup_s=18.0),
    ]
    frame = pd.DataFrame([dataclasses.asdict(r) for r in rows]).assign(
        timestamp=["2026-11-30T10:00:00+0000", "2026-11-30T10:05:00+0000"]
    )
    table = report.time_spent(frame)
    assert table.loc["pytorch", "save min"] == "2"
    assert table.loc["pytorch", "deletion min"] == "0.6"
    assert table.loc["pytorch", "warm-up min"] == ""  # not recorded: blank, not zero
    assert table.loc["first to last row", "all untimed min"] == "5 (wall)"


def test_machine_table_gives_each_run_its_other_work_steal_and_drift():
    times = {"save_s": 2.0, "load_cold_s": 1.0, "load_warm_s": 1.0}
    regions = ("save", "load_cold", "load_warm")
    busy = {
        f"{name}_{region}": seconds * share
        for region, seconds in zip(regions, times.values(), strict=True)
        for name, share in (("others_cpu", 0.5), ("steal", 0.25))
    }
    quiet = {
        f"{name}_{region}": 0.0 for region in ("save", "load_cold", "load_warm") for name in ("others_cpu", "steal")
    }
    frame = pd.DataFrame(
        [
            {"run_id": "a", "error": "", **times, **quiet, "drift_write_gbps": 2.0, "drift_read_gbps": 3.0},
            {"run_id": "b", "error": "", **times, **busy, "drift_write_gbps": 1.0, "drift_read_gbps": 1.5},
            {"run_id": "b", "error": "", **times, **busy, "drift_write_gbps": 1.0, "drift_read_gbps": 1.5},
            {"run_id": "b", "error": "failed", **times, **quiet, "drift_write_gbps": 9.0, "drift_read_gbps": 9.0},
        ]
    )
    table = report.machine_table(frame)
    assert table.loc["a", "other work, cores"] == "0"
    assert (table.loc["b", "other work, cores"], table.loc["b", "steal, cores"]) == ("0.5", "0.25")
    assert (table.loc["b", "rows"], table.loc["b", "drift read GB/s"]) == ("2", "1.5")
    older = frame.drop(columns=[c for c in frame if c.startswith(("others_cpu", "steal"))])
    assert report.machine_table(older).loc["a", "steal, cores"] == "not recorded"
