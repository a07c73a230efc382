"""ZeroMQ endpoint syntax, shared by the ``zmq`` source and sink.

Checked without importing pyzmq, so that ``validate`` stays fast and works where libzmq is absent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_TCP = re.compile(r"^tcp://(?P<host>\*|\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.:-]+?):(?P<port>\d+|\*)$")


@dataclass(frozen=True)
class Endpoint:
    transport: str          # tcp | ipc | inproc
    host: str = ""
    port: int | None = None
    path: str = ""

    def with_port_offset(self, offset: int) -> str:
        """The endpoint of DP rank ``r`` when ports are offset by rank (vLLM: ``5557 + r``)."""
        if self.transport != "tcp" or self.port is None:
            raise ValueError("only tcp endpoints with a numeric port can be offset")
        return f"tcp://{self.host}:{self.port + offset}"

    def __str__(self) -> str:
        if self.transport == "tcp":
            return f"tcp://{self.host}:{'*' if self.port is None else self.port}"
        return f"{self.transport}://{self.path}"


def parse_endpoint(value: str) -> Endpoint:
    """Parse ``tcp://host:port``, ``ipc://path`` or ``inproc://name``; ValueError says why not."""
    if value.startswith(("ipc://", "inproc://")):
        transport, _, path = value.partition("://")
        if not path:
            raise ValueError(f"{transport} endpoint needs a path after '{transport}://'")
        return Endpoint(transport, path=path)
    if not value.startswith("tcp://"):
        raise ValueError("a ZMQ endpoint starts with tcp://, ipc:// or inproc://")
    m = _TCP.match(value)
    if not m:
        raise ValueError("expected tcp://HOST:PORT, e.g. tcp://127.0.0.1:5557 or tcp://*:5557")
    port = m.group("port")
    if port != "*" and not 0 < int(port) < 65536:
        raise ValueError(f"port {port} is out of range 1-65535")
    return Endpoint("tcp", m.group("host"), None if port == "*" else int(port))


def rank_endpoints(value: str, ranks: int, step: int) -> list[str]:
    """Endpoints for DP ranks ``0..ranks-1``; rank r listens on ``port + r * step``."""
    if ranks == 1:
        return [value]
    ep = parse_endpoint(value)
    return [ep.with_port_offset(r * step) for r in range(ranks)]


def probe_connect(endpoint: str) -> str | None:
    """None when something listens at ``endpoint`` (tcp: a TCP connect; ipc: the socket file
    exists), else what is wrong. ZMQ itself would retry silently for ever."""
    import os
    import socket

    ep = parse_endpoint(endpoint)
    if ep.transport == "ipc":
        return None if os.path.exists(ep.path) else f"nothing listens at {endpoint} (no socket)"
    if ep.transport != "tcp" or ep.port is None:
        return None
    host = ep.host.strip("[]")
    try:
        with socket.create_connection((host, ep.port), timeout=2):
            return None
    except OSError as exc:
        return f"nothing answers at {endpoint}: {exc.strerror or exc}"


def probe_bind(endpoint: str) -> str | None:
    """None when ``endpoint`` can be bound now, else why not."""
    import socket

    ep = parse_endpoint(endpoint)
    if ep.transport != "tcp" or ep.port is None:
        return None
    host = "0.0.0.0" if ep.host in ("*", "") else ep.host.strip("[]")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, ep.port))
        return None
    except OSError as exc:
        return f"cannot bind {endpoint}: {exc.strerror or exc}"


class Readable:
    """Await until any of some plain ZMQ sockets has a message, or a timeout passes.

    ``zmq.asyncio`` does this with futures, a poller and callbacks per call, and registers
    the descriptors with the event loop on every wait; a relay that waits a thousand times a
    second spent a tenth of its CPU there. This keeps the sockets' notification descriptors
    registered from one wait to the next, and unregisters them only when they signal while
    nobody waits (the relay is busy, or held back by a full channel): a descriptor that
    stays readable would otherwise wake the event loop on every turn.

    ZMQ signals those descriptors on a change, not a state, so the sockets' ``EVENTS`` are
    checked before waiting, and the caller's timeout bounds what a missed signal could cost."""

    def __init__(self, sockets: list[Any]):
        import asyncio

        import zmq

        self._sockets = sockets
        self._fds = [s.get(zmq.FD) for s in sockets]
        self._events, self._pollin = int(zmq.EVENTS), int(zmq.POLLIN)
        self._loop = asyncio.get_running_loop()
        self._waiter: Any = None
        self._registered = False

    def _signalled(self) -> None:
        w = self._waiter
        if w is None:
            self._unregister()
        elif not w.done():
            w.set_result(None)

    def _unregister(self) -> None:
        if self._registered:
            for fd in self._fds:
                self._loop.remove_reader(fd)
            self._registered = False

    async def wait(self, timeout: float) -> None:
        from ..channel import resolve

        for s in self._sockets:
            if s.get(self._events) & self._pollin:
                return
        if not self._registered:
            for fd in self._fds:
                self._loop.add_reader(fd, self._signalled)
            self._registered = True
        fut = self._waiter = self._loop.create_future()
        timer = self._loop.call_later(timeout, resolve, fut)
        try:
            await fut
        finally:
            self._waiter = None
            timer.cancel()

    def wake(self) -> None:
        """End a :meth:`wait` now (the graph is stopping)."""
        from ..channel import resolve

        if self._waiter is not None:
            resolve(self._waiter)

    def close(self) -> None:
        self._unregister()


class OwnContext:
    """A ZMQ context that one publishing node owns, so that stopping can wait for what it sent.

    libzmq keeps sending what a closed socket still queues (up to the socket's LINGER) only
    while its context lives, and pyzmq does not terminate its global context at interpreter
    exit: a process that ends right after its last send loses whatever the I/O thread had not
    written yet. Measured: a ``kvgraph run`` publishing 6,250 messages to a subscriber that
    was reading more slowly lost the last 4,980 at exit, with LINGER set to a second. Here
    :meth:`close` closes the sockets with a linger and waits, on a thread, for the context to
    terminate: until every queued message is handed to the network, or the linger is over.
    """

    def __init__(self, asyncio: bool = False):
        import zmq
        import zmq.asyncio

        self.ctx: Any = zmq.asyncio.Context() if asyncio else zmq.Context()

    def socket(self, kind: int) -> Any:
        return self.ctx.socket(kind)

    async def close(self, sockets: list[Any], linger_s: float, log: Any = None) -> None:
        import asyncio
        import time

        for s in sockets:
            if s is not None and not s.closed:
                s.close(linger=int(linger_s * 1000))
        started = time.monotonic()
        await asyncio.to_thread(self.ctx.term)
        waited = time.monotonic() - started
        if log is not None and waited >= 0.5:
            log.info("waited %.1f s for subscribers to take the last messages (linger %.0f s)",
                     waited, linger_s)


class Reconnector:
    """Connects again where ZMQ gives up: a connecting socket whose peer sent a message over
    MAXMSGSIZE is disconnected by libzmq for good (a protocol error; it does not retry, unlike
    after a peer restart). This watches the sockets' monitors and, on a disconnection,
    connects the endpoint again; the batches lost meanwhile show as a seq gap."""

    def __init__(self, sockets: list[tuple[Any, list[str]]], log: Any, metrics: Any):
        import zmq

        self._zmq, self.log, self.metrics = zmq, log, metrics
        self._watched = [(s, eps, s.get_monitor_socket(zmq.EVENT_DISCONNECTED))
                         for s, eps in sockets]
        metrics.extra.setdefault("reconnects", 0)

    def check(self) -> None:
        """Non-blocking: connect again every endpoint that reported a disconnection."""
        from zmq.utils.monitor import parse_monitor_message

        for sock, endpoints, monitor in self._watched:
            while True:
                try:
                    event = parse_monitor_message(monitor.recv_multipart(self._zmq.NOBLOCK))
                except self._zmq.Again:
                    break
                ep = event["endpoint"].decode(errors="replace")
                if ep not in endpoints:
                    continue
                self.metrics.extra["reconnects"] += 1
                self.log.warning("disconnected from %s (the engine went away, or sent a message "
                                 "over max_frame_bytes); connecting again", ep)
                try:
                    sock.disconnect(ep)
                except self._zmq.ZMQError:
                    pass
                sock.connect(ep)

    def close(self) -> None:
        for sock, _, monitor in self._watched:
            try:
                sock.disable_monitor()
            except Exception:
                pass
            monitor.close(0)
        self._watched = []
