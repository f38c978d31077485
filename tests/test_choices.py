""" "What should I use?" from a run's rounds: intervals, ties called ties, one answer per set of files for loads."""

from __future__ import annotations

import pandas as pd

from ckptbench import choices, docs
from ckptbench.results import COLUMNS, config_json
from ckptbench.strategies import STRATEGIES

STEADY, SWINGING = (1.0, 1.0, 1.0), (0.6, 1.0, 1.6)


def _rounds(times: dict[str, tuple[float, float, float]], spreads=None) -> pd.DataFrame:
    """Three rounds: each strategy's (stall, save, cold load) seconds times its spread factor in each round."""
    rows = []
    for name, (stall, save, cold) in times.items():
        for repeat, factor in enumerate((spreads or {}).get(name, STEADY)):
            rows.append(
                dict.fromkeys(COLUMNS)
                | {
                    "run_id": "run",
                    "strategy": name,
                    "config": config_json(STRATEGIES[name].config()),
                    "repeat": repeat,
                    "error": "",
                    "verified": True,
                    "save_blocking_s": stall * factor,
                    "save_s": save * factor,
                    "load_cold_s": cold * factor,
                    "bytes": 10**9,
                }
            )
    return pd.DataFrame(rows, columns=COLUMNS)


def _answers(results: pd.DataFrame) -> dict[str, choices.Answer]:
    return {a.question.column: a for a in choices.answers(results)}


def test_a_sync_and_an_async_save_of_one_format_are_one_answer_for_loads_but_not_for_saves():
    results = _rounds({"pytorch": (2.0, 2.0, 3.0), "ts+best": (1.5, 1.5, 1.0), "ts+best+async": (0.2, 2.5, 1.1)})
    answers = _answers(results)
    load = answers["load_cold_s"]
    assert [c.names for c in load.ranked] == [("ts+best", "ts+best+async"), ("pytorch",)]
    assert load.use == "ts+best (= ts+best+async)"
    assert load.ranked[0].span.value == 1.05  # the median over rounds of both strategies' loads
    assert answers["bytes"].use == "tie: pytorch or ts+best (= ts+best+async)"  # equal sizes: a tie, not a pick
    assert answers["save_blocking_s"].use == "ts+best+async"  # the saves differ: each answers for itself
    assert answers["save_s"].use == "ts+best"


def test_overlapping_intervals_are_printed_as_a_tie_and_separated_ones_as_a_winner():
    times = {"dcp+async": (1.85, 4.0, 3.0), "ts+best+async": (1.66, 5.0, 3.0), "pytorch": (9.0, 9.0, 3.0)}
    tied = choices.table(_rounds(times, {"dcp+async": SWINGING})).set_index("question")
    stall = tied.loc["least stall for training (s until the save returns)"]
    assert stall["use"] == "tie: ts+best+async or dcp+async"
    assert stall["measured"] == "ts+best+async 1.66; dcp+async 1.85 [1.11-2.96]"
    assert stall["next"] == ""  # pytorch saves synchronously: its stall is no answer to this question
    clear = choices.table(_rounds(times)).set_index("question")
    assert clear.loc["least stall for training (s until the save returns)", "use"] == "ts+best+async"
    assert clear.loc["least stall for training (s until the save returns)", "next"] == "dcp+async 1.85"


def test_an_unverified_strategy_is_never_the_answer(tmp_path):
    results = _rounds({"pytorch": (2.0, 2.0, 3.0), "safetensors": (0.1, 0.1, 0.1)})
    results.loc[(results["strategy"] == "safetensors") & (results["repeat"] == 1), "verified"] = False
    assert {a.use for a in choices.answers(results)} == {"pytorch"}
    results.to_csv(tmp_path / "bench.csv", index=False)
    assert "| fastest load at inference, into fresh memory (cold load s) | pytorch | 3 |" in docs.render(
        f"choices {tmp_path / 'bench.csv'}"
    )


def test_a_synchronous_save_never_answers_least_stall():
    quick_sync = {"pytorch": (0.5, 0.5, 3.0), "ts+best+async": (1.0, 2.5, 1.1)}
    stall = _answers(_rounds(quick_sync))["save_blocking_s"]
    assert [c.names for c in stall.ranked] == [("ts+best+async",)]
    assert "save_blocking_s" not in _answers(_rounds({"pytorch": (0.5, 0.5, 3.0), "ts+best": (1.5, 1.5, 1.0)}))


def test_next_is_never_a_candidate_tied_with_the_answer():
    """A wide interval further down the ranking can be tied with the answer while a narrow one above it is not."""
    times = {"pytorch": (1.0, 1.0, 1.0), "safetensors": (1.5, 1.5, 1.5), "dcp": (2.0, 2.0, 2.0)}
    table = choices.table(_rounds(times, {"dcp": (0.2, 1.0, 1.6)})).set_index("question")
    durable = table.loc["soonest durable (save s)"]
    assert durable["use"] == "tie: pytorch or dcp"
    assert durable["next"] == "safetensors 1.5"


def test_the_choices_block_can_answer_from_some_strategies_only(tmp_path):
    _rounds({"pytorch": (2.0, 2.0, 3.0), "safetensors": (0.1, 0.1, 0.1)}).to_csv(tmp_path / "bench.csv", index=False)
    assert "| safetensors |" in docs.render(f"choices {tmp_path / 'bench.csv'}")
    assert "safetensors" not in docs.render(f"choices {tmp_path / 'bench.csv'} pytorch")


def test_loads_into_fresh_memory_and_into_a_live_model_are_answered_apart():
    fresh = _rounds({"pytorch": (2.0, 2.0, 3.0), "ts+best": (1.5, 1.5, 1.0)}).assign(load_into="fresh")
    existing = _rounds({"pytorch": (2.0, 2.0, 0.5), "ts+best": (1.5, 1.5, 1.0)}).assign(load_into="existing")
    table = choices.table(pd.concat([fresh, existing])).set_index("question")
    assert table.loc["fastest load at inference, into fresh memory (cold load s)", "use"] == "ts+best"
    assert table.loc["resume into a live model, into its tensors (cold load s)", "use"] == "pytorch"
    assert table.loc["resume into a live model, into its tensors (cold load s)", "measured"] == "0.5"
    only_fresh = choices.table(fresh)["question"].tolist()
    assert "resume into a live model, into its tensors (cold load s)" not in only_fresh


def test_the_intervals_block_marks_the_best_its_ties_and_leaves_the_rest_unmarked(tmp_path):
    times = {"pytorch": (2.0, 2.0, 3.0), "ts+best": (1.5, 1.5, 1.0), "safetensors": (1.6, 1.6, 2.0)}
    _rounds(times, {"safetensors": SWINGING}).to_csv(tmp_path / "bench.csv", index=False)
    rendered = docs.render(f"intervals {tmp_path / 'bench.csv'}")
    rows = {line.split(" | ")[0].strip("| `"): line for line in rendered.splitlines()[2:]}
    assert "least stall" not in rendered  # no save here returns before it is durable
    assert rows["ts+best"].endswith("| 1.5, best | 1, best | 1, tie |")
    assert "| 1.6 [0.96-2.56], tie | 2 [1.2-3.2] |" in rows["safetensors"]  # the saves overlap
    assert rows["pytorch"].endswith("| 2 | 3 | 1, best |")  # slower everywhere; equal sizes go to the first
