"""The study's claims judged with their uncertainty: HELD / NOT HELD only when the interval is clear of the limit."""

from __future__ import annotations

import pandas as pd
import pytest

from ckptbench import EIGHT_WAY, study, verdict
from ckptbench.results import COLUMNS
from ckptbench.study import CLAIMS, Criterion, Ratio
from ckptbench.verdict import HELD, INCONCLUSIVE, NOT_HELD, NOT_MEASURED

KEYS = [c.key for c in CLAIMS if c.store == "file"]
STUDY_LIKE = {  # strategy: (save s, cold load s, bytes): medians for which every claim holds
    "pytorch": (20.0, 15.0, 8e9),
    "tensorstore": (100.0, 40.0, 16e9),
    "t5x": (11.0, 20.0, 14e9),
    "ts+concurrency": (60.0, 35.0, 16e9),
    "ts+chunks": (10.0, 20.0, 16e9),
    "ts+compression": (130.0, 50.0, 14.5e9),
    "ts+float16": (95.0, 38.0, 8e9),
    "ts+ocdbt": (90.0, 42.0, 16.1e9),
}


def _results(numbers=STUDY_LIKE, spreads=(0.99, 1.0, 1.01), drift=(1.0, 1.0), **columns) -> pd.DataFrame:
    """Rows with the given medians, one per spread factor (the rounds), and drift probes as given.

    The baseline takes the factors in reverse, so its rounds do not move in step with the others'."""
    rows = []
    for name, (save, cold, size) in numbers.items():
        for repeat, spread in enumerate(spreads[::-1] if name == study.BASELINE else spreads):
            row = dict.fromkeys(COLUMNS) | {
                "strategy": name,
                "repeat": repeat,
                "error": "",
                "save_s": save * spread,
                "load_cold_s": cold * spread,
                "load_warm_s": cold / 2,
                "bytes": size,
                "tensors": 238,
                "verified": True,
                "drift_write_gbps": drift[len(rows) % len(drift)],
                "drift_read_gbps": drift[len(rows) % len(drift)],
            }
            row.update({column: values[name] for column, values in columns.items() if name in values})
            rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def _with(name: str, save: float | None = None, cold: float | None = None, size: float | None = None) -> dict:
    old = STUDY_LIKE[name]
    new = (old[0] if save is None else save, old[1] if cold is None else cold, old[2] if size is None else size)
    return {**STUDY_LIKE, name: new}


def _verdicts(results: pd.DataFrame) -> dict[str, str]:
    return dict(verdict.check(results)[["key", "verdict"]].itertuples(index=False))


def test_the_table_has_one_row_per_claim_with_the_documented_columns():
    table = verdict.check(_results())
    assert list(table.columns) == verdict.COLUMNS
    assert table["key"].tolist() == KEYS
    assert set(table["verdict"]) == {HELD}
    assert (table["measured"] != table["expected"]).all()


def test_claims_compare_registered_strategies():
    for claim in CLAIMS:
        for name in claim.strategies:
            assert name in EIGHT_WAY, (claim.key, name)
        assert claim.expected, claim.key


def test_measured_shows_each_ratio_with_its_interval():
    table = verdict.check(_results()).set_index("key")
    assert "ts+chunks save / tensorstore save = 0.1 [" in table.loc["chunks_primary", "measured"]
    assert "ts+float16 size / tensorstore size = 0.5;" in table.loc["float16_halves", "measured"]
    assert "min-max of 3 rounds (covers the median 75%)" in table.loc["ocdbt_better", "reason"]


@pytest.mark.parametrize(
    ("numbers", "expected"),
    [
        (_with("ts+chunks", save=19.0), HELD),
        (_with("ts+chunks", save=25.0), NOT_HELD),
        (_with("ts+chunks", save=20.0), INCONCLUSIVE),  # the limit lies inside the interval
        (_with("ts+concurrency", save=9.0), NOT_HELD),
    ],
)
def test_chunking_must_cut_80_percent_and_the_most(numbers, expected):
    assert _verdicts(_results(numbers))["chunks_primary"] == expected


@pytest.mark.parametrize(
    ("numbers", "expected"),
    [
        (_with("ts+float16", size=7.2e9), HELD),  # exactly 0.45: sizes are exact
        (_with("ts+float16", size=9e9), NOT_HELD),
        (_with("ts+float16", save=105.0, cold=40.0), HELD),
        (_with("ts+float16", save=130.0), NOT_HELD),
        (_with("ts+float16", save=110.0), INCONCLUSIVE),
    ],
)
def test_float16_must_halve_the_size_without_slowing_down(numbers, expected):
    assert _verdicts(_results(numbers))["float16_halves"] == expected


def test_overlapping_repeats_are_inconclusive_and_separated_ones_are_not():
    close = _with("ts+compression", save=100.0)
    spread = (0.8, 1.0, 1.25)  # baseline 80-125 s and gzip 80-125 s overlap completely
    assert _verdicts(_results(close, spreads=spread))["gzip_costs"] == INCONCLUSIVE
    assert _verdicts(_results(_with("ts+compression", save=200.0), spreads=spread))["gzip_costs"] == HELD
    assert _verdicts(_results(_with("ts+compression", save=50.0), spreads=spread))["gzip_costs"] == NOT_HELD
    table = verdict.check(_results(close, spreads=spread)).set_index("key")
    assert table.loc["gzip_costs", "reason"].startswith(
        "straddles its limit: ts+compression save / tensorstore save > 1"
    )


def test_a_single_repeat_judges_only_margins_larger_than_the_run_drift():
    one = (1.0,)
    calm = _results(_with("ts+ocdbt", save=95.0), spreads=one, drift=(1.0, 1.02))
    assert _verdicts(calm)["ocdbt_better"] == HELD  # 5 % margin, 2 % drift
    noisy = _results(_with("ts+ocdbt", save=95.0), spreads=one, drift=(1.0, 1.5))
    assert _verdicts(noisy)["ocdbt_better"] == INCONCLUSIVE  # 5 % margin, 50 % drift
    reason = verdict.check(noisy).set_index("key").loc["ocdbt_better", "reason"]
    assert "one round, widened by the run's drift (50%)" in reason
    assert _verdicts(noisy)["chunks_primary"] == HELD  # a 90 % cut survives 50 % drift
    blind = _results(_with("ts+ocdbt", save=95.0), spreads=one, drift=(float("nan"),))
    assert _verdicts(blind)["ocdbt_better"] == INCONCLUSIVE
    assert _verdicts(blind)["float16_halves"] == INCONCLUSIVE  # sizes exact, but the timings have no margin


def test_the_study_flip_seen_by_a_user_becomes_inconclusive():
    """One repeat while the disk drifted 1.7x: gzip 23 % faster than the baseline must not read NOT HELD."""
    flipped = _with("ts+compression", save=576.0)
    flipped = {**flipped, "tensorstore": (749.0, 40.0, 16e9)}
    results = _results(flipped, spreads=(1.0,), drift=(1.0, 1.7))
    assert _verdicts(results)["gzip_costs"] == INCONCLUSIVE


def test_a_missing_or_failed_strategy_is_not_measured():
    partial = {k: v for k, v in STUDY_LIKE.items() if k != "ts+ocdbt"}
    table = verdict.check(_results(partial)).set_index("key")
    assert table.loc["ocdbt_better", "verdict"] == NOT_MEASURED
    assert table.loc["ocdbt_better", "measured"] == "not measured: ts+ocdbt"
    assert table.loc["chunks_primary", "verdict"] == NOT_MEASURED
    assert table.loc["float16_halves", "verdict"] == HELD
    results = _results()
    results.loc[results["strategy"] == "t5x", ["save_s", "error"]] = [float("nan"), "DiskFullError: full"]
    results.loc[results["strategy"] == "t5x", "verified"] = False
    table = verdict.check(results).set_index("key")
    assert table.loc["t5x_no_better", "verdict"] == NOT_MEASURED
    assert table.loc["verified", "verdict"] == NOT_HELD
    assert "t5x" in table.loc["verified", "measured"]


def test_every_approach_claims_are_exact():
    results = _results(tensors={"ts+ocdbt": 237})
    table = verdict.check(results).set_index("key")
    assert table.loc["tensors", "verdict"] == NOT_HELD
    assert "ts+ocdbt" in table.loc["tensors", "measured"]
    assert verdict.check(_results({})).set_index("key").loc["verified", "verdict"] == NOT_MEASURED


def test_the_238_tensors_claim_needs_every_load_to_give_them_back():
    results = _results()
    results.loc[results["strategy"] == "ts+float16", "verified"] = False  # a load that lost a tensor
    row = verdict.check(results).set_index("key").loc["tensors"]
    assert row["verdict"] == NOT_HELD
    assert "not verified = True: ts+float16" in row["measured"]


def test_the_238_tensors_claim_is_not_judged_on_another_model():
    results = _results(tensors=dict.fromkeys(STUDY_LIKE, 22))
    row = verdict.check(results).set_index("key").loc["tensors"]
    assert row["verdict"] == NOT_MEASURED
    assert row["measured"] == "this run's model has 22 tensors"


def test_criteria_read_as_their_ratio_and_limit():
    criterion = Criterion(Ratio("save_s", "ts+chunks", "tensorstore"), "<=", 0.2)
    assert str(criterion) == "ts+chunks save / tensorstore save <= 0.2"
    assert criterion.holds(0.2)
    assert not criterion.holds(0.21)
    assert study.OPS[">"](2, 1)


def test_a_claim_names_phases_measured_while_the_disk_stood_out_from_the_run():
    results = _results()
    results.loc[(results["strategy"] == "ts+ocdbt") & (results["repeat"] == 1), "drift_write_gbps"] = 2.0
    table = verdict.check(results).set_index("key")
    assert table.loc["ocdbt_better", "reason"].endswith("stood out from the run's spread: ts+ocdbt")
    assert "stood out" not in table.loc["t5x_no_better", "reason"]


def test_a_disk_that_moves_all_run_long_flags_no_row():
    """Probes spread 0.5x-2x around the median in every round: that is the run's spread, not an outlier."""
    results = _results(drift=(0.5, 1.0, 2.0, 1.0, 0.6, 1.7))
    assert "stood out" not in " ".join(verdict.check(results)["reason"])
