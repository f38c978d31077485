"""Intervals from a run's rounds: a median, or a ratio paired within each round, with the coverage it has.

A round is every strategy measured once (the rows sharing a ``repeat``). What moves a run's numbers
moves a whole round (the machine, the disk, the host), so a ratio of two strategies is taken inside
each round and its spread is measured across rounds, never across repeats pooled from different
moments. The interval is the order-statistic (sign-test) interval of the median: distribution-free,
and exact about its coverage, which with few rounds is low (min-max of 3 rounds covers the median
with 75 %); it says so rather than borrowing confidence from a model of the noise. With one round
the value is widened by the disk drift the run measured, or has no margin at all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import median

import pandas as pd

CONFIDENCE = 0.95
"""The coverage aimed at: the narrowest order-statistic interval reaching it, else min-max and its own."""


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float
    method: str

    def __str__(self) -> str:
        if f"{self.low:.3g}" == f"{self.high:.3g}" == f"{self.value:.3g}":
            return f"{self.value:.3g}"
        if math.isinf(self.high):
            return f"{self.value:.3g} (no margin)"
        return f"{self.value:.3g} [{self.low:.3g}-{self.high:.3g}]"

    def overlaps(self, other: Interval) -> bool:
        return self.low <= other.high and other.low <= self.high

    def covers(self, value: float) -> bool:
        return self.low <= value <= self.high


def coverage(n: int, k: int) -> float:
    """The chance that [k-th smallest, k-th largest] of ``n`` independent values holds their true median."""
    return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n


def of_values(values: Sequence[float], run_drift: float | None = None) -> Interval | None:
    """The median of ``values`` (one per round) and its order-statistic interval; None when there are none."""
    data = sorted(v for v in values if not (v is None or math.isnan(v)))
    n = len(data)
    if n == 0:
        return None
    value = float(median(data))
    if n == 1:
        if run_drift is None:
            return Interval(value, 0.0, math.inf, "one round and no drift measured: no margin can be trusted")
        widened = f"one round, widened by the run's drift ({run_drift:.0%})"
        return Interval(value, value / (1 + run_drift), value * (1 + run_drift), widened)
    k = max([k for k in range(1, n // 2 + 1) if coverage(n, k) >= CONFIDENCE], default=1)
    low, high = data[k - 1], data[n - k]
    span = "min-max" if k == 1 else f"{k}th lowest-highest"
    return Interval(value, float(low), float(high), f"{span} of {n} rounds (covers the median {coverage(n, k):.0%})")


def per_round(results: pd.DataFrame, strategy: str | Sequence[str], column: str) -> pd.Series:
    """The completed rows' ``column`` for ``strategy`` (or several pooled), indexed by round."""
    names = [strategy] if isinstance(strategy, str) else list(strategy)
    rows = results[results["strategy"].isin(names) & (results["error"].fillna("") == "")]
    values = rows[column].astype(float)
    values.index = rows["repeat"].astype(int).to_numpy()
    return values.dropna()


def paired_ratio(num: pd.Series, den: pd.Series, run_drift: float | None = None) -> Interval | None:
    """``num / den`` per round (both indexed by round) and the interval of their median.

    Rounds where only one side completed drop out. Without rounds to pair (rows from separate phases,
    or pooled strategies), the ratio of medians spans the extremes: lowest over highest to highest
    over lowest.
    """
    if num.empty or den.empty:
        return None
    common = num.index.intersection(den.index)
    if num.index.has_duplicates or den.index.has_duplicates or common.empty:
        value = float(num.median() / den.median())
        if len(num) == len(den) == 1:
            return of_values([value], run_drift)
        return Interval(value, num.min() / den.max(), num.max() / den.min(), "min-max of unpaired values")
    return of_values((num[common] / den[common]).tolist(), run_drift)
