"""What the notebook and the CLI show and write: the session's setting, phase cells, tables and report files.

The notebook calls these so that it holds no benchmark logic of its own, and its exports match the CLI's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from pandas.io.formats.style import Styler

from . import plot
from .benchmark import Benchmark
from .errors import CkptbenchError
from .results import ADDED_COLUMNS, COLUMNS, summarize
from .strategies import BASELINE, EIGHT_WAY, get_strategy, parse_strategies
from .verdict import HELD, NOT_HELD

SUMMARY_COLUMNS = {
    "repeats": "repeats",
    "save_s_median": "save s",
    "load_cold_s_median": "cold load s",
    "load_warm_s_median": "warm load s",
    "bytes": "bytes",
    "files": "files",
    "save_gbps": "save GB/s",
    "load_cold_gbps": "cold GB/s",
    "verified": "verified",
}
"""The summary columns shown to people (medians), with their display names."""
SUMMARY_CSV = "summary.csv"
EXTENDED_STEM = "extended_comparison"


def describe(bench: Benchmark) -> pd.DataFrame:
    """The model and everything its numbers depend on (versions, CPU, RAM, disk), one row per item."""
    env = bench.environment()
    limits = env["limits"]
    items = {
        "run id": env["run_id"],
        "model": env["model"],
        "tensors": env["tensors"],
        "parameters": None if env["params"] is None else f"{env['params']:,}",
        "size in memory": None if env["model_bytes"] is None else f"{env['model_bytes'] / 1e9:.3f} GB",
        "disk limits": None
        if limits is None
        else f"{limits['write_gbps']:.2f} GB/s durable write, {limits['read_gbps']:.2f} GB/s cold read",
        "output folder": str(bench.out.resolve()),
        "filesystem": env["filesystem"],
        "free disk": f"{env['disk_free_bytes'] / 1e9:.1f} GB of {env['disk_total_bytes'] / 1e9:.1f} GB",
        "CPU": f"{env['cpu']} ({env['cores']} cores)",
        "RAM": f"{env['ram_bytes'] / 2**30:.1f} GiB",
        "python": f"{env['python']} on {env['platform']}",
        **env["packages"],
        "git commit": env["git_commit"],
        "repeats": env["repeats"],
    }
    return pd.DataFrame({"value": items}).rename_axis("item")


@dataclass
class Phases:
    """The notebook's phase cells: ``run_phase(name)`` measures one strategy unless the parameters leave it out."""

    bench: Benchmark
    strategies: str = "all"
    selected: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.selected = parse_strategies(self.strategies) if self.strategies.strip() else []

    def __call__(self, name: str) -> pd.DataFrame | None:
        get_strategy(name)
        if name not in self.selected:
            print(f"skipped {name}: not in {self.strategies!r}")
            return None
        return self.bench.run_phase(name)

    def run_all(self) -> pd.DataFrame:
        """Every selected phase in turn; the rows of this session so far."""
        return self.bench.run(self.selected)


def missing_note(results: pd.DataFrame) -> str:
    missing = plot.missing_phases(results)
    if not missing:
        return f"all {len(EIGHT_WAY)} approaches measured"
    return f"not measured ({len(missing)} of {len(EIGHT_WAY)}): {', '.join(missing)}"


def styled_summary(summary: pd.DataFrame, baseline: str = BASELINE) -> Styler:
    """The medians per strategy, the baseline row shaded and unverified strategies in red."""
    table = summary[list(SUMMARY_COLUMNS)].rename(columns=SUMMARY_COLUMNS)
    seconds = ["save s", "cold load s", "warm load s"]
    return (
        table.style.format({**dict.fromkeys(seconds, "{:.3f}"), "save GB/s": "{:.3f}", "cold GB/s": "{:.3f}"})
        .format({"bytes": "{:,}", "files": "{:,}"})
        .apply(lambda row: ["background-color: #fbe3d4" if row.name == baseline else ""] * len(row), axis=1)
        .map(lambda ok: "" if ok else "color: #c44e52; font-weight: bold", subset=["verified"])
    )


def styled_verdict(table: pd.DataFrame) -> Styler:
    colors = {HELD: "#55a868", NOT_HELD: "#c44e52"}
    return (
        table.style.hide(axis="index")
        .map(lambda v: f"color: {colors.get(v, '#777777')}; font-weight: bold", subset=["verdict"])
        .set_properties(**{"text-align": "left"})
    )


def read_results(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise CkptbenchError(f"results file {path} does not exist (write one with `python -m ckptbench run`)")
    results = pd.read_csv(path)
    if [c for c in COLUMNS if c in results.columns or c not in ADDED_COLUMNS] != list(results.columns):
        raise CkptbenchError(f"{path} is not a ckptbench results file (its columns differ)")
    return results.reindex(columns=COLUMNS)


def select_run(results: pd.DataFrame, run_id: str | None = None) -> pd.DataFrame:
    """One run's rows (default: the run that wrote last); a phase re-run replaces its earlier rows.

    That mirrors ``Benchmark.results``: within a run, each strategy keeps its rows from its last repeat 0.
    """
    if results.empty:
        raise CkptbenchError("the results file has no rows")
    run_id = results["run_id"].iloc[-1] if run_id is None else run_id
    run = results[results["run_id"] == run_id]
    if run.empty:
        known = ", ".join(results["run_id"].drop_duplicates().tail(5))
        raise CkptbenchError(f"no run {run_id!r} in the results; the latest runs: {known}")
    latest = []
    for _, rows in run.groupby("strategy", sort=False):
        starts = rows.index[rows["repeat"] == 0]
        latest.append(rows.loc[starts[-1] if len(starts) else rows.index[0] :])
    return pd.concat(latest).reset_index(drop=True)


def export_report(results: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """The 8-way figure (PNG, SVG), an extended one when other strategies ran, and the summary CSV."""
    eight = results[results["strategy"].isin(EIGHT_WAY)]
    paths = [] if eight.empty else plot.export(plot.comparison_figure(eight), out_dir)
    if len(eight) < len(results):
        title = "Checkpoint I/O: every strategy measured"
        paths += plot.export(plot.comparison_figure(results, title=title), out_dir, stem=EXTENDED_STEM)
    summary = Path(out_dir) / SUMMARY_CSV
    summarize(results, order=plot.ordered(results["strategy"])).to_csv(summary, index_label="strategy")
    return [*paths, summary]
