"""A TCP proxy that breaks storage on purpose, for fault tests: put it between the code under test
and a real server (``LUMBAR_RAY_S3_ENDPOINT=proxy.url``) and it forwards bytes both ways, except:

* **outage**: every open connection is reset (RST) and the listening socket is closed, so new
  connections are refused, for ``seconds``; then it listens again on the same port. Started by
  the test (:meth:`FaultProxy.outage`) or by the proxy itself when the ``outage_after``-th
  request carrying ``marker`` arrives (that request is not forwarded): a known point in the run,
  not a moment on the clock, so a slow machine does not move it.
* **random resets**: with ``reset_probability``, a chunk of a connection whose last request
  carried ``marker`` (a request, or a piece of its response) resets the connection instead of
  passing (seeded: ``seed``).

It listens on a free loopback port and runs its own event loop in a daemon thread; ``stop()``
(or leaving the ``with`` block) resets every connection and ends the thread.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

HOST = "127.0.0.1"


@dataclass
class FaultStats:
    connections: int = 0  # accepted and connected upstream
    marked_requests: int = 0  # requests that carried the marker
    resets: int = 0  # connections reset at random
    outages: int = 0


class FaultProxy:
    def __init__(self, upstream: str, *, marker: bytes = b".dcm HTTP/1.", reset_probability: float = 0.0,
                 seed: int = 0, outage_after: int | None = None, outage_s: float = 0.0):
        parts = urlsplit(upstream if "://" in upstream else f"tcp://{upstream}")
        self.upstream = (parts.hostname or HOST, int(parts.port))
        self.marker = marker
        self.reset_probability = reset_probability
        self.outage_after = outage_after
        self.outage_s = outage_s
        self.stats = FaultStats()
        self.port: int | None = None
        self._rng = random.Random(seed)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._down = threading.Event()
        self._triggered = False
        self._timer: asyncio.TimerHandle | None = None

    # ----- control (any thread) -----------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def down(self) -> bool:
        return self._down.is_set()

    def start(self) -> "FaultProxy":
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        self._server = self._call(self._listen(0))
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def outage(self, seconds: float) -> None:
        """Reset every connection and refuse new ones for ``seconds`` (from now)."""
        self._call(self._outage_now(seconds))

    def wait_up(self, timeout: float = 30.0) -> bool:
        """Wait until no outage is under way; False on timeout."""
        deadline = time.monotonic() + timeout
        while self.down and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self.down

    def stop(self) -> None:
        if self._loop is None:
            return
        try:
            self._call(self._shutdown())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()
            self._loop = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _call(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # ----- the event loop's side ----------------------------------------------------------------

    async def _listen(self, port: int) -> asyncio.AbstractServer:
        return await asyncio.start_server(self._handle, HOST, port, reuse_address=True)

    async def _outage_now(self, seconds: float) -> None:
        self._begin_outage(seconds)

    def _begin_outage(self, seconds: float) -> None:
        self._down.set()
        self.stats.outages += 1
        if self._server is not None:
            self._server.close()  # the listening socket closes: connections are refused
            self._server = None
        for pair in list(self._pairs):
            self._reset_pair(pair)
        self._timer = self._loop.call_later(seconds, lambda: self._loop.create_task(self._end_outage()))

    async def _end_outage(self) -> None:
        self._server = await self._listen(self.port)
        self._down.clear()

    async def _shutdown(self) -> None:
        self._down.set()
        if self._timer is not None:
            self._timer.cancel()
        if self._server is not None:
            self._server.close()
            self._server = None
        for pair in list(self._pairs):
            self._reset_pair(pair)
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            _reset(writer)
            return
        pair = (writer, up_writer)
        self._pairs.add(pair)
        self.stats.connections += 1
        state = {"marked": False}
        try:
            await asyncio.gather(self._pump(reader, up_writer, pair, state, request=True),
                                 self._pump(up_reader, writer, pair, state, request=False))
        except asyncio.CancelledError:  # stop(): the connections were reset already
            pass
        finally:
            self._pairs.discard(pair)
            for w in pair:
                w.close()

    async def _pump(self, reader, writer, pair, state: dict, *, request: bool) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if request:
                    hits = data.count(self.marker)
                    state["marked"] = hits > 0
                    self.stats.marked_requests += hits
                    if (hits and self.outage_after is not None and not self._triggered
                            and self.stats.marked_requests >= self.outage_after):
                        self._triggered = True
                        self._begin_outage(self.outage_s)  # this request is lost with the rest
                        return
                if state["marked"] and self.reset_probability and self._rng.random() < self.reset_probability:
                    self.stats.resets += 1
                    self._reset_pair(pair)
                    return
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError, RuntimeError):
            self._reset_pair(pair)

    def _reset_pair(self, pair) -> None:
        for w in pair:
            _reset(w)
        self._pairs.discard(pair)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), as a crashed server or a dropped route does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()
