"""The comparison figure and its exports, drawn from a real tiny run; the CLI's ``plot`` command."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest
from matplotlib.figure import Figure

import ckptbench
from ckptbench import EIGHT_WAY, STRATEGIES, floor, limits, plot, report
from ckptbench.cli import main
from ckptbench.model import ModelCheckpoint
from ckptbench.results import COLUMNS
from ckptbench.study import ordered

from conftest import FAKE_LIMITS

RUN = ("pytorch", "tensorstore", "ts+chunks")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def measured(tiny: ModelCheckpoint, tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """Three strategies x two repeats of the tiny model, measured for real against given disk limits."""
    config = ckptbench.RunConfig(
        preset="tiny", out=tmp_path_factory.mktemp("plot") / "out", repeats=2, progress=False, warmup=False, drift=False
    )
    bench = ckptbench.Benchmark(config, checkpoint=tiny, limits=FAKE_LIMITS, log=lambda message: None)
    bench.run(RUN)
    return bench.results


def _tick_labels(fig: Figure) -> list[list[str]]:
    return [[t.get_text() for t in ax.get_xticklabels()] for ax in fig.axes]


def _assert_png(path: Path, min_width: int = 1000) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    height, width = image.shape[:2]
    assert width >= min_width
    assert 0.2 < height / width < 1


def _assert_svg(path: Path) -> None:
    root = ET.parse(path).getroot()
    assert root.tag.endswith("svg")
    assert "disk limit" in path.read_text()


def test_the_figure_draws_three_panels_in_the_study_order(measured):
    assert measured["repeat"].tolist() == [0, 1] * 3
    fig = plot.comparison_figure(measured.iloc[::-1])  # row order must not matter
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 3
    assert _tick_labels(fig) == [list(RUN)] * 3
    assert [ax.get_ylabel() for ax in fig.axes] == ["save time (s)", "load time (s)", "size on disk (GB)"]
    texts = [t.get_text() for ax in fig.axes for t in ax.texts] + [t.get_text() for t in fig.texts]
    assert "disk limit" in texts
    assert "baseline" in texts
    (subtitle,) = (t.get_text() for t in fig.texts if t.get_text() != fig.get_suptitle())
    for fact in ("preset tiny", "238 tensors", "6.29 M parameters", "2 repeats"):
        assert fact in subtitle
    assert "not measured: t5x, ts+concurrency, ts+compression, ts+float16, ts+ocdbt" in subtitle


def test_the_bars_are_medians_and_the_baseline_stands_out(measured):
    fig = plot.comparison_figure(measured)
    save_ax = fig.axes[0]
    bars = save_ax.patches
    medians = measured.groupby("strategy")["save_s"].median()
    assert [b.get_height() for b in bars] == pytest.approx([medians[n] for n in RUN])
    colors = [b.get_facecolor() for b in bars]
    assert colors[1] != colors[0]  # the baseline
    assert colors[0] == colors[2]
    model_gb = measured["model_bytes"].iloc[0] / 1e9
    lines = sorted(line.get_ydata()[0] for line in save_ax.get_lines() if len(set(line.get_ydata())) == 1)
    assert pytest.approx(model_gb / measured["disk_write_gbps"].iloc[0]) in lines
    assert pytest.approx(medians["tensorstore"]) in lines


def test_each_bar_is_marked_at_its_modelled_floor(measured):
    fig = plot.comparison_figure(measured)
    expected = floor.floors(measured).reindex(list(RUN))
    for ax, column in ((fig.axes[0], "save_floor_s"), (fig.axes[1], "load_floor_s")):
        (marks,) = (c for c in ax.collections if c.get_gid() == plot.FLOOR_GID)
        heights = [segment[0][1] for segment in marks.get_segments()]
        assert heights == pytest.approx(expected[column].tolist())
    assert any("modelled floor" in t.get_text() for t in fig.legends[0].get_texts())
    assert not any("IOPS" in t.get_text() for t in fig.legends[0].get_texts())


def test_under_an_operation_cap_the_legend_charges_a_read_per_file(measured):
    """The files' reads at the capped rate raise the load floors (marks) and the legend says so."""
    capped = measured.assign(disk_read_iops=500.0)
    fig = plot.comparison_figure(capped)
    (marks,) = (c for c in fig.axes[1].collections if c.get_gid() == plot.FLOOR_GID)
    heights = [segment[0][1] for segment in marks.get_segments()]
    assert heights == pytest.approx(floor.floors(capped).reindex(list(RUN))["load_floor_s"].tolist())
    assert heights != pytest.approx(floor.floors(measured).reindex(list(RUN))["load_floor_s"].tolist())
    assert any("one read per file at 500 IOPS" in t.get_text() for t in fig.legends[0].get_texts())


def test_a_missing_phase_and_a_missing_baseline_still_draw(measured):
    without = measured[measured["strategy"] != "tensorstore"]
    fig = plot.comparison_figure(without, title="two of eight")
    assert _tick_labels(fig)[0] == ["pytorch", "ts+chunks"]
    assert "two of eight" in fig.get_suptitle()
    assert "baseline" not in [t.get_text() for t in fig.axes[0].texts]
    assert plot.missing_phases(without) == [n for n in EIGHT_WAY if n not in ("pytorch", "ts+chunks")]


def test_missing_phases_is_empty_for_the_eight_and_others_come_last(measured):
    rows = pd.concat([measured.assign(strategy=name) for name in (*reversed(EIGHT_WAY), "custom")])
    assert plot.missing_phases(rows) == []
    assert ordered(rows["strategy"]) == [*EIGHT_WAY, "custom"]
    assert _tick_labels(plot.comparison_figure(rows))[0] == [*EIGHT_WAY, "custom"]


def test_unverified_and_failed_strategies_are_labelled_and_keep_their_place(measured):
    rows = measured.copy()
    rows.loc[rows["strategy"] == "ts+chunks", "verified"] = False
    failed = rows["strategy"] == "tensorstore"
    rows.loc[failed, ["save_s", "load_cold_s", "load_warm_s", "bytes"]] = float("nan")
    rows.loc[failed, ["verified", "error"]] = [False, "DiskFullError: disk full"]
    fig = plot.comparison_figure(rows)
    assert _tick_labels(fig)[0] == ["pytorch", "tensorstore (FAILED)", "ts+chunks (NOT VERIFIED)"]
    assert fig.axes[0].patches[1].get_height() != fig.axes[0].patches[1].get_height()  # no bar: NaN


def test_many_strategies_turn_the_bars_horizontal_so_every_name_reads(measured):
    names = list(STRATEGIES)
    rows = pd.concat([measured[measured["strategy"] == "pytorch"].assign(strategy=name) for name in names])
    fig = plot.comparison_figure(rows, title="every strategy")
    assert len(names) >= plot.HORIZONTAL_FROM
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ordered(names)
    assert [ax.get_xlabel() for ax in fig.axes] == ["save time (s)", "load time (s)", "size on disk (GB)"]
    _width, height = fig.get_size_inches()
    assert height >= 0.4 * len(names)  # at least ~0.4 inch per name


def test_empty_or_mixed_results_are_refused(measured):
    with pytest.raises(ValueError, match="no results"):
        plot.comparison_figure(measured.iloc[:0])
    with pytest.raises(ValueError, match="mix presets"):
        plot.comparison_figure(pd.concat([measured, measured.assign(preset="openllama-3b")]))


def test_export_writes_a_readable_png_and_an_svg(measured, tmp_path):
    paths = plot.export(plot.comparison_figure(measured), tmp_path / "figures")
    assert [p.name for p in paths] == ["8way_performance_comparison.png", "8way_performance_comparison.svg"]
    _assert_png(paths[0], min_width=16 * plot.PNG_DPI)
    _assert_svg(paths[1])


def test_select_run_takes_the_latest_run_and_each_phases_latest_rows(measured):
    older = measured.assign(run_id="older")
    rerun = measured[measured["strategy"] == "pytorch"]
    table = pd.concat([older, measured, rerun.assign(save_s=99.0)], ignore_index=True)
    latest = report.select_run(table)
    assert len(latest) == len(measured)
    assert (latest.loc[latest["strategy"] == "pytorch", "save_s"] == 99.0).all()
    assert (report.select_run(table, "older")["run_id"] == "older").all()


def test_cli_plot_draws_the_latest_run(measured, tmp_path, capsys):
    csv = tmp_path / "results.csv"
    pd.concat([measured.assign(run_id="older", preset="other"), measured]).to_csv(csv, index=False)
    assert main(["plot", "--results", str(csv)]) == 0
    printed = capsys.readouterr().out
    assert "not measured (5 of 8)" in printed
    for name in ("8way_performance_comparison.png", "8way_performance_comparison.svg", "summary.csv"):
        assert f"wrote {tmp_path / name}" in printed
    _assert_png(tmp_path / "8way_performance_comparison.png")
    summary = pd.read_csv(tmp_path / "summary.csv", index_col="strategy")
    assert summary.index.tolist() == list(RUN)
    assert (summary["repeats"] == 2).all()

    assert main(["plot", "--results", str(csv), "--run-id", "older", "--out", str(tmp_path / "older")]) == 0
    assert "(other)" in capsys.readouterr().out
    assert (tmp_path / "older" / "summary.csv").is_file()


SCHEMA_1 = [
    c
    for c in COLUMNS[: COLUMNS.index("schema_version")]
    if c
    not in {
        "config",
        "save_blocking_s",
        "error",
        "drift_write_gbps",
        "drift_read_gbps",
        "schema_version",
        "overhead_s",
        "cpu_save_s",
        "cpu_load_cold_s",
        "cpu_load_warm_s",
        "disk_files_per_s",
        "fresh_copy_gbps",
        "warmup_s",
        "evict_s",
        "verify_s",
        "cleanup_s",
        "load_into",
        "ranks",
        "load_ranks",
        "rank_times",
        "peak_rss_save_sum",
        "peak_rss_load_sum",
    }
]


def test_cli_plot_reads_a_results_file_from_an_older_version(measured, tmp_path, capsys):
    csv = tmp_path / "results.csv"
    measured[SCHEMA_1].to_csv(csv, index=False)
    assert main(["plot", "--results", str(csv)]) == 0
    _assert_png(tmp_path / "8way_performance_comparison.png")
    assert pd.read_csv(tmp_path / "summary.csv")["strategy"].tolist() == list(RUN)


def test_cli_run_ends_by_exporting_the_figure_and_summary(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(limits, "measured", lambda directory, settings, **kwargs: FAKE_LIMITS)
    out = tmp_path / "out"
    assert (
        main(["run", "--preset", "tiny", "--strategies", "pytorch", "--out", str(out), "--no-warmup", "--no-drift"])
        == 0
    )
    printed = capsys.readouterr().out
    for name in ("8way_performance_comparison.png", "8way_performance_comparison.svg", "summary.csv"):
        assert f"wrote {out / name}" in printed
    _assert_png(out / "8way_performance_comparison.png")
    _assert_svg(out / "8way_performance_comparison.svg")
    assert pd.read_csv(out / "summary.csv")["strategy"].tolist() == ["pytorch"]


def test_cli_plot_errors_name_the_problem(tmp_path, capsys):
    missing = tmp_path / "absent.csv"
    assert main(["plot", "--results", str(missing)]) == 1
    assert f"results file {missing} does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty.csv"
    empty.write_text(",".join(COLUMNS) + "\n")
    assert main(["plot", "--results", str(empty)]) == 1
    assert "no rows" in capsys.readouterr().err
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    assert main(["plot", "--results", str(tmp_path / "other.csv")]) == 1
    assert "not a ckptbench results file" in capsys.readouterr().err
    row = {c: "0" for c in COLUMNS} | {"run_id": "run-1", "verified": "True", "error": "", "config": "{}"}
    (tmp_path / "one.csv").write_text(",".join(COLUMNS) + "\n" + ",".join(row[c] for c in COLUMNS) + "\n")
    assert main(["plot", "--results", str(tmp_path / "one.csv"), "--run-id", "run-2"]) == 1
    assert "no run 'run-2' in the results; the latest runs: run-1" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))
