"""Knob sweeps: the TensorStore writer/reader over a cross product of its options.

Each combination is an ad-hoc ``TensorStore`` strategy named after the knobs it sets, e.g.
``ts[chunk_bytes=1M,concurrency=32]``, measured by the same harness and stored like any run
(in ``sweep.csv``), so the name alone says which configuration a row measured.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import fields, replace
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from . import plot
from .benchmark import Benchmark
from .errors import CkptbenchError
from .strategies import TensorStore, TensorStoreOptions

_SIZES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_NONE = {"none", "default"}
_BOOLS = {"on": True, "true": True, "off": False, "false": False}
_CHOICES = {
    "dtype": ("float32", "float16"),
    "compression": ("gzip", "zstd"),
    "driver": ("file", "ocdbt"),
    "format": ("zarr", "zarr3"),
}
_BYTE_KNOBS = ("chunk_bytes", "inflight_bytes")
KNOBS: tuple[str, ...] = tuple(f.name for f in fields(TensorStoreOptions))
RESULTS_FILE, SUMMARY_FILE, FIGURE_STEM = "sweep.csv", "sweep_summary.csv", "sweep_effects"


def _parse_value(knob: str, text: str) -> Any:
    text = text.strip()
    if knob in _BYTE_KNOBS or knob == "concurrency":
        if text.lower() in _NONE and knob != "inflight_bytes":
            return None
        match = re.fullmatch(r"(\d+)([KMG]?)(?:i?B)?", text, flags=re.IGNORECASE)
        if not match:
            raise CkptbenchError(f"--knob {knob}: {text!r} is not a count or a size like 64K, 1M, 2G")
        return int(match[1]) * _SIZES[match[2].upper()]
    if knob == "sync":
        if text.lower() not in _BOOLS:
            raise CkptbenchError(f"--knob sync: {text!r} is not one of on, off")
        return _BOOLS[text.lower()]
    if knob == "compression" and text.lower() in _NONE:
        return None
    if text not in _CHOICES[knob]:
        raise CkptbenchError(f"--knob {knob}: {text!r} is not one of {', '.join(_CHOICES[knob])}")
    return text


def parse_knob(spec: str) -> tuple[str, list[Any]]:
    """``chunk_bytes=64K,1M`` -> ("chunk_bytes", [65536, 1048576])."""
    knob, sep, values = spec.partition("=")
    knob = knob.strip()
    if not sep or knob not in KNOBS:
        raise CkptbenchError(f"--knob {spec!r}: expected NAME=V1,V2,... with NAME one of {', '.join(KNOBS)}")
    parsed = [_parse_value(knob, v) for v in values.split(",") if v.strip()]
    if not parsed:
        raise CkptbenchError(f"--knob {spec!r}: no values")
    return knob, list(dict.fromkeys(parsed))


def _format(knob: str, value: Any) -> str:
    if value is None:
        return "none" if knob == "compression" else "default"
    if isinstance(value, bool):
        return "on" if value else "off"
    if knob in _BYTE_KNOBS:
        for suffix in ("G", "M", "K"):
            if value and value % _SIZES[suffix] == 0:
                return f"{value // _SIZES[suffix]}{suffix}"
    return str(value)


def _sensible(options: TensorStoreOptions) -> bool:
    """Combinations whose knobs cannot interact are skipped rather than measured twice or measured wrongly."""
    # OCDBT packs chunks into its own data files, so zarr3's sharding adds nothing but a second index.
    return not (options.driver == "ocdbt" and options.format == "zarr3")


def grid(knobs: dict[str, list[Any]], base: TensorStoreOptions | None = None) -> list[TensorStore]:
    """One strategy per sensible combination of the knobs' values, the others at ``base`` (the study's baseline)."""
    base = base or TensorStoreOptions()
    strategies = []
    for values in itertools.product(*knobs.values()):
        setting = dict(zip(knobs, values, strict=True))
        options = replace(base, **setting)
        if _sensible(options):
            label = ",".join(f"{k}={_format(k, v)}" for k, v in setting.items())
            strategies.append(TensorStore(f"ts[{label}]", options))
    return strategies


def knob_columns(results: pd.DataFrame) -> pd.DataFrame:
    """The knob values a sweep row measured, parsed back from its strategy name, one column per knob."""
    settings = [
        dict(part.split("=", 1) for part in re.fullmatch(r"ts\[(.*)\]", name)[1].split(","))
        for name in results["strategy"]
    ]
    return pd.concat([results.reset_index(drop=True), pd.DataFrame(settings)], axis=1)


def run(bench: Benchmark, knobs: dict[str, list[Any]]) -> tuple[pd.DataFrame, list[str]]:
    """Measure every configuration of the grid; the summary (fastest save first) and those that did not verify."""
    failed = bench.run_each(grid(knobs))
    return bench.summary().sort_values("save_s_median"), failed


def figure(bench: Benchmark, knobs: dict[str, list[Any]]) -> Figure:
    return plot.sweep_figure(knob_columns(bench.results), list(knobs))


def best(summary: pd.DataFrame) -> str:
    """The configuration with the lowest sum of median save and cold-load time among those that verified."""
    verified = summary[summary["verified"]]
    if verified.empty:
        raise CkptbenchError("no sweep configuration verified")
    return (verified["save_s_median"] + verified["load_cold_s_median"]).idxmin()
