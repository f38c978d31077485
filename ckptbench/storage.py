"""Where checkpoints go, chosen by URL scheme: ``file`` (the output folder) or ``s3://BUCKET/PREFIX``.

Each store is one module holding its ``Location`` (one checkpoint's place: files by name, the
TensorStore kvstore, the commit protocol's steps) and its ``Storage`` (a run's working places,
probes, leftovers and kept copies); see ``location`` for the interface. Nothing outside those
modules knows which store it is talking to. A new store (``gs://``, ``az://``) is therefore one new
module and one line in ``STORES``; ``tests/test_storage.py`` adds an in-memory ``mem://`` store that
way and runs strategies through it.
"""

from __future__ import annotations

from pathlib import Path

from .errors import UsageError
from .local import FileStorage, Folder
from .location import FILE, Location, Storage, scheme, staged
from .objectstore import S3Storage

STORES: dict[str, type[Storage]] = {
    FILE: FileStorage,
    "s3": S3Storage,
}
"""Every store, by the scheme of its URL (``file`` is the output folder itself)."""


def _store(store: str) -> type[Storage]:
    found = STORES.get(scheme(store))
    if found is None:
        raise UsageError(f"--store {store!r}: expected {' or '.join(s.form for s in STORES.values())}")
    return found


def check_settings(store: str, endpoint: str | None, injected_rtt_ms: float | None, ranks: int | None) -> None:
    """Refuse a store, endpoint, injected latency or rank count that cannot work together, in one line."""
    kind = _store(store)
    if kind.local and (endpoint is not None or injected_rtt_ms is not None):
        remote = " or ".join(f"{name}://" for name, s in STORES.items() if not s.local)
        raise UsageError(f"--s3-endpoint and --s3-rtt-ms need an {remote} --store")
    kind.validate(store, endpoint)
    if injected_rtt_ms is not None and injected_rtt_ms < 0:
        raise UsageError(f"--s3-rtt-ms must be 0 or more, got {injected_rtt_ms:g}")
    if ranks is not None and not kind.shared:
        raise UsageError(f"--ranks needs a store every rank reaches; an {scheme(store)}:// --store is one process's")
    if ranks is not None and injected_rtt_ms is not None:
        raise UsageError("--s3-rtt-ms is one process's delay proxy; with --ranks, run without it")


def is_local(store: str) -> bool:
    """Whether ``store`` is a local filesystem (what the disk's I/O throttle needs)."""
    return _store(store).local


def open_storage(store: str, out: Path, endpoint: str | None = None, injected_rtt_ms: float | None = None) -> Storage:
    """The store ``store`` names: ``file`` (checkpoints in ``out``), or a URL at ``endpoint``."""
    return _store(store).open(store, out, endpoint, injected_rtt_ms)


def location(
    where: str | Path | Location, endpoint: str | None = None, injected_rtt_ms: float | None = None
) -> Location:
    """A checkpoint's place from a folder path or a store's URL (a place given as such is kept)."""
    if isinstance(where, Location):
        return where
    if isinstance(where, Path) or "://" not in where:
        return Folder(Path(where))
    return _store(where).locate(where, endpoint, injected_rtt_ms)


def remote_kinds() -> list[str]:
    """The stores that are not a local folder, by scheme (``list`` says which strategies write to each)."""
    return [name for name, store in STORES.items() if not store.local]


__all__ = [
    "FILE",
    "STORES",
    "Location",
    "Storage",
    "check_settings",
    "is_local",
    "location",
    "open_storage",
    "remote_kinds",
    "scheme",
    "staged",
]
