"""Knob sweeps: the TensorStore writer/reader over a cross product of its options.

Each combination is an ad-hoc ``TensorStore`` strategy, measured by the same harness and stored like
any run (in ``sweep.csv``); its options travel in the row's ``config``, and the knobs' allowed values
come from ``TensorStoreOptions``' own types, so a new knob needs no edit here.
"""

from __future__ import annotations

import itertools
import re
import types
from collections.abc import Sequence
from dataclasses import fields, replace
from typing import Any, Union, get_args, get_origin, get_type_hints

import pandas as pd
from matplotlib.figure import Figure

from . import plot
from .benchmark import Benchmark, PhaseResult
from .errors import CkptbenchError, UsageError
from .results import configs
from .strategies import TensorStore, TensorStoreOptions, get_strategy

_SIZES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_NONE = {"none", "default"}
_BOOLS = {"on": True, "true": True, "off": False, "false": False}
KNOBS: tuple[str, ...] = tuple(f.name for f in fields(TensorStoreOptions))
_HINTS = get_type_hints(TensorStoreOptions)
RESULTS_FILE, SUMMARY_FILE, FIGURE_STEM = "sweep.csv", "sweep_summary.csv", "sweep_effects"
MINIMUM = {"chunk_bytes": 4 << 10, "concurrency": 1}
"""The least a knob may be: a chunk of a filesystem block (4 KiB; below it every element could be a file of
its own, hundreds of thousands of them), at least one I/O at a time."""


def _optional(knob: str) -> bool:
    hint = _HINTS[knob]
    return get_origin(hint) in (Union, types.UnionType) and type(None) in get_args(hint)


def _is_bytes(knob: str) -> bool:
    return knob.endswith("_bytes")


def _parse_value(knob: str, text: str) -> Any:
    text = text.strip()
    choices = TensorStoreOptions.choices(knob)
    if choices is not None:
        if text.lower() in _NONE and None in choices:
            return None
        if text not in choices:
            shown = ", ".join("none" if c is None else str(c) for c in choices)
            raise UsageError(f"--knob {knob}: {text!r} is not one of {shown}")
        return text
    if _HINTS[knob] is bool:
        if text.lower() not in _BOOLS:
            raise UsageError(f"--knob {knob}: {text!r} is not one of on, off")
        return _BOOLS[text.lower()]
    if text.lower() in _NONE and _optional(knob):
        return None
    match = re.fullmatch(r"(\d+)([KMG]?)(?:i?B)?", text, flags=re.IGNORECASE)
    if not match:
        raise UsageError(f"--knob {knob}: {text!r} is not a count or a size like 64K, 1M, 2G")
    value = int(match[1]) * _SIZES[match[2].upper()]
    if value < MINIMUM.get(knob, 0):
        raise UsageError(f"--knob {knob}: {text!r} is below its minimum, {format_value(knob, MINIMUM[knob])}")
    return value


def parse_knob(spec: str) -> tuple[str, list[Any]]:
    """``chunk_bytes=64K,1M`` -> ("chunk_bytes", [65536, 1048576])."""
    knob, sep, values = spec.partition("=")
    knob = knob.strip()
    if not sep or knob not in KNOBS:
        raise UsageError(f"--knob {spec!r}: expected NAME=V1,V2,... with NAME one of {', '.join(KNOBS)}")
    parsed = [_parse_value(knob, v) for v in values.split(",") if v.strip()]
    if not parsed:
        raise UsageError(f"--knob {spec!r}: no values")
    return knob, list(dict.fromkeys(parsed))


def parse_knobs(specs: list[str]) -> dict[str, list[Any]]:
    """Every ``--knob`` flag; a knob given twice takes the values of both (the flag repeats, it does not replace)."""
    knobs: dict[str, list[Any]] = {}
    for spec in specs:
        knob, values = parse_knob(spec)
        knobs[knob] = list(dict.fromkeys([*knobs.get(knob, []), *values]))
    return knobs


def format_value(knob: str, value: Any) -> str:
    """A knob's value as the command line writes it (the inverse of ``parse_knob``)."""
    if value is None:
        return "none" if TensorStoreOptions.choices(knob) else "default"
    if isinstance(value, bool):
        return "on" if value else "off"
    if _is_bytes(knob):
        for suffix in ("G", "M", "K"):
            if value and value % _SIZES[suffix] == 0:
                return f"{value // _SIZES[suffix]}{suffix}"
    return str(value)


def grid(knobs: dict[str, list[Any]], base: TensorStore | None = None) -> list[TensorStore]:
    """One strategy per valid combination of the knobs' values, the others at ``base``'s (the study's baseline
    by default); a base names its variations after itself, ``ts+best[io_mode=direct]``, and is itself the
    combination that changes nothing, under its own name, so its rows compare with its runs elsewhere."""
    prefix, options = ("ts", TensorStoreOptions()) if base is None else (base.name, base.options)
    strategies = []
    for values in itertools.product(*knobs.values()):
        setting = dict(zip(knobs, values, strict=True))
        varied = replace(options, **setting)
        if base is not None and varied == base.options:
            strategies.append(base)
        elif varied.is_valid():
            label = ",".join(f"{k}={format_value(k, v)}" for k, v in setting.items())
            strategies.append(TensorStore(f"{prefix}[{label}]", varied))
    return strategies


def base_strategy(name: str) -> TensorStore:
    """The registered TensorStore strategy a sweep varies, e.g. ``ts+best`` to try levers on the best one."""
    strategy = get_strategy(name)
    if not isinstance(strategy, TensorStore):
        raise UsageError(f"--base {name}: not a TensorStore strategy; a sweep varies TensorStore's knobs")
    return strategy


def knob_columns(results: pd.DataFrame, knobs: list[str]) -> pd.DataFrame:
    """The rows with one column per knob, read from each row's stored configuration."""
    settings = configs(results)
    missing = [k for k in knobs if k not in settings]
    if missing:
        raise CkptbenchError(f"the rows' configurations do not record {', '.join(missing)}")
    columns = {k: [format_value(k, v) for v in settings[k]] for k in knobs}
    return results.assign(**columns)


def run(
    bench: Benchmark, knobs: dict[str, list[Any]], base: TensorStore | None = None, peers: Sequence[str] = ()
) -> tuple[pd.DataFrame, list[PhaseResult]]:
    """Measure every configuration of the grid, and ``peers`` in the same rounds so a lever is judged against them
    measured alike; the summary (fastest save first) and every phase's result."""
    phases = bench.run([*grid(knobs, base), *peers])
    return bench.summary().sort_values("save_s_median"), phases


def figure(results: pd.DataFrame, knobs: list[str]) -> Figure:
    return plot.sweep_figure(knob_columns(results, knobs), knobs)


def best(summary: pd.DataFrame) -> str:
    """The configuration with the lowest sum of median save and cold-load time among those that verified."""
    verified = summary[summary["verified"]]
    if verified.empty:
        raise CkptbenchError("no sweep configuration verified")
    return (verified["save_s_median"] + verified["load_cold_s_median"]).idxmin()
