"""A lever's effect: each configuration's time as a ratio to its base's and to the fastest peer's, paired in rounds.

A sweep measures every configuration and its peers once per round. What moves a round (the machine, the disk)
moves all of them, so a ratio taken inside each round carries over to another run better than a median does
(the full-size A/A pair moved medians by up to 2.9 while paired ratios held closer). A ratio whose interval
holds 1 is a tie: in this run the lever neither helped nor hurt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from .results import succeeded
from .rounds import Interval, of_values, paired_ratio, per_round
from .verdict import drift

FAULTS: dict[str, str] = {
    "save_s": "minor_faults_save",
    "save_blocking_s": "minor_faults_save",
    "load_cold_s": "minor_faults_load_cold",
    "load_warm_s": "minor_faults_load_warm",
}
"""The region whose page faults go with each timing (a blocking save's are its whole save's: getrusage
covers the region the harness times, and the stall is part of it)."""
FASTER, SLOWER, TIE = "faster", "slower", "tie"


@dataclass(frozen=True)
class Effect:
    """One strategy's timing, and how it compares with the base and the fastest peer in the same rounds."""

    strategy: str
    seconds: Interval
    vs_base: Interval | None
    vs_peer: Interval | None
    minor_faults: float
    """Median minor page faults of the timed region (NaN where rows did not record them)."""

    @property
    def verdict(self) -> str:
        """Against the base: faster or slower only when the paired ratio's whole interval is on one side of 1."""
        if self.vs_base is None:
            return ""
        if self.vs_base.high < 1:
            return FASTER
        return SLOWER if self.vs_base.low > 1 else TIE


def fastest(results: pd.DataFrame, names: Sequence[str], column: str) -> str | None:
    """The strategy among ``names`` with the lowest median ``column`` in the rows; None if none measured it."""
    medians = {n: per_round(results, n, column).median() for n in names}
    medians = {n: m for n, m in medians.items() if pd.notna(m)}
    return min(medians, key=medians.__getitem__) if medians else None


def effects(results: pd.DataFrame, base: str, column: str, peers: Sequence[str] = ()) -> list[Effect]:
    """Every verified strategy's ``column``, fastest median first, each paired round by round with ``base``
    and with the peer whose median is lowest (the one a reader would pick instead)."""
    done = succeeded(results)
    verified = results.groupby("strategy", sort=False)["verified"].all()
    run_drift = drift(results)
    peer = fastest(done, [p for p in peers if verified.get(p, False)], column)
    base_rounds = per_round(done, base, column)
    peer_rounds = per_round(done, peer, column) if peer else pd.Series(dtype=float)
    found = []
    for name in verified[verified].index:
        rounds = per_round(done, name, column)
        span = of_values(rounds.tolist(), run_drift)
        if span is None:
            continue
        faults = done.loc[done["strategy"] == name, FAULTS[column]] if FAULTS[column] in done else pd.Series()
        found.append(
            Effect(
                name,
                span,
                None if name == base else paired_ratio(rounds, base_rounds, run_drift),
                None if name == peer or peer is None else paired_ratio(rounds, peer_rounds, run_drift),
                float(pd.to_numeric(faults, errors="coerce").median()),
            )
        )
    return sorted(found, key=lambda e: e.seconds.value)


def table(results: pd.DataFrame, base: str, column: str, peers: Sequence[str] = ()) -> pd.DataFrame:
    """The effects as a table: seconds, the ratio to the base and its verdict, the ratio to the fastest peer."""
    found = effects(results, base, column, peers)
    peer = fastest(succeeded(results), [p for p in peers if p in {e.strategy for e in found}], column)
    rows = []
    for e in found:
        row = {"strategy": e.strategy, "s": str(e.seconds)}
        row[f"/ {base}"] = "(base)" if e.strategy == base else f"{e.vs_base} {e.verdict}"
        if peer is not None:
            row[f"/ {peer}"] = "(fastest peer)" if e.strategy == peer else str(e.vs_peer)
        row["minor faults"] = "" if pd.isna(e.minor_faults) else f"{e.minor_faults:,.0f}"
        rows.append(row)
    return pd.DataFrame(rows).set_index("strategy")
