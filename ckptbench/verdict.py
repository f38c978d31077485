"""The study's claims (``study.CLAIMS``) judged on a run's rows, each with its uncertainty.

A criterion compares a ratio of medians with a limit. The ratio comes with an interval: a bootstrap
of the median ratio with three or more repeats on both sides, min-max with two, and with one repeat
the ratio widened by the disk drift the run measured. A criterion whose interval lies on one side
of its limit is HELD or NOT HELD; one that straddles it is INCONCLUSIVE, never a verdict the noise
could flip. Sizes and counts are exact and judged as such.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .location import FILE, scheme
from .results import DRIFT_FLAG, drift_from_median, succeeded
from .study import CLAIMS, EIGHT_WAY, EXACT_METRICS, METRICS, Claim, Criterion, Each, Ratio

HELD, NOT_HELD, INCONCLUSIVE, NOT_MEASURED = "HELD", "NOT HELD", "INCONCLUSIVE", "NOT MEASURED"
VERDICTS = (HELD, NOT_HELD, INCONCLUSIVE, NOT_MEASURED)
BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95
COLUMNS = ["key", "claim", "expected", "measured", "verdict", "reason"]


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float
    method: str

    def __str__(self) -> str:
        if self.low == self.high == self.value:
            return f"{self.value:.3g}"
        if math.isinf(self.high):
            return f"{self.value:.3g} (no margin)"
        return f"{self.value:.3g} [{self.low:.3g}-{self.high:.3g}]"


def drift(results: pd.DataFrame) -> float | None:
    """How far the disk moved during the run: max/min - 1 of its drift probes, the larger of write and read."""
    spreads = []
    for column in ("drift_write_gbps", "drift_read_gbps"):
        values = results[column].dropna() if column in results else pd.Series(dtype=float)
        values = values[values > 0]
        if len(values) >= 2:
            spreads.append(values.max() / values.min() - 1)
    return max(spreads) if spreads else None


def _bootstrap(num: np.ndarray, den: np.ndarray) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    nums = np.median(rng.choice(num, (BOOTSTRAP_RESAMPLES, len(num))), axis=1)
    dens = np.median(rng.choice(den, (BOOTSTRAP_RESAMPLES, len(den))), axis=1)
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(nums / dens, [tail, 100 - tail])
    return float(low), float(high)


def interval(results: pd.DataFrame, ratio: Ratio, run_drift: float | None) -> Interval | None:
    """The ratio of medians with its uncertainty, from the completed repeats; None if either side is missing."""
    done = succeeded(results)
    num = done.loc[done["strategy"] == ratio.strategy, ratio.metric].dropna().to_numpy(float)
    den = done.loc[done["strategy"] == ratio.reference, ratio.metric].dropna().to_numpy(float)
    if not len(num) or not len(den):
        return None
    value = float(np.median(num) / np.median(den))
    if ratio.metric in EXACT_METRICS:
        return Interval(value, value, value, "exact")
    if min(len(num), len(den)) >= 3:
        low, high = _bootstrap(num, den)
        return Interval(value, low, high, f"{CONFIDENCE:.0%} bootstrap of the median ratio")
    if max(len(num), len(den)) >= 2:
        return Interval(value, num.min() / den.max(), num.max() / den.min(), "min-max over repeats")
    if run_drift is None:
        return Interval(value, 0.0, math.inf, "one repeat and no drift measured: no margin can be trusted")
    return Interval(
        value,
        value / (1 + run_drift),
        value * (1 + run_drift),
        f"one repeat, widened by the run's drift ({run_drift:.0%})",
    )


def _judge(criterion: Criterion, span: Interval) -> str:
    low, high = criterion.holds(span.low), criterion.holds(span.high)
    return HELD if low and high else NOT_HELD if not (low or high) else INCONCLUSIVE


def _exact(results: pd.DataFrame, eaches: list[Each]) -> tuple[list[str], str]:
    """Each criterion's verdict, and what was measured: the approaches run, then each condition or who broke it."""
    present = [n for n in EIGHT_WAY if n in set(results["strategy"])]
    if not present:
        return [NOT_MEASURED] * len(eaches), "none of the eight was run"
    rows = results[results["strategy"].isin(present)]
    verdicts, held, broken = [], [], []
    for each in eaches:
        failing = sorted(set(rows.loc[rows[each.column] != each.value, "strategy"]), key=present.index)
        verdicts.append(NOT_HELD if failing else HELD)
        if failing:
            broken.append(f"not {each.column} = {each.value}: {', '.join(failing)}")
        else:
            held.append(f"{each.column} = {each.value}")
    scope = f"{len(present)} of {len(EIGHT_WAY)} approaches run" + (f", each with {' and '.join(held)}" if held else "")
    return verdicts, "; ".join([scope, *broken])


def judge(claim: Claim, results: pd.DataFrame, run_drift: float | None) -> dict[str, str]:
    """One row of the verdict table for ``claim``: the worst criterion decides, the reason names it."""
    missing = [n for n in claim.strategies if n not in set(succeeded(results)["strategy"])]
    if missing:
        return _table_row(
            claim, f"not measured: {', '.join(missing)}", NOT_MEASURED, "a strategy it compares did not run"
        )
    if claim.model_tensors is not None and not results["tensors"].eq(claim.model_tensors).any():
        counts = ", ".join(str(n) for n in sorted(set(results["tensors"].dropna().astype(int))))
        return _table_row(
            claim, f"this run's model has {counts} tensors", NOT_MEASURED, f"about a model of {claim.model_tensors}"
        )
    measured, outcomes = [], []
    eaches = [c for c in claim.criteria if isinstance(c, Each)]
    if eaches:
        verdicts, text = _exact(results, eaches)
        measured.append(text)
        outcomes += [(v, str(c), "exact") for v, c in zip(verdicts, eaches, strict=True)]
    for criterion in (c for c in claim.criteria if not isinstance(c, Each)):
        span = interval(results, criterion.ratio, run_drift)
        if span is None:
            missing = f"no {METRICS[criterion.ratio.metric]} recorded"
            return _table_row(claim, missing, NOT_MEASURED, f"needs a run on a {claim.store} store")
        measured.append(f"{criterion.ratio} = {span}")
        outcomes.append((_judge(criterion, span), str(criterion), span.method))
    shown = "; ".join(dict.fromkeys(measured))
    for outcome, label in ((NOT_MEASURED, "not measured"), (NOT_HELD, "fails"), (INCONCLUSIVE, "straddles its limit")):
        picked = [(c, m) for v, c, m in outcomes if v == outcome]
        if picked:
            methods = "; ".join(dict.fromkeys(m for _, m in picked))
            return _table_row(claim, shown, outcome, f"{label}: {'; '.join(c for c, _ in picked)} ({methods})")
    return _table_row(claim, shown, HELD, "; ".join(dict.fromkeys(m for _, _, m in outcomes)))


def _flagged(claim: Claim, results: pd.DataFrame) -> str:
    """The claim's strategies measured (in some repeat) while the disk was far from its run median."""
    far = results.loc[drift_from_median(results) > DRIFT_FLAG, "strategy"]
    names = [n for n in claim.strategies if n in set(far)]
    return f"; measured while the disk was far from its run median: {', '.join(names)}" if names else ""


def _table_row(claim: Claim, measured: str, verdict: str, reason: str) -> dict[str, str]:
    return {
        "key": claim.key,
        "claim": claim.claim,
        "expected": claim.expected,
        "measured": measured,
        "verdict": verdict,
        "reason": reason,
    }


def store_kind(results: pd.DataFrame) -> str:
    """The scheme of the store the rows measured (``s3``, ...), else ``file`` (rows from before stores existed too)."""
    stores = results["store"].dropna() if "store" in results else pd.Series(dtype=str)
    return next(iter(sorted({scheme(s) for s in stores if s} - {FILE})), FILE)


def check(results: pd.DataFrame) -> pd.DataFrame:
    """One row per claim of the rows' store: key, claim, expected (criteria), measured (ratios with intervals),
    verdict, reason. The study's claims are about a local disk; the cloud claim needs an S3 run."""
    run_drift = drift(results)
    kind = store_kind(results)
    rows = []
    for claim in CLAIMS:
        if claim.store == kind:
            row = judge(claim, results, run_drift)
            rows.append({**row, "reason": row["reason"] + _flagged(claim, results)})
    return pd.DataFrame(rows, columns=COLUMNS)
