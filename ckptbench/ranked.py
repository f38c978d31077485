"""Runs with ranks: N processes save their row shards of the model together, M processes load them back.

``run`` starts the world (spawned on this host, or joined when torchrun started this process on one
host or many) and returns rank 0's phases. The world has max(N, M) processes: a save runs on ranks
[0, N), a load on [0, M), the others wait. Every rank runs the same ``RankedBenchmark``: the
harness's order of repeats and its rows, with a repeat of its own:

- a save is timed on every saving rank from a barrier before the first write until every rank's
  data is synced (its own ``syncfs``, then a barrier); rank 0 then writes the manifest and renames
  the directory, as in one process, so a checkpoint is complete only once every rank's data is
  durable, and a save that a dying rank cut short keeps its ``.partial-`` name;
- a load is timed from a barrier after eviction (one rank per host drops the page cache) until
  every loading rank holds its rows; each rank then compares its rows with what they must hold,
  bit for bit, and a row is verified only when every rank's rows are.

A row's times are the slowest rank's; each rank's own times go into ``rank_times``. Every rank
draws each tensor as ``model.build`` does and keeps its rows (its save shard, and its load shard
when M differs from N): memory per rank is its shards plus the largest tensor in passing, at the
CPU cost of drawing the whole model on every rank. Rank 0 digests each whole tensor on the way.
"""

from __future__ import annotations

import json
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import pandas as pd
import psutil
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from . import launch, manifest, throttle
from . import model as model_lib
from .benchmark import Benchmark, PhaseResult, RunConfig, _Drift, _warmup_subset
from .disk import DiskUsage
from .errors import CheckpointError, UnknownChoiceError, UsageError, VerificationError, gigabytes
from .limits import Limits
from .location import Location, Staging
from .manifest import Layout, Manifest
from .measure import Measurement, measure, return_freed_memory
from .results import ResultsStore, Row, frame
from .shards import Ranks, row_range
from .storage import open_storage
from .strategies import STRATEGIES, Strategy, Tensors, total_bytes
from .strategies import nbytes as tensor_bytes
from .strategies.sharded import Sharded
from .strategies.sharded import forms as forms_of
from .study import GROUPS
from .verify import verify

RESULTS_FILE = "ranks.csv"
"""Where the notebook's scaling section keeps its rows, apart from the comparison's."""
PENDING = "pending-row"
"""The mailbox key of the row rank 0 is measuring: recorded as failed if the run ends before it does."""
RANK_BYTES = 400 * 10**6
"""What a rank holds before any tensor: an interpreter with torch and TensorStore imported (0.47 GB RSS
measured, some of it shared libraries)."""


@dataclass(frozen=True)
class Outcome:
    """What rank 0 hands back: its run and its phases."""

    run_id: str
    phases: list[PhaseResult]


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


def run(
    config: RunConfig, strategies: str | Iterable[str | Strategy] = "all", *, limits: Limits | None = None
) -> Outcome | None:
    """Measure ``strategies`` with ``config.ranks`` saving and ``config.load_ranks`` loading; rank 0's outcome.

    Spawns the ranks on this host, or, in a process torchrun started, runs as its rank (then only
    rank 0 returns an outcome). A rank that fails ends the run with ``launch.RankFailed``; the
    repeat it cut short is recorded as a failed row and its files are removed.
    """
    if config.ranks is None:
        raise UsageError("a run with ranks needs ranks (--ranks N)")
    chosen = forms(strategies)
    size = max(config.ranks, config.load_ranks or config.ranks)
    if not launch.under_torchrun():
        _check_memory(config, chosen, size)
    if launch.under_torchrun():
        if not config.profile.caps.empty:
            raise UsageError("--disk-profile needs ranks spawned by this run (--ranks N), not started by torchrun")
        if launch.torchrun_size() != size:
            raise UsageError(
                f"torchrun started {launch.torchrun_size()} processes; --ranks {config.ranks} "
                f"--load-ranks {config.load_ranks or config.ranks} needs {size}"
            )
        world = launch.join(config.rank_timeout_s)
        try:
            return _on_rank(world, config, chosen, limits)
        except BaseException as err:
            if world.rank == 0:
                _record_failure(config, world.mailbox, f"rank 0: {type(err).__name__}: {err}")
            raise
        finally:
            dist.destroy_process_group()
    throttle.enter(config.out, config.profile.caps)  # the ranks spawned next inherit the group
    mailbox = launch.Mailbox.serve(config.rank_timeout_s)
    try:
        return launch.spawn(mailbox, _on_rank, size, config, chosen, limits, timeout_s=config.rank_timeout_s)
    except launch.RankFailed as err:
        _record_failure(config, mailbox, str(err))
        open_storage(config.store, config.out).clean_stale()
        raise


def _check_memory(config: RunConfig, chosen: list[Sharded], size: int) -> None:
    """Refuse ranks whose memory together exceeds what is available, before any is spawned (exit 2, naming how
    many fit): each rank's interpreter, the model's rows once to save and once to check a reshard against,
    the loaded rows (times the hungriest strategy's copies) and a whole tensor in passing on every rank."""
    if config.model_path is None:
        tensors = model_lib.build_each(config.preset, config.seed)[0].tensors
        nbytes, largest = total_bytes(tensors), max(map(tensor_bytes, tensors.values()))
    else:
        nbytes = largest = sum(p.stat().st_size for p in Path(config.model_path).glob("*.safetensors"))
    copies = max(form.load_copies() for form in chosen)
    held = nbytes * (1 + (config.load_ranks not in (None, config.ranks)) + copies)
    needed = size * (RANK_BYTES + largest) + held
    return_freed_memory()
    available = psutil.virtual_memory().available
    if needed > available:
        fit = max(0, (available - held) // (RANK_BYTES + largest))
        need, have = gigabytes(needed, available)
        raise UsageError(
            f"{size} ranks need about {need} GB of memory, {have} GB are available: at most {fit} fit "
            f"(each about {RANK_BYTES / 1e9:g} GB plus its rows)"
        )


def scale(
    config: RunConfig,
    strategies: str | Iterable[str | Strategy],
    counts: Iterable[int],
    *,
    load_ranks: int | None = None,
    limits: Limits | None = None,
) -> pd.DataFrame:
    """One run per number of ranks in ``counts``, each loading with ``load_ranks`` (None: as many as saved);
    all their rows, for ``scaling.figure`` and ``scaling.table``."""
    configs = [replace(config, ranks=count, load_ranks=load_ranks) for count in counts]
    outcomes = [run(each, strategies, limits=limits) for each in configs]
    return frame(row for outcome in outcomes for phase in outcome.phases for row in phase.rows)


def _on_rank(world: launch.World, config: RunConfig, chosen: list[Sharded], limits: Limits | None) -> Outcome | None:
    bench = RankedBenchmark(config, world, limits=limits)
    phases = bench.run(chosen)
    return Outcome(bench.run_id, phases) if world.rank == 0 else None


def _record_failure(config: RunConfig, mailbox: launch.Mailbox, error: str) -> None:
    pending = mailbox.get(PENDING)
    if pending is not None:
        ResultsStore(config.out, config.results_file).append([replace(pending, error=" ".join(error.split()))])


@dataclass(frozen=True)
class _Timing:
    """One rank's view of a timed phase."""

    seconds: float
    """From the phase's first barrier until every rank was done (and, for rank 0's save, committed)."""
    own_s: float
    """Until this rank's own part was done: its data synced, or its rows in memory."""
    peak_rss: int
    cpu_s: float

    @classmethod
    def of(cls, measured: Measurement, own_s: float) -> _Timing:
        return cls(measured.seconds, own_s, measured.peak_rss, measured.cpu_s)


@dataclass(frozen=True)
class _Report:
    """What one rank measured in one repeat; None for a phase it took no part in."""

    save: _Timing | None
    cold: _Timing | None
    warm: _Timing | None
    verified: bool


@dataclass
class _Shards:
    """What this rank holds of the model: the shapes of all of it, its rows to save, the rows its load must return."""

    shapes: model_lib.ModelCheckpoint
    save: OrderedDict[str, torch.Tensor]
    expected: OrderedDict[str, torch.Tensor]
    digests: dict[str, str]


def _shards(config: RunConfig, rank: int, saving: int, loading: int) -> _Shards:
    """Every tensor drawn (or read) whole, one at a time, its rows kept; rank 0 digests each on the way."""
    if config.model_path is None:
        shapes, each = model_lib.build_each(config.preset, config.seed)
    else:
        whole = model_lib.load_local(config.model_path)
        meta = OrderedDict((name, torch.empty_like(t, device="meta")) for name, t in whole.tensors.items())
        shapes, each = model_lib.ModelCheckpoint(whole.source, whole.config, meta), iter(whole.tensors.items())
    held = _Shards(shapes, OrderedDict(), OrderedDict(), {})
    for name, tensor in each:
        if tensor.dim() == 0:
            raise UsageError(f"{name} is a scalar; ranks shard tensors by rows")
        if rank == 0:
            held.digests[name] = manifest.digest(tensor)
        mine = row_range(tensor.shape[0], saving, rank) if rank < saving else None
        if mine is not None:
            held.save[name] = tensor[mine[0] : mine[1]].clone()
        if rank < loading:
            rows = row_range(tensor.shape[0], loading, rank)
            held.expected[name] = held.save[name] if rows == mine else tensor[rows[0] : rows[1]].clone()
    return held


def _phase(world: launch.World, count: int, timeout_s: float) -> Ranks | None:
    """This rank in a phase of ``count`` ranks (None when it takes no part); every rank makes every group."""
    if count == world.size:
        group = dist.group.WORLD
    else:
        group = dist.new_group(list(range(count)), timeout=timedelta(seconds=timeout_s))
    return Ranks(world.rank, count, group, world.host, world.threads, timeout_s) if world.rank < count else None


def _entries(strategy: Sharded, path: Location) -> Layout:
    """The manifest's tensors; a directory without it is not a checkpoint, one of another format not this one's."""
    found = Manifest.read(path)
    if not strategy.reads(found.config):
        raise CheckpointError(f"{path}: written by {found.strategy}; {strategy.name} reads another format")
    return found.tensors


def _quiet(message: str) -> None:
    """The log of ranks other than 0: rank 0 speaks for the run."""


class RankedBenchmark(Benchmark):
    """The harness on one rank: the same rounds, repeats and rows as in one process, a repeat of its own.

    Rank 0 alone prepares the output folder, probes the disk, commits checkpoints and records rows;
    each row is then broadcast, so every rank's session holds the same results.
    """

    def __init__(
        self,
        config: RunConfig,
        world: launch.World,
        *,
        limits: Limits | None = None,
        log: Callable[[str], None] = tqdm.write,
    ) -> None:
        self.world = world
        self.saving_ranks = config.ranks
        self.loading_ranks = config.load_ranks or config.ranks
        self.everyone = Ranks(
            world.rank, world.size, dist.group.WORLD, world.host, world.threads, config.rank_timeout_s
        )
        self.saving = _phase(world, self.saving_ranks, config.rank_timeout_s)
        self.loading = _phase(world, self.loading_ranks, config.rank_timeout_s)
        held = _shards(config, world.rank, self.saving_ranks, self.loading_ranks)
        self.shards, self.expected = held.save, held.expected
        super().__init__(config, checkpoint=held.shapes, limits=limits, log=log if world.rank == 0 else _quiet)
        self.run_id = self.everyone.broadcast(self.run_id)
        self._layout = self.everyone.broadcast(
            manifest.layout(held.shapes.tensors, held.digests) if world.rank == 0 else None
        )
        hosts: list[str | None] = [None] * world.size
        dist.all_gather_object(hosts, socket.gethostname())
        self.hosts = hosts

    @property
    def _lead(self) -> bool:
        return self.world.rank == 0

    def prepare(self) -> model_lib.ModelCheckpoint:
        """Rank 0 makes the results file safe, cleans leftovers and probes the disk; the others wait."""
        if self._lead:
            super().prepare()
            shapes = self.checkpoint
            self.log(
                f"{shapes.source}: {len(shapes.tensors)} tensors, {shapes.params:,} parameters, "
                f"{shapes.nbytes / 1e9:.3g} GB; disk: {self.limits.write_gbps:.3g} GB/s durable write, "
                f"{self.limits.read_gbps:.3g} GB/s cold read; {self.saving_ranks} ranks save, "
                f"{self.loading_ranks} load ({self.world.size} processes on {len(set(self.hosts))} host(s), "
                f"{self.world.threads} threads each); {self.config.repeats} repeat(s), {self.config.order} order"
            )
        self.everyone.barrier()
        return self.checkpoint

    def environment(self) -> dict:
        ranks = {
            "save": self.saving_ranks,
            "load": self.loading_ranks,
            "processes": self.world.size,
            "launcher": self.world.launcher,
            "hosts": self.hosts,
            "threads_per_rank": self.world.threads,
        }
        return {**super().environment(), "ranks": ranks}

    def _row(self, strategy: Strategy, repeat: int, **measured) -> Row:
        return super()._row(strategy, repeat, ranks=self.saving_ranks, load_ranks=self.loading_ranks, **measured)

    def _measure(self, strategy: Strategy, repeat: int) -> Row:
        """One repeat as a row; a failure on any rank ends the run (``run`` records the row it cut short)."""
        if self._lead:
            self.world.mailbox.put(PENDING, self._row(strategy, repeat))
        row = self._repeat(strategy, repeat)
        if self._lead:
            self.world.mailbox.drop(PENDING)
            self.store.append([row])
            times = json.loads(row.rank_times)
            self.log(
                f"{strategy.name} [{repeat + 1}/{self.config.repeats}] {row.ranks}->{row.load_ranks} ranks: "
                f"save {row.save_s:.2f} s (ranks {min(times['save_s']):.2f}-{max(times['save_s']):.2f}), "
                f"cold load {row.load_cold_s:.2f} s (ranks {min(times['load_cold_s']):.2f}-"
                f"{max(times['load_cold_s']):.2f}), warm load {row.load_warm_s:.2f} s, "
                f"{row.bytes / 1e9:.3f} GB in {row.files} files, {'verified' if row.verified else 'NOT VERIFIED'}"
            )
        return row

    def _warm_up(self, strategy: Strategy) -> None:
        if not self.config.warmup or strategy.name in self._warm:
            return
        subset = _warmup_subset(self.checkpoint.tensors)
        entries = tuple(e for e in self._layout if e.name in subset)
        path = self._path(f"{strategy.name}.warmup")
        try:
            self._cycle(strategy, entries, path)
        finally:
            if self._lead:
                self.storage.discard(path)
        self._warm.add(strategy.name)

    def _path(self, name: str) -> Location:
        return self.everyone.broadcast(self.storage.working(name) if self._lead else None)

    def _repeat(self, strategy: Strategy, repeat: int) -> Row:
        started = time.perf_counter()
        self._warm_up(strategy)
        drift = self._drift() if self._lead else _Drift()
        probe_s = self.probe_s
        path = self._path(strategy.name)
        try:
            report, usage = self._cycle(strategy, self._layout, path)
            reports: list[_Report] | None = [None] * self.world.size if self._lead else None
            dist.gather_object(report, reports, dst=0)
            if self._lead and self.config.keep_checkpoints and repeat == self.config.repeats - 1:
                self.storage.install(path, strategy.name)
        finally:
            if self._lead:
                self.storage.discard(path)
        row = None
        if self._lead:
            row = self._ranked_row(strategy, repeat, reports, usage, drift, time.perf_counter() - started, probe_s)
        return self.everyone.broadcast(row)

    def _cycle(self, strategy: Sharded, entries: Layout, path: Location) -> tuple[_Report, DiskUsage | None]:
        """Save, evict, cold load, warm load and verify on this rank; the disk usage on local rank 0s."""
        saved = self._timed_save(strategy, entries, path)
        usage = self.storage.settle(path) if self.world.local_rank == 0 else None
        self.everyone.barrier()
        cold, loaded = self._timed_load(strategy, path)
        cold_ok = self._holds(strategy, entries, loaded, path)
        del loaded
        warm, loaded = self._timed_load(strategy, path)
        warm_ok = self._holds(strategy, entries, loaded, path)
        return _Report(saved, cold, warm, cold_ok and warm_ok), usage

    def _timed_save(self, strategy: Sharded, entries: Layout, path: Location) -> _Timing | None:
        staging = None
        if self._lead:
            self.storage.ensure_free(
                strategy.estimate_bytes({e.name: self.checkpoint.tensors[e.name] for e in entries})
            )
            staging = Staging.begin(path)
        staging = self.everyone.broadcast(staging)
        try:
            timing = None if self.saving is None else self._save_shards(strategy, entries, staging)
            self.everyone.barrier()  # committed before any rank evicts or reads it
        except BaseException as failure:
            if self._lead:
                staging.abandon(failure)
            raise
        return timing

    def _save_shards(self, strategy: Sharded, entries: Layout, staging: Staging) -> _Timing:
        ranks = self.saving
        shards: Tensors = {e.name: self.shards[e.name] for e in entries}
        with strategy.session(ranks, writing=True) as session:
            ranks.barrier()
            with measure() as timing:
                start = time.perf_counter()
                strategy.save_shards(session, shards, entries, staging.partial, ranks)
                staging.partial.sync()
                own = time.perf_counter() - start
                ranks.barrier()
                if ranks.rank == 0:  # every rank's data is durable: the manifest, synced, then published
                    staging.commit(Manifest(strategy.name, strategy.config(), entries))
        return _Timing.of(timing, own)

    def _timed_load(self, strategy: Sharded, path: Location) -> tuple[_Timing | None, OrderedDict | None]:
        ranks = self.loading
        if ranks is None:
            return None, None
        with strategy.session(ranks, writing=False) as session:
            ranks.barrier()
            with measure() as timing:
                start = time.perf_counter()
                loaded = strategy.load_shards(session, path, _entries(strategy, path), ranks)
                own = time.perf_counter() - start
                ranks.barrier()
        return _Timing.of(timing, own), loaded

    def _holds(self, strategy: Sharded, entries: Layout, loaded: Tensors | None, path: Location) -> bool:
        """Whether this rank's loaded rows are, bit for bit, the rows it must hold (true when it loaded none)."""
        if loaded is None:
            return True
        expected = OrderedDict((e.name, self.expected[e.name]) for e in entries)
        try:
            verify(loaded, expected, f"{strategy.name} checkpoint {path}, rank {self.world.rank}'s rows")
        except VerificationError as err:
            tqdm.write(f"VERIFICATION FAILED: {err}")
            return False
        return True

    def _ranked_row(
        self,
        strategy: Strategy,
        repeat: int,
        reports: list[_Report],
        usage: DiskUsage,
        drift: _Drift,
        wall_s: float,
        probe_s: float,
    ) -> Row:
        saves = [r.save for r in reports if r.save is not None]
        colds = [r.cold for r in reports if r.cold is not None]
        warms = [r.warm for r in reports if r.warm is not None]
        loads_rss = [max(c.peak_rss, w.peak_rss) for c, w in zip(colds, warms, strict=True)]
        save_s = max(t.seconds for t in saves)
        cold_s, warm_s = max(t.seconds for t in colds), max(t.seconds for t in warms)
        own = {"save_s": saves, "load_cold_s": colds, "load_warm_s": warms}
        return self._row(
            strategy,
            repeat,
            save_s=save_s,
            save_blocking_s=save_s,
            load_cold_s=cold_s,
            load_warm_s=warm_s,
            bytes=usage.bytes,
            bytes_allocated=usage.bytes_allocated,
            files=usage.files,
            peak_rss_save=max(t.peak_rss for t in saves),
            peak_rss_load=max(loads_rss),
            verified=all(r.verified for r in reports),
            drift_write_gbps=drift.write_gbps,
            drift_read_gbps=drift.read_gbps,
            overhead_s=wall_s - (save_s + cold_s + warm_s + self.probe_s - probe_s),
            cpu_save_s=sum(t.cpu_s for t in saves),
            cpu_load_cold_s=sum(t.cpu_s for t in colds),
            cpu_load_warm_s=sum(t.cpu_s for t in warms),
            rank_times=json.dumps({key: [round(t.own_s, 4) for t in times] for key, times in own.items()}),
            peak_rss_save_sum=sum(t.peak_rss for t in saves),
            peak_rss_load_sum=sum(loads_rss),
        )
