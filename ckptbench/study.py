"""The study as data: which approaches it compares, what it claimed, and the targets ckptbench holds itself to.

Everything that names strategies for a purpose (the eight, the baseline, the bench's peers) and every
threshold lives here, so verdicts, targets, plots, the CLI, the notebook and the generated docs read
one definition. A claim is a conjunction of criteria on ratios of medians; ``verdict`` judges them
with their uncertainty.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from .errors import UnknownChoiceError, UsageError
from .strategies import STRATEGIES, Strategy
from .strategies.sharded import Sharded
from .strategies.sharded import forms as forms_of

EIGHT_WAY: tuple[str, ...] = (
    "pytorch",
    "tensorstore",
    "t5x",
    "ts+concurrency",
    "ts+chunks",
    "ts+compression",
    "ts+float16",
    "ts+ocdbt",
)
"""The study's eight approaches, in its order."""
BASELINE = "tensorstore"
"""The study's unoptimised TensorStore configuration; every ablation changes one of its knobs."""
BEST = "ts+best"
"""The fastest lossless TensorStore configuration the sweep found."""
SINGLE_KNOB: tuple[str, ...] = ("ts+concurrency", "ts+chunks", "ts+compression", "ts+float16", "ts+ocdbt")
"""The ablations that change one baseline knob each."""
TENSORSTORE_EIGHT: tuple[str, ...] = tuple(n for n in EIGHT_WAY if STRATEGIES[n].config()["library"] == "tensorstore")
"""The eight-way approaches that write with TensorStore."""
ORBAX = "orbax"
"""Orbax with its defaults as installed: what the library's own maintainers ship on the same TensorStore."""
ONE_FILE: tuple[str, ...] = ("pytorch", "safetensors")
"""The one-file peers; the faster of them is the bar for the best TensorStore configuration."""
BEST_ASYNC = "ts+best+async"
"""The best TensorStore configuration, saving asynchronously: a copy of the tensors, written in the background."""
ASYNC: tuple[str, ...] = ("orbax+async", "dcp+async", BEST_ASYNC)
"""The asynchronous saves: each returns before its checkpoint is durable."""
FAST_LOADERS: tuple[str, ...] = ("runai-streamer", "fastsafetensors", "tensorizer")
"""The loaders people pick when load time matters; the fastest of them is the bar for the best cold load."""
BENCH: tuple[str, ...] = (*ONE_FILE, BEST, ORBAX, *ASYNC, *FAST_LOADERS)
"""What ``bench`` measures by default: what its targets compare."""
EXPECTED_TENSORS = 238
"""OpenLLaMA-3B's 237 weights plus the rotary inv_freq buffer."""
GROUPS: dict[str, tuple[str, ...]] = {
    "all": EIGHT_WAY,
    "every": tuple(STRATEGIES),
    "peers": tuple(n for n in STRATEGIES if n not in EIGHT_WAY),
}
"""Names that stand for several strategies on the command line and in the notebook's parameters."""


def parse_strategies(spec: str) -> list[str]:
    """A comma list of strategies and groups (``all``: the eight, ``every``: the whole registry, ``peers``: every
    other), each strategy once, in the order named: ``all,safetensors`` is the eight and safetensors."""
    parts = [part.strip() for part in spec.split(",") if part.strip()]
    if not parts:
        raise UnknownChoiceError("strategy", spec, [*GROUPS, *STRATEGIES])
    names = []
    for part in parts:
        if part not in GROUPS and part not in STRATEGIES:
            raise UnknownChoiceError("strategy", part, [*GROUPS, *STRATEGIES])
        names += GROUPS.get(part, [part])
    return list(dict.fromkeys(names))


def ordered(names: list[str] | tuple[str, ...] | Any) -> list[str]:
    """The study's order for the eight, then the registry's, then anything else in order of appearance."""
    present = list(dict.fromkeys(names))
    known = [n for n in (*EIGHT_WAY, *STRATEGIES) if n in present]
    return list(dict.fromkeys(known)) + [n for n in present if n not in known]


def _derived() -> dict[str, Sharded]:
    """Forms that are not a registered strategy's own name (per-process OCDBT), by name."""
    found = {}
    for strategy in STRATEGIES.values():
        try:
            found.update((form.name, form) for form in forms_of(strategy) if form.name not in STRATEGIES)
        except UsageError:
            continue
    return found


def forms(strategies: str | Iterable[str | Strategy]) -> list[Sharded]:
    """The forms with ranks of a strategy list: a group, names (``ts+ocdbt`` gives both OCDBT ways; a
    derived name such as ``ts+ocdbt+per-process`` gives one) or strategies. A strategy named on its own
    without a form is refused; a group leaves such strategies out (Orbax's checkpointer is one process)."""
    if isinstance(strategies, str):
        parts = [part.strip() for part in strategies.split(",") if part.strip()]
        items = [(name, part in GROUPS) for part in parts for name in GROUPS.get(part, (part,))]
    else:
        items = [(item, False) for item in strategies]
    derived = _derived()
    chosen: dict[str, Sharded] = {}
    for item, from_group in items:
        try:
            if isinstance(item, Strategy):
                found = forms_of(item)
            elif item in STRATEGIES:
                found = forms_of(STRATEGIES[item])
            elif item in derived:
                found = (derived[item],)
            else:
                raise UnknownChoiceError("strategy", str(item), [*GROUPS, *STRATEGIES, *derived])
        except UsageError:
            if from_group:
                continue
            raise
        chosen.update((form.name, form) for form in found)
    if not chosen:
        raise UnknownChoiceError("strategy", str(strategies), [*GROUPS, *STRATEGIES, *derived])
    return list(chosen.values())


Op = Literal["<", "<=", ">", ">="]
OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
METRICS: dict[str, str] = {
    "save_s": "save",
    "save_blocking_s": "blocking save",
    "load_cold_s": "cold load",
    "load_warm_s": "warm load",
    "bytes": "size",
    "files": "files",
    "objects": "objects",
    "requests_put": "PUT requests",
}
"""The results columns a claim may compare, and their names in words."""
EXACT_METRICS = frozenset({"bytes", "files", "objects", "requests_put"})
"""Columns that do not vary from run to run; every other metric is a timing, judged with its noise."""


@dataclass(frozen=True)
class Ratio:
    """A metric's median for ``strategy`` over the same metric's median for ``reference``."""

    metric: str
    strategy: str
    reference: str

    def __str__(self) -> str:
        return f"{self.strategy} {METRICS[self.metric]} / {self.reference} {METRICS[self.metric]}"


@dataclass(frozen=True)
class Criterion:
    ratio: Ratio
    op: Op
    limit: float

    def holds(self, value: float) -> bool:
        return OPS[self.op](value, self.limit)

    def __str__(self) -> str:
        return f"{self.ratio} {self.op} {self.limit:g}"


@dataclass(frozen=True)
class Each:
    """Every one of the eight that ran has ``column == value``: exact, so never inconclusive."""

    column: str
    value: Any

    def __str__(self) -> str:
        return f"{self.column} = {self.value} for each of the eight"


@dataclass(frozen=True)
class Claim:
    key: str
    claim: str
    """The study's words."""
    study: str
    """What the study reported seeing."""
    criteria: tuple[Criterion | Each, ...]
    """All must hold for HELD; any that clearly fails makes it NOT HELD."""
    store: Literal["file", "s3"] = "file"
    """The store whose runs judge it: the study measured a local disk; a cloud claim needs object storage."""
    model_tensors: int | None = None
    """The claim is about a model with this many tensors: a run of another model (2 layers) does not judge it."""

    @property
    def strategies(self) -> tuple[str, ...]:
        names = [n for c in self.criteria if isinstance(c, Criterion) for n in (c.ratio.strategy, c.ratio.reference)]
        return tuple(dict.fromkeys(names))

    @property
    def expected(self) -> str:
        return "; ".join(str(c) for c in self.criteria)


def _faster_than_each(strategy: str, others: tuple[str, ...]) -> tuple[Criterion, ...]:
    return tuple(Criterion(Ratio("save_s", strategy, other), "<", 1.0) for other in others if other != strategy)


CLAIMS: tuple[Claim, ...] = (
    Claim(
        "chunks_primary",
        "chunking is the primary save optimisation",
        f"ts+chunks saved about 90% faster than {BASELINE}, the largest cut of any single knob",
        (Criterion(Ratio("save_s", "ts+chunks", BASELINE), "<=", 0.2), *_faster_than_each("ts+chunks", SINGLE_KNOB)),
    ),
    Claim(
        "float16_halves",
        "float16 halves the size with no speed penalty",
        "half the bytes on disk, save and load as fast as the baseline",
        (
            Criterion(Ratio("bytes", "ts+float16", BASELINE), ">=", 0.45),
            Criterion(Ratio("bytes", "ts+float16", BASELINE), "<=", 0.55),
            Criterion(Ratio("save_s", "ts+float16", BASELINE), "<=", 1.1),
            Criterion(Ratio("load_cold_s", "ts+float16", BASELINE), "<=", 1.1),
        ),
    ),
    Claim(
        "gzip_costs",
        "gzip costs save time for its size gain",
        "ts+compression smaller on disk but slower to save",
        (
            Criterion(Ratio("save_s", "ts+compression", BASELINE), ">", 1.0),
            Criterion(Ratio("bytes", "ts+compression", BASELINE), "<", 1.0),
        ),
    ),
    Claim(
        "ocdbt_better",
        "OCDBT is slightly better",
        f"ts+ocdbt saved a little faster than {BASELINE}",
        (Criterion(Ratio("save_s", "ts+ocdbt", BASELINE), "<", 1.0),),
    ),
    Claim(
        "t5x_no_better",
        "T5X's combination is no better than chunks alone",
        "t5x saved no faster than ts+chunks",
        (Criterion(Ratio("save_s", "t5x", "ts+chunks"), ">=", 0.9),),
    ),
    Claim(
        "chunks_fastest",
        "ts+chunks is the fastest TensorStore save",
        "the lowest save time of the TensorStore approaches",
        _faster_than_each("ts+chunks", TENSORSTORE_EIGHT),
    ),
    Claim(
        "tensors",
        f"every approach saved {EXPECTED_TENSORS} tensors",
        f"{EXPECTED_TENSORS} tensors in every checkpoint",
        # ``tensors`` is the model's count; only a verified load shows the checkpoint gave back each of them.
        (Each("tensors", EXPECTED_TENSORS), Each("verified", True)),
        model_tensors=EXPECTED_TENSORS,
    ),
    Claim("verified", "every approach verified", "every load bit-exact", (Each("verified", True),)),
    Claim(
        "ocdbt_cloud",
        "OCDBT is better for cloud storage",
        f"recommended ts+ocdbt for object stores: an order of magnitude fewer objects and PUTs than {BASELINE}, "
        "and faster there",
        (
            Criterion(Ratio("objects", "ts+ocdbt", BASELINE), "<=", 0.1),
            Criterion(Ratio("requests_put", "ts+ocdbt", BASELINE), "<=", 0.1),
            Criterion(Ratio("save_s", "ts+ocdbt", BASELINE), "<", 1.0),
            Criterion(Ratio("load_cold_s", "ts+ocdbt", BASELINE), "<", 1.0),
        ),
        store="s3",
    ),
)


@dataclass(frozen=True)
class Target:
    """A figure ckptbench's own implementation must reach; ``targets`` computes the value under ``key``."""

    key: str
    label: str
    op: Op
    limit: float

    def met(self, value: float) -> bool:
        return OPS[self.op](value, self.limit)


TARGETS: tuple[Target, ...] = (
    Target("best_save_vs_torch", f"{BEST} save / pytorch save", "<=", 1.0),
    Target("best_load_vs_safetensors", f"{BEST} cold load / safetensors cold load", "<=", 1.0),
    Target("best_write_share", f"{BEST} bytes written / s as a share of the disk's durable-write ceiling", ">=", 0.8),
    Target("best_read_share", f"{BEST} bytes read / s as a share of the disk's cold-read ceiling", ">=", 0.8),
    Target("best_save_vs_orbax", f"{BEST} save / {ORBAX} save", "<=", 1.0),
    Target("best_load_vs_orbax", f"{BEST} cold load / {ORBAX} cold load", "<=", 1.0),
    Target("best_save_vs_one_file", f"{BEST} save / the faster one-file save ({', '.join(ONE_FILE)})", "<=", 1.0),
    Target(
        "best_load_vs_one_file", f"{BEST} cold load / the faster one-file cold load ({', '.join(ONE_FILE)})", "<=", 1.0
    ),
    Target(
        "best_load_vs_fast_loaders",
        f"{BEST} cold load / the fastest fast loader's cold load ({', '.join(FAST_LOADERS)})",
        "<=",
        1.0,
    ),
    Target("async_blocking", "the best async strategy's blocking save / pytorch save", "<=", 0.1),
    Target(
        "existing_read_share",
        "the best cold load into existing tensors: bytes read / s as a share of the disk's cold-read ceiling",
        ">=",
        0.8,
    ),
    Target(
        "fresh_read_share",
        "the best cold load into fresh memory: bytes read / s as a share of the disk's cold-read ceiling",
        ">=",
        0.6,
    ),
    Target("peak_memory", f"{BEST}, {BEST_ASYNC}: peak memory above the model and one copy of it, GB", "<=", 1.0),
    Target("harness_cost", "harness cost inside a timed region / shortest timed region", "<=", 0.05),
    Target("overhead", "wall time outside timed regions (strategies' and disk probes') / run wall time", "<=", 0.15),
)
TARGETS_BY_KEY: dict[str, Target] = {t.key: t for t in TARGETS}
