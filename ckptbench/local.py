"""Checkpoints in a local folder (``--store file``, the output folder): ``disk``'s work behind the store interface.

A save is staged under a partial name carrying the writer's pid (``disk.partial_name``), synced and
renamed into place; a load is made cold by evicting the checkpoint's pages. Each run measures in its
own working folder, and a later run removes a dead run's partial and working folders.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from . import disk, throttle
from . import limits as limits_lib
from .disk import DiskUsage
from .errors import UsageError
from .limits import Limits, ProbeSettings, Stream
from .location import FILE, Location, Source, Storage, T


@dataclass(frozen=True)
class Folder(Location):
    """A checkpoint's folder on a local filesystem."""

    path: Path
    local: ClassVar[bool] = True

    def __truediv__(self, name: str) -> Folder:
        return Folder(self.path / name)

    def __str__(self) -> str:
        return str(self.path)

    def where(self, name: str) -> str:
        return str(self.path / name)

    def write(self, name: str, fill: Callable[[Source], None]) -> None:
        fill(self.path / name)

    def read(self, name: str, parse: Callable[[Source], T]) -> T:
        path = self.path / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        return parse(path)

    def put_text(self, name: str, text: str) -> None:
        """Written under a temporary name and renamed, so it exists only once complete."""
        partial = self.path / f".{name}.partial"
        partial.write_text(text)
        os.replace(partial, self.path / name)

    def get_text(self, name: str) -> str | None:
        path = self.path / name
        return path.read_text() if path.is_file() else None

    def absent(self) -> str | None:
        if self.path.is_dir():
            return None
        return "a file, not a checkpoint folder" if self.path.exists() else "no such checkpoint folder"

    def kvstore(self, path: str = "") -> dict:
        return {"driver": "file", "path": f"{self.path.resolve()}/{path}"}

    @property
    def folder(self) -> Path:
        return self.path

    def space(self) -> tuple[str, int] | None:
        try:
            return str(self.path.parent), shutil.disk_usage(self.path).free
        except OSError:
            return None

    def stage(self) -> Folder:
        """A new folder beside this one, under this process's partial name."""
        partial = disk.partial_name(self.path)
        partial.mkdir(parents=True)
        return Folder(partial)

    def sync(self) -> None:
        """Durable: one syncfs of the filesystem, or under the I/O throttle each file's fsync (``disk.sync_files``)."""
        if throttle.active():
            disk.sync_files(self.path)
        else:
            disk.sync_filesystem(self.path)

    def publish(self, final: Location) -> None:
        target = _folder(final)
        os.replace(self.path, target)
        disk.fsync_directory(target.parent)

    def remove(self) -> None:
        disk.discard(self.path)

    def remove_failed(self, failure: BaseException) -> None:
        disk.remove_failed(self.path, failure)


def _folder(location: Location) -> Path:
    if not isinstance(location, Folder):
        raise TypeError(f"{location} is not a local folder")
    return location.path


class FileStorage(Storage):
    """The output folder: checkpoints staged, synced, renamed; evicted from the page cache before each cold load."""

    kind = FILE
    form = "'file'"
    local = True
    shared = True
    url = FILE

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._token = secrets.token_hex(3)

    @classmethod
    def validate(cls, url: str, endpoint: str | None) -> None:
        if url != FILE:
            raise UsageError(f"--store {url!r}: the local store is 'file' (its folder is --out)")

    @classmethod
    def open(cls, url: str, out: Path, endpoint: str | None, injected_rtt_ms: float | None) -> FileStorage:
        return cls(out)

    @classmethod
    def locate(cls, url: str, endpoint: str | None, injected_rtt_ms: float | None) -> Folder:
        return Folder(Path(url))

    @property
    def measured_on(self) -> str:
        return "disk"

    def working(self, name: str) -> Folder:
        return Folder(disk.working_name(self.directory, name, self._token))

    def settle(self, location: Location) -> DiskUsage:
        return disk.evict(_folder(location))

    def install(self, location: Location, name: str) -> Folder:
        disk.install(_folder(location), self.directory / name)
        return Folder(self.directory / name)

    def clean_stale(self) -> list[str]:
        return [str(p) for p in disk.clean_stale(self.directory)]

    def ensure_free(self, needed: int) -> None:
        disk.ensure_free(self.directory, needed)

    def limits(self, settings: ProbeSettings, reprobe: bool = False) -> Limits:
        return limits_lib.measured(self.directory, settings, reprobe=reprobe)

    def stream(self, size: int) -> Stream:
        return limits_lib.stream(self.directory, size)
