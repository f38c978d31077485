"""The study's claims, checked against this run's numbers.

Each claim pairs the study's expectation (and the criterion applied here) with a measured column
computed only from the run's summary (``results.summarize``), so an expectation is never shown as a
result. A claim whose phases were not run is NOT MEASURED, never guessed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from .strategies import BASELINE, EIGHT_WAY

HELD, NOT_HELD, NOT_MEASURED = "HELD", "NOT HELD", "NOT MEASURED"

CHUNKS_MIN_SAVE_REDUCTION = 0.80
"""ts+chunks must cut the baseline's save time by at least this fraction (the study saw ~90%)."""
SINGLE_KNOB_ABLATIONS = ("ts+concurrency", "ts+chunks", "ts+compression", "ts+float16", "ts+ocdbt")
"""The ablations that change one baseline knob each; chunking must give the largest save-time cut of them."""
FLOAT16_SIZE_RATIO = (0.45, 0.55)
"""ts+float16's bytes on disk over the baseline's, inclusive: "halves the size"."""
FLOAT16_MAX_SLOWDOWN = 0.10
"""How much slower than the baseline ts+float16 may save or load cold and still count as "no speed penalty"."""
T5X_MAX_GAIN_OVER_CHUNKS = 0.10
"""t5x counts as "better than chunks alone" only if it saves faster than ts+chunks by more than this fraction."""
EXPECTED_TENSORS = 238
"""OpenLLaMA-3B's 237 weights plus the rotary inv_freq buffer."""
TENSORSTORE_APPROACHES = tuple(n for n in EIGHT_WAY if n in ("tensorstore", "t5x") or n.startswith("ts+"))
"""The eight-way approaches that write with TensorStore."""

Judgement = tuple[str, str]
"""The measured text and the verdict."""


@dataclass(frozen=True)
class Claim:
    claim: str
    expected: str
    judge: Callable[[pd.DataFrame], Judgement]


def _absent(summary: pd.DataFrame, names: tuple[str, ...]) -> Judgement | None:
    missing = [n for n in names if n not in summary.index]
    return (f"not run: {', '.join(missing)}", NOT_MEASURED) if missing else None


def _s(seconds: float) -> str:
    return f"{seconds:.3g} s"


def _vs(value: float, base: float) -> str:
    """A time relative to another, as a percentage faster or slower."""
    change = value / base - 1
    return f"{abs(change):.1%} {'slower' if change > 0 else 'faster'}"


def _verdict(held: bool) -> str:
    return HELD if held else NOT_HELD


def _chunks_primary(summary: pd.DataFrame) -> Judgement:
    if absent := _absent(summary, (BASELINE, *SINGLE_KNOB_ABLATIONS)):
        return absent
    base = summary.loc[BASELINE, "save_s_median"]
    saves = {n: summary.loc[n, "save_s_median"] for n in SINGLE_KNOB_ABLATIONS}
    chunks = saves.pop("ts+chunks")
    other = min(saves, key=saves.get)
    cut = 1 - chunks / base
    measured = (
        f"ts+chunks saves {_vs(chunks, base)} than {BASELINE} ({_s(chunks)} vs {_s(base)}); "
        f"best other single knob: {other}, {_vs(saves[other], base)} ({_s(saves[other])})"
    )
    return measured, _verdict(cut >= CHUNKS_MIN_SAVE_REDUCTION and chunks < saves[other])


def _float16_halves(summary: pd.DataFrame) -> Judgement:
    if absent := _absent(summary, (BASELINE, "ts+float16")):
        return absent
    base, f16 = summary.loc[BASELINE], summary.loc["ts+float16"]
    size = f16["bytes"] / base["bytes"]
    save = f16["save_s_median"] / base["save_s_median"]
    cold = f16["load_cold_s_median"] / base["load_cold_s_median"]
    low, high = FLOAT16_SIZE_RATIO
    measured = (
        f"size x{size:.3f} of {BASELINE} ({f16['bytes'] / 1e9:.3g} GB vs {base['bytes'] / 1e9:.3g} GB); "
        f"save {_vs(f16['save_s_median'], base['save_s_median'])}, "
        f"cold load {_vs(f16['load_cold_s_median'], base['load_cold_s_median'])}"
    )
    limit = 1 + FLOAT16_MAX_SLOWDOWN
    return measured, _verdict(low <= size <= high and save <= limit and cold <= limit)


def _gzip_costs_time(summary: pd.DataFrame) -> Judgement:
    if absent := _absent(summary, (BASELINE, "ts+compression")):
        return absent
    base, gz = summary.loc[BASELINE], summary.loc["ts+compression"]
    measured = (
        f"save {_vs(gz['save_s_median'], base['save_s_median'])} ({_s(gz['save_s_median'])} vs "
        f"{_s(base['save_s_median'])}); size x{gz['bytes'] / base['bytes']:.3f} of {BASELINE}"
    )
    return measured, _verdict(gz["save_s_median"] > base["save_s_median"] and gz["bytes"] < base["bytes"])


def _ocdbt_better(summary: pd.DataFrame) -> Judgement:
    if absent := _absent(summary, (BASELINE, "ts+ocdbt")):
        return absent
    base, ocdbt = summary.loc[BASELINE, "save_s_median"], summary.loc["ts+ocdbt", "save_s_median"]
    return f"save {_vs(ocdbt, base)} than {BASELINE} ({_s(ocdbt)} vs {_s(base)})", _verdict(ocdbt < base)


def _t5x_no_better(summary: pd.DataFrame) -> Judgement:
    if absent := _absent(summary, ("t5x", "ts+chunks")):
        return absent
    t5x, chunks = summary.loc["t5x", "save_s_median"], summary.loc["ts+chunks", "save_s_median"]
    measured = f"t5x saves {_vs(t5x, chunks)} than ts+chunks ({_s(t5x)} vs {_s(chunks)})"
    return measured, _verdict(t5x >= chunks * (1 - T5X_MAX_GAIN_OVER_CHUNKS))


def _chunks_fastest(summary: pd.DataFrame) -> Judgement:
    if absent := _absent(summary, TENSORSTORE_APPROACHES):
        return absent
    saves = summary.loc[list(TENSORSTORE_APPROACHES), "save_s_median"].sort_values()
    (first, fastest), (second, next_fastest) = saves.iloc[:2].items()
    measured = f"fastest TensorStore save: {first} ({_s(fastest)}); next: {second} ({_s(next_fastest)})"
    return measured, _verdict(first == "ts+chunks")


def _every_approach(column: str, passes: Callable[[pd.Series], pd.Series], what: str) -> Callable:
    """A claim about each of the eight that ran; NOT MEASURED only when none did."""

    def judge(summary: pd.DataFrame) -> Judgement:
        present = [n for n in EIGHT_WAY if n in summary.index]
        if not present:
            return "none of the eight was run", NOT_MEASURED
        values = summary.loc[present, column]
        failing = values[~passes(values)]
        scope = f"{len(present)} of {len(EIGHT_WAY)} approaches run"
        if failing.empty:
            return f"{scope}, each {what}", HELD
        return f"{scope}; failing: {', '.join(f'{n} ({column}={v})' for n, v in failing.items())}", NOT_HELD

    return judge


CLAIMS: tuple[Claim, ...] = (
    Claim(
        "chunking is the primary save optimisation",
        f"ts+chunks saves ~90% faster than {BASELINE} (HELD: cut >= {CHUNKS_MIN_SAVE_REDUCTION:.0%} "
        "and the largest of the single-knob ablations)",
        _chunks_primary,
    ),
    Claim(
        "float16 halves the size with no speed penalty",
        f"ts+float16 bytes {FLOAT16_SIZE_RATIO[0]}-{FLOAT16_SIZE_RATIO[1]} x {BASELINE}'s; save and cold load "
        f"at most {FLOAT16_MAX_SLOWDOWN:.0%} slower",
        _float16_halves,
    ),
    Claim(
        "gzip costs save time for its size gain",
        f"ts+compression saves slower than {BASELINE} and is smaller on disk",
        _gzip_costs_time,
    ),
    Claim("OCDBT is slightly better", f"ts+ocdbt saves faster than {BASELINE}", _ocdbt_better),
    Claim(
        "T5X's combination is no better than chunks alone",
        f"t5x saves no more than {T5X_MAX_GAIN_OVER_CHUNKS:.0%} faster than ts+chunks",
        _t5x_no_better,
    ),
    Claim(
        "ts+chunks is the fastest TensorStore save",
        f"lowest save time of {', '.join(TENSORSTORE_APPROACHES)}",
        _chunks_fastest,
    ),
    Claim(
        f"every approach saved {EXPECTED_TENSORS} tensors",
        f"{EXPECTED_TENSORS} tensors in every checkpoint",
        _every_approach("tensors", lambda v: v == EXPECTED_TENSORS, f"{EXPECTED_TENSORS} tensors"),
    ),
    Claim(
        "every approach verified",
        "every load bit-exact with what was saved",
        _every_approach("verified", lambda v: v.astype(bool), "verified bit-exact"),
    ),
)


def check(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per claim: claim, expected, measured, verdict (HELD / NOT HELD / NOT MEASURED)."""
    rows = []
    for claim in CLAIMS:
        measured, verdict = claim.judge(summary)
        rows.append({"claim": claim.claim, "expected": claim.expected, "measured": measured, "verdict": verdict})
    return pd.DataFrame(rows, columns=["claim", "expected", "measured", "verdict"])
