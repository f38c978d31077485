"""The bench: the best TensorStore configuration against its peers and the disk, and the targets it must meet.

Every figure is a ratio of medians measured in the same run, keyed, next to its target
(``study.TARGETS``), so a miss is reported as measured rather than hidden by moving the goalposts.
Figures without a target are context: they explain a miss.
"""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from .benchmark import Benchmark, PhaseResult
from .betweenrun import RATIO, SHARE, widen
from .floor import bounds, floors
from .formatting import sig
from .limits import Limits, ProbeSettings
from .measure import measure
from .results import TIMES, succeeded, summarize
from .rounds import Interval, of_values
from .strategies import Strategy
from .study import ASYNC, BEST, BEST_ASYNC, FAST_LOADERS, ONE_FILE, ORBAX, TARGETS_BY_KEY
from .verdict import drift

COLUMNS = ["key", "label", "value", "low", "high", "target", "met", "verdict"]
FAMILIES = {
    "best_write_share": SHARE,
    "best_read_share": SHARE,
    "fresh_read_share": SHARE,
    "existing_read_share": SHARE,
    "peak_memory": None,
}
"""The between-run family (``betweenrun``) of each judged figure: shares of the run's own disk ceiling; memory
(GB above the model, no timing) keeps its rounds' interval; every other is a ratio of timings."""
MET, MISSED, INCONCLUSIVE = "MET", "MISSED", "INCONCLUSIVE"
TARGETS_FILE = "targets.csv"


def harness_cost(tensors: int, repeats: int = 5) -> float:
    """Seconds the harness adds inside one timed region: timer, memory sampler, one progress update per tensor.

    Only the region ``measure`` times counts: its set-up (collecting garbage, resetting the high-water mark) runs
    before the clock starts, as it does before every save and load.
    """
    costs = []
    for _ in range(repeats):
        with tqdm(total=tensors, file=io.StringIO()) as bar, measure() as timed:
            for _ in range(tensors):
                bar.update(1)
        costs.append(timed.seconds)
    return statistics.median(costs)


def _row(key: str, value: float, label: str | None = None, span: Interval | None = None) -> dict:
    """A target's row when ``key`` names one, else a context row (no target, ``met`` empty).

    ``met`` judges the value alone; ``verdict`` judges its interval across rounds when there is one
    (MET or MISSED only when all of it lies on one side, else INCONCLUSIVE), else the value.
    """
    target = TARGETS_BY_KEY.get(key)
    verdict = None
    if target is not None:
        sides = {target.met(span.low), target.met(span.high)} if span is not None else {target.met(value)}
        verdict = INCONCLUSIVE if len(sides) == 2 else MET if sides == {True} else MISSED
    return {
        "key": key,
        "label": target.label if target else label,
        "value": value if span is None else span.value,
        "low": None if span is None else span.low,
        "high": None if span is None else span.high,
        "target": f"{target.op} {target.limit:g}" if target else "",
        "met": None if target is None else bool(target.met(value if span is None else span.value)),
        "verdict": verdict,
    }


def _figures(done: pd.DataFrame) -> dict[str, float]:
    """The targets judged from the rows alone (ratios, shares of the disk, stalls, memory), from ``done``'s medians.

    Called on a whole run, and on each round's rows, whose spread gives the targets their intervals.
    """
    summary = summarize(done)
    figures = {}
    for key, metric, peers in (
        ("best_save_vs_torch", "save_s", ("pytorch",)),
        ("best_load_vs_safetensors", "load_cold_s", ("safetensors",)),
        ("best_save_vs_orbax", "save_s", (ORBAX,)),
        ("best_load_vs_orbax", "load_cold_s", (ORBAX,)),
        ("best_save_vs_one_file", "save_s", ONE_FILE),
        ("best_load_vs_one_file", "load_cold_s", ONE_FILE),
        ("best_load_vs_fast_loaders", "load_cold_s", FAST_LOADERS),
    ):
        if {BEST, *peers} <= set(summary.index):
            fastest = summary.loc[list(peers), f"{metric}_median"].min()
            figures[key] = summary.loc[BEST, f"{metric}_median"] / fastest
    if BEST in summary.index:
        best = summary.loc[BEST]
        figures["best_write_share"] = best["bytes"] / best["save_s_median"] / 1e9 / done["disk_write_gbps"].median()
        figures["best_read_share"] = best["bytes"] / best["load_cold_s_median"] / 1e9 / done["disk_read_gbps"].median()
    async_names = [n for n in ASYNC if n in summary.index]
    if async_names and "pytorch" in summary.index:
        stall = summary.loc[async_names, "save_blocking_s_median"].min()
        figures["async_blocking"] = stall / summary.loc["pytorch", "save_s_median"]
    for into in INTO:
        reader = best_reader(done, summary, into)
        if reader is not None:
            share = summary.loc[reader, "bytes"] / summary.loc[reader, "load_cold_s_median"] / 1e9
            figures[f"{into}_read_share"] = share / done["disk_read_gbps"].median()
    own = [n for n in (BEST, BEST_ASYNC) if n in summary.index]
    if own:
        peaks = summary.loc[own, ["peak_rss_save", "peak_rss_load"]].max(axis=1)
        figures["peak_memory"] = (peaks.max() - done["model_bytes"].max()) / 1e9
    return {k: float(v) for k, v in figures.items() if pd.notna(v)}


INTO = ("fresh", "existing")
"""Where a load lands, as the rows' ``load_into`` names it: each kind has its own read-share target."""


def best_reader(done: pd.DataFrame, summary: pd.DataFrame, into: str) -> str | None:
    """The strategy whose cold loads into ``into`` tensors read the most bytes per second; None if none did."""
    names = summary.index[summary.index.isin(done.loc[done["load_into"].fillna("fresh") == into, "strategy"])]
    if not len(names):
        return None
    return str((summary.loc[names, "bytes"] / summary.loc[names, "load_cold_s_median"]).idxmax())


def judged(results: pd.DataFrame, run_drift: float | None = None, between: bool = True) -> pd.DataFrame:
    """The targets a run's rows judge, each with its interval and its verdict.

    A figure is computed inside each round (a round's every strategy measured once, close in time), and
    its interval across rounds widened by its family's between-run spread (with ``between``), since what
    moves a second run (the host, the disk) holds still within one; the value is its median over rounds.
    """
    done = succeeded(results)
    rounds = [_figures(rows) for _, rows in done.groupby("repeat", sort=True)]
    rows = []
    for key, value in _figures(done).items():
        span = of_values([figures[key] for figures in rounds if key in figures], run_drift)
        family = FAMILIES.get(key, RATIO)
        rows.append(_row(key, value, span=widen(span, results, family) if between and family else span))
    return pd.DataFrame(rows, columns=COLUMNS)


OPERATION: dict[str, str] = {
    "best_save_vs_torch": "save",
    "best_save_vs_orbax": "save",
    "best_save_vs_one_file": "save",
    "best_write_share": "save",
    "best_load_vs_safetensors": "load",
    "best_load_vs_orbax": "load",
    "best_load_vs_one_file": "load",
    "best_load_vs_fast_loaders": "load",
    "best_read_share": "load",
    "fresh_read_share": "load",
    "existing_read_share": "load",
}
"""The operation each target judges, whose measured bound explains a miss."""


def explained(results: pd.DataFrame, cores: int, keys: Iterable[str]) -> pd.DataFrame:
    """Each target of ``keys`` as one run's rows judge it, with its interval; for one not MET, the measured bound
    of the operation it judges (``BEST``'s, or the best reader's for a read share), so a miss is never bare."""
    done = succeeded(results)
    summary = summarize(done)
    verdicts = judged(results, drift(results)).set_index("key")
    limiting = {(b.strategy, b.op): b for b in bounds(done, cores)}
    rows = []
    for key in keys:
        target = TARGETS_BY_KEY[key]
        label = f"{target.label} {target.op} {target.limit:g}"
        if key not in verdicts.index:
            rows.append({"target": label, "measured": "not measured in this run", "verdict": "", "bound": ""})
            continue
        found = verdicts.loc[key]
        span = Interval(found["value"], found["low"], found["high"], "") if pd.notna(found["low"]) else None
        into = key.removesuffix("_read_share")
        who = best_reader(done, summary, into) if into in INTO else BEST
        bound = limiting.get((who, OPERATION.get(key, "")))
        rows.append(
            {
                "target": label,
                "measured": f"{span if span else sig(found['value'])}" + (f" ({who})" if into in INTO else ""),
                "verdict": found["verdict"],
                "bound": "" if found["verdict"] == MET or bound is None else str(bound),
            }
        )
    return pd.DataFrame(rows, columns=["target", "measured", "verdict", "bound"])


def evaluate(
    results: pd.DataFrame,
    *,
    wall_s: float,
    cores: int,
    prepare_s: float = 0.0,
    probe_s: float = 0.0,
    start: Limits | None = None,
    end: Limits | None = None,
) -> pd.DataFrame:
    """Targets and context figures from one run's rows.

    ``wall_s`` is the run's wall time, of which ``prepare_s`` was set-up and ``probe_s`` the disk probes'
    own timed I/O (counted as measurement); ``end``, the disk probed after the strategies, shows whether
    the disk the shares divide by held still. ``cores`` is the run's, not this machine's. Shares divide by
    the disk's ceilings (its best multi-stream rates); every save or cold load short of the share its
    target asks for gets a row naming the resource that bound it, with the numbers behind it.
    """
    done = succeeded(results)
    summary = summarize(done)
    judged_rows = judged(results, drift(results))
    rows = []
    if start is not None and end is not None:
        rows.append(
            _row("disk_steady_write", end.write_gbps / start.write_gbps, "disk's durable-write ceiling after / before")
        )
        rows.append(
            _row("disk_steady_read", end.read_gbps / start.read_gbps, "disk's cold-read ceiling after / before")
        )
    rows += judged_rows.to_dict("records")
    write_gbps, read_gbps = done["disk_write_gbps"].median(), done["disk_read_gbps"].median()
    busy = (done["cpu_load_cold_s"] / done["load_cold_s"] / cores).groupby(done["strategy"]).median()
    floor = floors(done)
    limiting = {(b.strategy, b.op): b for b in bounds(done, cores)}
    rows += _async_rows(summary, done["model_bytes"].max())
    rows += _memory_rows(summary, done["model_bytes"].max())
    best = best_reader(done, summary, "existing")
    if best is not None:
        rows.append(
            _row(
                f"existing_best:{best}", busy[best], f"  reached by {best}: CPU time in its cold load / (wall x cores)"
            )
        )
    for name, s in summary.iterrows():
        write = s["bytes"] / s["save_s_median"] / 1e9 / write_gbps
        read = s["bytes"] / s["load_cold_s_median"] / 1e9 / read_gbps
        rows += [
            _row(f"write_share:{name}", write, f"{name}: bytes written / s, share of the disk's durable-write ceiling"),
            _row(f"read_share:{name}", read, f"{name}: bytes read / s cold, share of the disk's cold-read ceiling"),
            # A warm load does all of a load's work but the disk's: its rate caps what a cold load could reach.
            _row(
                f"warm_share:{name}",
                s["bytes"] / s["load_warm_s_median"] / 1e9 / read_gbps,
                f"{name}: bytes read / s warm (no disk: the load's own work), share of the disk's cold-read ceiling",
            ),
            _row(f"cpu_busy:{name}", busy[name], f"{name}: CPU time in the cold load / (wall time x {cores} cores)"),
            _row(
                f"save_floor:{name}",
                floor.loc[name, "save_floor_s"] / s["save_s_median"],
                f"{name}: modelled save floor (bytes at the write ceiling + files at the creation rate) / save",
            ),
            _row(
                f"load_floor:{name}",
                floor.loc[name, "load_floor_s"] / s["load_cold_s_median"],
                f"{name}: modelled cold-load floor (bytes at the read ceiling + copy into fresh memory) / cold load",
            ),
        ]
        for op, share, target in (("save", write, "best_write_share"), ("load", read, "best_read_share")):
            if not TARGETS_BY_KEY[target].met(share):
                bound = limiting[(name, op)]
                rows.append(_row(f"{op}_bound:{name}", bound.largest.share, str(bound)))
    if not summary.empty:
        shortest = summary[[f"{t}_median" for t in TIMES]].to_numpy().min()
        rows.append(_row("harness_cost", harness_cost(int(done["tensors"].max())) / shortest))
    timed = done[list(TIMES)].to_numpy().sum()
    overhead = 1 - (timed + probe_s) / wall_s
    rows += [
        _row("overhead", overhead),
        _row(
            "overhead_setup",
            (prepare_s - (start.probe_s if start else 0.0)) / wall_s,
            "  of which set-up (model build, digests, cleanup)",
        ),
        _row(
            "overhead_repeats",
            results["overhead_s"].sum() / wall_s,
            "  of which per repeat (eviction, verification, deletion, warm-up)",
        ),
        *(
            [_row("overhead_rounds", _rounds_cost(results) / wall_s, "  of which a fresh process per round")]
            if results["worker_s"].notna().any()
            else []
        ),
        _row(
            "overhead_with_probes",
            overhead + probe_s / wall_s,
            "  the same, counting the disk probes' I/O as overhead too",
        ),
    ]
    return pd.DataFrame(rows, columns=COLUMNS)


def _rounds_cost(results: pd.DataFrame) -> float:
    """Seconds a run with a fresh process per round pays beyond one in one process: starting the workers,
    and the warm-ups after each strategy's first (one process warms each strategy up once)."""
    later = results["repeat"] > results.groupby("strategy")["repeat"].transform("min")
    return float(results["worker_s"].sum() + results.loc[later, "warmup_s"].sum())


def _async_rows(summary: pd.DataFrame, model_bytes: float) -> list[dict]:
    """How long the async saves stall training against ``torch.save``, and the copy rate that stall is."""
    names = [n for n in ASYNC if n in summary.index]
    if not names or "pytorch" not in summary.index:
        return []
    blocking = summary.loc[names, "save_blocking_s_median"]
    torch_save = summary.loc["pytorch", "save_s_median"]
    rows = []
    for name in names:
        rows += [
            _row(f"blocking_share:{name}", blocking[name] / torch_save, f"{name}: blocking save / pytorch save"),
            # Each of them copies the tensors before returning: the stall is that copy's speed.
            _row(f"copy_gbps:{name}", model_bytes / blocking[name] / 1e9, f"{name}: GB of the model per blocking s"),
        ]
    return rows


def _memory_rows(summary: pd.DataFrame, model_bytes: float) -> list[dict]:
    """Peak memory beyond the model and one copy of it (a loaded model, or an async save's snapshot), in GB."""
    above = (summary[["peak_rss_save", "peak_rss_load"]].max(axis=1) - model_bytes) / 1e9
    return [
        _row(f"memory_above_copy:{name}", value, f"{name}: peak memory above the model and one copy, GB")
        for name, value in above.items()
    ]


@dataclass
class BenchReport:
    phases: list[PhaseResult]
    results: pd.DataFrame
    targets: pd.DataFrame
    end: Limits
    wall_s: float


def record(table: pd.DataFrame, run_id: str, path: Path) -> None:
    """This run's targets after the other runs' already in ``path``, as the results file keeps its rows: a second
    ``bench`` into the same folder (an A/A pair) keeps the first run's targets."""
    table = table.assign(run_id=run_id)
    if path.exists():
        kept = pd.read_csv(path)
        if "run_id" in kept:
            kept = kept[kept["run_id"].astype(str) != run_id]
        table = pd.concat([kept, table], ignore_index=True)
    table.to_csv(path, index=False)


def bench(benchmark: Benchmark, strategies: Iterable[str | Strategy]) -> BenchReport:
    """Measure ``strategies``, probe the disk again, and evaluate the targets; records the end probe and wall time."""
    started = time.perf_counter() - benchmark.prepare_s
    phases = benchmark.run(strategies)
    # under a disk profile the run is inside its throttle group: probed with the raw disk's settings, the end
    # probe would store throttled ceilings as the raw disk's, and the next run would refuse the caps as too high
    caps = benchmark.config.profile.caps
    end = benchmark.storage.limits(ProbeSettings.for_checkpoint(benchmark.checkpoint.nbytes).under(caps), reprobe=True)
    wall = time.perf_counter() - started
    environment = benchmark.environment()
    table = evaluate(
        benchmark.results,
        wall_s=wall,
        cores=environment["cores"],
        prepare_s=benchmark.prepare_s,
        probe_s=benchmark.probe_s + end.probe_s,
        start=benchmark.limits,
        end=end,
    )
    benchmark.results_file.write_environment(
        benchmark.run_id, {**environment, "limits_end": asdict(end), "wall_s": wall}
    )
    record(table, benchmark.run_id, benchmark.out / TARGETS_FILE)
    return BenchReport(phases, benchmark.results, table, end, wall)
