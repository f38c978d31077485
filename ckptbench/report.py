"""What people see: phase tables, summaries, verdicts, targets and exported files, from rows alone.

The notebook and the CLI both call these, so they hold no presentation logic of their own and their
outputs match. Tables show what a reader wants at a glance, in units, with three significant
digits; the full rows stay in the CSV.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from pandas.io.formats.style import Styler

from . import plot
from .benchmark import PhaseResult
from .errors import CkptbenchError
from .formatting import count, sig
from .results import MACHINE, REGIONS, summarize
from .study import BASELINE, EIGHT_WAY, ordered
from .verdict import HELD, INCONCLUSIVE, NOT_HELD

SUMMARY_CSV = "summary.csv"
EXTENDED_STEM = "extended_comparison"
VERDICT_COLORS = {HELD: "#55a868", NOT_HELD: "#c44e52", INCONCLUSIVE: "#dd8452"}


def phase_table(phase: PhaseResult) -> pd.DataFrame:
    """One row per repeat: times in seconds, size in GB, files, verified, and why a repeat failed (or was skipped)."""
    if phase.skipped is not None:
        return pd.DataFrame({"skipped": [phase.skipped]}, index=[phase.strategy])
    rows = phase.frame
    table = pd.DataFrame(
        {
            "save s": rows["save_s"].map(sig),
            "cold load s": rows["load_cold_s"].map(sig),
            "warm load s": rows["load_warm_s"].map(sig),
            "size GB": (rows["bytes"] / 1e9).map(sig),
            "files": rows["files"].map(count),
            "verified": rows["verified"].map({True: "yes", False: "NO"}),
        }
    )
    blocking = rows["save_blocking_s"].where(rows["save_blocking_s"] < rows["save_s"])
    if blocking.notna().any():
        table.insert(1, "blocking s", blocking.map(sig))
    table.index = pd.Index([f"{phase.strategy} [{r + 1}]" for r in rows["repeat"]])
    if (rows["error"] != "").any():
        table["error"] = rows["error"].str.slice(0, 120).to_numpy()
    return table


def summary_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The medians per strategy, formatted with units; a failed strategy keeps its line with its error."""
    table = pd.DataFrame(
        {
            "repeats": summary["repeats"].map(count),
            "save s": summary["save_s_median"].map(sig),
            "cold load s": summary["load_cold_s_median"].map(sig),
            "warm load s": summary["load_warm_s_median"].map(sig),
            "size GB": (summary["bytes"] / 1e9).map(sig),
            "files": summary["files"].map(count),
            "save GB/s": summary["save_gbps"].map(sig),
            "cold load GB/s": summary["load_cold_gbps"].map(sig),
            "verified": summary["verified"].map({True: "yes", False: "NO"}),
        },
        index=summary.index.rename(None),
    )
    blocking = summary["save_blocking_s_median"].where(summary["save_blocking_s_median"] < summary["save_s_median"])
    if blocking.notna().any():  # async saves return before they are durable; a synchronous one's blank stays blank
        table.insert(table.columns.get_loc("save s") + 1, "blocking s", blocking.map(sig))
    if summary["drift_max"].notna().any():
        table["disk drift"] = [
            "" if pd.isna(d) else f"{d:.0%}{' (stands out from the run)' if flagged else ''}"
            for d, flagged in zip(summary["drift_max"], summary["drift_flagged"], strict=True)
        ]
    if (summary["error"] != "").any():
        table["error"] = summary["error"].str.slice(0, 80)
    return table


TIME_PARTS = {
    "save_s": "save",
    "load_cold_s": "cold load",
    "load_warm_s": "warm load",
    "warmup_s": "warm-up",
    "evict_s": "eviction",
    "verify_s": "verification",
    "cleanup_s": "deletion",
    "worker_s": "worker start",
    "overhead_s": "all untimed",
}
"""What a repeat's wall time is made of: the timed regions, then the harness's work around them."""


def time_spent(results: pd.DataFrame) -> pd.DataFrame:
    """Minutes per strategy in each part of its repeats, summed over them, with the rows' span as a total."""
    done = results[results["error"] == ""]
    parts = done.groupby("strategy", sort=False)[list(TIME_PARTS)].sum(min_count=1)
    table = parts.reindex(ordered(done["strategy"])) / 60
    table = table.rename(columns={k: f"{v} min" for k, v in TIME_PARTS.items()}).map(sig)
    stamps = pd.to_datetime(results["timestamp"], format="%Y-%m-%dT%H:%M:%S%z", errors="coerce").dropna()
    if len(stamps) > 1:
        span = (stamps.max() - stamps.min()).total_seconds() / 60
        table.loc["first to last row"] = [""] * (len(table.columns) - 1) + [f"{sig(span)} (wall)"]
    return table


def machine_table(results: pd.DataFrame) -> pd.DataFrame:
    """Per run, the machine around its timed regions: cores other work and the hypervisor took (medians over
    rows and regions), and the drift probes' disk speeds: what moves when a second run disagrees."""
    done = results[results["error"] == ""]
    cores = {}
    for name in MACHINE:
        shares = [done[f"{name}_{region}"] / done[f"{region}_s"] for region in REGIONS if f"{name}_{region}" in done]
        cores[name] = pd.concat(shares, axis=1).median(axis=1) if shares else pd.Series(float("nan"), done.index)
    table = pd.DataFrame(
        {
            "other work, cores": cores["others_cpu"],
            "steal, cores": cores["steal"],
            "drift write GB/s": done["drift_write_gbps"],
            "drift read GB/s": done["drift_read_gbps"],
        }
    )
    table = table.groupby(done["run_id"], sort=False).median().rename_axis("run")
    table.insert(0, "rows", done.groupby("run_id", sort=False).size())
    return table.map(lambda v: "not recorded" if pd.isna(v) else sig(v))


def styled_summary(summary: pd.DataFrame, baseline: str = BASELINE) -> Styler:
    """The summary table, the baseline's row shaded and unverified strategies in red."""
    return (
        summary_table(summary)
        .style.apply(lambda row: ["background-color: #fbe3d4" if row.name == baseline else ""] * len(row), axis=1)
        .map(lambda ok: "" if ok == "yes" else "color: #c44e52; font-weight: bold", subset=["verified"])
    )


def styled_verdict(table: pd.DataFrame) -> Styler:
    return (
        table.drop(columns=["key"])
        .style.hide(axis="index")
        .map(lambda v: f"color: {VERDICT_COLORS.get(v, '#777777')}; font-weight: bold", subset=["verdict"])
        .set_properties(**{"text-align": "left"})
    )


def with_interval(value: float, low: float | None, high: float | None) -> str:
    """``value [low-high]`` in three digits; the value alone when it has no interval."""
    if low is None or high is None or pd.isna(low) or pd.isna(high) or low == high == value:
        return sig(value)
    return f"{sig(value)} [{sig(low)}-{sig(high)}]" if math.isfinite(high) else f"{sig(value)} (no margin)"


def targets_table(table: pd.DataFrame) -> pd.DataFrame:
    """Targets and context figures as people read them: label, value with its interval, target, verdict.

    Files written before targets had intervals show whether the value met its target (yes / NO)."""
    table = table.reindex(columns=[*table.columns, *(c for c in ("low", "high", "verdict") if c not in table)])
    met = table["met"].map({True: "yes", False: "NO"})
    return pd.DataFrame(
        {
            "figure": table["label"],
            "value": [with_interval(*v) for v in table[["value", "low", "high"]].itertuples(index=False)],
            "target": table["target"].fillna(""),
            "met": table["verdict"].where(table["verdict"].notna(), met).fillna(""),
        }
    )


def missing_note(results: pd.DataFrame) -> str:
    missing = plot.missing_phases(results)
    if not missing:
        return f"all {len(EIGHT_WAY)} approaches measured"
    return f"not measured ({len(missing)} of {len(EIGHT_WAY)}): {', '.join(missing)}"


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
    summarize(results, order=ordered(results["strategy"])).to_csv(summary, index_label="strategy")
    return [*paths, summary]
