"""The modelled floor: the least time a strategy's bytes and files can take at the limits measured in its run.

A save cannot write its bytes faster than the disk's multi-stream durable write, and pays the disk's
file-creation rate for every file; a cold load cannot read its bytes faster than the multi-stream cold
read, and copies the model's bytes into fresh memory, faulting in every page; under a disk profile
capping operations its reads also take one operation per file at least, and the slower of the two caps
(bandwidth, operations) holds them, for both apply at once. The sum is the floor. It
explains a gap to the disk limit rather than only showing it (the study's baseline writes 839,390
files), and the term, or the CPU, that accounts for most of a measured time names what bound it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from .results import succeeded

Op = Literal["save", "load"]
BOUND_AT = 0.5
"""A resource bound an operation when it alone accounts for at least this share of its time."""
PAGE = 4096
"""Bytes one minor fault maps (a base page; a huge-page fault maps more, so its cost is underestimated)."""
CPU, FAULTS = "CPU / page faults", "page faults"


def save_floor_s(nbytes: float, files: float, write_gbps: float, files_per_s: float) -> float:
    """Bytes at the durable-write ceiling plus files at the file-creation rate."""
    return nbytes / write_gbps / 1e9 + files / files_per_s


def load_floor_s(
    nbytes: float,
    model_bytes: float,
    read_gbps: float,
    fresh_copy_gbps: float,
    files: float = 0,
    read_iops: float | pd.Series | None = None,
) -> float:
    """Bytes at the cold-read ceiling, or (when the run measured an operation rate under a cap) one read
    operation per file at that rate if slower, plus the model's bytes copied into fresh memory."""
    return np.maximum(nbytes / read_gbps / 1e9, _file_reads_s(files, read_iops)) + model_bytes / fresh_copy_gbps / 1e9


def _file_reads_s(files: float | pd.Series, read_iops: float | pd.Series | None) -> float | pd.Series:
    """One read operation per file at the measured operation rate; 0 where none was measured (no cap)."""
    if isinstance(read_iops, pd.Series):
        return (files / read_iops).fillna(0)
    return 0.0 if read_iops is None or math.isnan(read_iops) else files / read_iops


def fault_s(minor_faults: float, fresh_copy_gbps: float) -> float:
    """Seconds ``minor_faults`` cost at the fresh-copy probe's rate: each maps a page copied into fresh memory."""
    return minor_faults * PAGE / fresh_copy_gbps / 1e9


def _per_strategy(results: pd.DataFrame) -> pd.DataFrame:
    """Each strategy's sizes (max), timings and the limits its rows carry (medians), from completed repeats."""
    done = (
        succeeded(results)
        .assign(**{c: math.nan for c in _FAULTS if c not in results.columns})
        .assign(
            cpu_save_share=lambda r: r["cpu_save_s"] / r["save_s"],
            cpu_load_share=lambda r: r["cpu_load_cold_s"] / r["load_cold_s"],
        )
    )
    grouped = done.groupby("strategy", sort=False)
    sizes = grouped[["bytes", "files", "model_bytes"]].max()
    medians = grouped[
        [
            "save_s",
            "load_cold_s",
            "load_warm_s",
            "cpu_save_share",
            "cpu_load_share",
            "disk_write_gbps",
            "disk_read_gbps",
            "disk_files_per_s",
            "fresh_copy_gbps",
            "disk_read_iops",
            *_FAULTS,
        ]
    ].median()
    return sizes.join(medians).astype(float)


def floors(results: pd.DataFrame) -> pd.DataFrame:
    """Each strategy's save and cold-load floor in seconds (NaN where its rows lack a limit)."""
    s = _per_strategy(results)
    return pd.DataFrame(
        {
            "save_floor_s": save_floor_s(s["bytes"], s["files"], s["disk_write_gbps"], s["disk_files_per_s"]),
            "load_floor_s": load_floor_s(
                s["bytes"], s["model_bytes"], s["disk_read_gbps"], s["fresh_copy_gbps"], s["files"], s["disk_read_iops"]
            ),
        }
    )


_FAULTS = ["minor_faults_save", "minor_faults_load_cold"]
"""The getrusage columns the fault shares read; rows written before they were recorded lack them (NaN)."""


@dataclass(frozen=True)
class Share:
    """How much of one operation's measured time one resource accounts for, and the numbers behind it."""

    resource: str
    share: float
    evidence: str

    def __str__(self) -> str:
        return f"{self.resource}, {self.evidence}"


@dataclass(frozen=True)
class Bound:
    """What bound one strategy's save or cold load: each measured resource's share of its median time."""

    strategy: str
    op: Op
    seconds: float
    shares: tuple[Share, ...]

    @property
    def largest(self) -> Share:
        """The share accounting for the most time; page faults, part of the CPU's work, once they alone bind."""
        found = max(self.shares, key=lambda s: -math.inf if math.isnan(s.share) else s.share)
        faults = next((s for s in self.shares if s.resource == FAULTS), None)
        if found.resource == CPU and faults is not None and faults.share >= BOUND_AT:
            return faults
        return found

    @property
    def resource(self) -> str | None:
        """The resource accounting for the most of the time, if that is at least ``BOUND_AT`` of it."""
        return self.largest.resource if self.largest.share >= BOUND_AT else None

    def __str__(self) -> str:
        what = f"{self.strategy} {'save' if self.op == 'save' else 'cold load'} ({self.seconds:.3g} s)"
        if self.resource is None:
            return f"{what}: no measured limit explains it; at most {self.largest}"
        if self.largest.share > 1:  # the resource alone would take longer than the whole operation did
            return f"{what}: bound by {self.largest}, beyond the probe's limit"
        return f"{what}: bound by {self.largest}"


def _save_shares(s: pd.Series, cores: int) -> tuple[Share, ...]:
    write_s, files_s = s["bytes"] / s["disk_write_gbps"] / 1e9, s["files"] / s["disk_files_per_s"]
    return (
        Share(
            "disk bandwidth",
            write_s / s["save_s"],
            f"{s['bytes'] / 1e9:.3g} GB at {s['disk_write_gbps']:.3g} GB/s = {write_s:.3g} s",
        ),
        Share(
            "file creation",
            files_s / s["save_s"],
            f"{s['files']:,.0f} files at {s['disk_files_per_s']:,.0f} files/s = {files_s:.3g} s",
        ),
        Share(CPU, s["cpu_save_share"] / cores, f"{s['cpu_save_share']:.2g} of {cores} cores busy"),
        _faults(s["minor_faults_save"], s["fresh_copy_gbps"], s["save_s"]),
    )


def _faults(faults: float, fresh_copy_gbps: float, seconds: float) -> Share:
    took = fault_s(faults, fresh_copy_gbps)
    each = PAGE / fresh_copy_gbps / 1e3
    return Share(
        FAULTS,
        took / seconds,
        f"{faults:,.0f} minor faults at {each:.2g} us each (a 4 KiB page at the fresh-copy rate) = {took:.3g} s",
    )


def _load_shares(s: pd.Series, cores: int) -> tuple[Share, ...]:
    read_s, fresh_s = s["bytes"] / s["disk_read_gbps"] / 1e9, s["model_bytes"] / s["fresh_copy_gbps"] / 1e9
    operations = ()
    if not math.isnan(s["disk_read_iops"]):
        reads_s = s["files"] / s["disk_read_iops"]
        operations = (
            Share(
                "read operations",
                reads_s / s["load_cold_s"],
                f"{s['files']:,.0f} files at {s['disk_read_iops']:,.0f} reads/s = {reads_s:.3g} s",
            ),
        )
    return (
        *operations,
        Share(
            "disk bandwidth",
            read_s / s["load_cold_s"],
            f"{s['bytes'] / 1e9:.3g} GB at {s['disk_read_gbps']:.3g} GB/s = {read_s:.3g} s",
        ),
        Share(
            CPU,
            s["load_warm_s"] / s["load_cold_s"],
            f"the warm load alone takes {s['load_warm_s']:.3g} s, {s['cpu_load_share']:.2g} of {cores} cores busy, "
            f"{s['model_bytes'] / 1e9:.3g} GB into fresh memory at {s['fresh_copy_gbps']:.3g} GB/s = {fresh_s:.3g} s",
        ),
        _faults(s["minor_faults_load_cold"], s["fresh_copy_gbps"], s["load_cold_s"]),
    )


def bounds(results: pd.DataFrame, cores: int) -> list[Bound]:
    """For each strategy's save and cold load, the share of its time each measured resource accounts for.

    Disk bandwidth: its bytes at the ceiling; file creation: its files at the creation rate. A save's
    CPU / page faults is its CPU seconds over the cores' time; a load's is its warm load, which does all
    of a load's work but the disk's, over its cold load (its CPU time and the fresh-memory copy back it up).
    Page faults: the region's minor faults (getrusage) at the fresh-copy probe's cost per page.
    """
    found = []
    with np.errstate(divide="ignore", invalid="ignore"):  # a limit a row did not record reads as NaN or inf
        for name, s in _per_strategy(results).iterrows():
            found.append(Bound(name, "save", s["save_s"], _save_shares(s, cores)))
            found.append(Bound(name, "load", s["load_cold_s"], _load_shares(s, cores)))
    return found
