"""What a bus sink wrote and the bus has not confirmed yet, shared by the ``nats``, ``redis``
and ``kafka`` sinks: their bounds (``max_pending_events``, ``max_pending_bytes``) and their
resending in order after a broken connection both read this ledger."""

from __future__ import annotations

from typing import Any

from ..node import JsonSchema, counter, gauge, integer

#: What a sink with this ledger counts (the ``redis`` and ``kafka`` sinks; the ``nats`` sink
#: words its own).
PENDING_METRICS = {
    "resent_messages": counter("Messages sent again after the bus did not confirm them (each "
                               "may have left a copy, with the same idempotency id)."),
    "held_events": gauge("Events written but not yet confirmed by the bus."),
    "not_main_group": counter("Events of KV groups other than the main one, not sent in a "
                              "Dynamo format."),
}

#: The bound of a sink's ledger, as every bus sink declares it.
PENDING_OPTIONS: dict[str, JsonSchema] = {
    "max_pending_events": integer("Events written but not yet confirmed by the server (held "
                                  "through an outage); past it the sink waits and the input "
                                  "edge's when_full applies.", 100_000, minimum=1),
    "max_pending_bytes": integer("The same bound in bytes.", 64 * 1024 * 1024, minimum=1024),
}

#: key (subject, stream, partition key), payload, events in it, idempotency id
Message = tuple[Any, bytes, int, str]


class Pending:
    """Messages written and not yet confirmed by the server, oldest first.

    Invariants: ``events`` and ``bytes`` are the sums over ``items``; ``0 <= sent <=
    len(items)``, and the first ``sent`` items went out, in order, on the connection of
    generation ``sent_gen``; items leave only from the front, once confirmed."""

    __slots__ = ("items", "events", "bytes", "sent", "sent_gen")

    def __init__(self) -> None:
        self.items: list[Message] = []
        self.events = self.bytes = 0
        self.sent = self.sent_gen = 0

    def add(self, message: Message) -> None:
        self.items.append(message)
        self.events += message[2]
        self.bytes += len(message[1])

    def over(self, config: Any) -> bool:
        """At or past the node's ``max_pending_events`` / ``max_pending_bytes``."""
        return self.events >= config["max_pending_events"] or \
            self.bytes >= config["max_pending_bytes"]

    def drop_first(self, k: int) -> None:
        """The first ``k`` are confirmed."""
        for _, payload, n, _ in self.items[:k]:
            self.events -= n
            self.bytes -= len(payload)
        del self.items[:k]
        self.sent = max(0, self.sent - k)

    def on_connection(self, gen: int) -> int:
        """Sending on connection ``gen``: what went out on an older one must go again.
        Returns how many messages that is."""
        if self.sent_gen == gen:
            return 0
        again, self.sent, self.sent_gen = self.sent, 0, gen
        return again




class LedgerSink:
    """The write path of a sink that holds messages in a :class:`Pending` ledger (the
    ``redis`` and ``kafka`` sinks): encode with idempotency ids, hold within the bound (past
    it, wait for the bus to make room), then send. A subclass has ``encoder``, ``pending``
    and the two bus-specific steps."""

    def start_ledger(self) -> None:
        self.pending = Pending()
        for name in ("resent_messages", "held_events"):
            self.metrics.extra.setdefault(name, 0)   # type: ignore[attr-defined]

    async def adopt(self, old: Any) -> None:
        """Event and message ids go on from the replaced sink (see ``continue_from``)."""
        self.encoder.continue_from(old.encoder)   # type: ignore[attr-defined]

    async def write(self, batch: list[Any]) -> None:
        messages, bad = self.encoder.encode_identified(batch)   # type: ignore[attr-defined]
        await self.ctx.reject(bad)   # type: ignore[attr-defined]
        pending = self.pending
        for message in messages:
            if pending.over(self.config):   # type: ignore[attr-defined]
                await self.make_room()
            pending.add(message)
        await self.send_new()
        self.metrics.extra["held_events"] = pending.events   # type: ignore[attr-defined]

    async def make_room(self) -> None:
        """Return once the ledger is under its bound (waits for the bus)."""
        raise NotImplementedError

    async def send_new(self) -> None:
        """Send what the ledger holds and has not sent, if the bus is there."""
        raise NotImplementedError
