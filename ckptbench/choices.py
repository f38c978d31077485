""" "What should I use?": each question answered from a run's rounds, with intervals, and ties called ties.

A strategy's figure is the median over rounds with its interval (``rounds``), widened for a second
run (``betweenrun``). The answer is the lowest median; every other strategy is tied with it whose
ratio to the answer, paired within rounds and widened by the between-run spread of such ratios,
reaches 1, since a second run could rank them the other way. (Without the between-run component,
as before it, a tie is two figures' intervals overlapping.) Strategies that write the same files and load them with
the same code (a synchronous and an asynchronous save of one format) differ only in how they save:
for the loads and the size they are one candidate, measured over both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pandas as pd

from .betweenrun import RATIO, TIME, widen
from .results import succeeded
from .rounds import Interval, of_values, paired_ratio, per_round
from .study import EXACT_METRICS
from .verdict import drift

SAVE_ONLY_KNOBS = ("async", "background")
"""Configuration keys that change how a save returns, never what it writes or how it is read."""


@dataclass(frozen=True)
class Question:
    text: str
    column: str
    scale: float
    """The column's unit: seconds (1) or GB (1e9)."""
    same_files_are_one: bool
    """Whether strategies writing the same files answer as one (loads and sizes; not saves)."""
    async_only: bool = False
    """Whether only saves that return before they are durable answer it: a synchronous save's stall is the
    whole save, which "soonest durable" already answers."""
    load_into: str | None = None
    """Only rows whose loads went into this kind of tensors (``fresh``: new memory, as inference starts;
    ``existing``: a live model's, as training resumes), for the two cost differently; None: every row."""


QUESTIONS: tuple[Question, ...] = (
    Question("least stall for training (s until the save returns)", "save_blocking_s", 1.0, False, async_only=True),
    Question("soonest durable (save s)", "save_s", 1.0, False),
    Question("fastest load at inference, into fresh memory (cold load s)", "load_cold_s", 1.0, True, load_into="fresh"),
    Question(
        "resume into a live model, into its tensors (cold load s)", "load_cold_s", 1.0, True, load_into="existing"
    ),
    Question("smallest on disk (GB)", "bytes", 1e9, True),
)


@dataclass(frozen=True)
class Candidate:
    names: tuple[str, ...]
    """One strategy, or several that share files and loader."""
    span: Interval
    rounds: tuple[tuple[int, float], ...] = ()
    """Its figure in each round (round, value), which ties are judged on."""

    @property
    def label(self) -> str:
        return self.names[0] if len(self.names) == 1 else f"{self.names[0]} (= {', '.join(self.names[1:])})"

    def __str__(self) -> str:
        return f"{self.label} {self.span}"


@dataclass(frozen=True)
class Answer:
    question: Question
    ranked: tuple[Candidate, ...]
    """Every verified candidate, lowest median first."""
    tied: tuple[Candidate, ...] = ()
    """The candidates after the first that a second run could rank ahead of it."""

    @property
    def winners(self) -> tuple[Candidate, ...]:
        """The best and every candidate tied with it."""
        return (self.ranked[0], *self.tied)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(n for c in self.winners for n in c.names)

    @property
    def use(self) -> str:
        labels = [c.label for c in self.winners]
        return labels[0] if len(labels) == 1 else f"tie: {', '.join(labels[:-1])} or {labels[-1]}"

    @property
    def runner_up(self) -> Candidate | None:
        """The best candidate that is not tied with the answer (a wide interval further down can be tied
        with it while a narrower one between them is not)."""
        return next((c for c in self.ranked if c not in self.winners), None)


def _settings(config: str | None) -> dict:
    return json.loads(config) if isinstance(config, str) and config else {}


def _file_key(config: str | None) -> str:
    return json.dumps({k: v for k, v in _settings(config).items() if k not in SAVE_ONLY_KNOBS}, sort_keys=True)


def _saves_async(config: str | None) -> bool:
    return any(_settings(config).get(knob) for knob in SAVE_ONLY_KNOBS)


def candidates(results: pd.DataFrame, merge_same_files: bool, async_only: bool = False) -> list[tuple[str, ...]]:
    """The verified strategies, in order of appearance (with ``async_only``, those whose save returns before it is
    durable); with ``merge_same_files``, those writing the same files (equal configurations but for
    ``SAVE_ONLY_KNOBS``) grouped as one."""
    done = succeeded(results)
    verified = results.groupby("strategy", sort=False)["verified"].all()
    names = [n for n in dict.fromkeys(done["strategy"]) if verified.get(n, False)]
    if async_only:
        saves_async = done.drop_duplicates("strategy").set_index("strategy")["config"].map(_saves_async)
        names = [n for n in names if saves_async[n]]
    if not merge_same_files:
        return [(n,) for n in names]
    key = done.drop_duplicates("strategy").set_index("strategy")["config"].map(_file_key)
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(key[name], []).append(name)
    return [tuple(group) for group in groups.values()]


def _tied(
    results: pd.DataFrame, best: Candidate, other: Candidate, run_drift: float | None, between: bool, exact: bool
) -> bool:
    """Whether a second run could rank ``other`` ahead of ``best``: their ratio within rounds, widened for a second
    run unless the figure is ``exact`` (a size), reaches 1; without ``between``, whether their intervals overlap."""
    if not between:
        return other.span.overlaps(best.span)
    num, den = (pd.Series(dict(c.rounds)) for c in (other, best))
    ratio = paired_ratio(num, den, run_drift)
    ratio = ratio if exact else widen(ratio, results, RATIO)
    return ratio is not None and ratio.low <= 1


def answer(results: pd.DataFrame, question: Question, run_drift: float | None, between: bool = True) -> Answer | None:
    """The question answered from the rows (one run's); None when no verified strategy measured its column.
    ``between``: intervals and ties account for a second run (``betweenrun``); False: this run's rounds only."""
    if question.load_into is not None:
        results = results[results["load_into"].fillna("fresh") == question.load_into]
    exact = question.column in EXACT_METRICS  # a size does not move between runs
    ranked = []
    for names in candidates(results, question.same_files_are_one, question.async_only):
        values = (per_round(results, names, question.column) / question.scale).groupby(level=0).median()
        span = of_values(values.tolist(), run_drift)
        if span is not None:
            span = widen(span, results, TIME) if between and not exact else span
            ranked.append(Candidate(names, span, tuple(zip(values.index.tolist(), values.tolist(), strict=True))))
    ranked.sort(key=lambda c: c.span.value)  # stable: an equal median goes to the first run
    if not ranked:
        return None
    tied = tuple(c for c in ranked[1:] if _tied(results, ranked[0], c, run_drift, between, exact))
    return Answer(question, tuple(ranked), tied)


def answers(results: pd.DataFrame, between: bool = True) -> list[Answer]:
    """Every question a run's rows can answer; one round's figures are widened by the run's drift, and with
    ``between`` every figure for a second run."""
    run_drift = drift(results)
    return [a for q in QUESTIONS if (a := answer(results, q, run_drift, between)) is not None]


def table(results: pd.DataFrame) -> pd.DataFrame:
    """One row per question: what to use (or the tie), its figure with interval, and the best of the rest."""
    rows = [
        {
            "question": a.question.text,
            "use": a.use,
            "measured": "; ".join(f"{c.span}" if len(a.winners) == 1 else str(c) for c in a.winners),
            "next": "" if a.runner_up is None else str(a.runner_up),
        }
        for a in answers(results)
    ]
    return pd.DataFrame(rows, columns=["question", "use", "measured", "next"])
