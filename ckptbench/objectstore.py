"""Checkpoints in an S3 bucket (``--store s3://BUCKET/PREFIX``): where one lives, what a run does with the
bucket, the client that moves its objects, and the requests it cost.

A bucket has no rename and no page cache: every PUT is durable once acknowledged, nothing is cached
on the client (each load opens a fresh TensorStore context; boto3 keeps nothing), and the manifest,
written last, is the commit marker, so a prefix without one is never complete. Each run writes
under its own working prefix (host, pid, token), so runs sharing a bucket never collide, and a later
run on the same host removes a dead run's.

TensorStore talks to S3 itself (its ``s3`` kvstore, spec from ``Prefix.kvstore``); the one-file
libraries go through boto3 (multipart upload, parallel ranged download). Requests are counted by
each library's own instruments: TensorStore's metrics (cumulative, process-wide: a delta around
the operation) and botocore's ``before-send``/``response-received`` events (once per HTTP attempt,
retries and multipart parts included). Retries and time-outs are bounded on both, so a dead or
wrong endpoint fails within seconds, not after TensorStore's default quarter of an hour.
"""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import os
import secrets
import socket
import statistics
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import psutil
import tensorstore as ts

from .disk import DiskUsage
from .errors import CkptbenchError, UsageError
from .limits import Limits, ProbeSettings, Stream
from .location import Counted, Location, Source, Storage, T
from .manifest import MANIFEST

MiB = 1 << 20
SCHEME = "s3://"
PART_BYTES = 16 * MiB
"""Multipart part size and ranged-GET size of the one-file uploads and downloads."""
TRANSFER_THREADS = 8
CONNECT_TIMEOUT_S, READ_TIMEOUT_S, ATTEMPTS = 5, 60, 3
"""boto3: each request may take this long to connect and to answer, and is tried this many times."""
TENSORSTORE_RETRIES = {"max_retries": 3, "initial_delay": "200ms", "max_delay": "1s"}
"""TensorStore's default is 32 retries backing off to 32 s each: about 15 minutes on a dead endpoint."""
STALL_S = "30"
"""A TensorStore request that moves no bytes for this long fails (its default is 120 s)."""
_TS_METRICS = ("/tensorstore/kvstore/s3/", "/tensorstore/http/request_started")
_WORK = ".work"
_THREADS = 8
PREFLIGHT_TIMEOUT_S = 5
"""The pre-flight check's connect and read time-out (two attempts): a wrong endpoint fails within seconds."""


class StorageError(CkptbenchError):
    """The object store is unreachable, refuses the credentials, or lacks the bucket: said in one line."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Endpoint:
    """How to reach the store: ``url`` None means AWS itself; the key pair comes from the environment."""

    url: str | None
    region: str

    @classmethod
    def from_environment(cls, url: str | None) -> Endpoint:
        missing = [v for v in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not os.environ.get(v)]
        if missing:
            raise StorageError(
                f"an s3:// store needs credentials: set {' and '.join(missing)} "
                "(`python -m ckptbench s3-server` prints the local server's)",
                exit_code=2,
            )
        os.environ.setdefault("TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS", STALL_S)
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        return cls(url, region)


def parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, "prefix/"); a usage error for anything else."""
    if not url.startswith(SCHEME):
        raise UsageError(f"--store {url!r}: expected 'file' or s3://BUCKET/PREFIX")
    bucket, _, prefix = url[len(SCHEME) :].partition("/")
    if not (3 <= len(bucket) <= 63) or not all(c.islower() or c.isdigit() or c in ".-" for c in bucket):
        raise UsageError(f"--store {url!r}: {bucket!r} is not an S3 bucket name (3-63 of a-z, 0-9, '.', '-')")
    parts = [p for p in prefix.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise UsageError(f"--store {url!r}: '.' and '..' are not allowed in the prefix")
    return bucket, "".join(f"{p}/" for p in parts)


def check_endpoint(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise UsageError(f"--s3-endpoint {url!r}: expected http://HOST:PORT or https://HOST[:PORT]")
    return url.rstrip("/")


@dataclass(frozen=True)
class Requests:
    """HTTP requests of one operation, by method, and the object bytes they moved.

    ``put`` counts POSTs too (a multipart upload's start and completion); ``get`` counts listings.
    Bytes are object data (request bodies of PUTs, response bodies of GETs), not headers.
    """

    put: int = 0
    get: int = 0
    head: int = 0
    delete: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0

    @property
    def total(self) -> int:
        return self.put + self.get + self.head + self.delete

    def __add__(self, other: Requests) -> Requests:
        return Requests(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __sub__(self, other: Requests) -> Requests:
        return Requests(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)))


def tensorstore_requests() -> Requests:
    """TensorStore's cumulative S3 requests, from its metrics (which have no per-method label).

    Its kvstore writes are PUTs (deletes count as writes too; ckptbench's saves issue none), its
    reads GETs, its listings GETs; every other HTTP request it started (the HEAD of a metadata
    check) is a HEAD. Retried attempts are left out.
    """
    values: dict[str, float] = {}
    for prefix in _TS_METRICS:
        for metric in ts.experimental_collect_matching_metrics(prefix):
            for value in metric["values"]:
                if "value" in value and len(value) == 1:
                    values[metric["name"].rsplit("/", 1)[-1]] = value["value"]
    count = {k: int(values.get(k, 0)) for k in ("read", "write", "list", "retries", "request_started")}
    return Requests(
        put=count["write"],
        get=count["read"] + count["list"],
        head=max(0, count["request_started"] - count["read"] - count["write"] - count["list"] - count["retries"]),
        bytes_sent=int(values.get("bytes_written", 0)),
        bytes_received=int(values.get("bytes_read", 0)),
    )


class BotoCounter:
    """Every HTTP attempt a boto3 client makes, by method, and the object bytes moved (thread-safe)."""

    _METHODS: ClassVar[dict[str, str]] = {"PUT": "put", "POST": "put", "GET": "get", "HEAD": "head", "DELETE": "delete"}

    def __init__(self, client: Any) -> None:
        self._lock = threading.Lock()
        self._counts = Requests()
        client.meta.events.register("before-send.s3.*", self._sent)
        client.meta.events.register("response-received.s3.*", self._received)

    def _add(self, **counts: int) -> None:
        with self._lock:
            self._counts = self._counts + Requests(**counts)

    def _sent(self, request: Any, event_name: str, **_: Any) -> None:
        sent = int(request.headers.get("Content-Length", 0) or 0) if request.method == "PUT" else 0
        self._add(**{self._METHODS.get(request.method, "get"): 1, "bytes_sent": sent})

    def _received(self, event_name: str, response_dict: dict | None = None, **_: Any) -> None:
        if response_dict is not None and event_name.endswith(".GetObject"):
            self._add(bytes_received=int(response_dict["headers"].get("content-length", 0) or 0))

    @property
    def requests(self) -> Requests:
        with self._lock:
            return self._counts


@functools.cache
def _client(endpoint: Endpoint, keys: tuple[str, str, str], attempts: int, timeout: float) -> tuple[Any, BotoCounter]:
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=min(timeout, CONNECT_TIMEOUT_S),
        read_timeout=timeout,
        retries={"total_max_attempts": attempts, "mode": "standard"},
        max_pool_connections=2 * TRANSFER_THREADS,
        s3={"addressing_style": "path"},
    )
    client = boto3.client(
        "s3",
        endpoint_url=endpoint.url,
        region_name=endpoint.region,
        aws_access_key_id=keys[0],
        aws_secret_access_key=keys[1],
        aws_session_token=keys[2] or None,
        config=config,
    )
    return client, BotoCounter(client)


def client(endpoint: Endpoint, attempts: int = ATTEMPTS, timeout: float = READ_TIMEOUT_S) -> tuple[Any, BotoCounter]:
    """One boto3 client per endpoint, key pair and policy, with its request counter.

    The keys are read from the environment now and given explicitly: boto3's default session would
    keep the first ones it found.
    """
    keys = tuple(os.environ.get(v, "") for v in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"))
    return _client(endpoint, keys, attempts, timeout)


def transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=PART_BYTES,
        multipart_chunksize=PART_BYTES,
        max_concurrency=TRANSFER_THREADS,
        use_threads=True,
    )


@dataclass(frozen=True)
class Prefix(Location):
    """A "folder" in a bucket: where one checkpoint's objects live (``key`` ends with '/').

    Written in place (``stage`` is the prefix itself): there is no rename, every PUT is durable once
    acknowledged, and the manifest, PUT last, is what makes it complete.
    """

    bucket: str
    key: str
    endpoint: Endpoint = field(compare=False)

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}"

    def __truediv__(self, name: str) -> Prefix:
        return replace(self, key=f"{self.key}{name}/")

    def where(self, name: str) -> str:
        return f"{self}{name}"

    @property
    def client(self) -> Any:
        return client(self.endpoint)[0]

    def kvstore(self, path: str = "") -> dict:
        """TensorStore's ``s3`` kvstore at ``path`` under this prefix.

        The region is given with the endpoint (else TensorStore first asks the bucket for it); the
        conditional write replaces the HEAD before each metadata PUT (as TensorStore does against
        AWS itself); credentials only from the environment (never the instance-metadata service).
        """
        spec = {
            "driver": "s3",
            "bucket": self.bucket,
            "path": f"{self.key}{path}",
            "aws_region": self.endpoint.region,
            "use_conditional_write": True,
            "aws_credentials": {"type": "environment"},
            "s3_request_retries": TENSORSTORE_RETRIES,
        }
        if self.endpoint.url is not None:
            spec["endpoint"] = self.endpoint.url
        return spec

    def write(self, name: str, fill: Callable[[Source], None]) -> None:
        """One object, filled in memory, then uploaded: a multipart upload in parallel parts when large."""
        buffer = io.BytesIO()
        fill(buffer)
        buffer.seek(0)
        self.upload(name, buffer)

    def read(self, name: str, parse: Callable[[Source], T]) -> T:
        """One object downloaded into memory (a HEAD, then parallel ranged GETs when large), then parsed."""
        from botocore.exceptions import ClientError

        try:
            buffer = self.download(name)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                raise FileNotFoundError(f"{self.where(name)}: no such object") from err
            raise
        return parse(buffer)

    def upload(self, name: str, data: io.BufferedIOBase) -> None:
        self.client.upload_fileobj(data, self.bucket, f"{self.key}{name}", Config=transfer_config())

    def download(self, name: str) -> io.BytesIO:
        buffer = io.BytesIO()
        self.client.download_fileobj(self.bucket, f"{self.key}{name}", buffer, Config=transfer_config())
        buffer.seek(0)
        return buffer

    def put_text(self, name: str, text: str) -> None:
        """One PUT: an object appears whole or not at all, so this is the commit marker's write."""
        self.client.put_object(Bucket=self.bucket, Key=f"{self.key}{name}", Body=text.encode())

    def get_text(self, name: str) -> str | None:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=f"{self.key}{name}")["Body"]
        except self.client.exceptions.NoSuchKey:
            return None
        return body.read().decode()

    def objects(self) -> Iterator[dict[str, Any]]:
        """Every object under this prefix, as the server lists them (key, size, ...)."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.key)
        for page in pages:
            yield from page.get("Contents", [])

    def children(self) -> list[Prefix]:
        """The prefixes one level below this one."""
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.key, Delimiter="/"
        )
        names = [c["Prefix"].removeprefix(self.key).rstrip("/") for p in pages for c in p.get("CommonPrefixes", [])]
        return [self / name for name in names]

    def stage(self) -> Prefix:
        """A fresh prefix (each run's own, each checkpoint numbered) is written in place."""
        return self

    def sync(self) -> None:
        """Nothing to do: an acknowledged PUT is durable."""

    def publish(self, final: Location) -> None:
        """Nothing to do: the manifest just PUT made the prefix complete where it is."""
        if final != self:
            raise ValueError(f"{self} was staged in place for itself, not for {final}")

    def remove(self) -> None:
        """The manifest first (from then on it is not a checkpoint), then every other object, in batches."""
        s3 = self.client
        s3.delete_object(Bucket=self.bucket, Key=f"{self.key}{MANIFEST}")

        def delete(keys: list[str]) -> None:
            found = s3.delete_objects(Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys]})
            if found.get("Errors"):
                first = found["Errors"][0]
                raise OSError(f"{self}: could not delete {first['Key']}: {first.get('Message', first)}")

        keys = (o["Key"] for o in self.objects())
        _parallel(delete, iter(lambda: list(itertools.islice(keys, 1000)), []))


@contextmanager
def counting(endpoint: Endpoint) -> Iterator[Counted]:
    """The requests TensorStore and boto3 make inside the block, counted by their own instruments.

    TensorStore bumps a write's counters a moment after its future resolves, so the end is taken
    once the counters stop moving (outside any timer that the block encloses).
    """
    counter = client(endpoint)[1]
    counted = Counted()
    before = tensorstore_requests() + counter.requests
    yield counted
    after = tensorstore_requests()
    for _ in range(50):
        time.sleep(0.005)
        latest = tensorstore_requests()
        if latest == after:
            break
        after = latest
    counted.requests = after + counter.requests - before


def explain(err: BaseException, endpoint: Endpoint, bucket: str) -> StorageError:
    """A botocore failure of the pre-flight check as one line that says what to do."""
    from botocore.exceptions import ClientError, ConnectTimeoutError, EndpointConnectionError, ReadTimeoutError

    where = endpoint.url or "AWS S3"
    if isinstance(err, EndpointConnectionError | ConnectTimeoutError):
        return StorageError(
            f"cannot reach S3 at {where}: {err} (is the server running? `python -m ckptbench s3-server` starts one)"
        )
    if isinstance(err, ReadTimeoutError):
        return StorageError(f"S3 at {where} accepted the connection but did not answer: {err}")
    if isinstance(err, ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("404", "NoSuchBucket") or status == 404:
            return StorageError(
                f"bucket {bucket!r} does not exist at {where} (create it, or let `python -m ckptbench s3-server "
                f"--bucket {bucket}` do it)",
                exit_code=2,
            )
        if code in ("403", "SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied") or status == 403:
            return StorageError(
                f"S3 at {where} refused the key pair in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY for bucket "
                f"{bucket!r} ({code or status})",
                exit_code=2,
            )
    return StorageError(f"S3 at {where}, bucket {bucket!r}: {type(err).__name__}: {err}")


class S3Storage(Storage):
    """A prefix in a bucket: ``s3://bucket/prefix``; kept checkpoints go to ``prefix/<name>/``."""

    kind = "s3"
    form = "s3://BUCKET/PREFIX"
    local = False
    shared = True

    def __init__(self, url: str, endpoint: str | None, injected_rtt_ms: float | None = None) -> None:
        self.url = url
        self.bucket, key = parse_url(url)
        self._endpoint_url = None if endpoint is None else check_endpoint(endpoint)
        self.injected_rtt_ms = injected_rtt_ms
        self._run = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._key = key
        self._names = itertools.count()
        self._endpoint: Endpoint | None = None

    @classmethod
    def validate(cls, url: str, endpoint: str | None) -> None:
        parse_url(url)
        if endpoint is not None:
            check_endpoint(endpoint)

    @classmethod
    def open(cls, url: str, out: Path, endpoint: str | None, injected_rtt_ms: float | None) -> S3Storage:
        return cls(url, endpoint, injected_rtt_ms)

    @classmethod
    def locate(cls, url: str, endpoint: str | None, injected_rtt_ms: float | None) -> Prefix:
        return cls(url, endpoint, injected_rtt_ms).root

    @property
    def measured_on(self) -> str:
        return f"{self.url} (single-stream PUT/GET)"

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

    def counting(self) -> contextlib.AbstractContextManager[Counted]:
        return counting(self.endpoint)

    def settle(self, location: Location) -> DiskUsage:
        """Nothing to evict on the client; the size and object count as the server lists them."""
        objects = list(_prefix(location).objects())
        size = sum(o["Size"] for o in objects)
        return DiskUsage(size, size, len(objects))

    def install(self, location: Location, name: str) -> Prefix:
        """Server-side copies into ``prefix/<name>/``, the manifest last; then the working copy goes."""
        source, final = _prefix(location), self.root / name
        final.remove()
        s3 = source.client
        objects = [o["Key"] for o in source.objects()]
        marker = f"{source.key}{MANIFEST}"

        def copy(key: str) -> None:
            target = f"{final.key}{key.removeprefix(source.key)}"
            s3.copy_object(Bucket=final.bucket, Key=target, CopySource={"Bucket": source.bucket, "Key": key})

        _parallel(copy, (k for k in objects if k != marker))
        if marker in objects:
            copy(marker)
        source.remove()
        return final

    def clean_stale(self) -> list[str]:
        """Working prefixes of this host's runs whose process is gone (another host's are left alone)."""
        work = self.root / _WORK
        host = socket.gethostname()
        removed = []
        for stale in work.children():
            run = stale.key.removeprefix(work.key).rstrip("/")
            owner, _, rest = run.rpartition("-")
            owner_host, _, pid = owner.rpartition("-")
            if owner_host == host and pid.isdigit() and rest and not psutil.pid_exists(int(pid)):
                for checkpoint in stale.children():
                    checkpoint.remove()
                stale.remove()
                removed.append(str(stale))
        return removed

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
            place.remove()
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
