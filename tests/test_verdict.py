"""Each claim's HELD / NOT HELD / NOT MEASURED logic on constructed numbers, and on a real tiny run."""

from __future__ import annotations

import pandas as pd
import pytest

from ckptbench import EIGHT_WAY, summarize, verdict
from ckptbench.results import frame
from ckptbench.verdict import HELD, NOT_HELD, NOT_MEASURED

CLAIMS = [c.claim for c in verdict.CLAIMS]
CHUNKS, FLOAT16, GZIP, OCDBT, T5X, FASTEST, TENSORS, VERIFIED = CLAIMS

STUDY_LIKE = {  # strategy: (save s, cold load s, bytes): numbers for which every claim holds
    "pytorch": (20.0, 15.0, 8e9),
    "tensorstore": (100.0, 40.0, 16e9),
    "t5x": (11.0, 20.0, 14e9),
    "ts+concurrency": (60.0, 35.0, 16e9),
    "ts+chunks": (10.0, 20.0, 16e9),
    "ts+compression": (130.0, 50.0, 14.5e9),
    "ts+float16": (95.0, 38.0, 8e9),
    "ts+ocdbt": (90.0, 42.0, 16.1e9),
}


def _summary(numbers: dict[str, tuple[float, float, float]] = STUDY_LIKE, **columns: dict) -> pd.DataFrame:
    """A summary as results.summarize makes it, from two repeats per strategy with exactly the given medians."""
    rows = []
    for name, (save, cold, size) in numbers.items():
        for spread in (0.5, 1.5):
            row = {
                "strategy": name,
                "save_s": save * spread,
                "load_cold_s": cold * spread,
                "load_warm_s": cold / 2,
                "bytes": size,
                "bytes_allocated": size,
                "files": 1,
                "peak_rss_save": 0,
                "peak_rss_load": 0,
                "tensors": 238,
                "verified": True,
                "model_bytes": 8e9,
            }
            row.update({column: values[name] for column, values in columns.items() if name in values})
            rows.append(row)
    return summarize(pd.DataFrame(rows), order=list(EIGHT_WAY))


def _with(name: str, save: float | None = None, cold: float | None = None, size: float | None = None) -> dict:
    numbers = dict(STUDY_LIKE)
    old = numbers[name]
    numbers[name] = (
        old[0] if save is None else save,
        old[1] if cold is None else cold,
        old[2] if size is None else size,
    )
    return numbers


def _verdicts(summary: pd.DataFrame) -> dict[str, str]:
    return dict(verdict.check(summary)[["claim", "verdict"]].itertuples(index=False))


def _measured(summary: pd.DataFrame, claim: str) -> str:
    table = verdict.check(summary).set_index("claim")
    return table.loc[claim, "measured"]


def test_the_table_has_one_row_per_claim_and_the_documented_columns():
    table = verdict.check(_summary())
    assert list(table.columns) == ["claim", "expected", "measured", "verdict"]
    assert table["claim"].tolist() == CLAIMS
    assert len(CLAIMS) == 8
    assert set(table["verdict"]) == {HELD}
    assert (table["measured"] != table["expected"]).all()


def test_measured_is_computed_from_the_numbers():
    assert _measured(_summary(), CHUNKS).startswith("ts+chunks saves 90.0% faster than tensorstore (10 s vs 100 s)")
    assert "ts+concurrency, 40.0% faster" in _measured(_summary(), CHUNKS)
    assert _measured(_summary(_with("ts+chunks", save=25.0)), CHUNKS).startswith("ts+chunks saves 75.0% faster")
    assert _measured(_summary(), FLOAT16).startswith("size x0.500 of tensorstore")
    assert "save 5.0% faster, cold load 5.0% faster" in _measured(_summary(), FLOAT16)
    assert _measured(_summary(), OCDBT) == "save 10.0% faster than tensorstore (90 s vs 100 s)"
    assert _measured(_summary(), FASTEST) == "fastest TensorStore save: ts+chunks (10 s); next: t5x (11 s)"


@pytest.mark.parametrize(
    ("numbers", "expected"),
    [
        (_with("ts+chunks", save=20.0), HELD),  # exactly the 80 % threshold
        (_with("ts+chunks", save=21.0), NOT_HELD),  # 79 %: below the threshold
        (_with("ts+concurrency", save=9.0), NOT_HELD),  # another knob cuts more
        (_with("ts+float16", save=5.0), NOT_HELD),
    ],
)
def test_chunking_must_cut_80_percent_and_the_most(numbers, expected):
    assert _verdicts(_summary(numbers))[CHUNKS] == expected


@pytest.mark.parametrize(
    ("numbers", "expected"),
    [
        (_with("ts+float16", size=7.2e9), HELD),  # exactly 0.45
        (_with("ts+float16", size=8.8e9), HELD),  # exactly 0.55
        (_with("ts+float16", size=9e9), NOT_HELD),
        (_with("ts+float16", size=7e9), NOT_HELD),
        (_with("ts+float16", save=110.0, cold=44.0), HELD),  # exactly 10 % slower
        (_with("ts+float16", save=112.0), NOT_HELD),
        (_with("ts+float16", cold=45.0), NOT_HELD),
    ],
)
def test_float16_must_halve_the_size_without_slowing_down(numbers, expected):
    assert _verdicts(_summary(numbers))[FLOAT16] == expected


@pytest.mark.parametrize(
    ("numbers", "expected"),
    [
        (_with("ts+compression", save=95.0), NOT_HELD),  # gzip faster than the baseline
        (_with("ts+compression", size=16e9), NOT_HELD),  # gzip not smaller
        (_with("ts+compression", save=101.0, size=15.9e9), HELD),
    ],
)
def test_gzip_must_be_slower_and_smaller(numbers, expected):
    assert _verdicts(_summary(numbers))[GZIP] == expected


def test_ocdbt_must_save_faster_than_the_baseline():
    assert _verdicts(_summary(_with("ts+ocdbt", save=100.0)))[OCDBT] == NOT_HELD
    assert _verdicts(_summary(_with("ts+ocdbt", save=99.0)))[OCDBT] == HELD


@pytest.mark.parametrize(("t5x_save", "expected"), [(9.0, HELD), (30.0, HELD), (8.5, NOT_HELD)])
def test_t5x_must_not_beat_chunks_by_more_than_10_percent(t5x_save, expected):
    assert _verdicts(_summary(_with("t5x", save=t5x_save)))[T5X] == expected


def test_chunks_must_be_the_fastest_tensorstore_save_but_pytorch_does_not_count():
    assert _verdicts(_summary(_with("pytorch", save=1.0)))[FASTEST] == HELD
    assert _verdicts(_summary(_with("t5x", save=9.9)))[FASTEST] == NOT_HELD
    assert _verdicts(_summary(_with("ts+ocdbt", save=9.0)))[FASTEST] == NOT_HELD


def test_every_approach_claims_name_the_failing_ones():
    summary = _summary(tensors={"pytorch": 237}, verified={"ts+ocdbt": False})
    verdicts = _verdicts(summary)
    assert verdicts[TENSORS] == NOT_HELD
    assert verdicts[VERIFIED] == NOT_HELD
    assert _measured(summary, TENSORS) == "8 of 8 approaches run; failing: pytorch (tensors=237)"
    assert _measured(summary, VERIFIED) == "8 of 8 approaches run; failing: ts+ocdbt (verified=False)"
    assert {v for c, v in verdicts.items() if c not in (TENSORS, VERIFIED)} == {HELD}


@pytest.mark.parametrize(
    ("dropped", "not_measured"),
    [
        ("tensorstore", {CHUNKS, FLOAT16, GZIP, OCDBT, FASTEST}),
        ("ts+chunks", {CHUNKS, T5X, FASTEST}),
        ("ts+concurrency", {CHUNKS, FASTEST}),
        ("ts+float16", {CHUNKS, FLOAT16, FASTEST}),
        ("ts+compression", {CHUNKS, GZIP, FASTEST}),
        ("ts+ocdbt", {CHUNKS, OCDBT, FASTEST}),
        ("t5x", {T5X, FASTEST}),
        ("pytorch", set()),
    ],
)
def test_a_missing_phase_makes_exactly_the_claims_that_need_it_not_measured(dropped, not_measured):
    summary = _summary({n: v for n, v in STUDY_LIKE.items() if n != dropped})
    verdicts = _verdicts(summary)
    assert {c for c, v in verdicts.items() if v == NOT_MEASURED} == not_measured
    assert {v for c, v in verdicts.items() if c not in not_measured} == {HELD}
    for claim in not_measured:
        assert dropped in _measured(summary, claim)
    assert _measured(summary, TENSORS) == "7 of 8 approaches run, each 238 tensors"


def test_nothing_run_is_not_measured_throughout():
    assert set(_verdicts(summarize(frame([]))).values()) == {NOT_MEASURED}


def test_a_real_tiny_run_verifies_every_approach_it_ran(make_bench):
    bench = make_bench()
    bench.run(["pytorch", "ts+chunks"])
    table = verdict.check(bench.summary()).set_index("claim")
    assert table.loc[VERIFIED, "verdict"] == HELD
    assert table.loc[VERIFIED, "measured"] == "2 of 8 approaches run, each verified bit-exact"
    assert table.loc[TENSORS, "verdict"] == HELD
    assert set(table.drop([VERIFIED, TENSORS])["verdict"]) == {NOT_MEASURED}
