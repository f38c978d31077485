"""A run under a disk profile read against its caps: how fast each strategy wrote and read, what bound it.

Every row of such a run carries its profile and caps (``disk_profile``, ``disk_caps``) and the
ceilings measured under them, so the floors here are the throttled disk's: bytes at the capped
bandwidth plus files at the capped operation rate. ``over_caps`` names any row that wrote or read
faster than its caps allow (I/O that escaped the throttle); ``across`` sets the same strategies side
by side on several disks, each median with its interval across rounds; ``spread`` and ``tighter`` say
whether two runs of one command (an A/A pair) agree more closely under a profile than on the raw disk.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .floor import floors
from .formatting import sig
from .profiles import Caps
from .results import succeeded
from .rounds import coverage, of_values, per_round
from .study import ordered

ALLOWANCE = 1.05
"""A row faster than this multiple of its cap escaped the throttle."""
SLICE_S = 0.1
"""The throttle's time slice: a group that was idle may send one slice's worth at the cap at once, so a small
checkpoint beats its cap by that much without escaping (12.6 MB read in 0.17-0.22 s through a 50 MB/s cap)."""


def rates(results: pd.DataFrame) -> pd.DataFrame:
    """Each completed row's checkpoint bytes over its save and its cold load, in B/s, with the caps it ran under."""
    done = succeeded(results)
    caps = [Caps.parse(spec) if spec else Caps() for spec in done["disk_caps"].fillna("")]
    return pd.DataFrame(
        {
            "strategy": done["strategy"],
            "repeat": done["repeat"],
            "save_s": done["save_s"],
            "load_cold_s": done["load_cold_s"],
            "write_bps": done["bytes"] / done["save_s"],
            "read_bps": done["bytes"] / done["load_cold_s"],
            "write_cap": [c.write_bps for c in caps],
            "read_cap": [c.read_bps for c in caps],
        },
        index=done.index,
    )


def over_caps(results: pd.DataFrame, allowance: float = ALLOWANCE) -> pd.DataFrame:
    """The rows that wrote or read faster than ``allowance`` times their caps, one slice's burst granted (none
    when the throttle held)."""
    r = rates(results)
    over = (r["write_bps"] > allowance * r["write_cap"].astype(float) * (1 + SLICE_S / r["save_s"])) | (
        r["read_bps"] > allowance * r["read_cap"].astype(float) * (1 + SLICE_S / r["load_cold_s"])
    )
    return r[over]


def check(results: pd.DataFrame, allowance: float = ALLOWANCE) -> str:
    """One line saying whether every completed row under caps kept to them: the tool's check, not the reader's."""
    capped = rates(results)
    capped = capped[capped[["write_cap", "read_cap"]].notna().any(axis=1)]
    over = over_caps(results, allowance)
    if capped.empty:
        return "caps check: no completed row ran under a bandwidth cap"
    held = "none" if over.empty else f"{len(over)}"
    return f"caps check: {held} of {len(capped)} rows wrote or read faster than {allowance} x the bandwidth caps"


def table(results: pd.DataFrame) -> pd.DataFrame:
    """Per strategy: its files, median save and cold load against their floors (the files' part apart), and
    its fastest write and read as a share of the caps."""
    done = succeeded(results)
    order = ordered(done["strategy"])
    grouped = done.groupby("strategy", sort=False)
    floor = floors(results)
    r = rates(results).groupby("strategy", sort=False)
    files = grouped["files"].max()
    file_create = files / grouped["disk_files_per_s"].median()
    file_reads = files / grouped["disk_read_iops"].median()
    over = over_caps(results)["strategy"].value_counts().reindex(files.index, fill_value=0)
    out = pd.DataFrame(
        {
            "files": files.map(lambda n: f"{n:,.0f}"),
            "save s": grouped["save_s"].median().map(sig),
            "save floor s": floor["save_floor_s"].map(sig),
            "files' part s": file_create.map(sig),
            "cold load s": grouped["load_cold_s"].median().map(sig),
            "load floor s": floor["load_floor_s"].map(sig),
            "files' reads s": file_reads.map(sig),
            "fastest write of cap": (r["write_bps"].max() / r["write_cap"].max()).map(_share),
            "fastest read of cap": (r["read_bps"].max() / r["read_cap"].max()).map(_share),
            f"rows over {ALLOWANCE} x caps": [f"{over[n]} of {c}" for n, c in grouped.size().items()],
        }
    )
    return out.reindex(order).rename_axis("strategy")


def _share(value: float) -> str:
    return "" if pd.isna(value) else f"{value:.0%}"


def across(runs: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Median save and cold load (s) of each strategy on each disk, with its interval across the run's rounds
    (``rounds``): one labelled run per disk. A one-round run's medians have no margin."""
    columns = {}
    for label, results in runs.items():
        names = dict.fromkeys(succeeded(results)["strategy"])
        for column, what in (("save_s", "save s"), ("load_cold_s", "cold load s")):
            spans = {name: of_values(per_round(results, name, column).tolist()) for name in names}
            columns[f"{what} ({label})"] = pd.Series({name: str(span) for name, span in spans.items() if span})
    table = pd.DataFrame(columns)
    names = [n for results in runs.values() for n in results["strategy"]]
    return table.reindex(ordered(dict.fromkeys(names))).fillna("").rename_axis("strategy")


def _moves(medians: pd.DataFrame) -> pd.DataFrame:
    """Per strategy and timing of an A/A pair (``compare``'s medians): how far B moved from A (the larger over
    the smaller, minus one) and the mean relative width of the two intervals."""
    ratio = medians["B / A"].astype(float)
    widths = [
        np.mean([(s.high - s.low) / s.value for s in spans]) for spans in zip(medians["A"], medians["B"], strict=True)
    ]
    return pd.DataFrame(
        {
            "strategy": medians["strategy"],
            "timing": medians["metric"],
            "move": np.maximum(ratio, 1 / ratio) - 1,
            "width": widths,
            "held": medians[["A covers B", "B covers A"]].sum(axis=1),
        }
    )


def spread(pairs: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per A/A pair (label -> ``compare``'s medians) and timing: the medians' B / A, their median move, the
    median width of their intervals and how many intervals held the other run's median."""
    rows = []
    for label, medians in pairs.items():
        moves = _moves(medians)
        for timing, group in moves.groupby("timing", sort=False):
            ratio = medians.loc[group.index, "B / A"]
            rows.append(
                {
                    "pair": label,
                    "timing": timing,
                    "medians": len(group),
                    "B / A": f"{sig(ratio.min())} to {sig(ratio.max())}",
                    "median move": f"{group['move'].median():.0%}",
                    "median interval width": f"{group['width'].median():.0%}",
                    "intervals holding the other run's median": f"{group['held'].sum()} of {2 * len(group)}",
                }
            )
    return pd.DataFrame(rows)


TIGHTER, LOOSER, TIE, TOO_FEW = "tighter", "looser", "tie", "too few to tell"
VERDICT_COVERAGE = 0.9
"""A verdict needs at least this chance that the differences' interval holds their median (five values)."""


def tighter(reference: pd.DataFrame, other: pd.DataFrame) -> pd.DataFrame:
    """Per timing, and all timings together: ``other`` pair's move and interval width minus ``reference``'s,
    strategy by strategy, as the median difference with its order-statistic interval. Tighter when the interval
    lies below zero, looser above it, else a tie: one pair each, so only a difference most strategies share
    counts; fewer than five differences are too few to tell (their min-max holds the median under 90 %)."""
    paired = _moves(reference).merge(_moves(other), on=["strategy", "timing"], suffixes=(" ref", ""))
    groups = [*paired.groupby("timing", sort=False), ("all", paired)]
    rows = []
    for timing, group in groups:
        row: dict[str, str | int] = {"timing": timing, "strategy x timing": len(group)}
        for what in ("move", "width"):
            span = of_values((group[what] - group[f"{what} ref"]).tolist())
            if span is None:
                continue
            verdict = TIGHTER if span.high < 0 else LOOSER if span.low > 0 else TIE
            if coverage(len(group), 1) < VERDICT_COVERAGE:
                verdict = TOO_FEW
            row[f"{what} difference (points)"] = (
                f"{100 * span.value:+.1f} [{100 * span.low:+.1f} to {100 * span.high:+.1f}]"
            )
            row[f"{what}: verdict"] = verdict
        rows.append(row)
    return pd.DataFrame(rows)
