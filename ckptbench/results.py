"""The results store: one CSV row per strategy x repeat, appended across runs, never clobbered."""

from __future__ import annotations

import itertools
import json
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pandas as pd


@dataclass(frozen=True)
class Row:
    run_id: str
    timestamp: str
    preset: str
    strategy: str
    repeat: int
    tensors: int
    params: int
    model_bytes: int
    save_s: float
    load_cold_s: float
    load_warm_s: float
    bytes: int
    bytes_allocated: int
    files: int
    peak_rss_save: int
    peak_rss_load: int
    verified: bool
    disk_write_gbps: float
    disk_read_gbps: float
    overhead_s: float
    """Harness time around this repeat's timed regions: eviction, accounting, verification, deletion, warm-up."""
    cpu_save_s: float
    """CPU seconds (user + system, all threads) inside the timed save; likewise for the loads."""
    cpu_load_cold_s: float
    cpu_load_warm_s: float


COLUMNS: list[str] = [f.name for f in fields(Row)]
ADDED_COLUMNS = ("overhead_s", "cpu_save_s", "cpu_load_cold_s", "cpu_load_warm_s")
"""Columns later versions added; a file from an older run lacks them and still reads (as NaN)."""
TIMES = ("save_s", "load_cold_s", "load_warm_s")


def frame(rows: Iterable[Row]) -> pd.DataFrame:
    return pd.DataFrame([asdict(r) for r in rows], columns=COLUMNS)


class ResultsStore:
    """``results.csv`` plus one environment JSON per run, in the output folder."""

    def __init__(self, directory: Path, filename: str = "results.csv") -> None:
        self.directory = Path(directory)
        self.csv = self.directory / filename
        self.runs = self.directory / "runs"

    def _set_aside_other_schema(self) -> Path | None:
        """A file written with other columns is renamed, kept whole, and a fresh one started."""
        if not self.csv.exists() or self.csv.stat().st_size == 0:
            return None
        header = pd.read_csv(self.csv, nrows=0).columns.tolist()
        if header == COLUMNS:
            return None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        kept = next(
            path
            for n in itertools.count()
            if not (
                path := self.csv.with_name(f"{self.csv.stem}.{stamp}{f'-{n}' if n else ''}.other-schema.csv")
            ).exists()
        )
        self.csv.rename(kept)
        warnings.warn(f"{self.csv} has another schema; kept it as {kept.name} and started a new one", stacklevel=3)
        return kept

    def append(self, rows: Sequence[Row]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._set_aside_other_schema()
        fresh = not self.csv.exists() or self.csv.stat().st_size == 0
        frame(rows).to_csv(self.csv, mode="a", header=fresh, index=False)

    def read(self) -> pd.DataFrame:
        if not self.csv.exists() or self.csv.stat().st_size == 0:
            return frame([])
        return pd.read_csv(self.csv)

    def environment_path(self, run_id: str) -> Path:
        return self.runs / f"{run_id}.json"

    def write_environment(self, run_id: str, environment: dict) -> Path:
        self.runs.mkdir(parents=True, exist_ok=True)
        path = self.environment_path(run_id)
        path.write_text(json.dumps(environment, indent=2, default=str))
        return path


def summarize(results: pd.DataFrame, order: Sequence[str] | None = None) -> pd.DataFrame:
    """Median, min and max of each timing per strategy, with sizes, memory and throughput."""
    grouped = results.groupby("strategy", sort=False)
    summary = pd.DataFrame({"repeats": grouped.size()})
    for column in TIMES:
        stats = grouped[column].agg(["median", "min", "max"])
        summary[[f"{column}_{s}" for s in stats.columns]] = stats
    for column in ("tensors", "bytes", "bytes_allocated", "files", "peak_rss_save", "peak_rss_load"):
        summary[column] = grouped[column].max()
    summary["verified"] = grouped["verified"].all()
    model_bytes = grouped["model_bytes"].max()
    summary["save_gbps"] = model_bytes / summary["save_s_median"] / 1e9
    summary["load_cold_gbps"] = model_bytes / summary["load_cold_s_median"] / 1e9
    if order is not None:
        summary = summary.reindex(
            [s for s in order if s in summary.index] + [s for s in summary.index if s not in order]
        )
    return summary
