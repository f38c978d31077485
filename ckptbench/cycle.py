"""One measurement cycle: save, evict, cold load, warm load and verify one strategy, and what it measured.

A ``Benchmark`` decides what to measure and when (preparation, order, rounds, warm-ups, failures
as rows); a cycle measures. ``LocalCycle`` runs in this process; ``ranked.RankedCycle`` runs one
rank's part of a cycle that many processes share. Both return the same ``Measured`` record, which
``results.row`` turns into a row, so a value measured either way reaches the results the same way.

Only the I/O a user would wait for is timed: eviction, verification, size accounting and deletion
sit between the timed regions and are clocked as untimed seconds.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import psutil
import torch
from tqdm.auto import tqdm

from . import checkpoint
from .bitwise import matches
from .config import LoadInto
from .errors import InsufficientMemoryError
from .manifest import Layout
from .measure import Measurement, measure, return_freed_memory
from .objectstore import Requests
from .results import Measured, Row
from .storage import Location, Storage, staged
from .strategies import Strategy, Tensors, total_bytes

_POISON = 0xFF
"""Every byte of the existing tensors before each load: a load that skipped a tensor cannot verify."""


class Stopwatch:
    """Seconds per named untimed step, summed over the step's occurrences, as ``Row`` columns (``evict_s``...)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[f"{step}_s"] += time.perf_counter() - started


class Cycle(ABC):
    """Measures one strategy once; how the processes that share a run agree (one process: trivially)."""

    storage: Storage
    """Where the checkpoints go."""
    lead = True
    """Whether this process prepares the run, probes the disk, records rows and speaks for the run."""
    failures_are_rows = True
    """Whether a failed cycle becomes a row and the run goes on (not with ranks: the others would wait for it)."""

    @abstractmethod
    def measure(
        self, strategy: Strategy, tensors: Tensors, layout: Layout, name: str, label: str, keep: bool
    ) -> Measured | None:
        """Save ``layout``'s tensors with ``strategy`` at the working place ``name``, evict, load cold and warm,
        verify each load; keep the checkpoint as ``strategy.name`` when ``keep``, else delete it. The record
        (None on a process that does not speak for the run); raises what stopped it."""

    def barrier(self) -> None:
        """Wait for every process of the run."""
        return None

    def share(self, row: Row | None) -> Row:
        """The lead's row, on every process."""
        return row

    def pending(self, row: Row) -> None:
        """The row being measured, recorded as failed if the run ends before it does."""
        return None

    def settled(self) -> None:
        """The pending row was measured."""
        return None

    def identity(self) -> dict:
        """Columns every row of this cycle carries (the ranks' plan)."""
        return {}

    def environment(self) -> dict:
        """What the run's environment record adds for this cycle."""
        return {}


class LocalCycle(Cycle):
    """A cycle in this process: staged, durable saves; loads into fresh tensors or existing ones."""

    def __init__(
        self,
        storage: Storage,
        load_into: LoadInto = "fresh",
        progress: bool = True,
        log: Callable[[str], None] = print,
        resumes: Callable[[Strategy, Tensors], None] | None = None,
    ) -> None:
        self.storage = storage
        self.load_into = load_into
        self.progress = progress
        self.log = log
        self.resumes = resumes
        """Raises when a verified cold load does not resume what was saved (a training state's next step)."""

    def _bar(self, description: str, total: int) -> tqdm:
        return tqdm(total=total, desc=description, unit="B", unit_scale=True, leave=False, disable=not self.progress)

    def measure(
        self, strategy: Strategy, tensors: Tensors, layout: Layout, name: str, label: str, keep: bool
    ) -> Measured:
        tensors = OrderedDict((entry.name, tensors[entry.name]) for entry in layout)
        path = self.storage.working(name)
        clock = Stopwatch()
        try:
            saved, blocking_s, save_requests = self._save(strategy, tensors, layout, path, label)
            with clock("evict"):
                usage = self.storage.settle(path)
            into = self._existing(tensors)
            cold, loaded, load_requests = self._load(strategy, tensors, path, f"{label} cold", into)
            with clock("verify"):
                cold_ok = self._verified(strategy, loaded, tensors, path)
                if cold_ok and self.resumes is not None:
                    self.resumes(strategy, loaded)
                del loaded
            warm, loaded, _ = self._load(strategy, tensors, path, f"{label} warm", into)
            # Nothing is timed now: delete the checkpoint while the CPU compares the last load.
            with ThreadPoolExecutor(1) as pool:
                deleted = None if keep else pool.submit(self.storage.discard, path)
                with clock("verify"):
                    warm_ok = self._verified(strategy, loaded, tensors, path)
                    del loaded
                with clock("cleanup"):
                    if deleted is not None:
                        deleted.result()
                    if keep:
                        kept = self.storage.install(path, strategy.name)
                        self.log(f"kept {strategy.name}'s checkpoint at {kept}")
        finally:
            self.storage.discard(path)
        requests = None if save_requests is None or load_requests is None else (save_requests, load_requests)
        return Measured(
            save=[saved],
            cold=[cold],
            warm=[warm],
            bytes=usage.bytes,
            bytes_allocated=usage.bytes_allocated,
            files=usage.files,
            verified=cold_ok and warm_ok,
            save_blocking_s=blocking_s,
            requests=requests,
            untimed=dict(clock.seconds),
        )

    def _save(
        self, strategy: Strategy, tensors: Tensors, layout: Layout, path: Location, label: str
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

        Made per cycle and dropped after it, outside the timers: an extra model kept through the saves
        would leave too little memory for the libraries that copy the model while saving.
        """
        if self.load_into == "fresh":
            return None
        return OrderedDict(
            (name, torch.empty_like(t, memory_format=torch.contiguous_format)) for name, t in saved.items()
        )

    def _load(
        self, strategy: Strategy, saved: Tensors, path: Location, label: str, into: Tensors | None
    ) -> tuple[Measurement, Tensors, Requests | None]:
        """A load, into fresh tensors or into ``into``, whose every byte is overwritten (and so touched) first."""
        if into is not None:
            for tensor in into.values():
                tensor.view(-1).view(torch.uint8).fill_(_POISON)
        size = total_bytes(saved)
        needed = int(size * strategy.load_copies()) - (0 if into is None else size)
        return_freed_memory()
        available = psutil.virtual_memory().available
        if needed > available:
            raise InsufficientMemoryError(f"{label} load", needed, available, _holders(size, available))
        with (
            self._bar(f"{label} load", size) as bar,
            self.storage.counting() as counted,
            measure() as timing,
        ):
            loaded = checkpoint.load(strategy, path, bar.update, into=into)
        if into is not None:
            timing.peak_rss += size  # allocated before the timer, it is the load's copy of the model
        return timing, loaded, counted.requests

    def _verified(self, strategy: Strategy, loaded: Tensors, saved: Tensors, path: Location) -> bool:
        return matches(loaded, saved, f"{strategy.name} checkpoint {path}", self.log)


def _holders(model: int, available: int) -> str:
    """Who holds the memory a load was refused: this process (the model among it) and everything else."""
    own, total = psutil.Process().memory_info().rss, psutil.virtual_memory().total
    return (
        f"this process holds {own / 1e9:.2f} GB (the model {model / 1e9:.2f} GB), "
        f"the rest of the machine {max(0, total - available - own) / 1e9:.2f} GB of {total / 1e9:.2f} GB"
    )
