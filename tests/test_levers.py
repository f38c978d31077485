"""A lever's effect, paired with its base and the fastest peer round by round: faster, slower or a tie."""

from __future__ import annotations

import pandas as pd
import pytest

from ckptbench import levers
from ckptbench.results import COLUMNS

BASE = "ts+best"


def _rounds(**by_round: tuple[float, ...]) -> pd.DataFrame:
    """Rows whose cold load takes the given seconds in rounds 0, 1, 2, ..."""
    rows = [
        dict.fromkeys(COLUMNS)
        | {"strategy": name, "repeat": r, "error": "", "verified": True, "load_cold_s": s, "minor_faults_load_cold": 10}
        for name, seconds in by_round.items()
        for r, s in enumerate(seconds)
    ]
    return pd.DataFrame(rows)


def test_a_lever_is_faster_slower_or_tied_by_its_ratio_to_the_base_in_each_round():
    results = _rounds(
        **{
            BASE: (1.0, 2.0, 1.5),  # the rounds move a lot; the ratios inside each round do not
            "halved": (0.5, 1.0, 0.75),
            "doubled": (2.0, 4.0, 3.0),
            "same": (1.1, 1.8, 1.5),
            "runai-streamer": (0.25, 0.5, 0.375),
        }
    )
    by_name = {e.strategy: e for e in levers.effects(results, BASE, "load_cold_s", ["runai-streamer", "pytorch"])}
    assert by_name["halved"].verdict == levers.FASTER
    assert by_name["halved"].vs_base.value == pytest.approx(0.5)
    assert by_name["doubled"].verdict == levers.SLOWER
    assert by_name["same"].verdict == levers.TIE
    assert by_name[BASE].vs_base is None
    assert by_name[BASE].vs_peer.value == pytest.approx(4.0)  # against the fastest peer measured
    assert by_name["runai-streamer"].vs_peer is None
    assert by_name["halved"].minor_faults == 10


def test_the_table_marks_the_base_and_the_fastest_peer_and_orders_by_median():
    results = _rounds(**{BASE: (1.0, 1.2, 1.1), "runai-streamer": (0.5, 0.6, 0.55), "pytorch": (0.9, 1.0, 0.95)})
    table = levers.table(results, BASE, "load_cold_s", ["runai-streamer", "pytorch"])
    assert list(table.index) == ["runai-streamer", "pytorch", BASE]
    assert table.loc[BASE, f"/ {BASE}"] == "(base)"
    assert table.loc["runai-streamer", "/ runai-streamer"] == "(fastest peer)"
    assert table.loc[BASE, "/ runai-streamer"] == "2"  # paired in every round


def test_without_peers_there_is_no_peer_column_and_unverified_strategies_are_left_out():
    results = _rounds(**{BASE: (1.0, 1.2), "broken": (0.1, 0.1)})
    results.loc[results["strategy"] == "broken", "verified"] = False
    table = levers.table(results, BASE, "load_cold_s")
    assert list(table.index) == [BASE]
    assert list(table.columns) == ["s", f"/ {BASE}", "minor faults"]
