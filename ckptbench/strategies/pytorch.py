"""The PyTorch family: ``torch.save``, safetensors and ``torch.distributed.checkpoint``."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import safetensors
import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from ..errors import CheckpointError
from ..location import Location
from ..manifest import Entry, Layout
from ..pytree import flatten, nest, structure_of, unflatten
from .base import MiB, Pending, Progress, SingleFile, Strategy, Tensors, to_numpy, total_bytes


@dataclass(frozen=True)
class TorchSave(SingleFile):
    """``torch.save`` of the whole mapping to one file; ``torch.load(weights_only=True)``."""

    name: str
    mmap: bool = False
    """Map the file and copy each tensor out of it: the copy is what makes the load's I/O count."""
    filename: str = "model.pt"

    def config(self) -> dict[str, Any]:
        return {"library": "torch", "format": "torch.save", "mmap": self.mmap}

    def knobs(self) -> dict[str, str]:
        load = "torch.load(weights_only=True, mmap=True) + copy" if self.mmap else "torch.load(weights_only=True)"
        return {"format": "torch.save zip, one file", "dtype": "model's", "load": load}

    def unsupported(self, store: str) -> str | None:
        if self.mmap and store != "file":
            return "mmap needs a local file; from object storage this is `pytorch`"
        return None

    def write(self, tensors: Tensors, target: Path | BinaryIO) -> None:
        structure = structure_of(tensors)
        torch.save(OrderedDict(tensors) if structure is None else unflatten(tensors, structure), target)

    def stored_names(self, directory: Location) -> set[str] | None:
        """The pickle's keys, its storages mapped and never read (a local file only)."""
        if not directory.local:
            return None
        return set(torch.load(directory.folder / self.filename, weights_only=True, mmap=True))

    def read(self, source: Path | BinaryIO, entries: Layout) -> OrderedDict[str, torch.Tensor]:
        loaded = torch.load(source, weights_only=True, mmap=self.mmap)
        # A nested state (numbers as Python numbers) comes back as the named tensors it was saved from.
        tensors = loaded if all(isinstance(t, torch.Tensor) for t in loaded.values()) else flatten(loaded)
        if self.mmap:
            tensors = OrderedDict((name, tensor.clone()) for name, tensor in tensors.items())
        saved_order = OrderedDict((e.name, tensors[e.name]) for e in entries if e.name in tensors)
        return OrderedDict({**saved_order, **tensors})


@dataclass(frozen=True)
class SafeTensors(SingleFile):
    """``safetensors`` ``save_file``; ``load_file`` with the pread backend, which materialises every tensor.

    The default mmap backend returns before reading anything, so timing it would measure nothing.
    """

    name: str
    filename: str = "model.safetensors"

    def config(self) -> dict[str, Any]:
        return {"library": "safetensors", "format": "safetensors", "backend": "pread"}

    def knobs(self) -> dict[str, str]:
        return {"format": "safetensors, one file", "dtype": "model's", "load": "load_file(backend='pread')"}

    def write(self, tensors: Tensors, target: Path | BinaryIO) -> None:
        structure = structure_of(tensors)
        metadata = None if structure is None else {"structure": json.dumps(structure)}
        if isinstance(target, Path):
            safetensors.torch.save_file(dict(tensors), target, metadata=metadata)
        else:
            target.write(safetensors.torch.save(dict(tensors), metadata=metadata))

    def stored_names(self, directory: Location) -> set[str] | None:
        """The keys of the file's JSON header (a local file only)."""
        if not directory.local:
            return None
        with safetensors.safe_open(directory.folder / self.filename, framework="pt") as f:
            return set(f.keys())

    def read(self, source: Path | BinaryIO, entries: Layout) -> OrderedDict[str, torch.Tensor]:
        # safetensors orders tensors its own way; the manifest keeps the mapping's order.
        if not isinstance(source, Path):
            tensors = safetensors.torch.load(source.read())  # copies every tensor out of the bytes
            return OrderedDict((e.name, tensors[e.name]) for e in entries)
        with safetensors.safe_open(source, framework="pt", backend="pread") as f:
            return OrderedDict((e.name, f.get_tensor(e.name)) for e in entries)

    def load_into(self, directory: Location, entries: Layout, into: Tensors, progress: Progress) -> None:
        """Each tensor's bytes read from the file straight into its existing memory, in file order.

        The library only returns new (or mapped) tensors, so this reads its documented layout: a
        little-endian u64 header length, then a JSON header with each tensor's dtype, shape and byte range.
        """
        where = directory.where(self.filename)

        def read_into(source: Path | BinaryIO) -> None:
            with contextlib.ExitStack() as stack:
                file = stack.enter_context(open(source, "rb", buffering=0)) if isinstance(source, Path) else source
                try:
                    header = json.loads(file.read(int.from_bytes(file.read(8), "little")))
                except (ValueError, UnicodeDecodeError) as err:
                    raise CheckpointError(f"{where}: unreadable safetensors header: {err}") from err
                base = file.tell()
                for begin, end, name in sorted(_byte_range(header, entry, where) for entry in entries):
                    target = into[name]
                    buffer = (
                        target
                        if target.is_contiguous()
                        else torch.empty_like(target, memory_format=torch.contiguous_format)
                    )
                    file.seek(base + begin)
                    _read_exactly(file, memoryview(to_numpy(buffer).reshape(-1).view(np.uint8)), where)
                    if buffer is not target:
                        target.copy_(buffer)
                    progress(end - begin)

        self.read_file(directory, read_into)


_SAFETENSORS_DTYPES = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.uint8: "U8",
}


def _byte_range(header: dict[str, Any], entry: Entry, path: str) -> tuple[int, int, str]:
    """Where ``entry``'s bytes lie after the header, refused unless the header agrees with the manifest."""
    stored = header.get(entry.name)
    expected = {"dtype": _SAFETENSORS_DTYPES.get(entry.torch_dtype), "shape": list(entry.shape)}
    if not isinstance(stored, dict) or {k: stored.get(k) for k in expected} != expected:
        raise CheckpointError(f"{path}: tensor {entry.name} is stored as {stored}, expected {expected}")
    begin, end = stored["data_offsets"]
    if end - begin != entry.nbytes:
        raise CheckpointError(f"{path}: tensor {entry.name} holds {end - begin} bytes, expected {entry.nbytes}")
    return begin, end, entry.name


def _read_exactly(file: io.RawIOBase | BinaryIO, buffer: memoryview, path: str) -> None:
    done = 0
    while done < len(buffer):
        count = file.readinto(buffer[done:])
        if not count:
            raise CheckpointError(f"{path}: ends {len(buffer) - done} bytes early")
        done += count


@contextlib.contextmanager
def _single_process() -> Iterator[None]:
    """One process without a process group is this strategy's definition, not something to warn about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _first_failure(err: CheckpointException) -> tuple[int, BaseException]:
    """The first failed rank and its own exception: its str, unlike the wrapper's, is not every rank's traceback."""
    rank, (failure, _) = next(iter(err.failures.items()))
    return rank, failure


@dataclass(frozen=True)
class DistributedCheckpoint(Strategy):
    """``torch.distributed.checkpoint`` in one process: a FileSystemWriter with several threads, one file each."""

    name: str
    threads: int = 4
    asynchronous: bool = False
    """``dcp.async_save`` (thread type, default stager): returns once its staging copy is made."""

    def config(self) -> dict[str, Any]:
        config = {"library": "torch.distributed.checkpoint", "format": "dcp", "threads": self.threads}
        # Only when set, so the synchronous strategy's stored configuration stays what it has always been.
        return {**config, "async": True} if self.asynchronous else config

    def knobs(self) -> dict[str, str]:
        return {
            "format": f"torch.distributed.checkpoint, {self.threads} files",
            "dtype": "model's",
            "load": "dcp.load into tensors allocated from the manifest",
            "save": "async_save (thread): returns after its staging copy" if self.asynchronous else "synchronous",
        }

    def unsupported(self, store: str) -> str | None:
        if store != "file":
            return "torch.distributed.checkpoint writes through a filesystem (its fsspec writer needs s3fs)"
        return None

    def save(self, tensors: Tensors, directory: Location, progress: Progress) -> Pending | None:
        writer = dcp.FileSystemWriter(directory.folder, thread_count=self.threads)
        if not self.asynchronous:
            with _single_process(), _as_os_error():
                dcp.save(nest(tensors), storage_writer=writer)
            progress(total_bytes(tensors))
            return None
        # The save runs in dcp's own thread: the warning filter stays on until it is waited for.
        quiet = contextlib.ExitStack()
        quiet.enter_context(_single_process())
        try:
            with _as_os_error():
                written = dcp.async_save(nest(tensors), storage_writer=writer)
        except BaseException:
            quiet.close()
            raise

        def finish() -> None:
            with quiet, _as_os_error():
                written.result()
            progress(total_bytes(tensors))

        return finish

    def _load(self, directory: Location, tensors: OrderedDict[str, torch.Tensor], progress: Progress) -> None:
        """Fill ``tensors`` in place: ``dcp.load`` writes into the tensors it is given, nested as they were saved."""
        try:
            with _single_process():
                dcp.load(nest(tensors), storage_reader=dcp.FileSystemReader(directory.folder))
        except CheckpointException as err:  # a BaseException: it would slip past ``except Exception``
            rank, failure = _first_failure(err)
            raise CheckpointError(
                f"{directory}: unreadable distributed checkpoint: rank {rank}: {type(failure).__name__}: {failure}"
            ) from failure
        except Exception as err:
            raise CheckpointError(f"{directory}: unreadable distributed checkpoint: {err}") from err
        progress(total_bytes(tensors))

    def stored_names(self, directory: Location) -> set[str] | None:
        """The keys of dcp's ``.metadata``."""
        return set(dcp.FileSystemReader(directory.folder).read_metadata().state_dict_metadata)

    def load(self, directory: Location, entries: Layout, progress: Progress) -> OrderedDict[str, torch.Tensor]:
        tensors = OrderedDict((e.name, torch.empty(e.shape, dtype=e.torch_dtype)) for e in entries)
        self._load(directory, tensors, progress)
        return tensors

    def load_into(self, directory: Location, entries: Layout, into: Tensors, progress: Progress) -> None:
        self._load(directory, OrderedDict((e.name, into[e.name]) for e in entries), progress)

    def estimate_bytes(self, tensors: Tensors) -> int:
        return total_bytes(tensors) + len(tensors) * 4096 + MiB


@contextlib.contextmanager
def _as_os_error() -> Iterator[None]:
    """dcp's CheckpointException is a BaseException: it would slip past ``except Exception``.

    Raised as the failing rank's own exception, chained to it, so its context (an ENOSPC) tells a full disk.
    """
    try:
        yield
    except CheckpointException as err:
        rank, failure = _first_failure(err)
        raise RuntimeError(f"rank {rank}: {type(failure).__name__}: {failure}") from failure
