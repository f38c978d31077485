"""A fresh worker process that measures items one at a time for its parent (pyperf's design).

State one measurement leaves in a process (the heap's free lists, huge pages, library thread
pools and caches) can move the next one. A run that measures each round in a new process
starts every round from the same state, so its rounds are independent samples. Workers come
from a fork server (``multiprocessing``'s forkserver), a process that has only imported the
worker's module: each is a fork of that clean state, started in about a second instead of the
several seconds a fresh interpreter takes to import torch and the libraries. Forking the
measuring process itself would copy exactly the state a worker is meant to leave behind, and
forking a process with running threads (TensorStore's, OpenMP's) can deadlock the child.
Tensors among the arguments travel through ``torch.multiprocessing``, which maps their shared
memory in the child: a model is shared, not rebuilt or copied. The fork server starts with the
process's first worker, so each worker takes its parent's environment as it is now.

The parent sends one item at a time and waits for its answer or for the worker's death, so a
worker that crashes becomes an error for the item it was measuring, never a hang.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from collections.abc import Callable
from contextlib import suppress
from multiprocessing.connection import Connection, wait
from typing import Any

import torch.multiprocessing as mp

_PRCTL = ctypes.CDLL(None, use_errno=True).prctl
_PR_SET_PDEATHSIG = 1

Serve = Callable[[Any], Any]
"""Measures one item in the worker; what it returns goes back to the parent (picklable)."""


class WorkerError(Exception):
    """An item failed in the worker (its error, as one line), or the worker died while measuring it."""


def one_line(err: BaseException) -> str:
    """An error as a results row records it: its type and message on one line."""
    return " ".join(f"{type(err).__name__}: {err}".split())


def _serve(connection: Connection, environment: dict[str, str], start: Callable[..., Serve], args: tuple) -> None:
    """The worker's loop: take the parent's environment, set up with ``start(*args)``, say ready, then answer
    each item until told to stop. It dies with the fork server, which ends when the parent does."""
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)
    os.environ.clear()
    os.environ.update(environment)
    serve = start(*args)
    connection.send(("ready", None))
    while (item := connection.recv()) is not None:
        try:
            connection.send(("ok", serve(item)))
        except Exception as err:  # the parent records it as the item's failure and goes on
            connection.send(("error", one_line(err)))
    connection.close()


class Worker:
    """A spawned process, started on first use, that measures items with what ``start(*args)`` returns.

    ``start`` must be a module-level function (the child imports it). A worker that died is replaced
    by a new one at the next item.
    """

    def __init__(self, start: Callable[..., Serve], *args: Any) -> None:
        self._start = start
        self._args = args
        self._live: tuple[mp.Process, Connection] | None = None
        self._started_s = 0.0

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn(self) -> tuple[mp.Process, Connection]:
        started = time.perf_counter()
        context = mp.get_context("forkserver")
        context.set_forkserver_preload([self._start.__module__])
        parent, child = context.Pipe()
        arguments = (child, dict(os.environ), self._start, self._args)
        process = context.Process(target=_serve, args=arguments, daemon=True)
        process.start()
        child.close()
        self._live = process, parent
        self._receive(self._live, "starting")
        self._started_s += time.perf_counter() - started
        return self._live

    def take_started(self) -> float:
        """Seconds spent starting workers (spawn, imports, ``start``) since last asked, for the caller to bill."""
        seconds, self._started_s = self._started_s, 0.0
        return seconds

    def _receive(self, live: tuple[mp.Process, Connection], doing: str) -> Any:
        """The worker's next answer; WorkerError if it reports an error, or if it dies first (then it is dropped)."""
        process, connection = live
        wait([connection, process.sentinel])
        try:
            kind, value = connection.recv()
        except (EOFError, ConnectionError):
            process.join()
            connection.close()
            self._live = None
            code = process.exitcode
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            raise WorkerError(f"the worker process died ({how}) while {doing}") from None
        if kind == "error":
            raise WorkerError(value)
        return value

    def measure(self, item: Any, label: str) -> Any:
        """``item`` measured in the worker (started if none is alive); WorkerError names what went wrong."""
        live = self._live or self._spawn()
        live[1].send(item)
        return self._receive(live, f"measuring {label}")

    def close(self) -> None:
        """Tell the worker to stop and wait for it (it holds no state worth keeping)."""
        if self._live is None:
            return
        process, connection = self._live
        self._live = None
        with suppress(BrokenPipeError, ConnectionError):
            connection.send(None)
        process.join(timeout=60)
        if process.is_alive():
            process.kill()
            process.join()
        connection.close()
