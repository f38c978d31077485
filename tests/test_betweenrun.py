"""Intervals that cover a second run: the between-run spread measured from committed A/A pairs, and verdicts that
a planted between-run shift used to flip now INCONCLUSIVE while a large effect still decides."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from ckptbench import betweenrun, compare, report, targets
from ckptbench.cli import main
from ckptbench.results import read_results
from ckptbench.rounds import Interval

PAIR = betweenrun.PAIRS["openllama-3b"][0]
"""The first full-size A/A pair, the spread's calibration pair for the full-size preset."""
TIMINGS = ["save_s", "save_blocking_s", "load_cold_s", "load_warm_s"]
SLOW_PAIR = "ts+best save / the faster one-file save (pytorch, safetensors) <= 1"


def _run_a() -> pd.DataFrame:
    return report.select_run(read_results(betweenrun.ROOT / PAIR.path), PAIR.a)


def test_the_spread_is_computed_from_the_committed_pairs_of_the_preset():
    results = read_results(betweenrun.ROOT / PAIR.path)
    moved = betweenrun.movements(report.select_run(results, PAIR.a), report.select_run(results, PAIR.b))
    spreads = betweenrun.spreads("openllama-3b")
    assert set(spreads) == set(betweenrun.FAMILIES)
    for family, spread in spreads.items():
        assert spread.pairs == (PAIR,)
        assert spread.figures == len(moved[family]) > 0
        assert spread.rms == pytest.approx(math.sqrt(sum(d * d for d in moved[family]) / len(moved[family])))
    assert all(d == 0 for values in betweenrun.movements(_run_a(), _run_a()).values() for d in values)
    assert betweenrun.spreads("tiny") == {}


def test_widening_adds_the_spread_in_quadrature_in_log_space_and_leaves_exact_figures_alone():
    spread = betweenrun.Spread(betweenrun.RATIO, 0.3, 10, (PAIR,))
    span = spread.widen(Interval(2.0, 1.0, 2.0, "rounds"))
    assert math.log(2.0 / span.low) == pytest.approx(math.hypot(math.log(2.0), spread.margin))
    assert math.log(span.high / 2.0) == pytest.approx(spread.margin)
    assert "widened for a second run" in span.method
    exact = Interval(1.5, 1.5, 1.5, "exact")
    assert spread.widen(exact) == exact
    unknown = betweenrun.widen(Interval(2.0, 1.0, 3.0, "rounds"), pd.DataFrame({"preset": ["tiny"]}), "time")
    assert (unknown.low, unknown.high) == (1.0, 3.0)
    assert "no A/A pair of this preset" in unknown.method


def test_a_planted_shift_that_flipped_a_target_is_inconclusive_widened_and_named_as_a_move(tmp_path, capsys):
    """Run B is run A with ts+best's saves twice as fast: on the rounds alone the target flips from MISSED to MET;
    widened for a second run each run's verdict is INCONCLUSIVE, so the runs do not contradict by verdicts, but the
    ratio moved beyond its between-run spread (paired ratios, not medians, which move together with the machine),
    and ``compare`` names that move, exit 1."""
    a = _run_a()
    b = a.assign(run_id="shifted")
    b.loc[b["strategy"] == "ts+best", ["save_s", "save_blocking_s"]] *= 0.5
    rounds_only = compare.compare(a, b, between=False)
    assert f"target '{SLOW_PAIR}': MISSED in A, MET in B" in rounds_only.contradictions
    widened = compare.compare(a, b)
    (moved,) = widened.contradictions
    assert moved.startswith(f"target '{SLOW_PAIR}': MISSED: ")
    assert moved.endswith("(a move the A/A pairs do not explain)")
    verdicts = targets.judged(a).set_index("label")["verdict"]
    assert verdicts[SLOW_PAIR.removesuffix(" <= 1")] == targets.INCONCLUSIVE
    pd.concat([a, b]).to_csv(tmp_path / "bench.csv", index=False)
    assert main(["compare", str(tmp_path / "bench.csv"), PAIR.a, "shifted"]) == 1
    printed = capsys.readouterr().out
    assert "rounds alone: 1 contradiction (exit 1)" in printed
    assert "widened for a second run by the between-run spread of 1 A/A pair(s)" in printed


def test_a_large_effect_still_gets_a_verdict():
    """ts+best's cold load is far slower than the fastest fast loader's: MISSED even widened for a second run."""
    widened, rounds_only = (
        targets.judged(_run_a(), between=between).set_index("key").loc["best_load_vs_fast_loaders"]
        for between in (True, False)
    )
    assert widened["verdict"] == rounds_only["verdict"] == targets.MISSED
    assert widened["low"] < rounds_only["low"]
    assert widened["high"] > rounds_only["high"]
