"""Runs with ranks: N processes save their row shards of the model together, M processes load them back.

``run`` starts the world (spawned on this host, or joined when torchrun started this process on one
host or many) and returns rank 0's phases. The world has max(N, M) processes: a save runs on ranks
[0, N), a load on [0, M), the others wait. Every rank runs the same ``Benchmark`` (the harness's
order of repeats and its rows), given a ``RankedCycle``:

- a save is timed on every saving rank from a barrier before the first write until every rank's
  data is synced (its own ``syncfs``, then a barrier); rank 0 then writes the manifest and renames
  the directory, as in one process, so a checkpoint is complete only once every rank's data is
  durable, and a save that a dying rank cut short keeps its ``.partial-`` name;
- a load is timed from a barrier after eviction (one rank per host drops the page cache) until
  every loading rank holds its rows; each rank then compares its rows with what they must hold,
  bit for bit, and a row is verified only when every rank's rows are.

Loads go into fresh tensors on every rank (``--load-into existing`` is refused with ranks). The
record is ``results.Measured``, as in one process: a row's times are the slowest rank's, each rank's
own times go into ``rank_times``. Every rank
draws each tensor as ``model.build`` does and keeps its rows (its save shard, and its load shard
when M differs from N): memory per rank is its shards plus the largest tensor in passing, at the
CPU cost of drawing the whole model on every rank. Rank 0 digests each whole tensor on the way.
"""

from __future__ import annotations

import socket
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import pandas as pd
import psutil
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from . import launch, manifest, study, throttle
from . import model as model_lib
from .benchmark import Benchmark, PhaseResult, new_run_id
from .bitwise import matches
from .config import RunConfig
from .cycle import Cycle, Stopwatch
from .errors import CheckpointError, UsageError, gigabytes
from .limits import Limits
from .location import Location, Staging
from .manifest import Layout, Manifest
from .measure import Measurement, measure, return_freed_memory
from .objectstore import Requests
from .results import Measured, ResultsFile, Row, frame
from .shards import Ranks, row_range
from .storage import open_storage
from .strategies import Strategy, Tensors, total_bytes
from .strategies import nbytes as tensor_bytes
from .strategies.sharded import Sharded

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
    chosen = study.forms(strategies)
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
        open_storage(config.store, config.out, config.s3_endpoint).clean_stale()
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
    """The harness on one rank: the same rounds, repeats and rows as in one process, with a ranked cycle.

    Rank 0 alone prepares the output folder, probes the disk and records rows; each row is then
    broadcast, so every rank's session holds the same results.
    """
    lead = world.rank == 0
    cycle = RankedCycle(config, world)
    everyone = cycle.everyone
    bench = Benchmark(
        config,
        cycle=cycle,
        checkpoint=cycle.held.shapes,
        layout=everyone.broadcast(manifest.layout(cycle.held.shapes.tensors, cycle.held.digests) if lead else None),
        limits=limits,
        log=tqdm.write if lead else _quiet,
        run_id=everyone.broadcast(new_run_id() if lead else None),
    )
    shapes = bench.prepare()
    if lead:
        bench.log(
            f"{shapes.source}: {len(shapes.tensors)} tensors, {shapes.params:,} parameters, "
            f"{shapes.nbytes / 1e9:.3g} GB; disk: {bench.limits.write_gbps:.3g} GB/s durable write, "
            f"{bench.limits.read_gbps:.3g} GB/s cold read; {cycle.saving_ranks} ranks save, "
            f"{cycle.loading_ranks} load ({world.size} processes on {len(set(cycle.hosts))} host(s), "
            f"{world.threads} threads each); {config.repeats} repeat(s), {config.order} order"
        )
    phases = bench.run(chosen)
    return Outcome(bench.run_id, phases) if lead else None


def _record_failure(config: RunConfig, mailbox: launch.Mailbox, error: str) -> None:
    pending = mailbox.get(PENDING)
    if pending is not None:
        ResultsFile(config.out, config.results_file).append([replace(pending, error=" ".join(error.split()))])


@dataclass(frozen=True)
class _Timed:
    """One rank's part of a timed region: what it measured, its own seconds (until its own part was done), and
    on an object store the requests it made."""

    measured: Measurement
    own_s: float
    requests: Requests | None


@dataclass(frozen=True)
class _Report:
    """What one rank measured in one cycle: each timed region it took part in (None for one it did not), and
    whether its loaded rows were what they must be."""

    save: _Timed | None
    cold: _Timed | None
    warm: _Timed | None
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


class RankedCycle(Cycle):
    """One rank's part of a cycle: N ranks save their shards, M load theirs back, every rank checks its rows.

    Rank 0 commits each checkpoint, and gathers what every rank measured into the record.
    """

    failures_are_rows = False

    def __init__(self, config: RunConfig, world: launch.World) -> None:
        self.world = world
        self.lead = world.rank == 0
        self.storage = open_storage(config.store, config.out, config.s3_endpoint)
        self.saving_ranks = config.ranks
        self.loading_ranks = config.load_ranks or config.ranks
        self.everyone = Ranks(
            world.rank, world.size, dist.group.WORLD, world.host, world.threads, config.rank_timeout_s
        )
        self.saving = _phase(world, self.saving_ranks, config.rank_timeout_s)
        self.loading = _phase(world, self.loading_ranks, config.rank_timeout_s)
        self.held = _shards(config, world.rank, self.saving_ranks, self.loading_ranks)
        hosts: list[str | None] = [None] * world.size
        dist.all_gather_object(hosts, socket.gethostname())
        self.hosts = hosts

    def barrier(self) -> None:
        self.everyone.barrier()

    def share(self, row: Row | None) -> Row:
        return self.everyone.broadcast(row)

    def pending(self, row: Row) -> None:
        self.world.mailbox.put(PENDING, row)

    def settled(self) -> None:
        self.world.mailbox.drop(PENDING)

    def identity(self) -> dict:
        return {"ranks": self.saving_ranks, "load_ranks": self.loading_ranks}

    def environment(self) -> dict:
        ranks = {
            "save": self.saving_ranks,
            "load": self.loading_ranks,
            "processes": self.world.size,
            "launcher": self.world.launcher,
            "hosts": self.hosts,
            "threads_per_rank": self.world.threads,
        }
        return {"ranks": ranks}

    def measure(
        self, strategy: Sharded, tensors: Tensors, layout: Layout, name: str, label: str, keep: bool
    ) -> Measured | None:
        path = self.everyone.broadcast(self.storage.working(name) if self.lead else None)
        clock = Stopwatch()
        try:
            save = self._save(strategy, tensors, layout, path)
            with clock("evict"):
                usage = self.storage.settle(path) if self.world.local_rank == 0 else None
                self.everyone.barrier()
            cold, loaded = self._load(strategy, path)
            with clock("verify"):
                cold_ok = self._holds(strategy, layout, loaded, path)
                del loaded
            warm, loaded = self._load(strategy, path)
            with clock("verify"):
                warm_ok = self._holds(strategy, layout, loaded, path)
                del loaded
            reports: list[_Report] | None = [None] * self.world.size if self.lead else None
            dist.gather_object(_Report(save, cold, warm, cold_ok and warm_ok), reports, dst=0)
            with clock("cleanup"):
                if self.lead and keep:
                    self.storage.install(path, strategy.name)
        finally:
            if self.lead:
                self.storage.discard(path)
        if not self.lead:
            return None
        regions: dict[str, list[_Timed]] = {
            key: [getattr(r, region) for r in reports if getattr(r, region) is not None]
            for key, region in (("save_s", "save"), ("load_cold_s", "cold"), ("load_warm_s", "warm"))
        }
        counted = {key: [t.requests for t in regions[key]] for key in ("save_s", "load_cold_s")}
        on_store = all(r is not None for each in counted.values() for r in each)
        totals = tuple(sum(counted[key], Requests()) for key in ("save_s", "load_cold_s")) if on_store else None
        return Measured(
            save=[t.measured for t in regions["save_s"]],
            cold=[t.measured for t in regions["load_cold_s"]],
            warm=[t.measured for t in regions["load_warm_s"]],
            bytes=usage.bytes,
            bytes_allocated=usage.bytes_allocated,
            files=usage.files,
            verified=all(r.verified for r in reports),
            requests=totals,
            rank_times={key: [t.own_s for t in timed] for key, timed in regions.items()},
            rank_requests={key.removesuffix("_s"): each for key, each in counted.items()} if on_store else None,
            untimed=dict(clock.seconds),
        )

    def _save(self, strategy: Sharded, tensors: Tensors, layout: Layout, path: Location) -> _Timed | None:
        staging = None
        if self.lead:
            self.storage.ensure_free(strategy.estimate_bytes({e.name: tensors[e.name] for e in layout}))
            staging = Staging.begin(path)
        staging = self.everyone.broadcast(staging)
        try:
            timing = None if self.saving is None else self._save_shards(strategy, layout, staging)
            self.everyone.barrier()  # committed before any rank evicts or reads it
        except BaseException as failure:
            if self.lead:
                staging.abandon(failure)
            raise
        return timing

    def _save_shards(self, strategy: Sharded, layout: Layout, staging: Staging) -> _Timed:
        ranks = self.saving
        shards: Tensors = {e.name: self.held.save[e.name] for e in layout}
        with self.storage.counting() as counted, strategy.session(ranks, writing=True) as session:
            ranks.barrier()
            with measure() as timing:
                start = time.perf_counter()
                strategy.save_shards(session, shards, layout, staging.partial, ranks)
                staging.partial.sync()
                own = time.perf_counter() - start
                ranks.barrier()
                if ranks.rank == 0:  # every rank's data is durable: the manifest, synced, then published
                    staging.commit(Manifest(strategy.name, strategy.config(), layout))
        return _Timed(timing, own, counted.requests)

    def _load(self, strategy: Sharded, path: Location) -> tuple[_Timed | None, Tensors | None]:
        ranks = self.loading
        if ranks is None:
            return None, None
        with self.storage.counting() as counted, strategy.session(ranks, writing=False) as session:
            ranks.barrier()
            with measure() as timing:
                start = time.perf_counter()
                loaded = strategy.load_shards(session, path, _entries(strategy, path), ranks)
                own = time.perf_counter() - start
                ranks.barrier()
        return _Timed(timing, own, counted.requests), loaded

    def _holds(self, strategy: Sharded, layout: Layout, loaded: Tensors | None, path: Location) -> bool:
        """Whether this rank's loaded rows are, bit for bit, the rows it must hold (true when it loaded none)."""
        if loaded is None:
            return True
        expected = OrderedDict((e.name, self.held.expected[e.name]) for e in layout)
        source = f"{strategy.name} checkpoint {path}, rank {self.world.rank}'s rows"
        return matches(loaded, expected, source, tqdm.write)
