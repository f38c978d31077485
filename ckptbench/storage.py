"""Where checkpoints go: a local folder or an S3 prefix, behind the operations the harness needs.

The harness stages a save, makes it durable, turns it cold and accounts for it, discards or keeps
it, and cleans up after interrupted runs; each store does these its own way. A folder syncs,
evicts pages and renames (``disk``). A bucket has no rename and no page cache: every PUT is
durable once acknowledged, nothing is cached on the client (each load opens a fresh TensorStore
context; boto3 keeps nothing), and the manifest, written last, is the commit marker, so a prefix
without one is never complete. Each run writes under its own working prefix (host, pid, token),
so runs sharing a bucket never collide, and a later run on the same host removes a dead run's.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import secrets
import socket
import statistics
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from . import disk
from . import limits as limits_lib
from .disk import DiskUsage
from .errors import UsageError
from .limits import Limits, ProbeSettings, Stream
from .manifest import MANIFEST
from .objectstore import Counted, Endpoint, Prefix, check_endpoint, client, counting, explain, parse_url

Location = Path | Prefix
"""A checkpoint's place: a folder, or a prefix in a bucket."""
FILE = "file"
_WORK = ".work"
_THREADS = 8
PREFLIGHT_TIMEOUT_S = 5
"""The pre-flight check's connect and read time-out (two attempts): a wrong endpoint fails within seconds."""


class Storage(ABC):
    """What the harness does with checkpoints, for one store."""

    kind: str
    """``file`` or ``s3``: what ``Strategy.unsupported`` is asked about."""
    url: str
    """The store as the results record it."""
    injected_rtt_ms: float | None = None

    def check(self) -> None:
        """Refuse before anything is measured when the store cannot be used."""
        return None

    @abstractmethod
    def working(self, name: str) -> Location:
        """Where this run measures a checkpoint: its own place, whoever else shares the store."""

    @abstractmethod
    def staged(self, location: Location) -> contextlib.AbstractContextManager[Location]:
        """Where to write a checkpoint that is complete and durable at ``location`` when the block succeeds."""

    def counting(self) -> contextlib.AbstractContextManager[Counted]:
        """The requests made inside the block (none to count on a local disk)."""
        return contextlib.nullcontext(Counted())

    @abstractmethod
    def settle(self, location: Location) -> DiskUsage:
        """Make the next load cold and account for the checkpoint's size, outside any timer."""

    @abstractmethod
    def discard(self, location: Location) -> None:
        """Delete a checkpoint so that, interrupted, it never looks complete."""

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


class FileStorage(Storage):
    """A local folder: staged under a partial name, synced, renamed; evicted from the page cache."""

    kind = FILE
    url = FILE

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._token = secrets.token_hex(3)

    def working(self, name: str) -> Path:
        return disk.working_name(self.directory, name, self._token)

    def staged(self, location: Location) -> contextlib.AbstractContextManager[Path]:
        return disk.staged(_path(location))

    def settle(self, location: Location) -> DiskUsage:
        return disk.evict(_path(location))

    def discard(self, location: Location) -> None:
        disk.discard(_path(location))

    def install(self, location: Location, name: str) -> Path:
        disk.install(_path(location), self.directory / name)
        return self.directory / name

    def clean_stale(self) -> list[str]:
        return [str(p) for p in disk.clean_stale(self.directory)]

    def ensure_free(self, needed: int) -> None:
        disk.ensure_free(self.directory, needed)

    def limits(self, settings: ProbeSettings, reprobe: bool = False) -> Limits:
        return limits_lib.measured(self.directory, settings, reprobe=reprobe)

    def stream(self, size: int) -> Stream:
        return limits_lib.stream(self.directory, size)


def _path(location: Location) -> Path:
    if not isinstance(location, Path):
        raise TypeError(f"{location} is not a folder")
    return location


class S3Storage(Storage):
    """A prefix in a bucket: ``s3://bucket/prefix``; kept checkpoints go to ``prefix/<name>/``."""

    kind = "s3"

    def __init__(self, url: str, endpoint: str | None, injected_rtt_ms: float | None = None) -> None:
        self.url = url
        self.bucket, key = parse_url(url)
        self._endpoint_url = None if endpoint is None else check_endpoint(endpoint)
        self.injected_rtt_ms = injected_rtt_ms
        self._run = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._key = key
        self._names = itertools.count()
        self._endpoint: Endpoint | None = None

    @property
    def endpoint(self) -> Endpoint:
        """The endpoint clients use (the delay proxy's when latency is injected); set by ``check``."""
        if self._endpoint is None:
            self.check()
        assert self._endpoint is not None
        return self._endpoint

    @property
    def root(self) -> Prefix:
        return Prefix(self.bucket, self._key, self.endpoint)

    def check(self) -> None:
        """Credentials present, the server answering, the key pair accepted and the bucket there.

        TensorStore, asked to create an array in a missing bucket, retries forever (a 404 on its
        conditional PUT reads as a lost race), so the bucket is checked before any save.
        """
        if self._endpoint is not None:
            return
        from botocore.exceptions import BotoCoreError, ClientError

        endpoint = Endpoint.from_environment(self._endpoint_url)
        if self.injected_rtt_ms is not None:
            endpoint = Endpoint(self._start_delay(endpoint), endpoint.region)
        try:
            client(endpoint, attempts=2, timeout=PREFLIGHT_TIMEOUT_S)[0].head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as err:
            raise explain(err, endpoint, self.bucket) from err
        self._endpoint = endpoint

    def _start_delay(self, endpoint: Endpoint) -> str:
        from .delayproxy import DelayProxy

        if endpoint.url is None:
            raise UsageError("--s3-rtt-ms needs --s3-endpoint: the delay is injected in front of that endpoint")
        proxy = DelayProxy(endpoint.url, float(self.injected_rtt_ms or 0)).start()
        weakref.finalize(self, proxy.stop)
        return proxy.endpoint

    def working(self, name: str) -> Prefix:
        return self.root / _WORK / self._run / f"{name}.{next(self._names)}"

    @contextmanager
    def staged(self, location: Location) -> Iterator[Prefix]:
        """A fresh prefix, written in place: the manifest, PUT last, is what makes it complete."""
        prefix = _prefix(location)
        try:
            yield prefix
        except BaseException:
            with contextlib.suppress(Exception):  # the store may be what failed: report that, not this
                self.discard(prefix)
            raise

    def counting(self) -> contextlib.AbstractContextManager[Counted]:
        return counting(self.endpoint)

    def _objects(self, prefix: Prefix) -> Iterator[dict[str, Any]]:
        pages = prefix.client.get_paginator("list_objects_v2").paginate(Bucket=prefix.bucket, Prefix=prefix.key)
        for page in pages:
            yield from page.get("Contents", [])

    def settle(self, location: Location) -> DiskUsage:
        """Nothing to evict on the client; the size and object count as the server lists them."""
        objects = list(self._objects(_prefix(location)))
        size = sum(o["Size"] for o in objects)
        return DiskUsage(size, size, len(objects))

    def discard(self, location: Location) -> None:
        """The manifest first (from then on it is not a checkpoint), then every other object, in batches."""
        prefix = _prefix(location)
        s3 = prefix.client
        s3.delete_object(Bucket=prefix.bucket, Key=f"{prefix.key}{MANIFEST}")

        def delete(keys: list[str]) -> None:
            found = s3.delete_objects(Bucket=prefix.bucket, Delete={"Objects": [{"Key": k} for k in keys]})
            if found.get("Errors"):
                first = found["Errors"][0]
                raise OSError(f"{prefix}: could not delete {first['Key']}: {first.get('Message', first)}")

        keys = (o["Key"] for o in self._objects(prefix))
        _parallel(delete, iter(lambda: list(itertools.islice(keys, 1000)), []))

    def install(self, location: Location, name: str) -> Prefix:
        """Server-side copies into ``prefix/<name>/``, the manifest last; then the working copy goes."""
        source, final = _prefix(location), self.root / name
        self.discard(final)
        s3 = source.client
        objects = [o["Key"] for o in self._objects(source)]
        marker = f"{source.key}{MANIFEST}"

        def copy(key: str) -> None:
            target = f"{final.key}{key.removeprefix(source.key)}"
            s3.copy_object(Bucket=final.bucket, Key=target, CopySource={"Bucket": source.bucket, "Key": key})

        _parallel(copy, (k for k in objects if k != marker))
        if marker in objects:
            copy(marker)
        self.discard(source)
        return final

    def clean_stale(self) -> list[str]:
        """Working prefixes of this host's runs whose process is gone (another host's are left alone)."""
        work = self.root / _WORK
        s3 = work.client
        host = socket.gethostname()
        removed = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=work.bucket, Prefix=work.key, Delimiter="/"):
            for common in page.get("CommonPrefixes", []):
                run = common["Prefix"].removeprefix(work.key).rstrip("/")
                owner, _, rest = run.rpartition("-")
                owner_host, _, pid = owner.rpartition("-")
                if owner_host == host and pid.isdigit() and rest and not psutil.pid_exists(int(pid)):
                    stale = work / run
                    for checkpoint in self._children(stale):
                        self.discard(checkpoint)
                    self.discard(stale)
                    removed.append(str(stale))
        return removed

    def _children(self, prefix: Prefix) -> list[Prefix]:
        pages = prefix.client.get_paginator("list_objects_v2").paginate(
            Bucket=prefix.bucket, Prefix=prefix.key, Delimiter="/"
        )
        names = [c["Prefix"].removeprefix(prefix.key).rstrip("/") for p in pages for c in p.get("CommonPrefixes", [])]
        return [prefix / name for name in names]

    def limits(self, settings: ProbeSettings, reprobe: bool = False) -> Limits:
        """One object uploaded and downloaded three times, as one-file strategies do: measured every run."""
        return self._probe(settings.total_bytes, repeats=3)

    def stream(self, size: int) -> Stream:
        probe = self._probe(size, repeats=1)
        return Stream(probe.write_gbps, probe.read_gbps, probe.probe_s)

    def _probe(self, size: int, repeats: int) -> Limits:
        """One object of ``size`` random bytes uploaded and downloaded ``repeats`` times."""
        place = self.working("store-probe")
        data = os.urandom(size)
        writes, reads = [], []
        try:
            for _ in range(repeats):
                writes.append(_timed(lambda: place.upload("probe", io.BytesIO(data))))
                reads.append(_timed(lambda: place.download("probe")))
        finally:
            self.discard(place)
        return Limits(
            write_gbps=size / statistics.median(writes) / 1e9,
            read_gbps=size / statistics.median(reads) / 1e9,
            probe_bytes=size,
            probe_s=sum(writes) + sum(reads),
            tool="one object, boto3",
        )


def _prefix(location: Location) -> Prefix:
    if not isinstance(location, Prefix):
        raise TypeError(f"{location} is not an S3 prefix")
    return location


def _timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def _parallel(action: Callable[[Any], None], items: Iterator[Any]) -> None:
    with ThreadPoolExecutor(_THREADS) as pool:
        for future in [pool.submit(action, item) for item in items]:
            future.result()


def open_storage(
    store: str, out: Path, s3_endpoint: str | None = None, injected_rtt_ms: float | None = None
) -> Storage:
    """``file`` (checkpoints in ``out``) or ``s3://bucket/prefix`` at ``s3_endpoint``."""
    if store == FILE:
        return FileStorage(out)
    return S3Storage(store, s3_endpoint, injected_rtt_ms)
