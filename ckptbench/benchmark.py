"""The harness: each repeat saves, evicts, loads cold, loads warm and verifies one strategy.

Only the I/O a user would wait for is timed. Building the model, digests, verification, cache
eviction, size accounting and deletion all happen between the timed regions. A run's settings are
a frozen ``RunConfig``; a ``Benchmark`` holds what one session has measured. Every phase returns a
``PhaseResult``; a failure becomes a recorded row and the run goes on.
"""

from __future__ import annotations

import random
import secrets
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal, get_args

import pandas as pd
import psutil
import torch
from tqdm.auto import tqdm

from . import checkpoint, disk, environment, manifest, profiles, throttle, training
from . import model as model_lib
from .errors import InsufficientMemoryError, UsageError, VerificationError
from .launch import under_torchrun
from .limits import Limits, ProbeSettings, missed_caps
from .measure import Measurement, measure, return_freed_memory
from .objectstore import Requests
from .results import ResultsStore, Row, config_json, frame, summarize
from .shards import cores
from .storage import FILE, Location, check_settings, is_local, open_storage, scheme, staged
from .strategies import Strategy, Tensors, get_strategy, nbytes, total_bytes
from .study import ordered
from .verify import verify

WARMUP_BYTES = 64 << 20
_DRIFT_MIN, _DRIFT_MAX = 32 << 20, 256 << 20
Order = Literal["interleaved", "shuffled", "sequential"]
ORDERS: tuple[str, ...] = get_args(Order)
LoadInto = Literal["fresh", "existing"]
LOAD_INTO: tuple[str, ...] = get_args(LoadInto)
_POISON = 0xFF
"""Every byte of the existing tensors before each load: a load that skipped a tensor cannot verify."""


def _warmup_subset(tensors: Tensors) -> OrderedDict[str, torch.Tensor]:
    """A few tensors (<= WARMUP_BYTES) that exercise a strategy's code paths without a full save."""
    subset, total = OrderedDict(), 0
    for name, tensor in tensors.items():
        size = nbytes(tensor)
        if total + size <= WARMUP_BYTES:
            subset[name], total = tensor, total + size
    return subset


RANKS_PER_CORE = 4
"""Processes a run may spawn per core of this host: more only queue for the cores (each takes ~0.4 GB)."""


@dataclass(frozen=True)
class RunConfig:
    """What a run measures and how; validated when made, so a bad setting fails before anything is written."""

    preset: str = model_lib.DEFAULT_PRESET
    model_path: Path | None = None
    """A local Hugging Face Llama directory; replaces the preset."""
    out: Path = Path("saved_models")
    repeats: int = 1
    order: Order = "interleaved"
    """interleaved: repeat 1 of every strategy, then repeat 2, ...; shuffled: the same, each round in a
    seeded random order; sequential: every repeat of one strategy before the next."""
    keep_checkpoints: bool = False
    warmup: bool = True
    drift: bool = True
    """Probe the disk briefly before every repeat, so each row says how fast the disk was at the time."""
    reprobe: bool = False
    """Measure the disk's limits again even when the output folder holds today's for its filesystem."""
    seed: int = 0
    results_file: str = "results.csv"
    progress: bool = True
    store: str = FILE
    """Where checkpoints are written: ``file`` (``out``) or ``s3://bucket/prefix`` (credentials from AWS_*)."""
    s3_endpoint: str | None = None
    """The S3 server's URL, e.g. ``http://127.0.0.1:8333`` (``python -m ckptbench s3-server``); None is AWS."""
    s3_rtt_ms: float | None = None
    """Round-trip time to inject in front of ``s3_endpoint`` with a delay proxy on loopback (no netem here);
    0 routes through the proxy without delay, to measure what the proxy itself costs."""
    load_into: LoadInto = "fresh"
    """fresh: every load returns new tensors; existing: it reads into tensors shaped like the model, allocated
    and touched outside the timers (what resuming a live model does)."""
    ranks: int | None = None
    """Save with this many processes, each holding its row shard of every tensor (``ckptbench.ranked``);
    None: one process, no process group."""
    load_ranks: int | None = None
    """Load with this many processes (default: ``ranks``); another number reshards."""
    rank_timeout_s: float = 900.0
    """How long any collective waits for a rank before the run fails naming it: longer than the slowest phase."""
    payload: training.Payload = "weights"
    """weights: the model's tensors; training: a training job's whole state (``ckptbench.training``), each load
    also resumed for one step and compared with the job that never stopped."""
    disk_profile: str = profiles.NONE
    """A cloud volume to emulate on the disk under ``out`` with the kernel's I/O throttle (``profiles.PROFILES``)."""
    disk_limit: str | None = None
    """The user's own caps instead, e.g. ``read=300M,write=300M,riops=3000,wiops=3000``."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        if self.model_path is not None:
            object.__setattr__(self, "model_path", Path(self.model_path))
        else:
            model_lib.get_preset(self.preset)
        if self.repeats < 1:
            raise UsageError(f"repeats must be at least 1, got {self.repeats}")
        if self.seed < 0:
            raise UsageError(f"seed must be 0 or more, got {self.seed}")
        if self.order not in ORDERS:
            raise UsageError(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        disk.refuse_file_in_the_way(self.out)
        check_settings(self.store, self.s3_endpoint, self.s3_rtt_ms, self.ranks)
        if self.load_into not in LOAD_INTO:
            raise UsageError(f"load_into must be one of {', '.join(LOAD_INTO)}, got {self.load_into!r}")
        if self.ranks is not None and self.ranks < 1:
            raise UsageError(f"ranks must be at least 1, got {self.ranks}")
        if self.load_ranks is not None and (self.ranks is None or self.load_ranks < 1):
            raise UsageError(f"load_ranks needs ranks and must be at least 1, got {self.load_ranks}")
        most = RANKS_PER_CORE * cores()
        for label, count in (("ranks", self.ranks), ("load_ranks", self.load_ranks)):
            if count is not None and count > most and not under_torchrun():
                raise UsageError(f"{label} must be 1 to {most} ({RANKS_PER_CORE} per core of {cores()}), got {count}")
        if self.rank_timeout_s <= 0:
            raise UsageError(f"rank_timeout_s must be positive, got {self.rank_timeout_s}")
        if not self.profile.caps.empty and not is_local(self.store):
            raise UsageError(
                f"--disk-profile and --disk-limit throttle the disk under --out; not an {scheme(self.store)}:// --store"
            )

        if self.payload not in training.PAYLOADS:
            raise UsageError(f"payload must be one of {', '.join(training.PAYLOADS)}, got {self.payload!r}")
        if self.payload == "training" and (self.model_path is not None or self.ranks is not None):
            raise UsageError("--payload training trains a preset in one process: not with --model-path or --ranks")

    @property
    def profile(self) -> profiles.Profile:
        """The disk profile the run emulates (``none``: the raw disk)."""
        return profiles.resolve(self.disk_profile, self.disk_limit)

    @property
    def label(self) -> str:
        """The model as results name it: the preset, or ``local:DIR`` for real weights."""
        return self.preset if self.model_path is None else f"local:{self.model_path.name}"


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

    def _repr_html_(self) -> str:
        from .report import phase_table

        return phase_table(self).to_html()

    def __repr__(self) -> str:
        from .report import phase_table

        return phase_table(self).to_string()


class _Stopwatch:
    """Seconds per named untimed step, summed over the step's occurrences."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[step] += time.perf_counter() - started


@dataclass
class _Drift:
    write_gbps: float | None = None
    read_gbps: float | None = None


class Benchmark:
    """One benchmark session: a model, an output folder, and the rows measured so far.

    Phases can run in any order and be re-run; a re-run replaces that strategy's rows in
    ``results`` (this session's view) and appends to the results store (the history).
    """

    def __init__(
        self,
        config: RunConfig | None = None,
        *,
        checkpoint: model_lib.ModelCheckpoint | training.TrainingCheckpoint | None = None,
        limits: Limits | None = None,
        log: Callable[[str], None] = tqdm.write,
        run_id: str | None = None,
    ) -> None:
        self.config = config or RunConfig()
        self.checkpoint = checkpoint
        self.limits = limits
        self.log = log
        self.run_id = run_id or f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        self.store = ResultsStore(self.config.out, self.config.results_file)
        self.storage = open_storage(self.config.store, self.config.out, self.config.s3_endpoint, self.config.s3_rtt_ms)
        """Where the checkpoints go (``config.store``); ``store`` is the results'."""
        self.prepare_s = 0.0
        """Set-up so far: building or loading the model, cleaning leftovers, probing the limits."""
        self.probe_s = 0.0
        """Seconds inside the disk probes' own timed I/O (start probe and drift probes): measurement, not overhead."""
        self._rows: dict[str, list[Row]] = {}
        self._warm: set[str] = set()
        self._layout: manifest.Layout | None = None

    @property
    def out(self) -> Path:
        return self.config.out

    @property
    def preset(self) -> str:
        return self.config.label

    def prepare(self) -> model_lib.ModelCheckpoint | training.TrainingCheckpoint:
        """Check the output folder, build or load the model, make the results safe, clean leftovers, probe the disk."""
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
        self.out.mkdir(parents=True, exist_ok=True)
        self.store.check()  # a file set aside is named in its warning
        for stale in [*self.storage.clean_stale(), *throttle.clean_stale()]:
            self.log(f"removed the leftovers of an interrupted run: {stale}")
        if self.limits is None:
            self.limits = self._probe(ProbeSettings.for_checkpoint(self.checkpoint.nbytes))
        else:
            throttle.enter(self.out, self.config.profile.caps)
        self.prepare_s += time.perf_counter() - started
        if not self.store.environment_path(self.run_id).exists():
            self.store.write_environment(self.run_id, self.environment())
        return self.checkpoint

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
            **environment.collect(self.out),
        }

    def _bar(self, description: str, total: int) -> tqdm:
        return tqdm(
            total=total, desc=description, unit="B", unit_scale=True, leave=False, disable=not self.config.progress
        )

    def _timed_save(
        self, strategy: Strategy, tensors: Tensors, layout: manifest.Layout, path: Location, label: str
    ) -> tuple[Measurement, float | None, Requests | None]:
        """The save until durable (on S3: acknowledged), for an async save the seconds until the strategy
        returned (its stall), and the requests it made (S3 only; counted outside the timer)."""
        self.storage.ensure_free(strategy.estimate_bytes(tensors))
        with (
            self._bar(f"{label} save", total_bytes(tensors)) as bar,
            self.storage.counting() as counted,
            measure() as timing,
            staged(path) as staging,
        ):
            blocking = checkpoint.save(strategy, tensors, layout, staging, bar.update)
        return timing, blocking, counted.requests

    def _existing(self, saved: Tensors) -> OrderedDict[str, torch.Tensor] | None:
        """With ``load_into="existing"``, new tensors shaped like ``saved`` for its loads to fill; else None.

        Made per repeat and dropped after it, outside the timers: an extra model kept through the saves
        would leave too little memory for the libraries that copy the model while saving.
        """
        if self.config.load_into == "fresh":
            return None
        return OrderedDict(
            (name, torch.empty_like(t, memory_format=torch.contiguous_format)) for name, t in saved.items()
        )

    def _timed_load(
        self, strategy: Strategy, path: Location, label: str, into: OrderedDict[str, torch.Tensor] | None = None
    ) -> tuple[Measurement, Tensors, Requests | None]:
        """A load, into fresh tensors or into ``into``, whose every byte is overwritten (and so touched) first."""
        if into is not None:
            for tensor in into.values():
                tensor.view(-1).view(torch.uint8).fill_(_POISON)
        total = self.checkpoint.nbytes if into is None else total_bytes(into)
        needed = int(self.checkpoint.nbytes * strategy.load_copies()) - (0 if into is None else total)
        return_freed_memory()
        available = psutil.virtual_memory().available
        if needed > available:
            raise InsufficientMemoryError(f"{label} load", needed, available)
        with (
            self._bar(f"{label} load", total) as bar,
            self.storage.counting() as counted,
            measure() as timing,
        ):
            loaded = checkpoint.load(strategy, path, bar.update, into=into)
        if into is not None:
            timing.peak_rss += total_bytes(into)  # allocated before the timer, it is the load's copy of the model
        return timing, loaded, counted.requests

    def _verified(self, strategy: Strategy, loaded: Tensors, path: Location) -> bool:
        try:
            verify(loaded, self.checkpoint.tensors, f"{strategy.name} checkpoint {path}")
        except VerificationError as err:
            self.log(f"VERIFICATION FAILED: {err}")
            return False
        return True

    def _resumes(self, strategy: Strategy, loaded: Tensors) -> None:
        """A training state must also resume: one more step from ``loaded`` (changed in place) equals the job's."""
        if isinstance(self.checkpoint, training.TrainingCheckpoint):
            found = training.resume_problem(self.checkpoint, loaded)
            if found is not None:
                raise VerificationError(f"{strategy.name} checkpoint does not resume: {found}")

    def _warm_up(self, strategy: Strategy) -> None:
        """Save and load a few tensors untimed, so library start-up is not billed to the first repeat."""
        if not self.config.warmup or strategy.name in self._warm:
            return
        subset = _warmup_subset(self.checkpoint.tensors)
        layout = tuple(e for e in self._layout if e.name in subset)
        path = self.storage.working(f"{strategy.name}.warmup")
        try:
            self._timed_save(strategy, subset, layout, path, f"{strategy.name} warm-up")
            self._timed_load(strategy, path, f"{strategy.name} warm-up", self._existing(subset))
        finally:
            self.storage.discard(path)
        self._warm.add(strategy.name)

    def _drift(self) -> _Drift:
        if not self.config.drift:
            return _Drift()
        size = min(max(self.checkpoint.nbytes // 16, _DRIFT_MIN), _DRIFT_MAX)
        probe = self.storage.stream(size)
        self.probe_s += probe.seconds
        return _Drift(probe.write_gbps, probe.read_gbps)

    def _row(self, strategy: Strategy, repeat: int, **measured) -> Row:
        checkpoint = self.checkpoint
        return Row(
            run_id=self.run_id,
            timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            preset=self.preset,
            strategy=strategy.name,
            config=config_json(strategy.config()),
            repeat=repeat,
            tensors=len(checkpoint.tensors),
            params=checkpoint.params,
            model_bytes=checkpoint.nbytes,
            disk_write_gbps=self.limits.write_gbps,
            disk_read_gbps=self.limits.read_gbps,
            disk_files_per_s=self.limits.files_per_s,
            fresh_copy_gbps=self.limits.fresh_copy_gbps,
            disk_read_iops=self.limits.read_iops,
            disk_profile=self.limits.throttle.get("profile", profiles.NONE),
            disk_caps=self.limits.throttle.get("caps", ""),
            store=self.storage.url,
            injected_rtt_ms=self.storage.injected_rtt_ms,
            load_into=self.config.load_into,
            payload=self.config.payload,
            **measured,
        )

    def _repeat(self, strategy: Strategy, repeat: int) -> Row:
        """One timed save, cold load and warm load, each verified; raises what stopped it.

        The untimed work between them is clocked too (``warmup_s``, ``evict_s``, ``verify_s``,
        ``cleanup_s``), so a run shows where its wall time outside the timers goes.
        """
        started = time.perf_counter()
        self._warm_up(strategy)
        warmup_s = time.perf_counter() - started
        drift = self._drift()
        probe_s = self.probe_s
        path = self.storage.working(strategy.name)
        label = f"{strategy.name} [{repeat + 1}/{self.config.repeats}]"
        keep = self.config.keep_checkpoints and repeat == self.config.repeats - 1
        clock = _Stopwatch()
        try:
            saved, blocking_s, save_requests = self._timed_save(
                strategy, self.checkpoint.tensors, self._layout, path, label
            )
            with clock("evict"):
                usage = self.storage.settle(path)
            into = self._existing(self.checkpoint.tensors)
            cold, loaded, load_requests = self._timed_load(strategy, path, f"{label} cold", into)
            with clock("verify"):
                cold_ok = self._verified(strategy, loaded, path)
                if cold_ok:
                    self._resumes(strategy, loaded)
                del loaded
            warm, loaded, _ = self._timed_load(strategy, path, f"{label} warm", into)
            # Nothing is timed now: delete the checkpoint while the CPU compares the last load.
            with ThreadPoolExecutor(1) as pool:
                deleted = None if keep else pool.submit(self.storage.discard, path)
                with clock("verify"):
                    warm_ok = self._verified(strategy, loaded, path)
                    del loaded
                with clock("cleanup"):
                    if deleted is not None:
                        deleted.result()
                    if keep:
                        kept = self.storage.install(path, strategy.name)
                        self.log(f"kept {strategy.name}'s checkpoint at {kept}")
        finally:
            self.storage.discard(path)
        timed = saved.seconds + cold.seconds + warm.seconds + (self.probe_s - probe_s)
        return self._row(
            strategy,
            repeat,
            save_s=saved.seconds,
            save_blocking_s=saved.seconds if blocking_s is None else min(blocking_s, saved.seconds),
            load_cold_s=cold.seconds,
            load_warm_s=warm.seconds,
            bytes=usage.bytes,
            bytes_allocated=usage.bytes_allocated,
            files=usage.files,
            peak_rss_save=saved.peak_rss,
            peak_rss_load=max(cold.peak_rss, warm.peak_rss),
            verified=cold_ok and warm_ok,
            drift_write_gbps=drift.write_gbps,
            drift_read_gbps=drift.read_gbps,
            overhead_s=time.perf_counter() - started - timed,
            cpu_save_s=saved.cpu_s,
            cpu_load_cold_s=cold.cpu_s,
            cpu_load_warm_s=warm.cpu_s,
            warmup_s=warmup_s,
            evict_s=clock.seconds["evict"],
            verify_s=clock.seconds["verify"],
            cleanup_s=clock.seconds["cleanup"],
            **_requests(save_requests, load_requests, usage.files),
        )

    def _measure(self, strategy: Strategy, repeat: int) -> Row:
        """One repeat as a row, a failure included: the reason is kept, the run goes on."""
        try:
            row = self._repeat(strategy, repeat)
        except Exception as err:  # kept as a result, as a benchmark should: the run goes on to the next
            message = " ".join(f"{type(err).__name__}: {err}".split())
            row = self._row(strategy, repeat, error=message)
            self.log(f"FAILED {strategy.name} [{repeat + 1}/{self.config.repeats}]: {message}")
        else:
            blocking = f" (blocking {row.save_blocking_s:.2f} s)" if row.save_blocking_s < row.save_s else ""
            self.log(
                f"{strategy.name} [{repeat + 1}/{self.config.repeats}]: save {row.save_s:.2f} s{blocking}, "
                f"cold load {row.load_cold_s:.2f} s, warm load {row.load_warm_s:.2f} s, "
                f"{row.bytes / 1e9:.3f} GB in {row.files} files, {'verified' if row.verified else 'NOT VERIFIED'}"
            )
        self.store.append([row])
        return row

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
            for strategy, repeat in batch:
                if strategy.name in failed:
                    continue
                row = self._measure(strategy, repeat)
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
                error = f"{strategy.name}: a load did not match what was saved (rows recorded in {self.store.csv})"
            results.append(PhaseResult(strategy.name, rows, error))
        return results

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


def _requests(save: Requests | None, load: Requests | None, objects: int | None) -> dict[str, int | None]:
    """The S3 columns of a row: the save's and the cold load's requests and the server's object count."""
    if save is None or load is None:
        return {}
    both = save + load
    return {
        "objects": objects,
        "requests_put": both.put,
        "requests_get": both.get,
        "requests_head": both.head,
        "requests_delete": both.delete,
        "requests_save": save.total,
        "bytes_sent": both.bytes_sent,
        "bytes_received": both.bytes_received,
    }
