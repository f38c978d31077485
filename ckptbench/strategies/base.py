"""What every strategy does: write a mapping of tensors as its library's files, and read them back.

Completeness and integrity are not a strategy's business: ``checkpoint`` adds the manifest (the
commit marker, with each tensor's name, dtype, shape and digest) and hands its entries to ``load``.
Strategies never sync either: the harness makes every save durable the same way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np
import torch

from ..errors import CheckpointError
from ..location import Location, Source
from ..manifest import Entry, Layout

Tensors = Mapping[str, torch.Tensor]
Progress = Callable[[int], None]
"""Called with the number of bytes of model data just written or read."""
Pending = Callable[[], None]
"""What an asynchronous save returns: wait for it, and the data has been written (not yet synced)."""

MiB = 1 << 20


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def total_bytes(tensors: Tensors) -> int:
    """Bytes of model data in a mapping: what progress counts and what throughput is measured against."""
    return sum(nbytes(t) for t in tensors.values())


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A view of the tensor's own memory (strides kept), so libraries can read from it or write into it.

    bfloat16 goes through its bits because numpy has no bfloat16 of its own.
    """
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def from_numpy(array: np.ndarray) -> torch.Tensor:
    """The inverse of ``to_numpy``, zero-copy."""
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(array)


class Strategy(ABC):
    """Writes a mapping of tensors as its library's files in a directory and reads them back in the saved dtypes."""

    name: str

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """What this strategy sets, as data: stored (as JSON) beside every result it produces."""

    @abstractmethod
    def knobs(self) -> dict[str, str]:
        """What this strategy sets, in words, for ``list`` and the generated tables in the docs."""

    def unsupported(self, store: str) -> str | None:
        """Why this strategy cannot write to a ``store`` (its scheme: "file", "s3", ...), or None when it can."""
        return None

    @abstractmethod
    def save(self, tensors: Tensors, directory: Location, progress: Progress) -> Pending | None:
        """Write every tensor; an asynchronous strategy returns once training could go on, with what to wait for."""

    @abstractmethod
    def load(self, directory: Location, entries: Layout, progress: Progress) -> OrderedDict[str, torch.Tensor]:
        """Every tensor of ``entries``, in their order, materialised in fresh memory."""

    def load_into(self, directory: Location, entries: Layout, into: Tensors, progress: Progress) -> None:
        """Read every tensor into the existing ``into`` (what resuming a live model does).

        By default a fresh load copied into place; strategies that can read in place override it.
        """
        for name, tensor in self.load(directory, entries, progress).items():
            into[name].copy_(tensor)

    def load_each(self, directory: Location, entries: Layout) -> Iterator[tuple[Entry, torch.Tensor | Exception]]:
        """Tensor by tensor, a damaged one reported in its place (for ``verify``); by default one whole load."""
        try:
            tensors = self.load(directory, entries, lambda n: None)
        except CheckpointError as err:
            tensors = {}
            failure: Exception = err
        else:
            failure = CheckpointError("not in the loaded checkpoint")
        for entry in entries:
            yield entry, tensors.get(entry.name, failure)

    def stored_names(self, directory: Location) -> set[str] | None:
        """The tensors the format's own index holds, for ``verify`` to check the manifest against; None where
        that index is not read (object storage, and formats without a reader here)."""
        return None

    def reads(self, config: dict[str, Any]) -> bool:
        """Whether a checkpoint written with ``config`` is in the format this strategy reads."""
        mine = self.config()
        return (config.get("library"), config.get("format")) == (mine["library"], mine["format"])

    @abstractmethod
    def estimate_bytes(self, tensors: Tensors) -> int:
        """An upper bound of the disk space a save needs, checked before writing."""

    def load_copies(self) -> float:
        """Copies of the model a load into fresh tensors holds at its peak, checked against free memory first."""
        return 1.0


class SingleFile(Strategy):
    """A library that writes the whole mapping into one file; subclasses say how it is written and read.

    Its location hands it a path, or (from object storage) the file's bytes in memory: serialised
    there and uploaded as one object (multipart, parts in parallel), downloaded there (ranged GETs
    in parallel) before it is read.
    """

    filename: str

    @abstractmethod
    def write(self, tensors: Tensors, target: Path | BinaryIO) -> None: ...

    @abstractmethod
    def read(self, source: Path | BinaryIO, entries: Layout) -> OrderedDict[str, torch.Tensor]: ...

    def save(self, tensors: Tensors, directory: Location, progress: Progress) -> None:
        directory.write(self.filename, lambda target: self.write(tensors, target))
        progress(total_bytes(tensors))

    def read_file(self, directory: Location, parse: Callable[[Source], Any]) -> Any:
        """What ``parse`` makes of the checkpoint's one file, refused when the file is missing or unreadable."""

        def parsed(source: Source) -> Any:
            try:
                return parse(source)
            except CheckpointError:
                raise
            except Exception as err:  # the libraries raise their own errors (pickle, zip, SafetensorError) for damage
                raise CheckpointError(
                    f"{directory.where(self.filename)}: unreadable {self.name} checkpoint: {err}"
                ) from err

        try:
            return directory.read(self.filename, parsed)
        except FileNotFoundError:
            raise CheckpointError(f"{directory}: no {self.filename}; not a complete {self.name} checkpoint") from None

    def load(self, directory: Location, entries: Layout, progress: Progress) -> OrderedDict[str, torch.Tensor]:
        tensors = self.read_file(directory, lambda source: self.read(source, entries))
        progress(total_bytes(tensors))
        return tensors

    def estimate_bytes(self, tensors: Tensors) -> int:
        return total_bytes(tensors) + MiB
