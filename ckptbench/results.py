"""The results file: one CSV row per strategy x repeat, appended across runs, never clobbered or lost.

Each row carries its strategy's configuration as JSON (``config``), and so do the columns of one
feature (``s3``, ``ranked``, ``rusage``), spread into columns when read; every row says the
schema it was written with. ``row`` is the one place a cycle's ``Measured`` record becomes a row:
a new measured value is a field in ``measure`` and a line here. Appends are single ``O_APPEND``
writes under a lock; a file of an earlier schema is rewritten once under today's header, its rows
kept; reading skips (and names) a damaged line rather than failing on it; a file that is no results
file is kept aside under a dated name before anything is measured.
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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import ResultsFileError
from .measure import COUNTERS, Measurement
from .objectstore import Requests
from .strategies import STRATEGIES

SCHEMA_VERSION = 3


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
    """The untimed parts of ``overhead_s``: the warm-up (first repeat of each process), eviction and size accounting,
    both verifications, and waiting for the deletion that overlaps the last one."""
    evict_s: float | None = None
    verify_s: float | None = None
    cleanup_s: float | None = None
    worker_s: float | None = None
    """Starting the fresh worker process that measured this repeat's round (spawn, imports, mapping the shared
    model), on the round's first row; part of ``overhead_s``. Empty when the run measured in one process."""
    schema_version: int = SCHEMA_VERSION
    disk_files_per_s: float | None = None
    """The disk's small-file create + write + fsync rate (the limit a checkpoint's file count pays for)."""
    fresh_copy_gbps: float | None = None
    """The rate of copying into fresh memory, page faults included (what a fresh load pays for its bytes)."""
    store: str = "file"
    """Where the checkpoints were written: ``file`` (the output folder) or the ``s3://bucket/prefix`` measured."""
    load_into: str = "fresh"
    """Where loads read to: ``fresh`` tensors, or the ``existing`` tensors of a live model."""
    payload: str = "weights"
    """What was saved: the model's ``weights``, or a ``training`` job's whole state (its loads also resumed)."""
    disk_profile: str = "none"
    """The cloud volume emulated with the kernel's I/O throttle (``profiles``); ``none``: the raw disk."""
    disk_caps: str = ""
    """Its caps as ``--disk-limit`` takes them (bytes/s and operations/s); the ``disk_*`` limits were measured
    under them."""
    disk_read_iops: float | None = None
    """Random 16 KiB cold reads per second under an operation cap: a load pays one per file at least."""
    s3: str = ""
    """Object stores only, as JSON: ``objects`` the store lists after the save; the HTTP requests of the save and
    the cold load (``requests_put`` with POSTs, ``requests_get`` with listings, ``requests_head``,
    ``requests_delete``; ``requests_save`` the save's share), the object bytes they moved (``bytes_sent``,
    ``bytes_received``), and ``injected_rtt_ms``, the round trip a delay proxy added (0: the proxy's own cost)."""
    ranked: str = ""
    """Runs with ranks only, as JSON: ``ranks`` saved and ``load_ranks`` loaded (another number is a reshard);
    ``rank_times``, each rank's own seconds per timed region; ``peak_rss_save_sum`` and ``peak_rss_load_sum``,
    each rank's peak summed; on an object store ``rank_requests``, each rank's requests in the save and the cold
    load, and ``rank_bytes``, the object bytes each sent in the save and received in the cold load (the ``s3``
    columns sum them). Times then run from a barrier until every rank is done, ``peak_rss_*`` are the largest
    rank's and ``cpu_*`` (like ``rusage``) the sum over ranks."""
    rusage: str = ""
    """What each timed region cost the kernel, as JSON (getrusage, all threads; summed over ranks): page faults
    (``minor_faults_*`` served from memory, ``major_faults_*`` from the disk) and context switches
    (``voluntary_switches_*`` to wait, ``involuntary_switches_*`` preempted), for ``save``, ``load_cold``,
    ``load_warm``; and the machine around them: ``others_cpu_*``, CPU seconds other processes took meanwhile,
    and ``steal_*``, CPU seconds the hypervisor took (both from the whole machine's counters)."""


REGIONS = ("save", "load_cold", "load_warm")
"""The timed regions of a cycle, as the columns name them."""
MACHINE = ("others_cpu", "steal")
"""What the rest of the machine did during each timed region, as the columns name it."""
GROUPED: dict[str, tuple[str, ...]] = {
    "s3": (
        "objects", "requests_put", "requests_get", "requests_head", "requests_delete", "requests_save",
        "bytes_sent", "bytes_received", "injected_rtt_ms",
    ),
    "ranked": (
        "ranks", "load_ranks", "rank_times", "peak_rss_save_sum", "peak_rss_load_sum", "rank_requests", "rank_bytes",
    ),
    "rusage": tuple(f"{counter}_{region}" for region in REGIONS for counter in (*COUNTERS, *MACHINE)),
}  # fmt: skip
"""The JSON fields of a row and the columns each holds: one feature's columns, empty in rows without it."""
HEADER: list[str] = [f.name for f in fields(Row)]
"""A results file's columns, as written."""
COLUMNS: list[str] = [column for name in HEADER for column in GROUPED.get(name, (name,))]
"""The columns rows are read into: the header with each JSON field spread into its own columns."""
TIMES = ("save_s", "load_cold_s", "load_warm_s")
_TEXT = {
    "run_id", "timestamp", "preset", "strategy", "config", "error", "store", "load_into", "rank_times", "disk_profile",
    "rank_requests", "rank_bytes",
    "disk_caps", "payload",
}  # fmt: skip
_BOOL = {"verified"}
_NUMERIC = [c for c in COLUMNS if c not in _TEXT | _BOOL]
_IDENTITY = {"run_id", "timestamp", "preset", "strategy", "repeat"}
_KNOWN = set(HEADER) | set(COLUMNS)
"""Every column a readable file may have: today's, and the spread ones earlier schemas wrote flat."""


@dataclass(frozen=True)
class Measured:
    """What one cycle measured, on every rank that took part (one, without ranks); what becomes a row."""

    save: list[Measurement]
    """The save on each saving rank: until the checkpoint is durable (on S3: acknowledged)."""
    cold: list[Measurement]
    """The loads on each loading rank, after eviction and again warm."""
    warm: list[Measurement]
    bytes: int
    bytes_allocated: int
    files: int
    verified: bool
    """Every load on every rank bit for bit what was saved."""
    save_blocking_s: float | None = None
    """An async save: until the strategy returned (its stall)."""
    requests: tuple[Requests, Requests] | None = None
    """On an object store: the save's requests and the cold load's."""
    rank_times: dict[str, list[float]] | None = None
    """With ranks: each rank's own seconds per timed region, until its own part was done."""
    rank_requests: dict[str, list[Requests]] | None = None
    """With ranks on an object store: each rank's requests in the ``save`` and the ``load_cold``."""
    untimed: dict[str, float] = field(default_factory=dict)
    """Seconds of the harness's work around the timed regions, by ``Row`` column (``evict_s``, ``overhead_s``...)."""
    drift_write_gbps: float | None = None
    drift_read_gbps: float | None = None


def row(identity: dict[str, Any], measured: Measured | None = None, error: str = "") -> Row:
    """The one way a row is made: its identity (who, what, where), then what a cycle measured, or why it failed.

    Columns are named as read (``requests_put``, ``ranks``), whichever JSON field holds them."""
    values = dict(identity)
    if error:
        values["error"] = error
    if measured is not None:
        values |= _measured_columns(measured)
    grouped = {name: _packed({k: values.pop(k) for k in keys if k in values}) for name, keys in GROUPED.items()}
    return Row(**values, **grouped)


def _measured_columns(m: Measured) -> dict[str, Any]:
    """A cycle's record as columns: times are the slowest rank's, memory the largest rank's, CPU and rusage sums."""
    regions = dict(zip(REGIONS, (m.save, m.cold, m.warm), strict=True))
    save_s = max(t.seconds for t in m.save)
    loads_rss = [max(c.peak_rss, w.peak_rss) for c, w in zip(m.cold, m.warm, strict=True)]
    columns: dict[str, Any] = {
        "save_s": save_s,
        "save_blocking_s": save_s if m.save_blocking_s is None else min(m.save_blocking_s, save_s),
        "load_cold_s": max(t.seconds for t in m.cold),
        "load_warm_s": max(t.seconds for t in m.warm),
        "bytes": m.bytes,
        "bytes_allocated": m.bytes_allocated,
        "files": m.files,
        "peak_rss_save": max(t.peak_rss for t in m.save),
        "peak_rss_load": max(loads_rss),
        "verified": m.verified,
        "drift_write_gbps": m.drift_write_gbps,
        "drift_read_gbps": m.drift_read_gbps,
        **{f"cpu_{region}_s": sum(t.cpu_s for t in each) for region, each in regions.items()},
        **m.untimed,
        **{
            f"{counter}_{region}": sum(getattr(t, counter) for t in each)
            for region, each in regions.items()
            for counter in COUNTERS
            if all(getattr(t, counter) is not None for t in each)
        },
        **{f"{name}_{region}": value for region, each in regions.items() for name, value in _machine(each).items()},
    }
    if m.rank_times is not None:
        columns |= {
            "rank_times": {region: [round(s, 4) for s in times] for region, times in m.rank_times.items()},
            "peak_rss_save_sum": sum(t.peak_rss for t in m.save),
            "peak_rss_load_sum": sum(loads_rss),
        }
    if m.rank_requests is not None:
        columns |= {
            "rank_requests": {region: [r.total for r in each] for region, each in m.rank_requests.items()},
            "rank_bytes": {
                "save": [r.bytes_sent for r in m.rank_requests["save"]],
                "load_cold": [r.bytes_received for r in m.rank_requests["load_cold"]],
            },
        }
    if m.requests is not None:
        save, load = m.requests
        both = save + load
        columns |= {
            "objects": m.files,
            "requests_put": both.put,
            "requests_get": both.get,
            "requests_head": both.head,
            "requests_delete": both.delete,
            "requests_save": save.total,
            "bytes_sent": both.bytes_sent,
            "bytes_received": both.bytes_received,
        }
    return columns


def _machine(each: list[Measurement]) -> dict[str, float]:
    """Other work during a region: the machine's busy CPU (the widest rank's view) less every rank's own."""
    if any(t.machine_cpu_s is None for t in each):
        return {}
    busy = max(t.machine_cpu_s for t in each)
    return {
        "others_cpu": max(0.0, busy - sum(t.cpu_s for t in each)),
        "steal": max(t.steal_s or 0.0 for t in each),
    }


def _packed(values: dict[str, Any]) -> str:
    kept = {k: v for k, v in values.items() if not _missing(v)}
    return json.dumps(kept, separators=(",", ":")) if kept else ""


def _spread(record: dict[str, Any]) -> dict[str, Any]:
    """A row's JSON fields spread into their columns (a nested value, such as ``rank_times``, stays JSON text)."""
    for name, keys in GROUPED.items():
        text = record.pop(name, None)
        if text is None:
            continue
        values = json.loads(text) if text else {}
        for key in keys:
            value = values.get(key)
            record[key] = json.dumps(value) if isinstance(value, dict | list) else value
    return record


def config_json(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


def frame(rows: Iterable[Row]) -> pd.DataFrame:
    return pd.DataFrame([_spread(asdict(r)) for r in rows], columns=COLUMNS)


def _readable(header: list[str]) -> bool:
    """A header of today's schema or an earlier one: known columns, each once, the identity among them."""
    return len(set(header)) == len(header) and _IDENTITY <= set(header) <= _KNOWN


def _cell(column: str, text: str) -> Any:
    if text == "":
        return None
    if column in _BOOL:
        if text not in ("True", "False"):
            raise ValueError(f"{column}={text!r} is not True or False")
        return text == "True"
    if column in _TEXT or column in GROUPED or column == "config":
        if column in GROUPED:
            json.loads(text)  # raises ValueError for damaged JSON
        return text
    value = float(text)  # raises ValueError for a non-numeric cell
    if not math.isfinite(value):
        raise ValueError(f"{column}={text!r} is not a finite number")
    return value


def _lines(path: Path) -> tuple[list[str], list[tuple[int, bytes]]]:
    """A results file's header and its non-blank lines (numbered from 2); raises when it is no results file."""
    lines = path.read_bytes().splitlines()
    if not lines or not lines[0].strip():
        return [], []
    try:
        header = next(csv.reader([lines[0].decode("utf-8")]))
    except (UnicodeDecodeError, csv.Error, StopIteration) as err:
        raise ResultsFileError(f"{path} is not a ckptbench results file (unreadable header: {err})") from None
    if not _readable(header):
        raise ResultsFileError(f"{path} is not a ckptbench results file (its columns differ)")
    return header, [(n, raw) for n, raw in enumerate(lines[1:], start=2) if raw.strip()]


def _fields(header: list[str], raw: bytes) -> dict[str, str]:
    (cells,) = csv.reader([raw.decode("utf-8")])
    if len(cells) != len(header):
        raise ValueError(f"{len(cells)} fields, the header has {len(header)}")
    return dict(zip(header, cells, strict=True))


def read_results(path: str | Path) -> pd.DataFrame:
    """Every readable row of a results file of any schema, in today's columns; damaged lines skipped and named.

    Columns added since a file was written read as missing. Rows from before configs were stored
    (schema 1) get their ``config`` from the registry when their strategy is known.
    """
    path = Path(path)
    if path.is_dir():
        raise ResultsFileError(f"results file {path} is a folder, not a file (give the CSV inside it)")
    if not path.is_file():
        raise ResultsFileError(f"results file {path} does not exist (write one with `python -m ckptbench run`)")
    header, lines = _lines(path)
    if not header:
        return frame([])
    records, skipped = [], []
    for number, raw in lines:
        try:
            records.append(_spread({c: _cell(c, text) for c, text in _fields(header, raw).items()}))
        except (UnicodeDecodeError, ValueError, csv.Error) as err:
            skipped.append(f"line {number} ({err})")
    if skipped:
        warnings.warn(f"{path}: skipped {len(skipped)} damaged row(s): {'; '.join(skipped[:5])}", stacklevel=2)
    results = pd.DataFrame.from_records(records, columns=COLUMNS)
    if "schema_version" not in header:
        results["schema_version"] = 1
    results["config"] = results["config"].astype(object)
    old = (results["schema_version"] == 1) & results["config"].isna()
    results.loc[old, "config"] = [
        config_json(STRATEGIES[name].config()) if name in STRATEGIES else None for name in results.loc[old, "strategy"]
    ]
    results[_NUMERIC] = results[_NUMERIC].apply(pd.to_numeric)
    results["verified"] = results["verified"].fillna(False).astype(bool)
    results["error"] = results["error"].astype(object).fillna("")
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


class ResultsFile:
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
        if header != HEADER:
            if not _readable(header):
                return True, self._set_aside("other-schema", "has another schema")
            self._upgrade()
            return False, None
        if not data.endswith(b"\n"):
            # The last line was cut short (a killed writer): end it so the next row is not glued onto it.
            with open(self.csv, "ab") as f:
                f.write(b"\n")
        return False, None

    def _upgrade(self) -> None:
        """Rewrite a file of an earlier schema under today's header, every row kept (new columns empty).

        Its flat feature columns go into their JSON fields; a damaged line stays as it was (reading
        skips and names it). The rewrite replaces the file in one rename, so it is never half done.
        """
        header, lines = _lines(self.csv)
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(HEADER)
        for _, raw in lines:
            try:
                old = _fields(header, raw)
                cells = _upgraded({"schema_version": "1", **old})
            except (UnicodeDecodeError, ValueError, csv.Error):
                buffer.write(raw.decode("utf-8", errors="replace") + "\n")
                continue
            writer.writerow(cells)
        partial = self.csv.with_name(f".{self.csv.name}.partial-{os.getpid()}")
        with open(partial, "w", encoding="utf-8") as f:
            f.write(buffer.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, self.csv)

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
                writer.writerow(HEADER)
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


def _upgraded(old: dict[str, str]) -> list[str]:
    """One row's cells of an earlier schema under today's header: flat feature columns packed into their fields."""
    cells = {column: old.get(column, "") for column in HEADER}
    for name, keys in GROUPED.items():
        if name not in old:
            cells[name] = _packed({key: _json_value(old.get(key, "")) for key in keys})
    return [cells[column] for column in HEADER]


def _json_value(text: str) -> Any:
    """A flat cell as its JSON value: a number, a nested JSON text (``rank_times``) as itself, empty as None."""
    if text == "":
        return None
    if text.lstrip().startswith(("{", "[")):
        return json.loads(text)
    number = float(text)
    return int(number) if number.is_integer() and "." not in text and "e" not in text.lower() else number


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
