"""The processes of a run with ranks: spawned here on one host, or started by torchrun on one host or many.

``spawn`` starts the ranks with ``torch.multiprocessing`` (spawn, so the worker must be a function
of an importable module, never a notebook cell). They rendezvous through a TCP store this process
serves on a port the kernel picks (no race for a free port), which also carries rank 0's result
and every rank's error back. A rank that raises or dies ends them all: ``spawn`` raises
``RankFailed`` naming the rank that failed first for its own reasons, not a peer that only saw its
connection close. Each rank joins a gloo process group whose timeout bounds every collective, so a
rank that hangs is named too, after that timeout.

Under ``torchrun`` the processes exist already: ``join`` makes this process the rank torchrun's
environment says, and the failure report is torchrun's.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import pickle
import re
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .errors import CkptbenchError
from .shards import cores

LOOPBACK = "127.0.0.1"
GRACE_S = 2.0
"""After the first failure, how long the other ranks get to fail on their own (and say why) before SIGTERM."""
_TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_ECHOES = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Connection refused",  # OCDBT's coordinator lives in rank 0: its death fails the others' writes thus
    "failed to connect to all addresses",
    "Broken pipe",
    "Timed out waiting",
)
"""What a rank reports when a peer failed first: never the cause when another rank names one."""
_TIMEOUTS = ("Timed out waiting", "timed out", "Timeout")
"""What a rank reports when it waited for a peer past the rank timeout."""
_ENDED = (-signal.SIGKILL, -signal.SIGTERM)
"""How the launcher ends ranks once another failed: never the cause when another rank timed out waiting."""
_LATE = re.compile(r"Rank (\d+) failed to pass monitoredBarrier in (\d+) ms")


class RankFailed(CkptbenchError):
    """A rank raised, died or hung; the run ended."""

    def __init__(self, rank: int | None, message: str) -> None:
        super().__init__(f"rank {rank} failed: {message}" if rank is not None else message)
        self.rank = rank


class Mailbox:
    """Small values between the ranks and whoever launched them: a TCP store, or this process's memory.

    It outlives a rank that dies, so what a rank put there (rank 0's result, a row in progress, an
    error) can still be read after the run ended.
    """

    def __init__(self, store: dist.Store | None = None) -> None:
        self._store = store
        self._memory: dict[str, Any] = {}

    @classmethod
    def serve(cls, timeout_s: float) -> Mailbox:
        """A store on a free port of this host, for ranks spawned here."""
        timeout = datetime.timedelta(seconds=timeout_s)
        return cls(dist.TCPStore(LOOPBACK, 0, is_master=True, wait_for_workers=False, timeout=timeout))

    @property
    def port(self) -> int:
        return self._store.port

    def put(self, key: str, value: Any) -> None:
        if self._store is None:
            self._memory[key] = value
        else:
            self._store.set(key, pickle.dumps(value))

    def get(self, key: str) -> Any:
        """The value, or None when nothing (or a deleted value) is there."""
        if self._store is None:
            return self._memory.get(key)
        if not self._store.check([key]):
            return None
        return pickle.loads(self._store.get(key))

    def drop(self, key: str) -> None:
        if self._store is None:
            self._memory.pop(key, None)
        else:
            self._store.delete_key(key)


@dataclass(frozen=True)
class World:
    """This process's place among all the run's processes."""

    rank: int
    size: int
    local_rank: int
    """Its rank among the processes on its host: local rank 0 does what is done once per host (page cache)."""
    local_size: int
    host: str
    """An address of rank 0's host the other ranks can reach."""
    mailbox: Mailbox = field(compare=False)
    launcher: str

    @property
    def threads(self) -> int:
        """This process's share of its host's cores."""
        return max(1, cores() // self.local_size)


def under_torchrun() -> bool:
    """Whether torchrun (or a launcher with its environment) started this process as one rank of a world."""
    return all(name in os.environ for name in _TORCHRUN)


def torchrun_size() -> int:
    return int(os.environ["WORLD_SIZE"])


def _quiet_grpc() -> None:
    """OCDBT's coordinator speaks gRPC, which logs every connection its shutdown closes; errors still show."""
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


def join(timeout_s: float) -> World:
    """Make this torchrun-started process its rank: threads sized to its share of the host, then the gloo group."""
    _quiet_grpc()
    env = os.environ
    world = World(
        rank=int(env["RANK"]),
        size=int(env["WORLD_SIZE"]),
        local_rank=int(env["LOCAL_RANK"]),
        local_size=int(env["LOCAL_WORLD_SIZE"]),
        host=env["MASTER_ADDR"],
        mailbox=Mailbox(),
        launcher="torchrun",
    )
    torch.set_num_threads(world.threads)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return world


def _one_line(err: BaseException) -> str:
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= 1000 else f"{text[:1000]}..."


def _entry(index: int, fn: Callable[..., Any], size: int, port: int, timeout_s: float, args: tuple) -> None:
    """One spawned rank: join the group, run ``fn``, put rank 0's result (or any rank's error) in the mailbox."""
    _quiet_grpc()
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(LOOPBACK, port, is_master=False, timeout=timeout)
    world = World(index, size, index, size, LOOPBACK, Mailbox(store), "spawn")
    torch.set_num_threads(world.threads)
    dist.init_process_group("gloo", store=store, rank=index, world_size=size, timeout=timeout)
    try:
        result = fn(world, *args)
        if index == 0:
            world.mailbox.put("result", result)
    except BaseException as err:
        world.mailbox.put(f"error/{index}", (time.time(), _one_line(err)))
        raise
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Set variables for the children spawn starts (it copies the environment), then restore ours."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value


def _is_echo(message: str) -> bool:
    return any(echo in message for echo in _ECHOES)


def _late(rank: int, message: str, reported_after_s: float) -> RankFailed | None:
    """The rank a monitored barrier waited for in vain, named by the rank that waited: it hung or was too slow.

    gloo words a peer that died mid-barrier the same way, with the configured timeout in place of the time it
    waited: a report that came sooner after the start than that timeout is the echo of a death, not a hang."""
    found = _LATE.search(message)
    if found is None:
        return None
    waited = int(found[2]) / 1000
    if reported_after_s < waited:
        return None
    return RankFailed(
        int(found[1]), f"did not reach a barrier within {waited:g} s: it hung or was too slow (rank {rank} waited)"
    )


def _first_failure(
    mailbox: Mailbox, context: mp.ProcessContext, err: Exception, timeout_s: float, started: float
) -> RankFailed:
    """The rank that failed for its own reasons: its own error; else a rank that another's barrier waited for
    in vain (it hung); else a rank that others timed out waiting for and that the launcher then killed (it
    hung, or was stopped); else a death without an error; else the first error."""
    reported = {r: e for r in range(len(context.processes)) if (e := mailbox.get(f"error/{r}")) is not None}
    errors = sorted((when, rank, message) for rank, (when, message) in reported.items())
    own = [(rank, message) for _, rank, message in errors if not _is_echo(message) and _LATE.search(message) is None]
    if own:
        return RankFailed(*own[0])
    late = [found for when, rank, message in errors if (found := _late(rank, message, when - started)) is not None]
    if late:
        return late[0]
    silent = [r for r, p in enumerate(context.processes) if r not in reported and p.exitcode in _ENDED]
    waited = [
        rank
        for when, rank, message in errors
        if any(word in message for word in _TIMEOUTS) and when - started >= timeout_s  # sooner: a death's echo
    ]
    if silent and waited:
        return RankFailed(
            silent[0],
            f"did not answer within the rank timeout ({timeout_s:g} s): it hung or was stopped "
            f"(rank {waited[0]} timed out waiting; the launcher then ended it)",
        )
    for rank, process in enumerate(context.processes):
        code = process.exitcode
        if rank not in reported and code not in (0, None, -signal.SIGTERM):
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
            return RankFailed(rank, f"{how}, without a Python error")
    if errors:
        _, rank, message = errors[0]
        return RankFailed(rank, message)
    return RankFailed(getattr(err, "error_index", None), str(err).strip().splitlines()[-1])


def spawn(mailbox: Mailbox, fn: Callable[..., Any], size: int, *args: Any, timeout_s: float) -> Any:
    """Run ``fn(world, *args)`` on ``size`` new processes of this host; rank 0's return value.

    ``fn`` must be a top-level function of an importable module. Each rank gets its share of the
    cores for OpenMP and torch. Raises ``RankFailed`` when any rank fails; the others are ended.
    """
    if "<locals>" in fn.__qualname__ or fn.__module__ == "__main__":
        raise TypeError(f"{fn.__qualname__}: spawned ranks import their function; define it in a module")
    threads = max(1, cores() // size)
    # torch's C++ warnings (gloo's "W..." lines as a peer goes away) would bury the one line that names the cause.
    quiet = os.environ.get("TORCH_CPP_LOG_LEVEL", "ERROR")
    started = time.time()
    with _environment(OMP_NUM_THREADS=str(threads), TORCH_CPP_LOG_LEVEL=quiet):
        context = mp.start_processes(
            _entry,
            args=(fn, size, mailbox.port, timeout_s, args),
            nprocs=size,
            join=False,
            start_method="spawn",
        )
    spawn_log = logging.getLogger("torch.multiprocessing.spawn")
    level = spawn_log.level
    spawn_log.setLevel(logging.ERROR)  # its "W... Terminating process" lines: the one error line says why
    try:
        while not context.join(timeout=0.5, grace_period=GRACE_S):
            pass
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as err:
        raise _first_failure(mailbox, context, err, timeout_s, started) from None
    finally:
        spawn_log.setLevel(level)
    return mailbox.get("result")
