"""``kafka`` sink: produce events to a Kafka topic, at least once, one worker per partition.

A message holds up to ``events_per_message`` events of one worker, in the formats of the
``nats`` sink; its key is the worker id (as decimal text), so Kafka's partitioner puts all of
one worker's events in one partition, in order, and its header ``kvgraph-id`` carries the
message's idempotency id (see :mod:`kvgraph.codecs.messages`; a ``kafka`` source drops a
message whose id it has just seen).

Delivery: the producer asks for ``acks=all``, and an event counts as delivered only once the
broker acknowledged its message. Messages wait in this node's ledger (``max_pending_events`` /
``max_pending_bytes``) until then; one that fails (after the client's own retries, within
``request_timeout_s``) is sent again with every message after it, in order, so a worker's
events never overtake each other; a message the broker had after all becomes a copy, counted
in ``resent_messages``. The idempotent producer (which would remove such copies) is off:
Tansu, the broker the tests run, does not support it.
"""

from __future__ import annotations

import operator
from typing import Any

from ..codecs.messages import encoding_options
from ..node import Sink, integer
from ..proto.kafka import (CONNECTION_OPTIONS, HEADER_ID, KAFKA_METRICS, TOPIC_OPTIONS,
                           KafkaEdge)
from ..registry import register
from ._pending import PENDING_METRICS, PENDING_OPTIONS, LedgerSink

@register
class KafkaSink(KafkaEdge, LedgerSink, Sink):
    name = "kafka"
    summary = "Produce events to a Kafka topic, keyed by worker, acknowledged by the brokers."
    metrics = {**KAFKA_METRICS, **PENDING_METRICS}
    replicable = True
    options = {
        **CONNECTION_OPTIONS,
        **TOPIC_OPTIONS,
        **encoding_options("jsonl"),
        "linger_ms": integer("How long the producer waits to fill a batch.", 5, minimum=0),
        "max_message_bytes": integer("Largest message produced (the brokers' and the topic's "
                                     "limit: message.max.bytes, max.message.bytes).",
                                     1_048_576, minimum=1024),
        **PENDING_OPTIONS,
    }
    required = ("topic",)
    example = 'bootstrap_servers = "127.0.0.1:9092"\ntopic = "kv-events"\nformat = "jsonl"'


    async def start(self) -> None:
        import asyncio

        from ..codecs.messages import MessageEncoder
        from ..proto.kafka import (aiokafka, client_options, create_topic, servers,
                                   start_client)
        from ..proto.link import Link

        c = self.config
        if c["create_topic"] and await create_topic(self, c["topic"], c["partitions"]):
            self.log.info("created topic %s (%d partitions)", c["topic"], c["partitions"])
        self.producer = aiokafka().AIOKafkaProducer(
            **client_options(c), acks="all", enable_idempotence=False,
            linger_ms=c["linger_ms"], max_request_size=c["max_message_bytes"],
            max_batch_size=min(c["max_message_bytes"], 1 << 20))
        await start_client(self, self.producer)
        self.link = Link(self, f"Kafka at {', '.join(servers(c))}")
        self.encoder = MessageEncoder(
            self, c["format"], block_size=c["block_size"], storage_tier=c["storage_tier"],
            events_per_message=c["events_per_message"],
            max_bytes=lambda: c["max_message_bytes"] - 512,   # record and header overhead
            limit="max_message_bytes", hint="raise max_message_bytes (and the topic's "
            "max.message.bytes)", key_of=_WORKER)
        # pending.items[:pending.sent] are handed to the producer; futures[i] is item i's ack.
        self.start_ledger()
        self.futures: list[Any] = []
        # One confirmer at a time: the runtime's flush, a full ledger making room, or the
        # watcher that sees the brokers back after an outage.
        self._confirming = asyncio.Lock()

    async def make_room(self) -> None:
        async with self._confirming:
            await self._confirm(make_room=True)

    async def send_new(self) -> None:
        if self.link.up and not self._confirming.locked():
            if not await self._send():
                self._watch()

    def _watch(self) -> None:
        """The brokers are away: confirm what is held in the background, so that the sink
        learns they are back (``can_confirm``) even if nothing more is written."""
        if getattr(self, "_watching", False):
            return
        self._watching = True

        async def watch() -> None:
            try:
                async with self._confirming:
                    await self._confirm()
            finally:
                self._watching = False

        self.ctx.spawn(watch(), "kafka-watch")

    async def _send(self) -> bool:
        """Hand what is not handed yet to the producer, in order; False if it refused (the
        brokers are away: metadata or buffer space did not come within request_timeout_s)."""
        import asyncio

        pending, topic = self.pending, self.config["topic"]
        send = self.producer.send
        while pending.sent < len(pending.items):
            worker, payload, _, mid = pending.items[pending.sent]
            try:
                future = await send(topic, value=payload, key=_key(worker),
                                    headers=[(HEADER_ID, mid.encode())])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.link.down(exc)
                return False
            self.futures.append(future)
            pending.sent += 1
        return True

    async def _confirm(self, make_room: bool = False) -> None:
        """Wait for the brokers' acks in order (all of them, or until under the bound); on a
        failure, produce that message and every later one again."""
        import asyncio

        pending, futures = self.pending, self.futures
        while pending.items:
            if make_room and not pending.over(self.config):
                return
            if not futures and not await self._send():
                await asyncio.sleep(self.link.backoff())
                continue
            done = 0
            while done < len(futures) and futures[done].done() and \
                    futures[done].exception() is None:
                done += 1
            if done:
                self.link.ok()
                pending.drop_first(done)
                del futures[:done]
                continue
            try:
                await futures[0]
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.link.down(exc)
                self._watch()
                self.metrics.extra["resent_messages"] += len(futures)
                for f in futures:   # their outcome no longer matters: they go again
                    f.add_done_callback(_outcome_read)
                futures.clear()
                pending.sent = 0
                await asyncio.sleep(self.link.backoff())
        self.metrics.extra["held_events"] = pending.events

    def can_confirm(self) -> bool:
        return self.link.up

    async def flush(self) -> None:
        """Return once the brokers acknowledged every message written."""
        async with self._confirming:
            await self._confirm()

    async def stop(self) -> None:
        producer = getattr(self, "producer", None)
        if producer is not None:
            await producer.stop()


#: Messages are grouped by worker (the encoder reads it from each event in one C-level pass).
_WORKER = operator.attrgetter("worker_id")


def _key(worker: int | None) -> bytes | None:
    """A message's key: its worker id, so that one worker's events share a partition."""
    return None if worker is None else str(worker).encode()


def _outcome_read(future: Any) -> None:
    """Read a superseded send's outcome, so that asyncio does not report it as lost."""
    if not future.cancelled():
        future.exception()
