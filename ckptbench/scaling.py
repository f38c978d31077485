"""Time against the number of ranks: how each strategy's save and cold load change as more processes share them.

Rows come from runs with ``--ranks`` (any number of runs, one model); a resharded load (saved with
another number of ranks) is drawn apart, as a hollow marker, since it reads another layout. On an object
store each rank's own requests show whether the work spreads over the ranks or one rank carries it.
"""

from __future__ import annotations

import json

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .formatting import sig
from .results import succeeded
from .rounds import Interval, of_values
from .study import ordered
from .verdict import drift

STEM = "ranks_scaling"


def ranked_rows(results: pd.DataFrame, completed: bool = True) -> pd.DataFrame:
    """The rows of runs with ranks (only the completed ones unless ``completed`` is False), of the model whose
    completed row came last."""
    rows = results[results["ranks"].notna()]
    done = succeeded(rows)
    if done.empty:
        raise ValueError("no completed results with ranks to draw (measure some with `run --ranks N`)")
    chosen = done if completed else rows
    return chosen[chosen["preset"] == done["preset"].iloc[-1]]


def _planned(results: pd.DataFrame) -> pd.DataFrame:
    """Every tried row with ranks, with its ``plan``: (ranks saving, ranks loading)."""
    tried = ranked_rows(results, completed=False)
    return tried.assign(plan=[(int(n), int(m)) for n, m in zip(tried["ranks"], tried["load_ranks"], strict=True)])


def _label(plan: tuple[int, int]) -> str:
    return f"{plan[0]}->{plan[1]}"


def table(results: pd.DataFrame) -> pd.DataFrame:
    """Median save and cold-load seconds, a line per strategy, a column per plan (ranks saving -> loading).

    A plan every one of whose repeats failed says ``failed``, so a missing measurement is never a blank.
    """
    tried = _planned(results)
    done = succeeded(tried)
    plans = sorted(set(tried["plan"]))
    medians = done.pivot_table(index="strategy", columns="plan", values=["save_s", "load_cold_s"], aggfunc="median")
    columns = pd.MultiIndex.from_product([["save_s", "load_cold_s"], plans])
    shown = medians.reindex(index=ordered(tried["strategy"]), columns=columns).map(sig)
    failed = set(zip(tried["strategy"], tried["plan"], strict=True)) - set(
        zip(done["strategy"], done["plan"], strict=True)
    )
    for name, plan in failed:
        shown.loc[name, [("save_s", plan), ("load_cold_s", plan)]] = "failed"
    shown.columns = [
        f"{'save' if what == 'save_s' else 'cold load'} s, {n}->{m} ranks" for what, (n, m) in shown.columns
    ]
    return shown.rename_axis(None)


TIMED = {"save_s": "save", "load_cold_s": "cold load"}


def _fastest(spans: dict[tuple[int, int], Interval]) -> str:
    """The plan with the lowest median and every plan whose interval overlaps it (a tie: no rank count wins)."""
    if not spans:
        return "failed"
    best = min(spans, key=lambda plan: spans[plan].value)
    tied = [plan for plan in spans if spans[plan].overlaps(spans[best])]
    return _label(best) if len(tied) == 1 else "tie: " + ", ".join(map(_label, sorted(tied)))


def intervals(results: pd.DataFrame) -> pd.DataFrame:
    """Save and cold-load seconds per strategy and plan, median [interval] over its rounds (one round widened by
    its run's disk drift), and which plan is fastest: a plan whose interval overlaps the fastest's ties with it,
    so "more ranks help" is claimed only where the repeats keep them apart."""
    tried = _planned(results)
    done = succeeded(tried)
    plans = sorted(set(tried["plan"]))
    cells: dict[str, dict[str, str]] = {}
    for name in ordered(tried["strategy"]):
        methods: dict[str, None] = {}
        for column, what in TIMED.items():
            spans: dict[tuple[int, int], Interval] = {}
            for plan in plans:
                mine = done[(done["strategy"] == name) & (done["plan"] == plan)]
                runs = tried[tried["run_id"].isin(mine["run_id"])]
                span = of_values(mine[column].astype(float).tolist(), drift(runs)) if not mine.empty else None
                if span is not None:
                    spans[plan] = span
                    methods[span.method] = None
                tried_here = ((tried["strategy"] == name) & (tried["plan"] == plan)).any()
                cell = str(span) if span is not None else ("failed" if tried_here else "not run")
                cells.setdefault(f"{what} s, {_label(plan)} ranks", {})[name] = cell
            cells.setdefault(f"fastest {what}", {})[name] = _fastest(spans)
        cells.setdefault("intervals", {})[name] = "; ".join(methods)
    return pd.DataFrame(cells)


def _per_rank(values: list[list[float]], scale: float = 1.0) -> str:
    """Each rank's median over the repeats, rank 0 first."""
    return " / ".join(sig(float(pd.Series(each).median()) / scale) for each in zip(*values, strict=True))


def requests(results: pd.DataFrame) -> pd.DataFrame:
    """On an object store, per strategy and plan: each rank's requests and object bytes in the save and in the
    cold load (medians over repeats), so a rank that carries the others' work (a gather, a coordinator) shows."""
    done = succeeded(_planned(results))
    done = done[done["rank_requests"].fillna("") != ""]
    if done.empty:
        raise ValueError("no completed results with per-rank requests (run `run --ranks N --store s3://...`)")
    lines = []
    for name in ordered(done["strategy"]):
        for plan in sorted(set(done.loc[done["strategy"] == name, "plan"])):
            mine = done[(done["strategy"] == name) & (done["plan"] == plan)]
            counts = [json.loads(r) for r in mine["rank_requests"]]
            moved = [json.loads(b) for b in mine["rank_bytes"]]
            lines.append(
                {
                    "strategy": name,
                    "ranks": _label(plan),
                    "repeats": len(mine),
                    "objects": sig(float(mine["objects"].median())),
                    "save requests per rank": _per_rank([c["save"] for c in counts]),
                    "cold-load requests per rank": _per_rank([c["load_cold"] for c in counts]),
                    "save MB sent per rank": _per_rank([b["save"] for b in moved], 1e6),
                    "cold-load MB received per rank": _per_rank([b["load_cold"] for b in moved], 1e6),
                }
            )
    return pd.DataFrame(lines)


def _medians(rows: pd.DataFrame, x: str, column: str) -> pd.DataFrame:
    return rows.groupby(x)[column].agg(["median", "min", "max"]).sort_index()


def figure(results: pd.DataFrame) -> Figure:
    """Save and cold-load time against ranks, one line per strategy: medians, whiskers min-max."""
    rows = ranked_rows(results)
    names = ordered(rows["strategy"])
    fig = Figure(figsize=(13.0, 5.2))
    fig.subplots_adjust(left=0.07, right=0.98, top=0.8, bottom=0.24, wspace=0.22)
    fig.suptitle("Checkpoint I/O with ranks: time against the number of processes", fontsize=14, fontweight="bold")
    fig.text(
        0.5,
        0.875,
        f"preset {rows['preset'].iloc[0]} · {rows['model_bytes'].max() / 1e9:.3g} GB · each rank holds its rows of "
        "every tensor · lines at the median, whiskers min-max over repeats",
        ha="center",
        fontsize=9,
    )
    save_ax, load_ax = fig.subplots(1, 2)
    colors = [f"C{i % 10}" for i in range(len(names))]
    resharded = rows["load_ranks"] != rows["ranks"]
    for name, color in zip(names, colors, strict=True):
        mine = rows[rows["strategy"] == name]
        same = mine["load_ranks"] == mine["ranks"]
        for ax, part, x, column, style in (
            (save_ax, mine, "ranks", "save_s", {}),
            (load_ax, mine[same], "load_ranks", "load_cold_s", {}),
            (load_ax, mine[~same], "load_ranks", "load_cold_s", {"linestyle": "none", "markerfacecolor": "white"}),
        ):
            if part.empty:
                continue
            stats = _medians(part, x, column)
            spread = [stats["median"] - stats["min"], stats["max"] - stats["median"]]
            ax.errorbar(stats.index, stats["median"], yerr=spread, marker="o", color=color, capsize=3, **style)
    for ax, heading, xlabel in (
        (save_ax, "Save (until every rank's data is durable)", "ranks saving"),
        (load_ax, "Cold load (until every rank holds its rows)", "ranks loading"),
    ):
        ax.set_title(heading, fontsize=12)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("time (s)")
        ax.set_xticks(sorted(set(rows["ranks"]) | set(rows["load_ranks"])))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=c, marker="o", label=n) for n, c in zip(names, colors, strict=True)]
    if resharded.any():
        label = "resharded: loaded by another number of ranks"
        handles.append(
            Line2D([], [], color="#555555", marker="o", markerfacecolor="white", linestyle="none", label=label)
        )
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=9, frameon=False)
    return fig
