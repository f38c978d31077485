"""A multi-host launch rehearsed on one machine: each host a network namespace, the two joined by a veth pair.

What a real two-host job does, with nothing shared but the network between the hosts and the object
store: one ``torchrun`` node per namespace, c10d rendezvous at host 0's address, gloo between the
hosts over the veth pair (``GLOO_SOCKET_IFNAME``), and every rank writing to a SeaweedFS cluster
that host 0 serves on its address. The addresses exist only inside the namespaces; the machine's
own network is untouched. Needs root (creating namespaces does).

Everything made is named ``ckptbench-<pid>-h<N>`` (namespaces; the veth ends live only inside them,
so deleting a namespace deletes its end) and removed at the end, on Ctrl-C or SIGTERM, and, after
a kill, by the next rehearsal, which removes every namespace whose owning pid is gone together with
the processes still inside it. Every process started here also gets SIGTERM when this one dies.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from .errors import CkptbenchError, UsageError
from .s3server import DEFAULT_BUCKET, DEFAULT_PORT, REGION, credentials, die_with_parent

PREFIX = "ckptbench-"
LINK = "ckptbench0"
"""The veth end's name inside each namespace (the same in both, so one ``GLOO_SOCKET_IFNAME`` fits all)."""
SUBNET = "10.77.0"
HOSTS = 2
RENDEZVOUS_PORT = 29400
STOP_GRACE_S = 10.0
SERVER_TIMEOUT_S = 120.0
_OWNED = re.compile(rf"{re.escape(PREFIX)}(\d+)-h\d+")


class RehearsalError(CkptbenchError):
    """The rehearsal's network or S3 server could not be set up, or a host's node failed."""


@dataclass(frozen=True)
class Network:
    """The hosts of one rehearsal: host ``n`` is namespace ``namespace(n)`` at ``address(n)``."""

    owner: int

    def namespace(self, host: int) -> str:
        return f"{PREFIX}{self.owner}-h{host}"

    def address(self, host: int) -> str:
        return f"{SUBNET}.{host + 1}"

    @property
    def namespaces(self) -> list[str]:
        return [self.namespace(host) for host in range(HOSTS)]


def check_can_run() -> None:
    """Refuse in one line where namespaces cannot be made: not root, or no ``ip`` or ``unshare``."""
    if os.geteuid() != 0:
        raise UsageError("hosts: network namespaces need root; run it as root")
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            raise UsageError(f"hosts: `{tool}` is not installed (iproute2, util-linux)")


def _ip(*arguments: str) -> str:
    done = subprocess.run(["ip", *arguments], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RehearsalError(f"ip {' '.join(arguments)}: {done.stderr.strip()}")
    return done.stdout


def namespaces() -> list[str]:
    """Every rehearsal's namespace on this machine, live or left behind."""
    names = (line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip())
    return [name for name in names if _OWNED.fullmatch(name)]


def _remove(namespace: str) -> None:
    """The processes inside ``namespace`` killed, then the namespace (and its veth end) deleted."""
    with contextlib.suppress(RehearsalError):
        for pid in _ip("netns", "pids", namespace).split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline:
        with contextlib.suppress(RehearsalError):
            if not _ip("netns", "pids", namespace).split():
                break
        time.sleep(0.1)
    _ip("netns", "del", namespace)


def clean_stale() -> list[str]:
    """Remove the namespaces of rehearsals whose process is gone; their names."""
    removed = []
    for name in namespaces():
        owner = int(_OWNED.fullmatch(name)[1])
        if not psutil.pid_exists(owner):
            _remove(name)
            removed.append(name)
    return removed


@contextlib.contextmanager
def network() -> Iterator[Network]:
    """Two namespaces joined by a veth pair, each end with its address and up; removed on the way out."""
    made = Network(os.getpid())
    created: list[str] = []
    try:
        for name in made.namespaces:
            _ip("netns", "add", name)
            created.append(name)
        first, second = made.namespaces
        _ip("link", "add", LINK, "netns", first, "type", "veth", "peer", "name", LINK, "netns", second)
        for host, name in enumerate(made.namespaces):
            _ip("-n", name, "addr", "add", f"{made.address(host)}/24", "dev", LINK)
            _ip("-n", name, "link", "set", LINK, "up")
            _ip("-n", name, "link", "set", "lo", "up")
        yield made
    finally:
        for name in created:
            _remove(name)


def _start(namespace: str, command: Sequence[str], env: dict[str, str], **popen: object) -> subprocess.Popen:
    """``command`` inside ``namespace``, in its own process group, ended if this process dies."""
    parent = os.getpid()
    return subprocess.Popen(
        ["ip", "netns", "exec", namespace, *command],
        env=env,
        start_new_session=True,
        preexec_fn=lambda: die_with_parent(parent),
        **popen,
    )


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to its process group, SIGKILL after ``STOP_GRACE_S``."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _serve(net: Network, env: dict[str, str], volumes: int) -> tuple[subprocess.Popen, str]:
    """The S3 cluster on host 0's address (``s3-server --volumes``), once it says it is up; its endpoint."""
    address = net.address(0)
    command = [sys.executable, "-m", "ckptbench", "s3-server", "--host", address, "--port", str(DEFAULT_PORT)]
    server = _start(
        net.namespace(0),
        [*command, "--volumes", str(volumes)],
        env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    said: list[str] = []
    deadline = time.monotonic() + SERVER_TIMEOUT_S
    assert server.stdout is not None
    while time.monotonic() < deadline:
        line = server.stdout.readline()
        if not line:
            break
        said.append(line.strip())
        if "Ctrl-C stops it." in line:
            return server, f"http://{address}:{DEFAULT_PORT}"
    _stop(server)
    raise RehearsalError(f"the S3 server on host 0 did not start: {' | '.join(said[-3:])}")


def _nodes(net: Network, env: dict[str, str], per_host: int, run: Sequence[str]) -> list[subprocess.Popen]:
    """One torchrun node per host, rendezvous at host 0, each running ``python -m ckptbench run ...``.

    Each node gets its own host name too (a UTS namespace), so the run records two hosts; host 0's
    node serves the rendezvous (``is_host``: torch cannot tell that an address inside a namespace is its own).
    """
    nodes = []
    for host in range(HOSTS):
        named = ["unshare", "--uts", "--", "sh", "-c", 'hostname "$1" && shift && exec "$@"', "sh"]
        command = [
            *named, f"{PREFIX}h{host}",
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", str(HOSTS), "--nproc-per-node", str(per_host), "--node-rank", str(host),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{net.address(0)}:{RENDEZVOUS_PORT}",
            "--rdzv-id", f"{PREFIX}{net.owner}", "--rdzv-conf", f"is_host={int(host == 0)}",
            "--local-addr", net.address(host),
            "-m", "ckptbench", "run", *run,
        ]  # fmt: skip
        nodes.append(_start(net.namespace(host), command, env))
    return nodes


def _wait(net: Network, nodes: list[subprocess.Popen]) -> None:
    """Until every node ends; when one fails, the others are stopped and the failure named in one line."""
    while True:
        codes = [node.poll() for node in nodes]
        failed = [(host, code) for host, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            for node in nodes:
                _stop(node)
            host, code = failed[0]
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
            raise RehearsalError(f"host {host} ({net.namespace(host)}): its torchrun node {how}")
        if all(code == 0 for code in codes):
            return
        time.sleep(0.2)


@contextlib.contextmanager
def _terminated_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, so everything made is removed on the way out, as on Ctrl-C."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def rehearse(run: Sequence[str], *, per_host: int = 2, volumes: int = 2, log=print) -> None:
    """``run`` (the arguments of ``ckptbench run``) on 2 hosts x ``per_host`` ranks (``--ranks`` defaults to all of
    them) saving to an S3 cluster on host 0, the store. Raises ``RehearsalError`` naming a host whose node failed."""
    check_can_run()
    if per_host < 1:
        raise UsageError(f"--nproc-per-node {per_host}: each host runs at least one rank")
    if any(arg.split("=")[0] in ("--store", "--s3-endpoint") for arg in run):
        raise UsageError("hosts sets --store and --s3-endpoint itself: the store is its S3 cluster on host 0")
    for stale in clean_stale():
        log(f"removed the leftovers of an interrupted rehearsal: namespace {stale}")
    access, secret = credentials()
    path = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": access,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_REGION": REGION,
        "GLOO_SOCKET_IFNAME": LINK,
        "PYTHONPATH": path,
        "PYTHONUNBUFFERED": "1",  # the server's "up" line must reach this process as it is printed
    }
    started: list[subprocess.Popen] = []
    with _terminated_as_interrupt(), network() as net:
        try:
            server, endpoint = _serve(net, env, volumes)
            started.append(server)
            log(
                f"{HOSTS} hosts (namespaces {', '.join(net.namespaces)}; {net.address(0)} and {net.address(1)}), "
                f"{per_host} ranks each; S3 cluster ({volumes} volume servers) at {endpoint} on host 0"
            )
            store = ["--store", f"s3://{DEFAULT_BUCKET}/hosts", "--s3-endpoint", endpoint]
            nodes = _nodes(net, env, per_host, [*run, *store])
            started.extend(nodes)
            _wait(net, nodes)
        finally:
            for process in reversed(started):
                _stop(process)
