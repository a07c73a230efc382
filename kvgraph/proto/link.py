"""A node's connection to a broker, as operators see it: up or down, since when, how often.

The ``redis`` and ``kafka`` nodes learn that their broker is away from a failed call (their
clients have no disconnect callback, unlike nats-py); :class:`Link` turns those calls into the
same gauges and counters the ``nats`` nodes show, so that ``kvgraph top``, the live view and
Prometheus read every bus the same way, and into one warning per outage, not one per call.
"""

from __future__ import annotations

import time
from typing import Any, Awaitable, Callable, TypeVar

from ..node import counter, gauge

T = TypeVar("T")

LINK_METRICS = {
    "disconnects": counter("Times the connection to the broker was found broken."),
    "reconnects": counter("Times it came back."),
    "connected": gauge("1 while the broker answers, 0 while it does not."),
    "disconnected_since": gauge("Unix time the connection went down; 0 while connected."),
}


class Link:
    """The state of one node's connection to ``what`` (a broker, in words for the log)."""

    def __init__(self, node: Any, what: str):
        self.node, self.what = node, what
        extra = node.metrics.extra
        for name in ("disconnects", "reconnects", "disconnected_since"):
            extra.setdefault(name, 0)
        extra["connected"] = 1
        self.up = True
        self.wait_s = 0.0   # the next backoff (see backoff())

    def down(self, exc: BaseException) -> None:
        """A call failed for want of the broker."""
        if not self.up:
            return
        self.up = False
        extra = self.node.metrics.extra
        extra["connected"] = 0
        extra["disconnected_since"] = time.time()
        extra["disconnects"] += 1
        self.node.log.warning("lost %s (%s: %s); retrying", self.what, type(exc).__name__, exc)

    def ok(self) -> None:
        """A call succeeded."""
        self.wait_s = 0.0
        if self.up:
            return
        self.up = True
        extra = self.node.metrics.extra
        extra["connected"] = 1
        extra["disconnected_since"] = 0
        extra["reconnects"] += 1
        self.node.log.info("%s is back", self.what)

    def backoff(self, most: float = 5.0) -> float:
        """Seconds to wait before the next attempt: the node's ``reconnect_wait_s``, doubling
        up to ``most``."""
        first = self.node.config["reconnect_wait_s"]
        self.wait_s = min(most, self.wait_s * 2) if self.wait_s else first
        return self.wait_s


async def with_backoff(config: Any, call: Callable[[], Awaitable[T]],
                       retry: Callable[[BaseException], bool] = lambda exc: True,
                       most: float = 5.0,
                       on_retry: Callable[[BaseException], None] | None = None) -> T:
    """``await call()`` until it succeeds, at most the node's ``connect_attempts`` times,
    waiting ``reconnect_wait_s`` and then twice as long each time (up to ``most`` s). An error
    ``retry`` refuses, or the last one, is raised as it is; ``on_retry`` hears the others."""
    import asyncio

    wait = config["reconnect_wait_s"]
    attempts = config["connect_attempts"]
    for n in range(1, attempts + 1):
        try:
            return await call()
        except Exception as exc:
            if not retry(exc) or n == attempts:
                raise
            if on_retry is not None:
                on_retry(exc)
            await asyncio.sleep(wait)
            wait = min(wait * 2, most)
    raise AssertionError("unreachable: connect_attempts is at least 1")


async def first_contact(node: Any, attempt: Callable[[], Awaitable[None]], what: str,
                        retry: Callable[[BaseException], bool] = lambda exc: True) -> None:
    """:func:`with_backoff` of ``attempt``; what it cannot do is a NodeFailure naming
    ``what``. How a ``redis`` or ``kafka`` node reaches its broker at start."""
    from ..errors import NodeFailure

    try:
        await with_backoff(node.config, attempt, retry)
    except Exception as exc:
        raise NodeFailure(f"cannot reach {what}: {type(exc).__name__}: {exc}") from exc
    node.log.info("connected to %s", what)
