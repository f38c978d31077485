"""The 8-way comparison figure: save time, load time and size on disk, one bar per strategy.

Drawn on a bare ``matplotlib.figure.Figure`` (no pyplot state), so it works headless and never leaks
figures; in Jupyter it displays inline when returned once the inline backend is on (``%matplotlib inline``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .floor import floors
from .formatting import abbreviated, sig
from .results import succeeded
from .study import BASELINE, EIGHT_WAY, ordered

BAR = "#4c72b0"
BLOCKING_BAR = "#1b2a49"
BASELINE_BAR = "#dd8452"
DISK = "#c44e52"
MODEL = "#55a868"
FLOOR = "#222222"
FLOOR_GID = "modelled-floor"
WARM_ALPHA = 0.45
PNG_DPI = 200


def missing_phases(results: pd.DataFrame) -> list[str]:
    """Which of the eight approaches have no rows in ``results``, in the study's order."""
    present = set(results["strategy"])
    return [n for n in EIGHT_WAY if n not in present]


HORIZONTAL_FROM = 11
"""From this many strategies on, bars run horizontally so every name stays legible at notebook width."""


def _stats(results: pd.DataFrame, column: str, order: list[str], scale: float = 1.0) -> pd.DataFrame:
    done = succeeded(results)
    return done.groupby("strategy")[column].agg(["median", "min", "max"]).reindex(order) / scale


def _subtitle(results: pd.DataFrame, missing: list[str]) -> str:
    repeats = succeeded(results).groupby("strategy").size()
    low, high = (repeats.min(), repeats.max()) if len(repeats) else (0, 0)
    spread = f"{low}" if low == high else f"{low}-{high}"
    text = (
        f"preset {results['preset'].iloc[0]} · {int(results['tensors'].max())} tensors · "
        f"{abbreviated(results['params'].max())} parameters ({results['model_bytes'].max() / 1e9:.3g} GB in memory) · "
        f"{spread} repeat{'s' if high > 1 else ''} per strategy: bars at the median, whiskers min-max"
    )
    if (results["load_into"] == "existing").any():
        text += " · loads into existing tensors"
    return f"{text}\nnot measured: {', '.join(missing)}" if missing else text


def _bars(
    ax: Axes, x: np.ndarray, stats: pd.DataFrame, colors: list[str], width: float, horizontal: bool, **style
) -> None:
    """Median bars with min-max whiskers, each labelled with its median beyond the whisker."""
    spread = [stats["median"] - stats["min"], stats["max"] - stats["median"]]
    if horizontal:
        ax.barh(x, stats["median"], width, color=colors, xerr=spread, capsize=2, error_kw={"lw": 1}, **style)
    else:
        ax.bar(x, stats["median"], width, color=colors, yerr=spread, capsize=3, error_kw={"lw": 1}, **style)
    for xi, median, top in zip(x, stats["median"], stats["max"], strict=True):
        _label(ax, xi, median, top, horizontal, fontsize=7, rotation=0 if horizontal or width > 0.5 else 90)


def _label(ax: Axes, xi: float, median: float, at: float, horizontal: bool, **style) -> None:
    """A bar's median written just beyond ``at`` (its whisker's end, or the bar's own end)."""
    if np.isnan(median):
        return
    point, offset = ((at, xi), (2, 0)) if horizontal else ((xi, at), (0, 2))
    ax.annotate(
        sig(median),
        point,
        xytext=offset,
        textcoords="offset points",
        ha="left" if horizontal else "center",
        va="center" if horizontal else "bottom",
        **style,
    )


def _floor_marks(ax: Axes, x: np.ndarray, floor: pd.Series, width: float, horizontal: bool) -> None:
    """A short solid mark across each bar at its modelled floor (none where the run recorded no limit)."""
    drawn = np.isfinite(floor.to_numpy(dtype=float))
    at, low, high = floor.to_numpy(dtype=float)[drawn], x[drawn] - width / 2, x[drawn] + width / 2
    if horizontal:
        ax.vlines(at, low, high, colors=FLOOR, linewidth=2, zorder=3, gid=FLOOR_GID)
    else:
        ax.hlines(at, low, high, colors=FLOOR, linewidth=2, zorder=3, gid=FLOOR_GID)


def _inner_bars(ax: Axes, x: np.ndarray, medians: pd.Series, width: float, horizontal: bool) -> None:
    """Narrow dark bars inside wider ones (no whiskers, which the outer bar already has), labelled inside it."""
    if horizontal:
        ax.barh(x, medians, width, color=BLOCKING_BAR)
    else:
        ax.bar(x, medians, width, color=BLOCKING_BAR)
    for xi, median in zip(x, medians, strict=True):
        _label(ax, xi, median, median, horizontal, fontsize=6, color="white")


def _line(ax: Axes, value: float, color: str, style: str, label: str, horizontal: bool) -> None:
    """A reference line across the panel, named at its end so the panel reads without the legend."""
    if horizontal:
        ax.axvline(value, color=color, linestyle=style, linewidth=1.3, zorder=0.5)
        where, xycoords, offset, ha, va, rotation = (value, 0), ("data", "axes fraction"), (2, 3), "left", "bottom", 90
    else:
        ax.axhline(value, color=color, linestyle=style, linewidth=1.3, zorder=0.5)
        where, xycoords, offset, ha, va, rotation = (1, value), ("axes fraction", "data"), (-3, 2), "right", "bottom", 0
    ax.annotate(
        label,
        where,
        xycoords=xycoords,
        xytext=offset,
        textcoords="offset points",
        ha=ha,
        va=va,
        rotation=rotation,
        fontsize=8,
        color=color,
        bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.7, "pad": 1},
    )


def comparison_figure(results: pd.DataFrame, *, baseline: str = BASELINE, title: str | None = None) -> Figure:
    """Save time, cold/warm load time and size on disk per strategy, from one model's results rows.

    The baseline's bar is highlighted and its median drawn across each panel; the disk limit is the time
    the disk itself needs for the model's bytes at its measured multi-stream durable-write / cold-read
    ceiling, and a mark across each bar is that strategy's modelled floor (its own bytes and files at the
    measured limits, ``floor``). A strategy that failed or did not verify keeps its place, labelled. With
    many strategies the bars run horizontally.
    """
    if results.empty:
        raise ValueError("no results to draw")
    if results["preset"].nunique() != 1:
        raise ValueError(f"results mix presets {sorted(results['preset'].unique())}; draw one model at a time")
    order = ordered(results["strategy"])
    horizontal = len(order) >= HORIZONTAL_FROM
    missing = missing_phases(results)
    model_gb = results["model_bytes"].max() / 1e9
    write_gbps, read_gbps = results["disk_write_gbps"].median(), results["disk_read_gbps"].median()
    verified = results.groupby("strategy")["verified"].all()
    completed = set(succeeded(results)["strategy"])
    labels = [
        name if verified[name] else f"{name} (NOT VERIFIED)" if name in completed else f"{name} (FAILED)"
        for name in order
    ]
    colors = [BASELINE_BAR if name == baseline else BAR for name in order]
    x = np.arange(len(order))

    if horizontal:
        fig = Figure(figsize=(16.0, 3.2 + 0.42 * len(order)))
        fig.subplots_adjust(left=0.12, right=0.98, top=1 - 1.45 / fig.get_figheight(), bottom=1.1 / fig.get_figheight())
        fig.subplots_adjust(wspace=0.35)
    else:
        fig = Figure(figsize=(max(16.0, 2.0 * len(order)), 7.0))
        fig.subplots_adjust(left=0.05, right=0.99, top=0.82, bottom=0.3, wspace=0.22)
    top = fig.subplotpars.top
    fig.suptitle(
        title or "Checkpoint I/O: the 8-way comparison", fontsize=15, fontweight="bold", y=top + (1 - top) * 0.8
    )
    fig.text(0.5, top + (1 - top) * 0.45, _subtitle(results, missing), ha="center", va="center", fontsize=10)
    save_ax, load_ax, size_ax = fig.subplots(1, 3, sharey=horizontal)

    save = _stats(results, "save_s", order)
    # An async save returns before it is durable: its stall is drawn inside its bar; a synchronous one has none.
    blocking = _stats(results, "save_blocking_s", order)
    blocking = blocking.where(blocking["median"] < save["median"], axis=0)
    cold = _stats(results, "load_cold_s", order)
    warm = _stats(results, "load_warm_s", order)
    size = _stats(results, "bytes", order, scale=1e9)
    _bars(save_ax, x, save, colors, 0.7, horizontal)
    asynchronous = blocking["median"].notna().any()
    if asynchronous:
        _inner_bars(save_ax, x, blocking["median"], 0.3, horizontal)
    _bars(load_ax, x - 0.2, cold, colors, 0.4, horizontal)
    _bars(load_ax, x + 0.2, warm, colors, 0.4, horizontal, alpha=WARM_ALPHA, hatch="//")
    _bars(size_ax, x, size, colors, 0.7, horizontal)
    floor = floors(results).reindex(order)
    _floor_marks(save_ax, x, floor["save_floor_s"], 0.7, horizontal)
    _floor_marks(load_ax, x - 0.2, floor["load_floor_s"], 0.4, horizontal)
    _line(save_ax, model_gb / write_gbps, DISK, ":", "disk limit", horizontal)
    _line(load_ax, model_gb / read_gbps, DISK, ":", "disk limit (cold read)", horizontal)
    _line(size_ax, model_gb, MODEL, ":", "model in memory", horizontal)
    if baseline in completed:
        for ax, stats in ((save_ax, save), (load_ax, cold), (size_ax, size)):
            _line(ax, stats.loc[baseline, "median"], BASELINE_BAR, "--", "baseline", horizontal)

    panels = (
        (save_ax, "Save (until durable)", "save time (s)"),
        (load_ax, "Load: cold (solid) and warm (hatched)", "load time (s)"),
        (size_ax, "Size on disk", "size on disk (GB)"),
    )
    for ax, heading, unit in panels:
        ax.set_title(heading, fontsize=12)
        if horizontal:
            ax.set_xlabel(unit)
            ax.set_yticks(x, labels, fontsize=10)
            ax.margins(x=0.15)
            ax.set_xlim(left=0)
            ax.grid(axis="x", alpha=0.3)
        else:
            ax.set_ylabel(unit)
            ax.set_xticks(x, labels, rotation=35, ha="right", rotation_mode="anchor", fontsize=10)
            ax.margins(y=0.12)
            ax.set_ylim(bottom=0)
            ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    if horizontal:
        save_ax.invert_yaxis()

    handles = [Patch(color=BAR, label="strategy (median)")]
    if baseline in order:
        handles += [
            Patch(color=BASELINE_BAR, label=f"baseline: {baseline}"),
            Line2D([], [], color=BASELINE_BAR, linestyle="--", label="baseline median"),
        ]
    if asynchronous:
        handles.append(Patch(color=BLOCKING_BAR, label="async save: blocking until it returns (inner bar)"))
    handles += [
        Patch(facecolor="white", edgecolor="#555555", hatch="//", label="warm load"),
        Line2D(
            [],
            [],
            color=DISK,
            linestyle=":",
            label=f"disk limit: {model_gb:.3g} GB at {write_gbps:.2f} GB/s write, {read_gbps:.2f} GB/s cold read "
            "(best of 1-64 streams)",
        ),
        Line2D([], [], color=FLOOR, linewidth=2, label=_floor_label(results)),
        Line2D([], [], color=MODEL, linestyle=":", label=f"model in memory ({model_gb:.3g} GB)"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=9, frameon=False)
    return fig


def _floor_label(results: pd.DataFrame) -> str:
    """What the floor marks charge; under an operation cap, a load's one read per file at the capped rate too."""
    files_per_s, fresh_gbps = results["disk_files_per_s"].median(), results["fresh_copy_gbps"].median()
    read_iops = results["disk_read_iops"].median() if "disk_read_iops" in results else float("nan")
    reads = "" if np.isnan(read_iops) else f" or one read per file at {read_iops:,.0f} IOPS if slower,"
    return (
        f"modelled floor: bytes at the disk limit + files at {files_per_s:,.0f}/s (save); "
        f"bytes at the disk limit{reads} + copy into fresh memory at {fresh_gbps:.2g} GB/s (cold load)"
    )


def export(fig: Figure, out_dir: str | Path, stem: str = "8way_performance_comparison") -> list[Path]:
    """Write the figure as PNG (for reading) and SVG (for editing and print); return both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.png", out / f"{stem}.svg"]
    fig.savefig(paths[0], dpi=PNG_DPI)
    fig.savefig(paths[1])
    return paths


def sweep_figure(rows: pd.DataFrame, knobs: list[str]) -> Figure:
    """Each knob's effect: median save and cold-load time over every configuration with that value.

    ``rows`` are sweep results with one column per knob (``sweep.knob_columns``); whiskers span the
    medians of the configurations sharing the value, so a flat line means the knob does not matter here.
    """
    if rows.empty:
        raise ValueError("no sweep results to draw")
    per_config = rows.groupby([*knobs, "strategy"], sort=False)[["save_s", "load_cold_s"]].median().reset_index()
    fig = Figure(figsize=(max(6.0, 4.5 * len(knobs)), 4.8))
    fig.subplots_adjust(left=0.08, right=0.98, top=0.8, bottom=0.16, wspace=0.3)
    fig.suptitle("TensorStore knob sweep: the effect of each knob", fontsize=14, fontweight="bold")
    fig.text(
        0.5,
        0.885,
        f"preset {rows['preset'].iloc[0]} · {per_config['strategy'].nunique()} configurations · "
        "line at the median over configurations with that value, band min-max",
        ha="center",
        fontsize=9,
        color="#333333",
    )
    axes = np.atleast_1d(fig.subplots(1, len(knobs)))
    for ax, knob in zip(axes, knobs, strict=True):
        values = list(dict.fromkeys(per_config[knob]))
        x = np.arange(len(values))
        for column, color, label in (("save_s", BAR, "save"), ("load_cold_s", DISK, "cold load")):
            stats = per_config.groupby(knob, sort=False)[column].agg(["median", "min", "max"]).reindex(values)
            ax.plot(x, stats["median"], marker="o", color=color, label=label)
            ax.fill_between(x, stats["min"], stats["max"], color=color, alpha=0.15)
        ax.set_xticks(x, values)
        ax.set_xlabel(knob)
        ax.set_ylabel("time (s)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=9)
    return fig
