"""How a checkpoint is written and read: one class per library, one registry entry per approach.

Every TensorStore approach is the same writer/reader with different ``TensorStoreOptions``, so an
ablation differs from the baseline in exactly the field it names. Strategies write into a
directory they are given and never sync: the harness makes every save durable the same way.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..errors import CheckpointError, UnknownChoiceError
from . import sharded
from .base import MiB, Pending, Progress, SingleFile, Strategy, Tensors, nbytes, total_bytes
from .orbax import Orbax
from .pytorch import DistributedCheckpoint, SafeTensors, TorchSave
from .streamers import FastSafetensors, RunaiStreamer, Tensorizer
from .zarr import TensorStore, TensorStoreOptions, divisor_chunks

_STUDY = TensorStoreOptions()
BEST = TensorStoreOptions(dtype="float16", chunk_bytes=1 * MiB, concurrency=128, inflight_bytes=1 << 30)
"""The sweep's winner (median save + cold load) on this project's machine, openllama-3b-2l, 2026-11-29:
32 configurations of chunk size, dtype, per-file fsync, bytes in flight and I/O concurrency."""
STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        TorchSave("pytorch"),
        TensorStore("tensorstore", _STUDY),
        TensorStore("t5x", replace(_STUDY, chunk_bytes=64 * MiB, concurrency=128, compression="gzip")),
        TensorStore("ts+concurrency", replace(_STUDY, concurrency=128)),
        TensorStore("ts+chunks", replace(_STUDY, chunk_bytes=1 * MiB)),
        TensorStore("ts+compression", replace(_STUDY, compression="gzip")),
        TensorStore("ts+float16", replace(_STUDY, dtype="float16")),
        TensorStore("ts+ocdbt", replace(_STUDY, driver="ocdbt")),
        TorchSave("pytorch+mmap", mmap=True),
        SafeTensors("safetensors"),
        DistributedCheckpoint("dcp"),
        TensorStore("ts+zarr3", replace(_STUDY, format="zarr3")),
        TensorStore("ts+zstd", replace(_STUDY, compression="zstd")),
        TensorStore("ts+nosync", replace(_STUDY, sync=False)),
        TensorStore("ts+best", BEST),
        Orbax("orbax"),
        Orbax("orbax+uncompressed", compression=False),
        Orbax("orbax+async", asynchronous=True),
        DistributedCheckpoint("dcp+async", asynchronous=True),
        TensorStore("ts+best+async", replace(BEST, background=True)),
        RunaiStreamer("runai-streamer"),
        FastSafetensors("fastsafetensors"),
        Tensorizer("tensorizer"),
    )
}
"""Every approach ckptbench can measure, one line each; ``study`` says which of them the study compares."""


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise UnknownChoiceError("strategy", name, list(STRATEGIES)) from None


def from_config(name: str, config: dict[str, Any]) -> Strategy:
    """The strategy that wrote a checkpoint, rebuilt from its stored configuration (a sweep's ad-hoc ones too)."""
    if "sharded" in config:
        base = {key: value for key, value in config.items() if key != "sharded"}
        same = next((s for s in STRATEGIES.values() if s.config() == base), None)
        return sharded.rebuild(name, same or from_config(name, base), config["sharded"])
    registered = STRATEGIES.get(name)
    if registered is not None and registered.config() == config:
        return registered
    if config.get("library") == "tensorstore":
        knobs = {k: v for k, v in config.items() if k != "library"}
        try:
            return TensorStore(name, TensorStoreOptions(**knobs))
        except TypeError as err:
            raise CheckpointError(f"strategy {name}: TensorStore options not understood: {err}") from err
    same = next((s for s in STRATEGIES.values() if s.config() == config), None)
    if same is None:
        raise CheckpointError(f"strategy {name}: no strategy of this version writes {config}")
    return same


__all__ = [
    "BEST",
    "STRATEGIES",
    "DistributedCheckpoint",
    "MiB",
    "Orbax",
    "Pending",
    "Progress",
    "SafeTensors",
    "SingleFile",
    "Strategy",
    "TensorStore",
    "TensorStoreOptions",
    "Tensors",
    "TorchSave",
    "divisor_chunks",
    "from_config",
    "get_strategy",
    "nbytes",
    "total_bytes",
]
