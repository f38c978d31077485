"""Latency without netem: a TCP proxy on loopback that adds a fixed round-trip time to every connection.

This machine's kernel has no ``sch_netem`` (``tc qdisc ... netem`` fails: "Specified qdisc kind is
unknown") and no modules to load it, so the delay is injected here: each direction holds every chunk
it reads for half the round-trip time before passing it on, without holding back the chunks behind
it (so throughput is not capped the way a stop-and-wait relay would cap it), and a new connection
waits one round trip before it reaches the server, like a handshake over the slow link. It runs in
its own process (no GIL shared with the benchmark) and exits when its parent closes its stdin.

    python -m ckptbench.delayproxy --target http://127.0.0.1:8333 --rtt-ms 20    # prints LISTENING http://...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import time
from urllib.parse import urlsplit

from .errors import CkptbenchError

_READY = "LISTENING "


async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            if data is None:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(deliver())
    with contextlib.suppress(OSError):
        while data := await reader.read(1 << 16):
            queue.put_nowait((time.monotonic() + delay, data))
    queue.put_nowait((time.monotonic() + delay, None))
    with contextlib.suppress(OSError):
        await sender


async def _serve(target: tuple[str, int], rtt: float) -> None:
    async def connect(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(rtt)
        try:
            server_reader, server_writer = await asyncio.open_connection(*target)
        except OSError:
            client_writer.close()
            return
        half = rtt / 2
        await asyncio.gather(_relay(client_reader, server_writer, half), _relay(server_reader, client_writer, half))
        for writer in (client_writer, server_writer):
            writer.close()

    server = await asyncio.start_server(connect, "127.0.0.1", 0, backlog=512)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"{_READY}http://{host}:{port}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.buffer.read)
    os._exit(0)  # the parent closed stdin or exited: drop every connection at once, without a word


class DelayProxy:
    """The proxy as a child process in front of ``target`` (an http:// endpoint); ``endpoint`` is where to connect."""

    def __init__(self, target: str, rtt_ms: float) -> None:
        parts = urlsplit(target)
        if parts.hostname is None or parts.port is None:
            raise CkptbenchError(f"cannot inject latency in front of {target}: it needs an explicit host and port")
        self.target, self.rtt_ms = target, rtt_ms
        self.endpoint = ""
        self._process: subprocess.Popen | None = None

    def start(self) -> DelayProxy:
        self._process = subprocess.Popen(
            [sys.executable, "-m", __name__, "--target", self.target, "--rtt-ms", str(self.rtt_ms)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line.startswith(_READY):
            self.stop()
            raise CkptbenchError(f"the delay proxy did not start: {line.strip()!r}")
        self.endpoint = line.removeprefix(_READY).strip()
        return self

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(OSError):
            process.stdin.close()  # type: ignore[union-attr]
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ckptbench.delayproxy", description=__doc__)
    parser.add_argument("--target", required=True, help="http://HOST:PORT of the server")
    parser.add_argument("--rtt-ms", type=float, required=True)
    args = parser.parse_args(argv)
    parts = urlsplit(args.target)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve((parts.hostname, parts.port), args.rtt_ms / 1000))


if __name__ == "__main__":
    main()
