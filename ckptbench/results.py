"""The results store: one CSV row per strategy x repeat, appended across runs, never clobbered or lost.

Each row carries its strategy's configuration as JSON (``config``) and the schema it was written
with, so a row says what it measured without its name being parsed. Appends are single
``O_APPEND`` writes under a lock; reading skips (and names) a damaged line rather than failing on
it; a file that cannot be appended to safely is kept aside under a dated name before anything is
measured.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import itertools
import json
import math
import os
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import ResultsFileError
from .strategies import STRATEGIES

SCHEMA_VERSION = 2


@dataclass(frozen=True)
class Row:
    """One repeat of one strategy; a failed repeat keeps its identity, ``error`` and no measurements."""

    run_id: str
    timestamp: str
    preset: str
    strategy: str
    config: str
    """The strategy's configuration (``Strategy.config()``) as JSON."""
    repeat: int
    tensors: int
    params: int
    model_bytes: int
    save_s: float | None = None
    """From the call until the checkpoint is durable."""
    save_blocking_s: float | None = None
    """From the call until control returns to the caller; equals ``save_s`` for a synchronous save."""
    load_cold_s: float | None = None
    load_warm_s: float | None = None
    bytes: int | None = None
    bytes_allocated: int | None = None
    files: int | None = None
    peak_rss_save: int | None = None
    peak_rss_load: int | None = None
    verified: bool = False
    error: str = ""
    """Why the repeat failed (one line); empty when it ran to the end."""
    disk_write_gbps: float | None = None
    """The disk's durable-write ceiling (the best over 1-64 streams) in this run; ``disk_read_gbps``: cold read."""
    disk_read_gbps: float | None = None
    drift_write_gbps: float | None = None
    """The drift probe taken just before this repeat: how fast the disk was at the time."""
    drift_read_gbps: float | None = None
    overhead_s: float | None = None
    """Harness time around this repeat's timed regions: eviction, accounting, verification, deletion, warm-up."""
    cpu_save_s: float | None = None
    """CPU seconds (user + system, all threads) inside the timed save; likewise for the loads."""
    cpu_load_cold_s: float | None = None
    cpu_load_warm_s: float | None = None
    warmup_s: float | None = None
    """The untimed parts of ``overhead_s``: the warm-up (first repeat only), eviction and size accounting,
    both verifications, and waiting for the deletion that overlaps the last one."""
    evict_s: float | None = None
    verify_s: float | None = None
    cleanup_s: float | None = None
    schema_version: int = SCHEMA_VERSION
    disk_files_per_s: float | None = None
    """The disk's small-file create + write + fsync rate (the limit a checkpoint's file count pays for)."""
    fresh_copy_gbps: float | None = None
    """The rate of copying into fresh memory, page faults included (what a fresh load pays for its bytes)."""
    store: str = "file"
    """Where the checkpoints were written: ``file`` (the output folder) or the ``s3://bucket/prefix`` measured."""
    objects: int | None = None
    """Objects the store lists for the checkpoint after its save (S3 only: the server's own view)."""
    requests_put: int | None = None
    """HTTP requests of the save and the cold load (S3 only), as TensorStore's metrics and botocore's events
    counted them: PUT (with POST, which starts and completes a multipart upload), GET (with listings), HEAD,
    DELETE."""
    requests_get: int | None = None
    requests_head: int | None = None
    requests_delete: int | None = None
    requests_save: int | None = None
    """Of those requests, the save's (every method); the rest were the cold load's."""
    bytes_sent: int | None = None
    """Object bytes the save and the cold load uploaded (request bodies); ``bytes_received``: downloaded."""
    bytes_received: int | None = None
    injected_rtt_ms: float | None = None
    """Round-trip time the delay proxy added in front of the S3 endpoint (0: through the proxy, no delay: its own
    cost); empty when there was no proxy."""
    load_into: str = "fresh"
    """Where loads read to: ``fresh`` tensors, or the ``existing`` tensors of a live model."""
    ranks: int | None = None
    """Processes that saved, each holding its row shard of every tensor; empty for a run in one process.

    With ranks, times run from a barrier before the first write (or read) until every rank is done,
    ``peak_rss_*`` are the largest rank's and ``cpu_*`` the sum over ranks."""
    load_ranks: int | None = None
    """Processes that loaded; a number other than ``ranks`` is a reshard."""
    rank_times: str = ""
    """Each rank's own seconds as JSON (``save_s``, ``load_cold_s``, ``load_warm_s``: one list each): stragglers."""
    peak_rss_save_sum: int | None = None
    """Peak resident memory above the start, summed over the ranks (each rank's own peak)."""
    peak_rss_load_sum: int | None = None
    payload: str = "weights"
    """What was saved: the model's ``weights``, or a ``training`` job's whole state (its loads also resumed)."""
    disk_profile: str = "none"
    """The cloud volume emulated with the kernel's I/O throttle (``profiles``); ``none``: the raw disk."""
    disk_caps: str = ""
    """Its caps as ``--disk-limit`` takes them (bytes/s and operations/s); the ``disk_*`` limits were measured
    under them."""
    disk_read_iops: float | None = None
    """Random 16 KiB cold reads per second under an operation cap: a load pays one per file at least."""


COLUMNS: list[str] = [f.name for f in fields(Row)]
TIMES = ("save_s", "load_cold_s", "load_warm_s")
_TEXT = {
    "run_id", "timestamp", "preset", "strategy", "config", "error", "store", "load_into", "rank_times", "disk_profile",
    "disk_caps", "payload",
}  # fmt: skip
_BOOL = {"verified"}
_NUMERIC = [c for c in COLUMNS if c not in _TEXT | _BOOL]
_V1_CORE = [
    "run_id", "timestamp", "preset", "strategy", "repeat", "tensors", "params", "model_bytes", "save_s",
    "load_cold_s", "load_warm_s", "bytes", "bytes_allocated", "files", "peak_rss_save", "peak_rss_load",
    "verified", "disk_write_gbps", "disk_read_gbps",
]  # fmt: skip
_V1_ADDED = ["overhead_s", "cpu_save_s", "cpu_load_cold_s", "cpu_load_warm_s"]
"""Schema 1 (before configs were stored): its core columns, then columns added to it over time."""


def config_json(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


def frame(rows: Iterable[Row]) -> pd.DataFrame:
    return pd.DataFrame([asdict(r) for r in rows], columns=COLUMNS)


def _is_schema_2(header: list[str]) -> bool:
    """Today's columns, or an earlier schema-2 file's: today's up to a column added since."""
    return "schema_version" in header and header == COLUMNS[: len(header)]


def _is_schema_1(header: list[str]) -> bool:
    return header[: len(_V1_CORE)] == _V1_CORE and header[len(_V1_CORE) :] == _V1_ADDED[: len(header) - len(_V1_CORE)]


def _cell(column: str, text: str) -> Any:
    if text == "":
        return None
    if column in _BOOL:
        if text not in ("True", "False"):
            raise ValueError(f"{column}={text!r} is not True or False")
        return text == "True"
    if column in _TEXT:
        return text
    value = float(text)  # raises ValueError for a non-numeric cell
    if not math.isfinite(value):
        raise ValueError(f"{column}={text!r} is not a finite number")
    return value


def read_results(path: str | Path) -> pd.DataFrame:
    """Every readable row of a results file (schema 1 or 2) in today's columns; damaged lines skipped and named.

    Columns added since a file was written read as missing.

    Schema-1 rows get their ``config`` from the registry when their strategy is known.
    """
    path = Path(path)
    if path.is_dir():
        raise ResultsFileError(f"results file {path} is a folder, not a file (give the CSV inside it)")
    if not path.is_file():
        raise ResultsFileError(f"results file {path} does not exist (write one with `python -m ckptbench run`)")
    lines = path.read_bytes().splitlines()
    if not lines or not lines[0].strip():
        return frame([])
    try:
        header = next(csv.reader([lines[0].decode("utf-8")]))
    except (UnicodeDecodeError, csv.Error, StopIteration) as err:
        raise ResultsFileError(f"{path} is not a ckptbench results file (unreadable header: {err})") from None
    if not _is_schema_2(header) and not _is_schema_1(header):
        raise ResultsFileError(f"{path} is not a ckptbench results file (its columns differ)")
    records, skipped = [], []
    for number, raw in enumerate(lines[1:], start=2):
        if not raw.strip():
            continue
        try:
            (cells,) = csv.reader([raw.decode("utf-8")])
            if len(cells) != len(header):
                raise ValueError(f"{len(cells)} fields, the header has {len(header)}")
            records.append({column: _cell(column, text) for column, text in zip(header, cells, strict=True)})
        except (UnicodeDecodeError, ValueError, csv.Error) as err:
            skipped.append(f"line {number} ({err})")
    if skipped:
        warnings.warn(f"{path}: skipped {len(skipped)} damaged row(s): {'; '.join(skipped[:5])}", stacklevel=2)
    results = pd.DataFrame.from_records(records, columns=header).reindex(columns=COLUMNS)
    if _is_schema_1(header):
        results["schema_version"] = 1
        results["config"] = [
            config_json(STRATEGIES[name].config()) if name in STRATEGIES else None for name in results["strategy"]
        ]
        results["error"] = ""
    results[_NUMERIC] = results[_NUMERIC].apply(pd.to_numeric)
    results["verified"] = results["verified"].fillna(False).astype(bool)
    results["error"] = results["error"].fillna("")
    results["store"] = [store if isinstance(store, str) and store else "file" for store in results["store"]]
    results["load_into"] = results["load_into"].astype(object).fillna("fresh")
    results["rank_times"] = results["rank_times"].astype(object).fillna("")
    results["payload"] = results["payload"].astype(object).fillna("weights")
    results["disk_profile"] = results["disk_profile"].astype(object).fillna("none")
    results["disk_caps"] = results["disk_caps"].astype(object).fillna("")
    return results


def configs(results: pd.DataFrame) -> pd.DataFrame:
    """Each row's configuration as columns (one per key of its ``config`` JSON), aligned with ``results``."""
    parsed = [json.loads(c) if isinstance(c, str) and c else {} for c in results["config"]]
    return pd.DataFrame(parsed, index=results.index)


def _dated(path: Path, label: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return next(
        candidate
        for n in itertools.count()
        if not (candidate := path.with_name(f"{path.stem}.{stamp}{f'-{n}' if n else ''}.{label}{path.suffix}")).exists()
    )


class ResultsStore:
    """``results.csv`` plus one environment JSON per run, in the output folder."""

    def __init__(self, directory: Path, filename: str = "results.csv") -> None:
        self.directory = Path(directory)
        self.csv = self.directory / filename
        self.runs = self.directory / "runs"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise writers, across processes, for the check-then-append of one batch of rows.

        The lock is on the folder itself, which stays put while the file may be set aside and restarted.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _set_aside(self, label: str, reason: str) -> Path:
        kept = _dated(self.csv, label)
        self.csv.rename(kept)
        warnings.warn(f"{self.csv} {reason}; kept it as {kept.name} and started a new one", stacklevel=4)
        return kept

    def _prepare_for_append(self) -> tuple[bool, Path | None]:
        """Whether a header is needed, and where a file that could not be appended to was kept."""
        if not self.csv.exists() or self.csv.stat().st_size == 0:
            return True, None
        data = self.csv.read_bytes()
        first = data.split(b"\n", 1)[0]
        try:
            header = next(csv.reader([first.decode("utf-8")]))
            data.decode("utf-8")
        except (UnicodeDecodeError, csv.Error, StopIteration):
            return True, self._set_aside("unreadable", "is not a UTF-8 results file")
        if header != COLUMNS:
            return True, self._set_aside("other-schema", "has another schema")
        if not data.endswith(b"\n"):
            # The last line was cut short (a killed writer): end it so the next row is not glued onto it.
            with open(self.csv, "ab") as f:
                f.write(b"\n")
        return False, None

    def check(self) -> Path | None:
        """Make the file safe to append to before anything is measured; where a bad file was kept, if one was."""
        with self._locked():
            return self._prepare_for_append()[1]

    def append(self, rows: Sequence[Row]) -> None:
        with self._locked():
            header, _ = self._prepare_for_append()
            buffer = io.StringIO()
            writer = csv.writer(buffer, lineterminator="\n")
            if header:
                writer.writerow(COLUMNS)
            for row in rows:
                writer.writerow(["" if _missing(v) else v for v in asdict(row).values()])
            fd = os.open(self.csv, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, buffer.getvalue().encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)

    def read(self) -> pd.DataFrame:
        if not self.csv.exists() or self.csv.stat().st_size == 0:
            return frame([])
        return read_results(self.csv)

    def environment_path(self, run_id: str) -> Path:
        return self.runs / f"{run_id}.json"

    def write_environment(self, run_id: str, environment: dict) -> Path:
        self.runs.mkdir(parents=True, exist_ok=True)
        path = self.environment_path(run_id)
        partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
        partial.write_text(json.dumps(environment, indent=2, default=str))
        os.replace(partial, path)
        return path


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def succeeded(results: pd.DataFrame) -> pd.DataFrame:
    """The rows that ran to the end (verified or not), whose timings mean something."""
    return results[results["error"].fillna("") == ""]


DRIFT_FLAG = 0.25
"""The least distance of a repeat's drift probe from the run's median probe that can flag it."""
DRIFT_MADS = 3.0
"""How many of the run's own median absolute deviations a flagged probe must also lie beyond: a disk that
moves this much all run long is the run's spread (which the intervals carry), not a row's anomaly."""


def drift_from_median(results: pd.DataFrame) -> pd.Series:
    """Each row's largest relative distance of its drift probes (write, read) from the run's median probe."""
    distances = [
        (results[column] / results[column].median() - 1).abs()
        for column in ("drift_write_gbps", "drift_read_gbps")
        if column in results and results[column].notna().any()
    ]
    if not distances:
        return pd.Series(float("nan"), index=results.index)
    return pd.concat(distances, axis=1).max(axis=1)


def drift_stands_out(results: pd.DataFrame) -> pd.Series:
    """Rows measured while the disk stood out from the run's own spread: their drift probe is further from
    the run median than ``DRIFT_FLAG`` and than ``DRIFT_MADS`` scaled median absolute deviations."""
    distance = drift_from_median(results)
    spread = 1.4826 * distance.median()
    return distance > max(DRIFT_FLAG, DRIFT_MADS * spread) if distance.notna().any() else distance.notna()


def summarize(results: pd.DataFrame, order: Sequence[str] | None = None) -> pd.DataFrame:
    """Median, min and max of each timing per strategy over its completed repeats, with sizes and memory.

    A strategy whose every repeat failed keeps a line: no timings, ``verified`` False and its ``error``.
    """
    grouped = results.groupby("strategy", sort=False)
    done = succeeded(results).groupby("strategy", sort=False)
    summary = pd.DataFrame({"repeats": done.size()}).reindex(grouped.size().index).fillna(0).astype(int)
    for column in (*TIMES, "save_blocking_s"):
        stats = done[column].agg(["median", "min", "max"]).reindex(summary.index)
        summary[[f"{column}_{s}" for s in stats.columns]] = stats
    for column in ("tensors", "bytes", "bytes_allocated", "files", "peak_rss_save", "peak_rss_load"):
        summary[column] = done[column].max().reindex(summary.index)
    summary["verified"] = grouped["verified"].all() & (summary["repeats"] > 0)
    summary["drift_max"] = drift_from_median(results).groupby(results["strategy"], sort=False).max()
    summary["drift_flagged"] = drift_stands_out(results).groupby(results["strategy"], sort=False).any()
    summary["error"] = grouped["error"].agg(lambda errors: next((e for e in errors if e), ""))
    model_bytes = grouped["model_bytes"].max()
    summary["save_gbps"] = model_bytes / summary["save_s_median"] / 1e9
    summary["load_cold_gbps"] = model_bytes / summary["load_cold_s_median"] / 1e9
    if order is not None:
        summary = summary.reindex(
            [s for s in order if s in summary.index] + [s for s in summary.index if s not in order]
        )
    return summary
