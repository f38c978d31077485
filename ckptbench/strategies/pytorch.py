"""The PyTorch family: ``torch.save``, safetensors and ``torch.distributed.checkpoint``."""

from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import safetensors
import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from ..errors import CheckpointError
from ..manifest import Layout
from .base import MiB, Progress, SingleFile, Strategy, Tensors, total_bytes


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
        torch.save(OrderedDict(tensors), target)

    def read(self, source: Path | BinaryIO, entries: Layout) -> OrderedDict[str, torch.Tensor]:
        tensors = torch.load(source, weights_only=True, mmap=self.mmap)
        if self.mmap:
            tensors = OrderedDict((name, tensor.clone()) for name, tensor in tensors.items())
        return tensors


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
        if isinstance(target, Path):
            safetensors.torch.save_file(dict(tensors), target)
        else:
            target.write(safetensors.torch.save(dict(tensors)))

    def read(self, source: Path | BinaryIO, entries: Layout) -> OrderedDict[str, torch.Tensor]:
        # safetensors orders tensors its own way; the manifest keeps the mapping's order.
        if not isinstance(source, Path):
            tensors = safetensors.torch.load(source.read())  # copies every tensor out of the bytes
            return OrderedDict((e.name, tensors[e.name]) for e in entries)
        with safetensors.safe_open(source, framework="pt", backend="pread") as f:
            return OrderedDict((e.name, f.get_tensor(e.name)) for e in entries)


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

    def config(self) -> dict[str, Any]:
        return {"library": "torch.distributed.checkpoint", "format": "dcp", "threads": self.threads}

    def knobs(self) -> dict[str, str]:
        return {
            "format": f"torch.distributed.checkpoint, {self.threads} files",
            "dtype": "model's",
            "load": "dcp.load into tensors allocated from the manifest",
        }

    def unsupported(self, store: str) -> str | None:
        if store != "file":
            return "torch.distributed.checkpoint writes through a filesystem (its fsspec writer needs s3fs)"
        return None

    def save(self, tensors: Tensors, directory: Path, progress: Progress) -> None:
        try:
            with _single_process():
                dcp.save(dict(tensors), storage_writer=dcp.FileSystemWriter(directory, thread_count=self.threads))
        except CheckpointException as err:  # a BaseException: it would slip past ``except Exception``
            rank, failure = _first_failure(err)
            # Chained to the rank's exception, whose own context (an ENOSPC) tells a full disk.
            raise RuntimeError(f"rank {rank}: {type(failure).__name__}: {failure}") from failure
        progress(total_bytes(tensors))

    def load(self, directory: Path, entries: Layout, progress: Progress) -> OrderedDict[str, torch.Tensor]:
        tensors = OrderedDict((e.name, torch.empty(e.shape, dtype=e.torch_dtype)) for e in entries)
        try:
            with _single_process():
                dcp.load(tensors, storage_reader=dcp.FileSystemReader(directory))
        except CheckpointException as err:  # a BaseException: it would slip past ``except Exception``
            rank, failure = _first_failure(err)
            raise CheckpointError(
                f"{directory}: unreadable distributed checkpoint: rank {rank}: {type(failure).__name__}: {failure}"
            ) from failure
        except Exception as err:
            raise CheckpointError(f"{directory}: unreadable distributed checkpoint: {err}") from err
        progress(total_bytes(tensors))
        return tensors

    def estimate_bytes(self, tensors: Tensors) -> int:
        return total_bytes(tensors) + len(tensors) * 4096 + MiB
