"""The study's claims (``study.CLAIMS``) judged on a run's rows, each with its uncertainty.

A criterion compares a ratio of medians with a limit. The ratio is taken within each round and comes
with the interval of its median across rounds (``rounds``), widened for a second run by the ratios'
between-run spread (``betweenrun``); with one round it is widened by the disk drift the run measured
too. A criterion whose interval lies on one side
of its limit is HELD or NOT HELD; one that straddles it is INCONCLUSIVE, never a verdict the noise
could flip. Sizes and counts are exact and judged as such.
"""

from __future__ import annotations

import pandas as pd

from .betweenrun import RATIO, widen
from .location import FILE, scheme
from .results import drift_stands_out, succeeded
from .rounds import Interval, paired_ratio, per_round
from .study import CLAIMS, EIGHT_WAY, EXACT_METRICS, METRICS, Claim, Criterion, Each, Ratio

HELD, NOT_HELD, INCONCLUSIVE, NOT_MEASURED = "HELD", "NOT HELD", "INCONCLUSIVE", "NOT MEASURED"
VERDICTS = (HELD, NOT_HELD, INCONCLUSIVE, NOT_MEASURED)
COLUMNS = ["key", "claim", "expected", "measured", "verdict", "reason"]


def drift(results: pd.DataFrame) -> float | None:
    """How far the disk moved during the run: max/min - 1 of its drift probes, the larger of write and read."""
    spreads = []
    for column in ("drift_write_gbps", "drift_read_gbps"):
        values = results[column].dropna() if column in results else pd.Series(dtype=float)
        values = values[values > 0]
        if len(values) >= 2:
            spreads.append(values.max() / values.min() - 1)
    return max(spreads) if spreads else None


def interval(results: pd.DataFrame, ratio: Ratio, run_drift: float | None, between: bool = True) -> Interval | None:
    """The ratio, paired within rounds, with its interval across them (with ``between``, widened for a second
    run); None if either side is missing."""
    num = per_round(results, ratio.strategy, ratio.metric)
    den = per_round(results, ratio.reference, ratio.metric)
    if ratio.metric in EXACT_METRICS and len(num) and len(den):
        value = float(num.median() / den.median())
        return Interval(value, value, value, "exact")
    span = paired_ratio(num, den, run_drift)
    return widen(span, results, RATIO) if between else span


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


def judge(claim: Claim, results: pd.DataFrame, run_drift: float | None, between: bool = True) -> dict[str, str]:
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
        span = interval(results, criterion.ratio, run_drift, between)
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
    """The claim's strategies measured (in some repeat) while the disk stood out from the run's own spread."""
    far = results.loc[drift_stands_out(results), "strategy"]
    names = [n for n in claim.strategies if n in set(far)]
    return f"; measured while the disk stood out from the run's spread: {', '.join(names)}" if names else ""


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


def check(results: pd.DataFrame, between: bool = True) -> pd.DataFrame:
    """One row per claim of the rows' store: key, claim, expected (criteria), measured (ratios with intervals),
    verdict, reason. The study's claims are about a local disk; the cloud claim needs an S3 run. ``between``:
    intervals widened for a second run; False: this run's rounds only."""
    run_drift = drift(results)
    kind = store_kind(results)
    rows = []
    for claim in CLAIMS:
        if claim.store == kind:
            row = judge(claim, results, run_drift, between)
            rows.append({**row, "reason": row["reason"] + _flagged(claim, results)})
    return pd.DataFrame(rows, columns=COLUMNS)
