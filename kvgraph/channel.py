"""Bounded channels of batches between nodes, and the inbox that merges a node's inputs.

One :class:`Channel` per edge, with the edge's ``capacity`` (in batches), ``capacity_events``
(the same bound in events: batches vary in size), ``capacity_bytes`` (in bytes of decoded
events, as the sender estimated them: events vary in size too, from a block to thousands) and
``when_full``. The channel is full when any bound is reached; a batch larger than a bound still
goes into an empty channel, so that nothing can deadlock.
``block`` suspends the sender until there is room (backpressure reaches the source),
``drop_newest`` discards the batch being sent, ``drop_oldest`` the oldest queued one; drops are
counted, never silent. A port that feeds several edges sends the same batch to each (fan-out);
a node with several input edges reads them through one :class:`Inbox` (fan-in), round-robin so
that no input starves another.

Channels are single-threaded (asyncio); sends and receives that need not wait never yield.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Any

Batch = list[Any]


@dataclass(frozen=True)
class ChannelStats:
    """A snapshot, like trio's ``MemoryChannel.statistics()``, plus counters."""

    name: str
    capacity: int
    capacity_events: int
    current: int            # batches queued now
    current_events: int
    current_bytes: int      # estimated bytes of the events queued now
    capacity_bytes: int
    peak: int               # most batches ever queued at once
    waiting_senders: int
    sent_batches: int
    sent_events: int
    dropped_batches: int
    dropped_events: int
    when_full: str


class Channel:
    __slots__ = ("on_drop_queued", "name", "capacity", "capacity_events", "when_full", "_q", "_inbox", "_space", "closed", "peak",
                 "sent_batches", "sent_events", "dropped_batches", "dropped_events",
                 "queued_events", "src", "dst", "capacity_bytes", "queued_bytes", "_sizes")

    def __init__(self, name: str, capacity: int, when_full: str = "block",
                 src: str = "", dst: str = "", capacity_events: int = 1 << 62,
                 capacity_bytes: int = 1 << 62):
        if capacity < 1 or capacity_events < 1 or capacity_bytes < 1:
            raise ValueError("capacity, capacity_events and capacity_bytes must be >= 1")
        self.capacity_events, self.capacity_bytes = capacity_events, capacity_bytes
        if when_full not in ("block", "drop_newest", "drop_oldest"):
            raise ValueError(f"unknown when_full {when_full!r}")
        self.name, self.capacity, self.when_full = name, capacity, when_full
        self.on_drop_queued: Any = None  # called with a queued batch that drop_oldest drops
        self.src, self.dst = src, dst
        self._q: deque[Batch] = deque()
        self._inbox: Inbox | None = None
        self._space: deque[asyncio.Future[None]] = deque()
        self.closed = False
        self.peak = self.sent_batches = self.sent_events = 0
        self.dropped_batches = self.dropped_events = self.queued_events = 0
        self.queued_bytes = 0
        self._sizes: deque[int] = deque()   # the estimated bytes of each queued batch

    def _append(self, batch: Batch, size: int) -> None:
        q = self._q
        q.append(batch)
        self._sizes.append(size)
        self.queued_bytes += size
        n = len(batch)
        self.queued_events += n
        self.sent_batches += 1
        self.sent_events += n
        if len(q) > self.peak:
            self.peak = len(q)
        if self._inbox is not None:
            self._inbox.wake()

    async def send(self, batch: Batch, size: int = 0) -> int:
        """Queue ``batch`` (``size``: its estimated bytes, :func:`kvgraph.event.batch_bytes`);
        returns how many events a full channel dropped to make it fit (0 unless the policy is
        ``drop_newest`` or ``drop_oldest``)."""
        if self.closed:
            raise RuntimeError(f"channel {self.name} is closed")
        if not self.full:
            self._append(batch, size)
            return 0
        if self.when_full == "drop_newest":
            self._drop(batch)
            return len(batch)
        if self.when_full == "drop_oldest":
            lost = 0
            while self.full:
                old = self._q.popleft()
                self.queued_bytes -= self._sizes.popleft()
                self._drop(old, queued=True)
                lost += len(old)
            self._append(batch, size)
            return lost
        loop = asyncio.get_running_loop()
        while self.full:
            fut = loop.create_future()
            self._space.append(fut)
            try:
                await fut
            finally:
                if not fut.done():
                    fut.cancel()
                if fut in self._space:
                    self._space.remove(fut)
        self._append(batch, size)
        return 0

    @property
    def full(self) -> bool:
        q = self._q
        return len(q) >= self.capacity or (bool(q) and (self.queued_events >= self.capacity_events
                                                        or self.queued_bytes >= self.capacity_bytes))

    def _drop(self, batch: Batch, queued: bool = False) -> None:
        self.dropped_batches += 1
        self.dropped_events += len(batch)
        if queued:
            self.queued_events -= len(batch)
            if self.on_drop_queued is not None:
                self.on_drop_queued(batch)

    def get_nowait(self) -> Batch | None:
        if not self._q:
            return None
        batch = self._q.popleft()
        self.queued_bytes -= self._sizes.popleft()
        self.queued_events -= len(batch)
        while self._space:
            fut = self._space.popleft()
            if not fut.done():
                fut.set_result(None)
                break
        return batch

    def close(self) -> None:
        """The sender is done; the receiver drains what is queued, then sees the end."""
        self.closed = True
        if self._inbox is not None:
            self._inbox.wake()

    def clear(self) -> int:
        """Discard everything queued (abort); returns the number of events lost."""
        lost = self.queued_events
        self._q.clear()
        self._sizes.clear()
        self.queued_events = self.queued_bytes = 0
        return lost

    def __len__(self) -> int:
        return len(self._q)

    def statistics(self) -> ChannelStats:
        return ChannelStats(self.name, self.capacity, self.capacity_events, len(self._q),
                            self.queued_events, self.queued_bytes, self.capacity_bytes,
                            self.peak, len(self._space), self.sent_batches, self.sent_events,
                            self.dropped_batches, self.dropped_events, self.when_full)


class Inbox:
    """All input channels of one node, read as one stream (fan-in).

    A reload (:mod:`kvgraph.reload`) changes the set: :meth:`add` joins a new input edge,
    a removed one is closed by the runtime and leaves the inbox once drained, and
    :meth:`detach` ends the reading of a node being replaced at a batch boundary, leaving what
    is queued to its successor, which reads the same channels."""

    __slots__ = ("channels", "_waiter", "_next", "detached")

    def __init__(self, channels: list[Channel]):
        self.channels = list(channels)
        self._waiter: asyncio.Future[None] | None = None
        self._next = 0
        self.detached = False
        for ch in self.channels:
            ch._inbox = self

    def wake(self) -> None:
        if self._waiter is not None:
            resolve(self._waiter)

    def add(self, ch: Channel) -> None:
        """A new input edge (a reload)."""
        ch._inbox = self
        self.channels.append(ch)
        self.wake()

    def detach(self) -> None:
        """Stop reading (the node is being replaced): :meth:`get` returns None from now on,
        as at the end of the input, and the channels keep what they hold."""
        self.detached = True
        self.wake()

    def get_nowait(self) -> Batch | None:
        if self.detached:
            return None
        chs = self.channels
        n = len(chs)
        for k in range(n):
            i = (self._next + k) % n
            ch = chs[i]
            if ch._q:
                self._next = (i + 1) % n
                return ch.get_nowait()
            if ch.closed and n > 1:   # a removed edge, drained: it leaves the inbox
                del chs[i]
                self._next = 0
                return self.get_nowait()
        return None

    @property
    def exhausted(self) -> bool:
        return self.detached or all(ch.closed and not ch._q for ch in self.channels)

    async def get(self) -> Batch | None:
        """The next batch, or None once every input is closed and drained."""
        while True:
            batch = self.get_nowait()
            if batch is not None:
                return batch
            if self.exhausted:
                return None
            await self.wait()

    async def wait(self, timeout: float | None = None) -> None:
        """Return when a batch may have arrived, an input closed, or ``timeout`` passed.

        A timer on the waiter itself, not ``asyncio.wait_for``: that makes a task per call,
        which at a few thousand waits a second is a visible share of an idle relay's CPU."""
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, resolve, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()


def resolve(fut: "asyncio.Future[None]") -> None:
    """Wake whoever awaits ``fut``, once (a timer and an event may both try)."""
    if not fut.done():
        fut.set_result(None)
