"""How far a second run of the same command moves a run's figures, measured from committed A/A pairs.

An interval across one run's rounds sees the noise inside the run, not the state of the machine that
differs between runs (the host under the VM, the disk behind it): on the first full-size A/A pair every
median of the second run was slower, far outside those intervals, and two targets changed sides. So the
intervals verdicts are judged on add a between-run component measured on this machine, per family of
figures and preset: the root mean square of log(B / A) over the same figures of the committed A/A pairs
(``PAIRS``). log(B / A) is the difference of two runs, so its spread is that of a second run's figure
about this one's, and the widened interval predicts where a second run's figure falls. The component is
added to the within-run interval's log half-widths in quadrature; it already holds the within-run noise of
the pairs' medians, so the sum errs wide. The pairs are data, computed here from their results files, and
were declared before the pair that tests them out of sample was measured. A preset without a pair gets
no component, and its intervals say so.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from itertools import combinations
from pathlib import Path
from statistics import NormalDist

import pandas as pd

from .results import read_results, succeeded
from .rounds import CONFIDENCE, Interval, of_values, paired_ratio, per_round

ROOT = Path(__file__).resolve().parents[1]
TIMINGS = ("save_s", "save_blocking_s", "load_cold_s", "load_warm_s")
TIME, RATIO, SHARE = "time", "ratio", "share"
FAMILIES = {
    TIME: "a strategy's median seconds",
    RATIO: "one strategy's timing over another's, paired within rounds",
    SHARE: "a strategy's bytes per second as a share of the disk's ceiling probed in the same run",
}
"""Figures that move alike between runs: seconds move with the whole machine, ratios of two strategies measured
in the same round cancel most of that, shares divide by the run's own disk probe."""


@dataclass(frozen=True)
class Pair:
    """Two runs of one command, one right after the other, in one committed results file."""

    path: str
    a: str
    b: str


PAIRS: dict[str, tuple[Pair, ...]] = {
    "openllama-3b": (
        Pair("docs/results/2026-12-02-aa-openllama-3b/bench.csv", "20261202-155917-b18713", "20261202-163227-85714c"),
    ),
    "openllama-3b-2l": (
        Pair(
            "docs/results/2026-12-02-aa-fresh-openllama-3b-2l/bench.csv",
            "20261202-161105-6e2c08",
            "20261202-161306-aa5fc6",
        ),
        Pair(
            "docs/results/2026-12-02-aa-inprocess-openllama-3b-2l/bench.csv",
            "20261202-165322-59c277",
            "20261202-165548-7325b1",
        ),
        Pair(
            "docs/results/2026-12-02-aa-fixed-openllama-3b-2l/bench.csv",
            "20261202-170102-8d9944",
            "20261202-170352-b1e066",
        ),
    ),
}
"""The A/A pairs each preset's between-run spread is measured on: the pairs measured with the rest of the
machine frozen, as every committed run now is (the 2-layer pairs measured among other helpers' work are
left out). Declared before the second full-size pair was measured, which tests them out of sample."""


@dataclass(frozen=True)
class Spread:
    """One family's between-run spread on one preset: the root mean square of log(B / A), and what it rests on."""

    family: str
    rms: float
    figures: int
    pairs: tuple[Pair, ...]

    @property
    def margin(self) -> float:
        """The log half-width a second run's figure stays within at ``rounds.CONFIDENCE``, if log(B / A) is normal."""
        return NormalDist().inv_cdf((1 + CONFIDENCE) / 2) * self.rms

    def widen(self, span: Interval | None) -> Interval | None:
        """``span`` with this spread added to both log half-widths in quadrature; exact figures stay exact."""
        if span is None or span.value <= 0 or span.low == span.high == span.value:
            return span
        low = span.low if span.low > 0 else 0.0
        below = math.log(span.value / low) if low > 0 else math.inf
        above = math.log(span.high / span.value) if math.isfinite(span.high) else math.inf
        return Interval(
            span.value,
            span.value * math.exp(-math.hypot(below, self.margin)),
            span.value * math.exp(math.hypot(above, self.margin)),
            f"{span.method}; widened for a second run (x/÷ {math.exp(self.margin):.2f}: {self.family}s' between-run "
            f"spread over {self.figures} figures of {len(self.pairs)} A/A pair{'s' * (len(self.pairs) > 1)})",
        )


def timed(results: pd.DataFrame) -> list[tuple[str, str]]:
    """The (strategy, timing) pairs a run measured; a synchronous save's blocking time is its save, so left out."""
    done = succeeded(results)
    pairs = []
    for name in dict.fromkeys(done["strategy"]):
        rows = done[done["strategy"] == name]
        for metric in TIMINGS:
            if rows[metric].notna().any() and not (
                metric == "save_blocking_s" and (rows["save_blocking_s"] >= rows["save_s"]).all()
            ):
                pairs.append((name, metric))
    return pairs


def _value(span: Interval | None) -> float:
    return math.nan if span is None else span.value


def figures(results: pd.DataFrame) -> dict[str, dict[tuple, float]]:
    """One run's figures of each family, keyed so that the same figure of another run has the same key."""
    found: dict[str, dict[tuple, float]] = {TIME: {}, RATIO: {}, SHARE: {}}
    measured = timed(results)
    for name, metric in measured:
        found[TIME][(name, metric)] = _value(of_values(per_round(results, name, metric).tolist()))
    for (one, metric), (two, other) in combinations(measured, 2):
        if metric == other:
            ratio = paired_ratio(per_round(results, one, metric), per_round(results, two, metric))
            found[RATIO][(one, two, metric)] = _value(ratio)
    done = succeeded(results)
    for metric, ceiling in (("save_s", "disk_write_gbps"), ("load_cold_s", "disk_read_gbps")):
        for name in dict.fromkeys(done["strategy"]):
            rows = done[done["strategy"] == name]
            share = (rows["bytes"] / rows[metric] / 1e9 / rows[ceiling]).astype(float)
            share.index = rows["repeat"].astype(int).to_numpy()
            found[SHARE][(name, metric)] = _value(of_values(share.dropna().tolist()))
    return found


def movements(a: pd.DataFrame, b: pd.DataFrame) -> dict[str, list[float]]:
    """log(B / A) of every figure of each family both runs measured."""
    one, two = figures(a), figures(b)
    moved = {}
    for family in FAMILIES:
        pairs = [(one[family][k], two[family][k]) for k in one[family] if k in two[family]]
        moved[family] = [math.log(y / x) for x, y in pairs if x > 0 and y > 0]
    return moved


@functools.cache
def spreads(preset: str) -> dict[str, Spread]:
    """Each family's between-run spread on ``preset``, from its committed A/A pairs; empty without pairs."""
    pairs = PAIRS.get(preset, ())
    moved: dict[str, list[float]] = {family: [] for family in FAMILIES}
    for pair in pairs:
        results = read_results(ROOT / pair.path)
        run = results["run_id"].astype(str)
        for family, values in movements(results[run == pair.a], results[run == pair.b]).items():
            moved[family] += values
    return {
        family: Spread(family, math.sqrt(sum(v * v for v in values) / len(values)), len(values), pairs)
        for family, values in moved.items()
        if values
    }


def preset(results: pd.DataFrame) -> str:
    """The preset the rows measured (the first, should they mix)."""
    names = results["preset"].dropna().astype(str) if "preset" in results else pd.Series(dtype=str)
    return names.iloc[0] if len(names) else ""


def widen(span: Interval | None, results: pd.DataFrame, family: str) -> Interval | None:
    """``span``, a figure of ``family`` from ``results``, widened by its preset's between-run spread; a preset
    without an A/A pair keeps the within-run interval and says so."""
    if span is None or span.low == span.high == span.value:
        return span
    spread = spreads(preset(results)).get(family)
    if spread is None:
        return replace(span, method=f"{span.method}; no A/A pair of this preset: a second run may move it further")
    return spread.widen(span)
