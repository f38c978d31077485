"""The harness: what to measure and when; a ``Cycle`` measures each repeat.

A run's settings are a frozen ``RunConfig``; a ``Benchmark`` holds what one session has measured.
It prepares the run (the model, the results file, the disk's limits), orders the repeats in
rounds, warms each strategy up and probes the disk's drift before every repeat, and keeps a
failure as a recorded row while the run goes on. With ``fresh_process`` each round runs in a
new worker process (``worker``) that maps the model from shared memory and measures with this
same harness, its records coming back to be rows here. The cycle it is given (one process by default,
or one rank of many: ``ranked``) saves, evicts, loads, verifies and returns the ``Measured``
record that ``results.row`` turns into a row. Every phase returns a ``PhaseResult``.
"""

from __future__ import annotations

import os
import random
import resource
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from . import disk, environment, manifest, measure, profiles, throttle, training
from . import model as model_lib
from .config import Order, RunConfig
from .cycle import Cycle, LocalCycle
from .errors import VerificationError
from .limits import Limits, ProbeSettings, missed_caps
from .results import Measured, ResultsFile, Row, config_json, frame, row, summarize
from .storage import open_storage
from .strategies import Strategy, Tensors, get_strategy, nbytes
from .study import ordered
from .worker import Worker, WorkerError, one_line

WARMUP_BYTES = 64 << 20
_DRIFT_MIN, _DRIFT_MAX = 32 << 20, 256 << 20
BUSY = 0.25
"""Cores of other work before a run above which it is warned of: a quiet machine idles well under it."""


def new_run_id() -> str:
    """A run's name: when it started, and a token that tells two runs of the same second apart."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def warmup_subset(tensors: Tensors) -> OrderedDict[str, torch.Tensor]:
    """A few tensors (<= WARMUP_BYTES) that exercise a strategy's code paths without a full save."""
    subset, total = OrderedDict(), 0
    for name, tensor in tensors.items():
        size = nbytes(tensor)
        if total + size <= WARMUP_BYTES:
            subset[name], total = tensor, total + size
    return subset


@dataclass
class PhaseResult:
    """One strategy's rows from one phase; ``error`` says why it stopped early, if it did."""

    strategy: str
    rows: list[Row]
    error: str | None = None
    skipped: str | None = None
    """Why the strategy was not measured at all: it cannot write to the run's store."""

    @property
    def ok(self) -> bool:
        if self.skipped is not None:
            return True
        return self.error is None and bool(self.rows) and all(r.verified for r in self.rows)

    @property
    def frame(self) -> pd.DataFrame:
        return frame(self.rows)


class Benchmark:
    """One benchmark session: a model, an output folder, and the rows measured so far.

    Phases can run in any order and be re-run; a re-run replaces that strategy's rows in
    ``results`` (this session's view) and appends to the results file (the history).
    """

    def __init__(
        self,
        config: RunConfig | None = None,
        *,
        cycle: Cycle | None = None,
        checkpoint: model_lib.ModelCheckpoint | training.TrainingCheckpoint | None = None,
        layout: manifest.Layout | None = None,
        limits: Limits | None = None,
        log: Callable[[str], None] = tqdm.write,
        run_id: str | None = None,
    ) -> None:
        self.config = config or RunConfig()
        self.checkpoint = checkpoint
        self.limits = limits
        self.log = log
        self.run_id = run_id or new_run_id()
        self.results_file = ResultsFile(self.config.out, self.config.results_file)
        config = self.config
        self.cycle = cycle or LocalCycle(
            open_storage(config.store, config.out, config.s3_endpoint, config.s3_rtt_ms),
            config.load_into,
            config.progress,
            log,
            self._resumes,
        )
        self.storage = self.cycle.storage
        """Where the checkpoints go (``config.store``); ``results_file`` is where the rows go."""
        self.prepare_s = 0.0
        """Set-up so far: building or loading the model, cleaning leftovers, probing the limits."""
        self.probe_s = 0.0
        """Seconds inside the disk probes' own timed I/O (start probe and drift probes): measurement, not overhead."""
        self.other_work = float("nan")
        """Cores other processes kept busy just before the run (``measure.other_work``)."""
        self._rows: dict[str, list[Row]] = {}
        self._warm: set[str] = set()
        self._layout = layout
        self._fresh = self.config.fresh_process and cycle is None
        """Each round in a fresh worker process (only for the local cycle this harness builds itself)."""

    @property
    def out(self) -> Path:
        return self.config.out

    @property
    def preset(self) -> str:
        return self.config.label

    def prepare(self) -> model_lib.ModelCheckpoint | training.TrainingCheckpoint:
        """Check the output folder, build or load the model, make the results safe, clean leftovers, probe the disk.

        With ranks only the lead does; the others wait for it."""
        if self.cycle.lead:
            self._prepare()
        self.cycle.barrier()
        return self.checkpoint

    def _prepare(self) -> None:
        started = time.perf_counter()
        disk.check_folder(self.out)
        self.storage.check()
        if not self.config.profile.caps.empty:
            throttle.check(self.out)
        if self.checkpoint is None:
            if self.config.payload == "training":
                self.checkpoint = training.build(self.config.preset, self.config.seed)
            elif self.config.model_path is None:
                self.checkpoint = model_lib.build(self.config.preset, self.config.seed)
            else:
                self.checkpoint = model_lib.load_local(self.config.model_path)
        if self._layout is None:
            tensors = self.checkpoint.tensors
            self._layout = manifest.layout(tensors, manifest.digests(tensors))
        if self._fresh:  # once, so each round's worker maps the model instead of copying it
            for tensor in self.checkpoint.tensors.values():
                tensor.share_memory_()
        self.out.mkdir(parents=True, exist_ok=True)
        self.results_file.check()  # a file set aside is named in its warning
        for stale in [*self.storage.clean_stale(), *throttle.clean_stale()]:
            self.log(f"removed the leftovers of an interrupted run: {stale}")
        self.other_work = measure.other_work()
        if self.other_work > BUSY:
            self.log(
                f"warning: other work kept {self.other_work:.2g} cores busy before the run; its timings will move"
                " between runs (each row's others_cpu_* says how much during its timed regions)"
            )
        if self.limits is None:
            self.limits = self._probe(ProbeSettings.for_checkpoint(self.checkpoint.nbytes))
        else:
            throttle.enter(self.out, self.config.profile.caps)
        self.prepare_s += time.perf_counter() - started
        if not self.results_file.environment_path(self.run_id).exists():
            self.results_file.write_environment(self.run_id, self.environment())

    def _probe(self, settings: ProbeSettings) -> Limits:
        """The store's ceilings, under the run's disk profile when it has one (joining its throttle group).

        Caps above the raw disk's ceilings would emulate nothing and are refused; ceilings that miss
        their caps by more than ``limits.MISS`` are reported (a warning line, and in ``throttle['missed']``).
        """
        profile = self.config.profile
        raw = None
        if not profile.caps.empty and not throttle.inherited():
            throttle.leave()
            raw = self.storage.limits(settings, reprobe=False)
            self.probe_s += raw.probe_s
            throttle.refuse_above(profile.caps, raw.read_gbps, raw.write_gbps)
        group = throttle.enter(self.out, profile.caps)
        limits = self.storage.limits(settings.under(profile.caps), reprobe=self.config.reprobe)
        self.probe_s += limits.probe_s
        if profile.caps.empty:
            return limits
        missed = missed_caps(limits, profile.caps)
        for miss in missed:
            self.log(f"warning: disk profile {profile.name} not held: {miss}")
        record = {
            "profile": profile.name,
            "volume": profile.volume,
            "source": profile.source,
            **(group.describe() if group is not None else {"caps": profile.caps.spec()}),
            "raw_write_gbps": None if raw is None else raw.write_gbps,
            "raw_read_gbps": None if raw is None else raw.read_gbps,
            "missed": missed,
        }
        return replace(limits, throttle=record)

    def _resumes(self, strategy: Strategy, loaded: Tensors) -> None:
        """A training state must also resume: one more step from ``loaded`` (changed in place) equals the job's."""
        whole = len(loaded) == len(self.checkpoint.tensors)  # a warm-up's few tensors are no state to resume
        if whole and isinstance(self.checkpoint, training.TrainingCheckpoint):
            found = training.resume_problem(self.checkpoint, loaded)
            if found is not None:
                raise VerificationError(f"{strategy.name} checkpoint does not resume: {found}")

    def environment(self) -> dict:
        checkpoint = self.checkpoint
        return {
            "run_id": self.run_id,
            "preset": self.preset,
            "model": None if checkpoint is None else checkpoint.source,
            "tensors": None if checkpoint is None else len(checkpoint.tensors),
            "params": None if checkpoint is None else checkpoint.params,
            "model_bytes": None if checkpoint is None else checkpoint.nbytes,
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.config).items()},
            "repeats": self.config.repeats,
            "order": self.config.order,
            "limits": None if self.limits is None else asdict(self.limits),
            "prepare_s": self.prepare_s,
            "probe_s": self.probe_s,
            "other_work_cores": self.other_work,
            **environment.collect(self.out),
            **self.cycle.environment(),
        }

    def _warm_up(self, strategy: Strategy) -> None:
        """A cycle over a few tensors, unrecorded, so library start-up is not billed to the first repeat."""
        if not self.config.warmup or strategy.name in self._warm:
            return
        subset = warmup_subset(self.checkpoint.tensors)
        layout = tuple(e for e in self._layout if e.name in subset)
        name = f"{strategy.name}.warmup"
        self.cycle.measure(strategy, self.checkpoint.tensors, layout, name, f"{strategy.name} warm-up", keep=False)
        self._warm.add(strategy.name)

    def _drift(self) -> dict[str, float | None]:
        """A short probe of the disk before a repeat (by the lead), so its row says how fast the disk was then."""
        if not self.config.drift or not self.cycle.lead:
            return {}
        size = min(max(self.checkpoint.nbytes // 16, _DRIFT_MIN), _DRIFT_MAX)
        probe = self.storage.stream(size)
        self.probe_s += probe.seconds
        return {"drift_write_gbps": probe.write_gbps, "drift_read_gbps": probe.read_gbps}

    def _identity(self, strategy: Strategy, repeat: int) -> dict[str, Any]:
        """What a row is of: the run, the strategy and its repeat, the model, the disk, where and how it loads."""
        checkpoint = self.checkpoint
        return {
            "run_id": self.run_id,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "preset": self.preset,
            "strategy": strategy.name,
            "config": config_json(strategy.config()),
            "repeat": repeat,
            "tensors": len(checkpoint.tensors),
            "params": checkpoint.params,
            "model_bytes": checkpoint.nbytes,
            "disk_write_gbps": self.limits.write_gbps,
            "disk_read_gbps": self.limits.read_gbps,
            "disk_files_per_s": self.limits.files_per_s,
            "fresh_copy_gbps": self.limits.fresh_copy_gbps,
            "disk_read_iops": self.limits.read_iops,
            "disk_profile": self.limits.throttle.get("profile", profiles.NONE),
            "disk_caps": self.limits.throttle.get("caps", ""),
            "store": self.storage.url,
            "injected_rtt_ms": self.storage.injected_rtt_ms,
            "load_into": self.config.load_into,
            "payload": self.config.payload,
            **self.cycle.identity(),
        }

    def _repeat(self, strategy: Strategy, repeat: int) -> Measured | None:
        """One warm-up (the first time), drift probe and cycle; the record, with the time around the cycle's
        timed regions (``warmup_s``, ``overhead_s``) added. None on a process that does not speak for the run."""
        started = time.perf_counter()
        self._warm_up(strategy)
        warmup_s = time.perf_counter() - started
        drift = self._drift()
        probe_s = self.probe_s
        label = f"{strategy.name} [{repeat + 1}/{self.config.repeats}]"
        keep = self.config.keep_checkpoints and repeat == self.config.repeats - 1
        measured = self.cycle.measure(strategy, self.checkpoint.tensors, self._layout, strategy.name, label, keep)
        if measured is None:
            return None
        timed = sum(max(t.seconds for t in region) for region in (measured.save, measured.cold, measured.warm))
        overhead_s = time.perf_counter() - started - timed - (self.probe_s - probe_s)
        untimed = {**measured.untimed, "warmup_s": warmup_s, "overhead_s": overhead_s}
        return replace(measured, untimed=untimed, **drift)

    def _in_worker(self, worker: Worker, strategy: Strategy, repeat: int) -> Measured:
        """One repeat measured by the round's worker; starting it (if this repeat did) billed as ``worker_s``."""
        measured, probe_s = worker.measure((strategy, repeat), f"{strategy.name} [{repeat + 1}/{self.config.repeats}]")
        self.probe_s += probe_s
        started_s = worker.take_started()
        untimed = {**measured.untimed, "worker_s": started_s, "overhead_s": measured.untimed["overhead_s"] + started_s}
        return replace(measured, untimed=untimed)

    def _measure(self, strategy: Strategy, repeat: int, worker: Worker | None = None) -> Row:
        """One repeat as a row (here, or by ``worker``), a failure included: the reason is kept and the run goes
        on (unless the cycle's processes cannot go on without this one: then it raises, and the pending row
        records the failure)."""
        lead = self.cycle.lead
        identity = self._identity(strategy, repeat) if lead else {}
        if lead:
            self.cycle.pending(row(identity))
        try:
            measured = self._repeat(strategy, repeat) if worker is None else self._in_worker(worker, strategy, repeat)
        except Exception as err:  # kept as a result, as a benchmark should: the run goes on to the next
            if not self.cycle.failures_are_rows:
                raise
            message = str(err) if isinstance(err, WorkerError) else one_line(err)
            result = row(identity, error=message)
            self.log(f"FAILED {strategy.name} [{repeat + 1}/{self.config.repeats}]: {message}")
        else:
            result = self.cycle.share(row(identity, measured) if lead else None)
            if lead:
                self.log(_described(result, measured, f"{strategy.name} [{repeat + 1}/{self.config.repeats}]"))
        if lead:
            self.cycle.settled()
            self.results_file.append([result])
        return result

    def _skipped(self, strategy: Strategy) -> str | None:
        reason = strategy.unsupported(self.storage.kind)
        if reason is not None:
            self.log(f"skipped {strategy.name}: cannot write to {self.storage.url}: {reason}")
        return reason

    def _resolve(self, strategy: str | Strategy) -> Strategy:
        return get_strategy(strategy) if isinstance(strategy, str) else strategy

    def run_phase(self, strategy: str | Strategy) -> PhaseResult:
        """Every repeat of one strategy in a row (a notebook phase cell); replaces its rows in this session.

        ``strategy`` is a registry name or any ``Strategy`` (a sweep's ad-hoc configurations).
        """
        return self.run([strategy], order="sequential")[0]

    def run(self, strategies: Iterable[str | Strategy], order: Order | None = None) -> list[PhaseResult]:
        """Measure the strategies ``repeats`` times each in ``order`` (the config's by default).

        Interleaved rounds spread a slow stretch of the machine over every strategy instead of
        letting it land on one. A strategy that fails stops taking part; the others go on.
        """
        requested = [self._resolve(s) for s in strategies]
        order = order or self.config.order
        self.prepare()
        skipped = {s.name: reason for s in requested if (reason := self._skipped(s)) is not None}
        resolved = [s for s in requested if s.name not in skipped]
        for strategy in resolved:
            self._rows[strategy.name] = []
        failed: dict[str, str] = {}
        rounds = (
            [[(s, r) for r in range(self.config.repeats)] for s in resolved]
            if order == "sequential"
            else [self._round(resolved, r, order) for r in range(self.config.repeats)]
        )
        for batch in rounds:
            with self._round_worker() as worker:
                for strategy, repeat in batch:
                    if strategy.name in failed:
                        continue
                    row = self._measure(strategy, repeat, worker)
                    self._rows[strategy.name].append(row)
                    if row.error:
                        failed[strategy.name] = row.error
        results = []
        for strategy in requested:
            if strategy.name in skipped:
                results.append(PhaseResult(strategy.name, [], skipped=skipped[strategy.name]))
                continue
            rows = self._rows[strategy.name]
            error = failed.get(strategy.name)
            if error is None and not all(r.verified for r in rows):
                recorded = self.results_file.csv
                error = f"{strategy.name}: a load did not match what was saved (rows recorded in {recorded})"
            results.append(PhaseResult(strategy.name, rows, error))
        return results

    def _round_worker(self) -> AbstractContextManager[Worker | None]:
        """A fresh worker process for one round (started at its first repeat), or None to measure here."""
        if not self._fresh:
            return nullcontext()
        return Worker(_round_session, self.config, self.run_id, self.checkpoint, self._layout, self.limits, os.getpid())

    def _round(self, strategies: list[Strategy], repeat: int, order: Order) -> list[tuple[Strategy, int]]:
        batch = list(strategies)
        if order == "shuffled":
            random.Random(f"{self.config.seed}-{repeat}").shuffle(batch)
        return [(s, repeat) for s in batch]

    @property
    def results(self) -> pd.DataFrame:
        """This session's rows, one phase's latest measurements per strategy, in the study's order."""
        return frame(row for name in ordered(self._rows) for row in self._rows[name])

    def summary(self) -> pd.DataFrame:
        return summarize(self.results, order=ordered(self._rows))


def _round_session(
    config: RunConfig,
    run_id: str,
    checkpoint: model_lib.ModelCheckpoint | training.TrainingCheckpoint,
    layout: manifest.Layout,
    limits: Limits,
    parent: int,
) -> Callable[[tuple[Strategy, int]], tuple[Measured, float]]:
    """In a round's worker: this run's harness around the shared model, which measures one repeat per call and
    returns its record and the drift probe's seconds. It joins the I/O throttle group of ``parent`` (the run's
    process), and maps the model's pages before anything is timed."""
    throttle.follow(parent)
    for tensor in checkpoint.tensors.values():
        storage = tensor.untyped_storage()
        if storage.nbytes():
            torch.empty(0, dtype=torch.uint8).set_(storage)[:: resource.getpagesize()].sum()
    here = replace(config, fresh_process=False)
    bench = Benchmark(here, checkpoint=checkpoint, layout=layout, limits=limits, run_id=run_id)

    def repeat(item: tuple[Strategy, int]) -> tuple[Measured, float]:
        probe_s = bench.probe_s
        measured = bench._repeat(*item)
        assert measured is not None  # a local cycle speaks for its run
        return measured, bench.probe_s - probe_s

    return repeat


def _described(result: Row, measured: Measured, label: str) -> str:
    """A repeat's log line: its times (each rank's range, with ranks), size and whether it verified."""

    def spread(key: str) -> str:
        if measured.rank_times is None:
            return ""
        times = measured.rank_times[key]
        return f" (ranks {min(times):.2f}-{max(times):.2f})"

    plan = "" if measured.rank_times is None else f" {len(measured.save)}->{len(measured.cold)} ranks"
    blocking = f" (blocking {result.save_blocking_s:.2f} s)" if result.save_blocking_s < result.save_s else ""
    return (
        f"{label}{plan}: save {result.save_s:.2f} s{blocking}{spread('save_s')}, "
        f"cold load {result.load_cold_s:.2f} s{spread('load_cold_s')}, warm load {result.load_warm_s:.2f} s, "
        f"{result.bytes / 1e9:.3f} GB in {result.files} files, {'verified' if result.verified else 'NOT VERIFIED'}"
    )
