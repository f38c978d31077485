"""Two runs side by side: does the second tell the reader what the first told them?

For every strategy and timing, both medians with their intervals across rounds and their ratio;
for every claim, target and "What should I use?" answer, whether the runs agree. A contradiction
is a verdict only noise could have flipped if the intervals were honest: HELD against NOT HELD, MET
against MISSED, or two answers with no strategy in common (a tie shares its names). Calibration
says how honest the intervals were: the share of one run's intervals that hold the other run's
median (both ways); an interval meant for a second run should hold it nine times in ten or more.
Verdicts and intervals are judged as the rest of ckptbench judges them, widened for a second run
(``betweenrun``); the same comparison on the rounds' intervals alone is kept beside it, to show what
the between-run component changed.

Widened verdicts alone cannot see a real change of about the between-run spread squared (x/÷ 1.74 on
each side at full size: a strategy three times slower leaves both runs INCONCLUSIVE). So a target
also contradicts when its verdict flips on the rounds' intervals and each run's value lies outside the
other's interval for a second run: a move this machine's A/A pairs do not explain.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from . import betweenrun, choices, targets, verdict
from .formatting import sig
from .report import select_run
from .results import read_results, succeeded
from .rounds import Interval, of_values, per_round
from .study import METRICS, ordered

TIMINGS = ("save_s", "save_blocking_s", "load_cold_s", "load_warm_s")
CALIBRATION_GOAL = 0.9
"""The share of intervals that should hold the other run's median."""
FIGURE_STEM = "calibration"
A_COLOR, B_COLOR, MISSED_COLOR = "#4c72b0", "#dd8452", "#c44e52"


@dataclass
class Comparison:
    names: tuple[str, str]
    """The two runs' ids (or labels), A first."""
    medians: pd.DataFrame
    """Per strategy and timing: A's and B's median with interval, B / A, and whether each interval holds
    the other's median."""
    claims: pd.DataFrame
    targets: pd.DataFrame
    answers: pd.DataFrame
    contradictions: list[str] = field(default_factory=list)
    spreads: dict[str, betweenrun.Spread] = field(default_factory=dict)
    """The between-run spreads the intervals were widened by (none: this run's rounds only)."""
    within: Comparison | None = None
    """The same comparison on the rounds' intervals alone, without the between-run component."""

    @property
    def agree(self) -> bool:
        return not self.contradictions

    def calibration(self, table: pd.DataFrame | None = None) -> tuple[int, int]:
        """How many intervals (of the medians, or of ``table``) hold the other run's value, out of how many."""
        table = self.medians if table is None else table
        covered = table[["A covers B", "B covers A"]].to_numpy()
        return int(covered.sum()), covered.size

    def _calibration_lines(self) -> list[str]:
        held, total = self.calibration()
        ratio_held, ratio_total = self.calibration(self.targets.dropna(subset=["A covers B"]))
        lines = [
            f"calibration: {held} of {total} medians' intervals hold the other run's median "
            f"({held / total:.0%}; goal {CALIBRATION_GOAL:.0%})"
            if total
            else "calibration: no timing measured in both runs",
        ]
        if ratio_total:
            lines.append(
                f"  targets' intervals: {ratio_held} of {ratio_total} hold the other run's value "
                f"({ratio_held / ratio_total:.0%})"
            )
        return lines

    def summary(self) -> str:
        lines = [f"A = {self.names[0]}, B = {self.names[1]}"]
        if self.spreads:
            pairs = next(iter(self.spreads.values())).pairs
            widths = ", ".join(f"{s.family} x/÷ {np.exp(s.margin):.2f}" for s in self.spreads.values())
            lines.append(f"widened for a second run by the between-run spread of {len(pairs)} A/A pair(s): {widths}")
        elif self.within is not None:
            lines.append("no A/A pair of this preset: intervals from the rounds only")
        lines += self._calibration_lines()
        if self.within is not None and self.spreads:
            clashes = len(self.within.contradictions)
            lines += [f"  rounds alone: {line.strip()}" for line in self.within._calibration_lines()]
            lines.append(f"  rounds alone: {clashes} contradiction{'s' * (clashes != 1)} (exit {int(clashes > 0)})")
        if self.contradictions:
            lines += [f"CONTRADICTION: {c}" for c in self.contradictions]
        else:
            lines.append("the runs agree: no claim, target or answer contradicts the other run")
        return "\n".join(lines)


def _shown(span: Interval | None) -> str:
    return "" if span is None else str(span)


def _medians(a: pd.DataFrame, b: pd.DataFrame, between: bool) -> pd.DataFrame:
    drifts = verdict.drift(a), verdict.drift(b)
    rows = []
    names = ordered([n for n in succeeded(a)["strategy"].unique() if n in set(succeeded(b)["strategy"])])
    for name in names:
        for metric in TIMINGS:
            spans = [of_values(per_round(run, name, metric).tolist(), d) for run, d in zip((a, b), drifts, strict=True)]
            if None in spans or (metric == "save_blocking_s" and _synchronous(a, name)):
                continue
            if between:
                spans = [betweenrun.widen(span, run, betweenrun.TIME) for span, run in zip(spans, (a, b), strict=True)]
            one, two = spans
            rows.append(
                {
                    "strategy": name,
                    "metric": METRICS[metric],
                    "A": one,
                    "B": two,
                    "B / A": two.value / one.value,
                    "A covers B": one.covers(two.value),
                    "B covers A": two.covers(one.value),
                }
            )
    return pd.DataFrame(rows, columns=["strategy", "metric", "A", "B", "B / A", "A covers B", "B covers A"])


def medians_table(comparison: Comparison) -> pd.DataFrame:
    """The medians as people read them: intervals in three digits, the ratio, and which interval missed."""
    table = comparison.medians
    missed = [
        ", ".join(name for name, held in (("A's", a), ("B's", b)) if not held) or ""
        for a, b in zip(table["A covers B"], table["B covers A"], strict=True)
    ]
    return pd.DataFrame(
        {
            "strategy": table["strategy"],
            "metric": table["metric"],
            "A": table["A"].map(str),
            "B": table["B"].map(str),
            "B / A": table["B / A"].map(sig),
            "interval missing the other median": missed,
        }
    )


def _synchronous(results: pd.DataFrame, name: str) -> bool:
    """A save that returned only once durable: its stall is its save, already compared."""
    rows = succeeded(results)
    rows = rows[rows["strategy"] == name]
    return bool((rows["save_blocking_s"] >= rows["save_s"]).all())


def _claims(a: pd.DataFrame, b: pd.DataFrame, between: bool) -> tuple[pd.DataFrame, list[str]]:
    one, two = verdict.check(a, between).set_index("key"), verdict.check(b, between).set_index("key")
    measured = (one["verdict"] != verdict.NOT_MEASURED) | (two["verdict"] != verdict.NOT_MEASURED)
    one, two = one[measured], two[measured]
    table = pd.DataFrame(
        {
            "claim": one["claim"],
            "A": one["verdict"] + ": " + one["measured"],
            "B": two["verdict"] + ": " + two["measured"],
        }
    )
    clash = [
        key
        for key in one.index
        if {one.loc[key, "verdict"], two.loc[key, "verdict"]} == {verdict.HELD, verdict.NOT_HELD}
    ]
    table["agree"] = ["NO" if key in clash else "yes" for key in table.index]
    found = [
        f"claim '{one.loc[k, 'claim']}': {one.loc[k, 'verdict']} in A, {two.loc[k, 'verdict']} in B" for k in clash
    ]
    return table.reset_index(drop=True), found


def _targets(a: pd.DataFrame, b: pd.DataFrame, between: bool) -> tuple[pd.DataFrame, list[str]]:
    one = targets.judged(a, verdict.drift(a), between).set_index("key")
    two = targets.judged(b, verdict.drift(b), between).set_index("key")
    rows, found = [], []
    for key in one.index.intersection(two.index, sort=False):
        x, y = one.loc[key], two.loc[key]
        clash = {x["verdict"], y["verdict"]} == {targets.MET, targets.MISSED}
        rows.append(
            {
                "target": f"{x['label']} {x['target']}",
                "A": f"{x['verdict']}: {Interval(x['value'], x['low'], x['high'], '')}",
                "B": f"{y['verdict']}: {Interval(y['value'], y['low'], y['high'], '')}",
                "agree": "NO" if clash else "yes",
                "A covers B": bool(x["low"] <= y["value"] <= x["high"]),
                "B covers A": bool(y["low"] <= x["value"] <= y["high"]),
            }
        )
        if clash:
            found.append(f"target '{x['label']} {x['target']}': {x['verdict']} in A, {y['verdict']} in B")
    return pd.DataFrame(rows, columns=["target", "A", "B", "agree", "A covers B", "B covers A"]), found


def _answers(a: pd.DataFrame, b: pd.DataFrame, between: bool) -> tuple[pd.DataFrame, list[str]]:
    one = {x.question.text: x for x in choices.answers(a, between)}
    two = {x.question.text: x for x in choices.answers(b, between)}
    rows, found = [], []
    for question in [q for q in one if q in two]:
        x, y = one[question], two[question]
        clash = not x.names & y.names
        rows.append(
            {
                "question": question,
                "A": f"{x.use}: {x.winners[0].span}",
                "B": f"{y.use}: {y.winners[0].span}",
                "agree": "NO" if clash else "yes",
            }
        )
        if clash:
            found.append(f"'{question}': {x.use} in A, {y.use} in B")
    return pd.DataFrame(rows, columns=["question", "A", "B", "agree"]), found


def _moved(widened: pd.DataFrame, rounds: pd.DataFrame) -> list[str]:
    """Targets that flipped MET/MISSED on the rounds' intervals and moved beyond a second run's interval both
    ways (each run's value outside the other's widened interval); those whose widened verdicts clash already are
    named as such."""
    widened, rounds = widened.set_index("target"), rounds.set_index("target").reindex(widened["target"])
    beyond = ~widened["A covers B"].astype(bool) & ~widened["B covers A"].astype(bool)
    moved = beyond & (rounds["agree"] == "NO") & (widened["agree"] != "NO")
    return [
        f"target '{target}': {rounds.loc[target, 'A']} in A, {rounds.loc[target, 'B']} in B on the rounds' "
        "intervals, and each value outside the other run's interval for a second run (a move the A/A pairs "
        "do not explain)"
        for target in widened.index[moved]
    ]


def compare(a: pd.DataFrame, b: pd.DataFrame, names: tuple[str, str] | None = None, between: bool = True) -> Comparison:
    """Run B against run A: each the rows of one run (``report.select_run``). ``between``: intervals widened for a
    second run by run A's preset's between-run spread, with the rounds-only comparison kept as ``within``."""
    names = names or (str(a["run_id"].iloc[0]), str(b["run_id"].iloc[0]))
    claims, clashing_claims = _claims(a, b, between)
    target_table, clashing_targets = _targets(a, b, between)
    answer_table, clashing_answers = _answers(a, b, between)
    within = compare(a, b, names, between=False) if between else None
    if within is not None:
        clashing_targets += _moved(target_table, within.targets)
    return Comparison(
        names,
        _medians(a, b, between),
        claims,
        target_table,
        answer_table,
        clashing_claims + clashing_targets + clashing_answers,
        betweenrun.spreads(betweenrun.preset(a)) if between else {},
        within,
    )


STORED_RUNS = {
    "openllama-3b-2l": "docs/results/2026-11-30-openllama-3b-2l/results.csv",
    "openllama-3b": "docs/results/2026-11-30-openllama-3b/results.csv",
}
"""The committed run of each preset a session's run is compared with in the notebook."""


def with_stored(session: pd.DataFrame, preset: str) -> Comparison | None:
    """The session's rows against the committed run of its preset; None when no run of it is stored."""
    if preset not in STORED_RUNS:
        return None
    stored = select_run(read_results(Path(__file__).resolve().parents[1] / STORED_RUNS[preset]))
    return compare(stored, session, (STORED_RUNS[preset], "this session"))


def _bar(ax: Axes, span: Interval, base: float, at: float, color: str, alpha: float) -> None:
    ends = max(span.low, span.value / 1e3), min(span.high, span.value * 1e3)  # "no margin" stays on the axis
    ax.plot([ends[0] / base, ends[1] / base], [at, at], color=color, lw=4, solid_capstyle="butt", alpha=alpha)


def figure(comparison: Comparison) -> Figure:
    """Each timing's interval in run A against run B's median (and the reverse), relative to A's median: the
    rounds' interval dark, widened for a second run pale.

    A dot outside its bar is an interval that did not hold the second run: the figure shows how far.
    """
    table = comparison.medians
    rounds = comparison.within.medians if comparison.within is not None else table
    fig = Figure(figsize=(8, 0.28 * len(table) + 1.6), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(table))[::-1]
    for yi, one, two, own_a, own_b in zip(y, table["A"], table["B"], rounds["A"], rounds["B"], strict=True):
        base = one.value
        for span, own, at, color in ((one, own_a, yi + 0.15, A_COLOR), (two, own_b, yi - 0.15, B_COLOR)):
            _bar(ax, span, base, at, color, 0.35)
            _bar(ax, own, base, at, color, 1.0)
        ax.plot([two.value / base], [yi + 0.15], "o", color=B_COLOR if one.covers(two.value) else MISSED_COLOR, ms=5)
        ax.plot([1.0], [yi - 0.15], "o", color=A_COLOR if two.covers(one.value) else MISSED_COLOR, ms=5)
    ax.axvline(1.0, color="#999999", lw=0.8)
    ax.set_xscale("log")
    ax.set_yticks(y, [f"{s} {m}" for s, m in zip(table["strategy"], table["metric"], strict=True)], fontsize=8)
    ax.set_xlabel("relative to run A's median (log)")
    held, total = comparison.calibration()
    own = comparison.within.calibration()[0] if comparison.within is not None else held
    ax.set_title(
        f"Intervals of A (blue) and B (orange), each with the other run's median (red: missed)\n"
        f"widened for a second run (pale): {held} of {total} hold it ({held / max(total, 1):.0%}); "
        f"rounds alone (dark): {own} ({own / max(total, 1):.0%}) · A {comparison.names[0]}, B {comparison.names[1]}",
        fontsize=9,
    )
    return fig
