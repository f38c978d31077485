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
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ..errors import CheckpointError
from ..location import Location
from ..manifest import Entry, Layout, Manifest
from ..pytree import SEPARATOR, Structure, flatten, nest, structure_of, unflatten
from ..stateful import MASTER, OPTIMIZER, adamw, master_module
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
        structure = structure_of(tensors)
        if not self.asynchronous:
            with _single_process(), _as_os_error():
                dcp.save(nest(tensors) if structure is None else _training(tensors, structure), storage_writer=writer)
            progress(total_bytes(tensors))
            return None
        # The save runs in dcp's own thread: the warning filter stays on until it is waited for.
        quiet = contextlib.ExitStack()
        quiet.enter_context(_single_process())
        try:
            with _as_os_error():
                state = nest(tensors) if structure is None else _training(tensors, structure)
                written = dcp.async_save(state, storage_writer=writer)
        except BaseException:
            quiet.close()
            raise

        def finish() -> None:
            with quiet, _as_os_error():
                written.result()
            progress(total_bytes(tensors))

        return finish

    def _load(self, directory: Location, entries: Layout, into: Tensors | None) -> OrderedDict[str, torch.Tensor]:
        """Every tensor of ``entries``, read by ``dcp.load`` into ``into`` (in place) or fresh tensors.

        A training state is read as DCP's recipe resumes a job: get_state_dict of the master module and
        AdamW (a fresh AdamW gets its state there, from a step with zero gradients), dcp.load into what
        it returned, set_state_dict.
        """
        try:
            with _single_process():
                # Only a nested state's names hold the separator: a mapping of weights never reads the manifest.
                nested = any(SEPARATOR in e.name for e in entries)
                structure = Manifest.read(directory).structure if nested else None
                if structure is None:
                    tensors = OrderedDict(
                        (e.name, torch.empty(e.shape, dtype=e.torch_dtype) if into is None else into[e.name])
                        for e in entries
                    )
                    dcp.load(nest(tensors), storage_reader=dcp.FileSystemReader(directory.folder))
                    return tensors
                return _resume(directory, entries, structure, into)
        except CheckpointException as err:  # a BaseException: it would slip past ``except Exception``
            rank, failure = _first_failure(err)
            raise CheckpointError(
                f"{directory}: unreadable distributed checkpoint: rank {rank}: {type(failure).__name__}: {failure}"
            ) from failure
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(f"{directory}: unreadable distributed checkpoint: {err}") from err

    def stored_names(self, directory: Location) -> set[str] | None:
        """The keys of dcp's ``.metadata``."""
        return set(dcp.FileSystemReader(directory.folder).read_metadata().state_dict_metadata)

    def load(self, directory: Location, entries: Layout, progress: Progress) -> OrderedDict[str, torch.Tensor]:
        tensors = self._load(directory, entries, None)
        progress(total_bytes(tensors))
        return tensors

    def load_into(self, directory: Location, entries: Layout, into: Tensors, progress: Progress) -> None:
        for name, tensor in self._load(directory, entries, into).items():
            if tensor.data_ptr() != into[name].data_ptr():  # a number set_state_dict gave back, not read in place
                into[name].copy_(tensor)
        progress(total_bytes(into))

    def estimate_bytes(self, tensors: Tensors) -> int:
        return total_bytes(tensors) + len(tensors) * 4096 + MiB


def _training(tensors: Tensors, structure: Structure) -> dict[str, Any]:
    """A training state as DCP's recipe saves one: the master module and AdamW through get_state_dict (the
    optimizer's state keyed by parameter name), beside the float16 weights, scheduler, step and RNG states."""
    state = unflatten(tensors, structure)
    module = master_module(state[MASTER])
    master, optimizer = get_state_dict(module, adamw(module, state[OPTIMIZER]))
    return {**state, MASTER: master, OPTIMIZER: optimizer}


def _resume(
    directory: Location, entries: Layout, structure: Structure, into: Tensors | None
) -> OrderedDict[str, torch.Tensor]:
    """The state of ``entries`` read back through set_state_dict, into ``into``'s tensors or fresh ones."""
    if into is None:
        fresh = {e.name: torch.empty(e.shape, dtype=e.torch_dtype) for e in entries if not _optimizer_leaf(e.name)}
        state = {key: unflatten(fresh, child) for key, child in structure["dict"] if key != OPTIMIZER}
        module = master_module(state[MASTER])
        optimizer = adamw(module)
        # The job makes its scheduler before it resumes: that gives each group the initial_lr it saved.
        torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    else:
        state = unflatten(into, structure)
        module = master_module(state[MASTER])
        optimizer = adamw(module, state[OPTIMIZER])
    master, optimizer_state = get_state_dict(module, optimizer)
    whole = {**state, MASTER: master, OPTIMIZER: optimizer_state}
    dcp.load(whole, storage_reader=dcp.FileSystemReader(directory.folder))
    set_state_dict(module, optimizer, model_state_dict=whole[MASTER], optim_state_dict=whole[OPTIMIZER])
    loaded = flatten({**whole, MASTER: state[MASTER], OPTIMIZER: optimizer.state_dict()})
    return OrderedDict((e.name, loaded[e.name]) for e in entries if e.name in loaded)


def _optimizer_leaf(name: str) -> bool:
    return name.split(SEPARATOR, 1)[0] == OPTIMIZER


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
