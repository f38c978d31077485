"""What a store is to the harness: a Location (one checkpoint's place) and a Storage (a run's use of a store).

Strategies, the manifest and ``checkpoint`` see only ``Location``: they write and read named files
through it and ask it for TensorStore's kvstore, whatever the store. Libraries that can only write a
local folder (DCP, Orbax, mmap) ask for ``folder``, which a remote store refuses; their
``unsupported`` says so before a run starts.

Every save, in one process or with ranks, on a disk or in a bucket, is committed the same way
(``Staging``): it is written where no reader takes it for a checkpoint (``stage``), each writer
makes its own data durable (``sync``), then one writer writes the manifest last, syncs, and
``publish``es it. A failed save's staging place is removed (``remove_failed``), keeping what stopped
the save as the error. Each store does each step its own way: a folder stages under a partial name
and renames; a bucket writes in place, where the manifest's single PUT is the commit.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, ClassVar, Protocol, TypeVar

from .errors import UsageError

if TYPE_CHECKING:
    from .disk import DiskUsage
    from .limits import Limits, ProbeSettings, Stream
    from .objectstore import Requests

FILE = "file"
"""The store that is the output folder itself (``--store file``)."""
T = TypeVar("T")
Source = Path | BinaryIO
"""One file as a library takes it: a local path, or its bytes in memory (an object downloaded)."""


def scheme(store: str) -> str:
    """The scheme a ``--store`` value (or a results row's ``store``) names: ``file`` when it has none."""
    head, separator, _ = store.partition("://")
    return head if separator else FILE


class Location(ABC):
    """Where one checkpoint's files live: a folder, a prefix in a bucket, ... (``/`` names a place inside)."""

    local: ClassVar[bool] = False
    """A folder on this machine (``folder`` is it): a format's own index can be read without fetching the data."""

    @abstractmethod
    def __truediv__(self, name: str) -> Location: ...

    @abstractmethod
    def __str__(self) -> str: ...

    @abstractmethod
    def where(self, name: str) -> str:
        """The file ``name`` here, as messages name it."""

    @abstractmethod
    def write(self, name: str, fill: Callable[[Source], None]) -> None:
        """Write the file ``name`` with ``fill``, given a path to write or a buffer to fill."""

    @abstractmethod
    def read(self, name: str, parse: Callable[[Source], T]) -> T:
        """What ``parse`` makes of the file ``name`` (a path or its bytes); FileNotFoundError when absent."""

    @abstractmethod
    def put_text(self, name: str, text: str) -> None:
        """A small text file that appears whole or not at all (the manifest, the commit marker)."""

    @abstractmethod
    def get_text(self, name: str) -> str | None:
        """A small text file's text, or None when there is no such file."""

    def absent(self) -> str | None:
        """Why nothing here can be a checkpoint (no such folder), or None (a prefix always may be: its manifest
        says whether it is complete)."""
        return None

    @abstractmethod
    def kvstore(self, path: str = "") -> dict:
        """TensorStore's kvstore spec for ``path`` under this place."""

    @property
    def folder(self) -> Path:
        """This place as a local folder, for libraries that write only through a filesystem."""
        raise UsageError(f"{self} is not a local folder")

    def space(self) -> tuple[str, int] | None:
        """Where free space runs out (as a folder's name) and how many bytes are free; None where nothing fills up."""
        return None

    @abstractmethod
    def stage(self) -> Location:
        """A fresh place to write a checkpoint bound for here, which no reader takes for complete."""

    @abstractmethod
    def sync(self) -> None:
        """Make durable what this process wrote here."""

    @abstractmethod
    def publish(self, final: Location) -> None:
        """Make this staged, synced checkpoint the one at ``final``."""

    @abstractmethod
    def remove(self) -> None:
        """Delete the checkpoint here so that, interrupted, it never looks complete."""

    def remove_failed(self, failure: BaseException) -> None:
        """Delete what a failed save wrote here; ``failure`` stays the error (the store may be what failed)."""
        with contextlib.suppress(Exception):
            self.remove()


@dataclass
class Counted:
    """Filled in when a ``counting`` block exits: the requests made inside it (None on a local disk)."""

    requests: Requests | None = None


class _Manifest(Protocol):
    def write(self, directory: Location) -> None: ...


@dataclass
class Staging:
    """A checkpoint on its way to ``final``: every writer writes at ``partial``; one ``commit`` completes it."""

    final: Location
    partial: Location
    committed: bool = field(default=False, compare=False)

    @classmethod
    def begin(cls, final: Location) -> Staging:
        return cls(final, final.stage())

    def commit(self, manifest: _Manifest) -> None:
        """Once every writer's data is durable: the manifest last, synced, then published at ``final``."""
        manifest.write(self.partial)
        self.partial.sync()
        self.partial.publish(self.final)
        self.committed = True

    def abandon(self, failure: BaseException) -> None:
        self.partial.remove_failed(failure)


@contextlib.contextmanager
def staged(final: Location) -> Iterator[Staging]:
    """A checkpoint staged for ``final`` in one process: committed inside the block, or removed.

    A block that fails has what it wrote removed; one that ends without committing wrote no
    checkpoint, and its staging place goes too.
    """
    staging = Staging.begin(final)
    try:
        yield staging
    except BaseException as failure:
        staging.abandon(failure)
        raise
    if not staging.committed:
        staging.partial.remove()


class Storage(ABC):
    """What the harness does with one store during a run: its working places, probes, leftovers, kept copies."""

    kind: ClassVar[str]
    """The store's URL scheme (``file`` for the output folder): what ``Strategy.unsupported`` is asked about."""
    form: ClassVar[str]
    """How ``--store`` names it, for the message that lists the stores."""
    local: ClassVar[bool]
    """A local filesystem (the disk's I/O throttle needs one); no endpoint to give."""
    shared: ClassVar[bool] = False
    """Every process of a run, on any host, reaches the same checkpoints (``--ranks`` needs it)."""
    url: str
    """The store as the results record it."""
    injected_rtt_ms: float | None = None

    @classmethod
    @abstractmethod
    def validate(cls, url: str, endpoint: str | None) -> None:
        """Refuse a malformed ``--store`` (or endpoint) with one line, before anything runs."""

    @classmethod
    @abstractmethod
    def open(cls, url: str, out: Path, endpoint: str | None, injected_rtt_ms: float | None) -> Storage:
        """The store ``url`` names (``out`` is the output folder)."""

    @classmethod
    @abstractmethod
    def locate(cls, url: str, endpoint: str | None, injected_rtt_ms: float | None) -> Location:
        """The checkpoint at ``url`` (for ``verify``)."""

    @property
    @abstractmethod
    def measured_on(self) -> str:
        """What the limits probe measured, for a run's first line."""

    def check(self) -> None:
        """Refuse before anything is measured when the store cannot be used."""
        return None

    @abstractmethod
    def working(self, name: str) -> Location:
        """Where this run measures a checkpoint: its own place, whoever else shares the store."""

    def counting(self) -> contextlib.AbstractContextManager[Counted]:
        """The requests made inside the block (none to count on a local disk)."""
        return contextlib.nullcontext(Counted())

    @abstractmethod
    def settle(self, location: Location) -> DiskUsage:
        """Make the next load cold and account for the checkpoint's size, outside any timer."""

    def discard(self, location: Location) -> None:
        """Delete a checkpoint so that, interrupted, it never looks complete."""
        location.remove()

    @abstractmethod
    def install(self, location: Location, name: str) -> Location:
        """Keep a complete checkpoint under ``name``, replacing one kept there before; where it is now."""

    @abstractmethod
    def clean_stale(self) -> list[str]:
        """Remove what runs that no longer run left behind; what was removed."""

    def ensure_free(self, needed: int) -> None:
        """Refuse before writing when ``needed`` bytes will not fit."""
        return None

    @abstractmethod
    def limits(self, settings: ProbeSettings, reprobe: bool = False) -> Limits:
        """What the store allows at best: the ceilings every share and floor divides by."""

    @abstractmethod
    def stream(self, size: int) -> Stream:
        """One cheap write and cold read, before every repeat, to track how the store drifts."""
