"""Checkpoints in an S3 bucket: where one lives, the client that moves its objects, and the requests it cost.

TensorStore talks to S3 itself (its ``s3`` kvstore, spec from ``Prefix.kvstore``); the one-file
libraries go through boto3 (multipart upload, parallel ranged download). Requests are counted by
each library's own instruments: TensorStore's metrics (cumulative, process-wide: a delta around
the operation) and botocore's ``before-send``/``response-received`` events (once per HTTP attempt,
retries and multipart parts included). Retries and time-outs are bounded on both, so a dead or
wrong endpoint fails within seconds, not after TensorStore's default quarter of an hour.
"""

from __future__ import annotations

import functools
import io
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar
from urllib.parse import urlsplit

import tensorstore as ts

from .errors import CkptbenchError, UsageError

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


@dataclass
class Counted:
    """Filled in when a ``counting`` block exits: the requests made inside it (None on a local disk)."""

    requests: Requests | None = None


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
class Prefix:
    """A "folder" in a bucket: where one checkpoint's objects live (``key`` ends with '/')."""

    bucket: str
    key: str
    endpoint: Endpoint = field(compare=False)

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}"

    def __truediv__(self, name: str) -> Prefix:
        return replace(self, key=f"{self.key}{name}/")

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

    def upload(self, name: str, data: io.BufferedIOBase) -> None:
        """One object from a file object: a multipart upload in parallel parts when large."""
        self.client.upload_fileobj(data, self.bucket, f"{self.key}{name}", Config=transfer_config())

    def download(self, name: str) -> io.BytesIO:
        """One object into memory: a HEAD, then parallel ranged GETs when large."""
        buffer = io.BytesIO()
        self.client.download_fileobj(self.bucket, f"{self.key}{name}", buffer, Config=transfer_config())
        buffer.seek(0)
        return buffer

    def write_text(self, name: str, text: str) -> None:
        """One PUT: an object appears whole or not at all, so this is the commit marker's write."""
        self.client.put_object(Bucket=self.bucket, Key=f"{self.key}{name}", Body=text.encode())

    def read_text(self, name: str) -> str | None:
        """The object's text, or None if there is no such object."""
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=f"{self.key}{name}")["Body"]
        except self.client.exceptions.NoSuchKey:
            return None
        return body.read().decode()


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
