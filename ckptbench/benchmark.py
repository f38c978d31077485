"""The harness: each phase saves, evicts, loads cold, loads warm and verifies one strategy.

Only the I/O a user would wait for is timed. Building the model, verification, cache eviction,
size accounting and deletion all happen between the timed regions.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from . import disk, environment
from . import limits as limits_lib
from . import model as model_lib
from .errors import VerificationError
from .measure import Measurement, measure
from .results import ResultsStore, Row, frame, summarize
from .strategies import STRATEGIES, Strategy, Tensors, get_strategy, nbytes, total_bytes
from .verify import verify

WARMUP_BYTES = 64 << 20
_PROBE_MIN, _PROBE_MAX = 64 << 20, 1 << 30


def _warmup_subset(tensors: Tensors) -> OrderedDict[str, torch.Tensor]:
    """A few tensors (<= WARMUP_BYTES) that exercise a strategy's code paths without a full save."""
    subset, total = OrderedDict(), 0
    for name, tensor in tensors.items():
        size = nbytes(tensor)
        if total + size <= WARMUP_BYTES:
            subset[name], total = tensor, total + size
    return subset


@dataclass
class Benchmark:
    """One benchmark session: a model, an output folder, and the rows measured so far.

    Phases can run in any order and be re-run; a re-run replaces that strategy's rows in
    ``results`` (this session's view) and appends to the results store (the history).
    """

    preset: str = model_lib.DEFAULT_PRESET
    model_path: str | Path | None = None
    out: Path = Path("saved_models")
    repeats: int = 1
    keep_checkpoints: bool = False
    warmup: bool = True
    seed: int = 0
    progress: bool = True
    run_id: str = field(default_factory=lambda: f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}")
    checkpoint: model_lib.ModelCheckpoint | None = field(default=None, repr=False)
    limits: limits_lib.Limits | None = None
    results_file: str = "results.csv"
    prepare_s: float = 0.0
    """Set-up so far: building or loading the model, cleaning leftovers, probing the limits.

    ``limits.probe_s`` of it is the probe's own timed I/O."""
    log: Callable[[str], None] = field(default=tqdm.write, repr=False)
    _rows: dict[str, list[Row]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.model_path is None and self.checkpoint is None:
            model_lib.get_preset(self.preset)
        elif self.model_path is not None:
            self.preset = f"local:{Path(self.model_path).name}"
        if self.repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {self.repeats}")
        self.store = ResultsStore(self.out, self.results_file)

    def prepare(self) -> model_lib.ModelCheckpoint:
        """Build (or load) the model, clean stale partial saves, measure the limits, record the environment."""
        started = time.perf_counter()
        if self.checkpoint is None:
            if self.model_path is None:
                self.checkpoint = model_lib.build(self.preset, self.seed)
            else:
                self.checkpoint = model_lib.load_local(self.model_path)
        self.out.mkdir(parents=True, exist_ok=True)
        for stale in disk.clean_stale(self.out):
            self.log(f"removed the leftovers of an interrupted save: {stale}")
        if self.limits is None:
            size = min(max(self.checkpoint.nbytes, _PROBE_MIN), _PROBE_MAX)
            self.limits = limits_lib.probe(self.out, size)
        self.prepare_s += time.perf_counter() - started
        if not self.store.environment_path(self.run_id).exists():
            self.store.write_environment(self.run_id, self.environment())
        return self.checkpoint

    def environment(self) -> dict:
        checkpoint = self.checkpoint
        return {
            "run_id": self.run_id,
            "preset": self.preset,
            "model": None if checkpoint is None else checkpoint.source,
            "tensors": None if checkpoint is None else len(checkpoint.tensors),
            "params": None if checkpoint is None else checkpoint.params,
            "model_bytes": None if checkpoint is None else checkpoint.nbytes,
            "repeats": self.repeats,
            "limits": None if self.limits is None else asdict(self.limits),
            "prepare_s": self.prepare_s,
            **environment.collect(self.out),
        }

    def _bar(self, description: str, total: int) -> tqdm:
        return tqdm(total=total, desc=description, unit="B", unit_scale=True, leave=False, disable=not self.progress)

    def _timed_save(self, strategy: Strategy, tensors: Tensors, final: Path, label: str) -> Measurement:
        disk.ensure_free(self.out, strategy.estimate_bytes(tensors))
        with (
            self._bar(f"{label} save", total_bytes(tensors)) as bar,
            measure() as timing,
            disk.staged(final) as partial,
        ):
            strategy.save(tensors, partial, bar.update)
        return timing

    def _timed_load(self, strategy: Strategy, tensors: Tensors, final: Path, label: str) -> tuple[Measurement, Tensors]:
        with self._bar(f"{label} load", total_bytes(tensors)) as bar, measure() as timing:
            loaded = strategy.load(final, bar.update)
        return timing, loaded

    def _verified(self, strategy: Strategy, loaded: Tensors, tensors: Tensors, final: Path) -> bool:
        try:
            verify(loaded, tensors, f"{strategy.name} checkpoint {final}")
        except VerificationError as err:
            self.log(f"VERIFICATION FAILED: {err}")
            return False
        return True

    def _warm_up(self, strategy: Strategy, tensors: Tensors) -> None:
        final = self.out / f".warmup-{strategy.name}"
        disk.remove(final)
        subset = _warmup_subset(tensors)
        try:
            self._timed_save(strategy, subset, final, f"{strategy.name} warm-up")
            self._timed_load(strategy, subset, final, f"{strategy.name} warm-up")
        finally:
            disk.remove(final)

    def _repeat(self, strategy: Strategy, repeat: int, started: float) -> Row:
        checkpoint = self.checkpoint
        tensors = checkpoint.tensors
        final = self.out / strategy.name
        label = f"{strategy.name} [{repeat + 1}/{self.repeats}]"
        keep = self.keep_checkpoints and repeat == self.repeats - 1
        try:
            saved = self._timed_save(strategy, tensors, final, label)
            usage = disk.evict(final)
            cold, loaded = self._timed_load(strategy, tensors, final, f"{label} cold")
            cold_ok = self._verified(strategy, loaded, tensors, final)
            del loaded
            warm, loaded = self._timed_load(strategy, tensors, final, f"{label} warm")
            # Nothing is timed now: delete the checkpoint while the CPU compares the last load.
            # A deletion that failed there is retried, and raises, below.
            with ThreadPoolExecutor(1) as pool:
                if not keep:
                    pool.submit(disk.remove, final)
                warm_ok = self._verified(strategy, loaded, tensors, final)
                del loaded
        finally:
            if not keep:
                disk.remove(final)
        return Row(
            run_id=self.run_id,
            timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            preset=self.preset,
            strategy=strategy.name,
            repeat=repeat,
            tensors=len(tensors),
            params=checkpoint.params,
            model_bytes=checkpoint.nbytes,
            save_s=saved.seconds,
            load_cold_s=cold.seconds,
            load_warm_s=warm.seconds,
            bytes=usage.bytes,
            bytes_allocated=usage.bytes_allocated,
            files=usage.files,
            peak_rss_save=saved.peak_rss,
            peak_rss_load=max(cold.peak_rss, warm.peak_rss),
            verified=cold_ok and warm_ok,
            disk_write_gbps=self.limits.write_gbps,
            disk_read_gbps=self.limits.read_gbps,
            overhead_s=time.perf_counter() - started - saved.seconds - cold.seconds - warm.seconds,
            cpu_save_s=saved.cpu_s,
            cpu_load_cold_s=cold.cpu_s,
            cpu_load_warm_s=warm.cpu_s,
        )

    def run_phase(self, strategy: str | Strategy) -> pd.DataFrame:
        """Measure one strategy ``repeats`` times; raise after recording if any load did not verify.

        ``strategy`` is a registry name or any ``Strategy`` (a sweep's ad-hoc configurations).
        """
        strategy = get_strategy(strategy) if isinstance(strategy, str) else strategy
        name = strategy.name
        checkpoint = self.prepare()
        started = time.perf_counter()
        if (self.out / name).exists():
            self.log(f"replacing the checkpoint kept by an earlier run: {self.out / name}")
            disk.remove(self.out / name)
        if self.warmup:
            self._warm_up(strategy, checkpoint.tensors)
        rows = []
        for repeat in range(self.repeats):
            row = self._repeat(strategy, repeat, started)
            started = time.perf_counter()
            rows.append(row)
            self.store.append([row])
            self.log(
                f"{name} [{repeat + 1}/{self.repeats}]: save {row.save_s:.2f} s, cold load {row.load_cold_s:.2f} s, "
                f"warm load {row.load_warm_s:.2f} s, {row.bytes / 1e9:.3f} GB in {row.files} files, "
                f"{'verified' if row.verified else 'NOT VERIFIED'}"
            )
        self._rows[name] = rows
        if not all(r.verified for r in rows):
            raise VerificationError(f"{name}: a load did not match what was saved (rows recorded in {self.store.csv})")
        return frame(rows)

    def run(self, names: Iterable[str]) -> pd.DataFrame:
        for name in names:
            self.run_phase(name)
        return self.results

    def run_each(self, strategies: Iterable[str | Strategy]) -> list[str]:
        """Every phase in turn, recording (not stopping at) one that fails verification; the names of those."""
        failed = []
        for strategy in strategies:
            try:
                self.run_phase(strategy)
            except VerificationError as err:
                failed.append(strategy if isinstance(strategy, str) else strategy.name)
                self.log(f"error: {err}")
        return failed

    @property
    def results(self) -> pd.DataFrame:
        """This session's rows, one phase's latest measurements per strategy, in registry order."""
        ordered = [name for name in STRATEGIES if name in self._rows]
        ordered += [name for name in self._rows if name not in STRATEGIES]
        return frame(row for name in ordered for row in self._rows[name])

    def summary(self) -> pd.DataFrame:
        return summarize(self.results, order=list(STRATEGIES))
