"""Orbax, the JAX checkpointer built on TensorStore, as a peer: its defaults as installed, read back into numpy.

Orbax takes numpy views of the tensors (no jax arrays), writes its own ``<dir>.orbax-checkpoint-tmp``
and renames it, so it writes into a subfolder of the directory the harness stages: the harness's
manifest, sync and rename still decide when a checkpoint is complete (Orbax syncs neither its JSON
files nor its rename). What it chose on disk is read from the files of a small save, not restated here.
"""

from __future__ import annotations

import contextlib
import functools
import json
import tempfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts
import torch

from ..errors import CheckpointError
from ..location import Location
from ..manifest import Entry, Layout
from ..pytree import SEPARATOR, nest, unnest
from .base import MiB, Pending, Progress, Strategy, Tensors, from_numpy, to_numpy, total_bytes

SUBFOLDER = "orbax"
_PROBE = "probe"


@dataclass(frozen=True)
class Orbax(Strategy):
    """Orbax's PyTree checkpointer, with its defaults except the knobs named here."""

    name: str
    compression: bool = True
    """Orbax's ``use_compression`` (on by default)."""
    asynchronous: bool = False
    """``AsyncCheckpointer``: returns once Orbax has copied the arrays; otherwise ``Checkpointer``."""

    def config(self) -> dict[str, Any]:
        return {
            "library": "orbax-checkpoint",
            "format": "orbax",
            "use_compression": self.compression,
            "async": self.asynchronous,
        }

    def knobs(self) -> dict[str, str]:
        return {
            **on_disk(self.compression),
            "dtype": "model's",
            "load": "restore into numpy; into existing tensors: a type handler writing in place",
            "save": "AsyncCheckpointer: returns after its own copy" if self.asynchronous else "synchronous",
        }

    def unsupported(self, store: str) -> str | None:
        if store != "file":
            return "ckptbench drives Orbax through a local folder; Orbax's own gs:// and s3:// paths are not wired in"
        return None

    def save(self, tensors: Tensors, directory: Location, progress: Progress) -> Pending | None:
        from . import orbax_io

        arrays = nest({name: to_numpy(tensor.contiguous()) for name, tensor in tensors.items()})
        checkpointer = orbax_io.checkpointer(self.compression, self.asynchronous)
        try:
            orbax_io.save(checkpointer, _root(directory), arrays)
        except BaseException:
            checkpointer.close()  # a failed save otherwise leaves Orbax's threads running
            raise

        def finish() -> None:
            checkpointer.close()  # waits for an asynchronous save to be written and renamed
            progress(total_bytes(tensors))

        if self.asynchronous:
            return finish
        finish()
        return None

    def load(self, directory: Location, entries: Layout, progress: Progress) -> OrderedDict[str, torch.Tensor]:
        from . import orbax_io

        with _readable(directory) as root:
            arrays = unnest(orbax_io.restore(root))
        missing = [e.name for e in entries if e.name not in arrays]
        if missing:
            raise CheckpointError(f"{directory}: the Orbax checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}")
        tensors = OrderedDict((e.name, from_numpy(np.asarray(arrays[e.name]))) for e in entries)
        progress(total_bytes(tensors))
        return tensors

    def load_into(self, directory: Location, entries: Layout, into: Tensors, progress: Progress) -> None:
        from . import orbax_io

        with _readable(directory) as root:
            orbax_io.restore_into(root, nest({e.name: to_numpy(into[e.name]) for e in entries}))
        progress(sum(e.nbytes for e in entries))

    def load_each(self, directory: Location, entries: Layout) -> Iterator[tuple[Entry, torch.Tensor | Exception]]:
        """Each array read with TensorStore from Orbax's kvstore, so ``verify`` names every damaged tensor.

        Orbax's own restore stops at the first failure and leaves the other reads reporting to its closed event loop.
        """
        root = Path(_root(directory))
        try:
            layout = _Layout.read(root)
        except (OSError, ValueError, KeyError) as err:
            failure = CheckpointError(f"{root}: not an Orbax checkpoint: {err}")
            yield from ((entry, failure) for entry in entries)
            return
        context = ts.Context()
        for entry in entries:
            try:
                yield entry, from_numpy(layout.open(_param(entry.name), context).read().result())
            except ValueError as err:
                yield entry, err

    def load_copies(self) -> float:
        """Twice the model, as measured on openllama-3b-2l (peaks of 1.8-2.0 models, with zstd and without).

        Orbax issues every array's read at once and each array is one chunk, so each one's stored bytes and
        its decoded copy can be alive together: the likely reason, not traced inside TensorStore.
        """
        return 2.0

    def estimate_bytes(self, tensors: Tensors) -> int:
        # zstd cannot grow incompressible data by much; OCDBT adds its B-tree and a manifest per process.
        return total_bytes(tensors) * 21 // 20 + len(tensors) * 4096 + 16 * MiB


def _param(name: str) -> str:
    """The name Orbax gives a leaf of the nested tree: its keys joined with dots."""
    return name.replace(SEPARATOR, ".")


def _root(directory: Location) -> str:
    """Orbax's checkpoint folder, absolute: OCDBT refuses keys with relative components."""
    return str((directory.folder / SUBFOLDER).resolve())


@contextlib.contextmanager
def _readable(directory: Location) -> Iterator[str]:
    """The checkpoint folder; whatever Orbax raises for a missing or damaged one becomes a ``CheckpointError``."""
    root = _root(directory)
    if not Path(root).is_dir():
        raise CheckpointError(f"{directory}: no {SUBFOLDER}/; not a complete Orbax checkpoint")
    try:
        yield root
    except CheckpointError:
        raise
    except Exception as err:  # Orbax and TensorStore raise their own types for damage
        raise CheckpointError(f"{root}: unreadable Orbax checkpoint: {type(err).__name__}: {err}") from err


@functools.cache
def on_disk(compression: bool) -> dict[str, str]:
    """Orbax's on-disk choices, read from its own files after saving one small array with these settings."""
    from . import orbax_io

    with tempfile.TemporaryDirectory(prefix="ckptbench-orbax-") as scratch:
        root = Path(scratch) / SUBFOLDER
        with orbax_io.checkpointer(compression, asynchronous=False) as checkpointer:
            orbax_io.save(checkpointer, str(root), {_PROBE: np.zeros((64, 32), np.float16)})
        return describe(root, _PROBE)


@dataclass(frozen=True)
class _Layout:
    """Where Orbax put its arrays: its flags file says whether in OCDBT and in which zarr version."""

    root: Path
    ocdbt: bool
    zarr3: bool

    @classmethod
    def read(cls, root: Path) -> _Layout:
        flags = json.loads((root / "_METADATA").read_text())
        return cls(root, bool(flags["use_ocdbt"]), bool(flags["use_zarr3"]))

    def kvstore(self, key: str = "") -> dict[str, str]:
        if self.ocdbt:
            return {"driver": "ocdbt", "base": f"file://{self.root}/", "path": key}
        return {"driver": "file", "path": f"{self.root}/{key}"}

    def metadata(self, name: str) -> dict[str, Any]:
        store = ts.KvStore.open(self.kvstore()).result()
        return json.loads(store.read(f"{name}/{'zarr.json' if self.zarr3 else '.zarray'}").result().value)

    def open(self, name: str, context: ts.Context) -> ts.TensorStore:
        """One array as saved; a missing chunk is an error, never the fill value."""
        spec = {"driver": "zarr3" if self.zarr3 else "zarr", "kvstore": self.kvstore(f"{name}/")}
        return ts.open({**spec, "open": True, "fill_missing_data_reads": False}, context=context).result()


def describe(root: Path, name: str) -> dict[str, str]:
    """How Orbax stored the array ``name`` under ``root``: its kvstore, zarr version, chunks and compression."""
    layout = _Layout.read(root)
    metadata = layout.metadata(name)
    if layout.zarr3:
        chunks = metadata["chunk_grid"]["configuration"]["chunk_shape"]
        codecs = [c["name"] for c in metadata["codecs"] if c["name"] not in ("bytes", "transpose")]
        compression = ", ".join(codecs) or "none"
    else:
        chunks = metadata["chunks"]
        compressor = metadata.get("compressor")
        level = "" if compressor is None or "level" not in compressor else f" level {compressor['level']}"
        compression = "none" if compressor is None else f"{compressor['id']}{level}"
    return {
        "format": f"Orbax PyTree, zarr v{3 if layout.zarr3 else metadata['zarr_format']} arrays",
        "chunks": "one per array" if list(chunks) == list(metadata["shape"]) else f"{chunks} for {metadata['shape']}",
        "compression": compression,
        "kvstore": "ocdbt" if layout.ocdbt else "file",
    }
