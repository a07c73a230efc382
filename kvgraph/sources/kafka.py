"""``kafka`` source: consume a Kafka topic in a consumer group, at least once.

Each record's value is a message in one of the bus formats (as the ``kafka`` sink writes it).
Offsets are committed only after every sink downstream confirmed the events, per partition
and in order: a partition's commit moves to the end of the longest run of settled batches from
its start, so a batch confirmed early never commits past one still in the graph. A batch that
was dropped on the way sends its partition back (``seek``) to the batch's first offset: it and
everything after it are read again, in order (copies of what had been delivered are dropped by
their ``kvgraph-id`` header, within ``dedup_ids``).

Rebalances: before a partition is taken away, the node waits (up to ``rebalance_wait_s``) for
its batches in the graph to settle and commits them, so that the partition's next owner
neither misses them nor applies them again beside this node; batches still in flight after
the wait are given up (the next owner reads them again: at least once). A restart resumes from
the committed offsets; what was delivered but not yet committed is delivered again, and
counted by the brokers' offsets only (Kafka does not count deliveries).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Iterable, Mapping

from ..codecs.messages import reading_options
from ..event import Event, Rejected
from ..node import (Source, counter, gauge, integer, number, string)
from ..proto.kafka import (CONNECTION_OPTIONS, HEADER_ID, KAFKA_METRICS, TOPIC_OPTIONS,
                           KafkaEdge)
from ..registry import register


class _Window:
    """Records [start, end) of one partition, emitted as one batch."""

    __slots__ = ("start", "end", "done", "alive")

    def __init__(self, start: int, end: int):
        self.start, self.end = start, end
        self.done = False
        self.alive = True   # False once given up (revoked, or its partition rewound)


class _Partition:
    """An assigned partition's batches in the graph, oldest first, and what to commit."""

    __slots__ = ("windows", "commit", "committed", "settled")

    def __init__(self) -> None:
        self.windows: deque[_Window] = deque()
        self.commit: int | None = None      # the offset to commit next (None: nothing new)
        self.committed: int | None = None
        self.settled = 0                    # records delivered up to ``commit``, not committed

    def in_flight(self) -> int:
        return sum(w.end - w.start for w in self.windows)


@register
class KafkaSource(KafkaEdge, Source):
    name = "kafka"
    summary = "Consume a Kafka topic in a consumer group; commit once the sinks confirmed."
    metrics = {**KAFKA_METRICS,
               "malformed": counter("Records or lines that could not be decoded (sent to "
                                    "errors)."),
               "committed_records": counter("Records delivered whose offsets the group "
                                            "committed."),
               "rewinds": counter("Partitions sent back to re-read a batch dropped on the way."),
               "rebalances": counter("Partition assignments received."),
               "given_up_records": counter("Records in flight when their partition was taken "
                                           "away (its next owner reads them again)."),
               "duplicates_dropped": counter("Records whose kvgraph-id was just delivered: "
                                             "copies, not emitted."),
               "in_flight": gauge("Records emitted and not yet committed.")}
    options = {
        **CONNECTION_OPTIONS,
        **TOPIC_OPTIONS,
        "group_id": string("Consumer group: members share the partitions, and the group keeps "
                           "the committed offsets.", "kvgraph", min_length=1),
        "deliver_policy": string("Where a group with no committed offset starts: `all` (the "
                                 "earliest record) or `new`.", "all", enum=["all", "new"]),
        "max_records": integer("Records per fetch.", 500, minimum=1),
        "max_in_flight": integer("Records emitted and not yet committed; past it fetching "
                                 "waits.", 10_000, minimum=1),
        "session_timeout_s": number("The group's session timeout: a member silent this long "
                                    "is taken out and its partitions given to others.", 10.0,
                                    minimum=1),
        "rebalance_wait_s": number("How long a revoked partition's batches may take to settle "
                                   "before they are given up.", 10.0, minimum=0),
        **reading_options(),
    }
    required = ("topic",)
    example = 'bootstrap_servers = "127.0.0.1:9092"\ntopic = "kv-events"\ngroup_id = "kvgraph"'

    @classmethod
    def at_least_once(cls, options: Mapping[str, Any]) -> bool:
        return True

    # -- runtime ------------------------------------------------------------------------------

    async def start(self) -> None:
        import asyncio

        from ..codecs.messages import MessageDecoder, RecentIds
        from ..proto.kafka import (aiokafka, client_options, create_topic, servers,
                                   start_client)
        from ..proto.link import Link

        c = self.config
        for name in ("committed_records", "rewinds", "rebalances", "given_up_records",
                     "duplicates_dropped", "in_flight"):
            self.metrics.extra.setdefault(name, 0)
        if c["create_topic"] and await create_topic(self, c["topic"], c["partitions"]):
            self.log.info("created topic %s (%d partitions)", c["topic"], c["partitions"])
        session_ms = int(c["session_timeout_s"] * 1000)
        self.consumer = aiokafka().AIOKafkaConsumer(
            **client_options(c), group_id=c["group_id"], enable_auto_commit=False,
            auto_offset_reset="earliest" if c["deliver_policy"] == "all" else "latest",
            session_timeout_ms=session_ms, heartbeat_interval_ms=max(100, session_ms // 5),
            rebalance_timeout_ms=int((c["rebalance_wait_s"] + 5) * 1000),
            max_poll_records=c["max_records"])
        self.consumer.subscribe([c["topic"]], listener=_listener(self))
        await start_client(self, self.consumer)
        self.link = Link(self, f"Kafka at {', '.join(servers(c))}")
        self.decoder = MessageDecoder.for_node(self)
        self.seen = RecentIds(c["dedup_ids"])
        self.parts: dict[Any, _Partition] = {}
        self.rewind: dict[Any, int] = {}
        self._settled = asyncio.Event()
        self._dirty = asyncio.Event()
        self.ctx.spawn(self._committer(), "commit")

    def _in_flight(self) -> int:
        n = sum(p.in_flight() for p in self.parts.values())
        self.metrics.extra["in_flight"] = n
        return n

    async def run(self) -> None:
        import asyncio

        c, stopping = self.config, self.ctx.stopping
        consumer = self.consumer
        while not stopping.is_set():
            for tp, offset in list(self.rewind.items()):
                del self.rewind[tp]
                if tp in consumer.assignment():
                    consumer.seek(tp, offset)
            if self._in_flight() >= c["max_in_flight"]:
                self._settled.clear()
                try:
                    await asyncio.wait_for(self._settled.wait(), 0.25)
                except asyncio.TimeoutError:
                    pass
                continue
            try:
                fetched = await consumer.getmany(timeout_ms=250,
                                                 max_records=c["max_records"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:   # the client reconnects by itself; say so, then retry
                self.link.down(exc)
                await asyncio.sleep(self.link.backoff())
                continue
            self.link.ok()
            for tp, records in fetched.items():
                if records and tp not in self.rewind:
                    await self._emit(tp, records)

    async def _emit(self, tp: Any, records: list[Any]) -> None:
        from ..acks import Ack

        events: list[Event] = []
        rejected: list[Rejected] = []
        ids: list[bytes] = []
        decode, seen = self.decoder.decode, self.seen
        base = tp.partition << 48
        for r in records:
            mid = _header(r.headers)
            if seen.copy_of_recent(mid):
                self.metrics.extra["duplicates_dropped"] += 1
                continue
            if mid is not None:
                ids.append(mid)
            if r.value is None:
                self.metrics.extra["malformed"] += 1
                rejected.append(self.ctx.rejected(f"record {tp.topic}/{tp.partition}@{r.offset}"
                                                  " has no value"))
                continue
            decode(r.value, events, rejected, origin=base | r.offset)
        part = self.parts.setdefault(tp, _Partition())
        window = _Window(records[0].offset, records[-1].offset + 1)
        part.windows.append(window)
        ack = Ack(lambda: self._settle(tp, window, ids, True),
                  lambda: self._settle(tp, window, ids, False))
        self.metrics.events_in += len(events)
        await self.ctx.emit(events, acks=(ack,))
        await self.ctx.reject(rejected)
        ack.release()

    def _settle(self, tp: Any, window: _Window, ids: list[bytes], ok: bool) -> None:
        self._settled.set()
        part = self.parts.get(tp)
        if not window.alive or part is None:
            return   # given up: the partition was revoked or rewound past it
        if ok:
            window.done = True
            while part.windows and part.windows[0].done:
                w = part.windows.popleft()
                part.commit = w.end
                part.settled += w.end - w.start
            self._dirty.set()
            self._in_flight()
            return
        # Dropped on the way: read it again, and everything after it, in order.
        self.seen.forget(ids)
        self.metrics.extra["rewinds"] += 1
        keep: deque[_Window] = deque()
        for w in part.windows:
            if w.start >= window.start:
                w.alive = False
            else:
                keep.append(w)
        part.windows = keep
        self.rewind[tp] = min(self.rewind.get(tp, window.start), window.start)

    async def _committer(self) -> None:
        """Commit what settled, a round at a time (commits are round trips: batching them
        keeps them off the hot path)."""
        import asyncio

        while True:
            await self._dirty.wait()
            self._dirty.clear()
            await self._commit()
            await asyncio.sleep(0.05)

    async def _commit(self, only: Iterable[Any] | None = None) -> None:
        offsets = {tp: p.commit for tp, p in self.parts.items()
                   if p.commit is not None and p.commit != p.committed
                   and (only is None or tp in only)}
        if not offsets:
            return
        counts = {tp: self.parts[tp].settled for tp in offsets}   # what these offsets cover
        try:
            await self.consumer.commit(offsets)
        except Exception as exc:   # e.g. a rebalance took the partition: its owner re-reads
            self.log.problem("commit", "could not commit offsets (%s: %s); they are committed "
                             "with the next ones, or re-read by the partition's next owner",
                             type(exc).__name__, exc)
            return
        for tp, offset in offsets.items():
            part = self.parts.get(tp)
            if part is not None:
                part.committed = offset
                self.metrics.extra["committed_records"] += counts[tp]
                part.settled -= counts[tp]

    async def _revoked(self, revoked: Iterable[Any]) -> None:
        """Before partitions go: let their batches settle (bounded), commit, give up the
        rest."""
        import asyncio
        import time

        revoked = set(revoked)
        deadline = time.monotonic() + self.config["rebalance_wait_s"]
        while any(self.parts[tp].windows for tp in revoked if tp in self.parts) and \
                time.monotonic() < deadline:
            self._settled.clear()
            try:
                await asyncio.wait_for(self._settled.wait(), 0.1)
            except asyncio.TimeoutError:
                pass
        await self._commit(revoked)
        for tp in revoked:
            part = self.parts.pop(tp, None)
            self.rewind.pop(tp, None)
            if part is None:
                continue
            for w in part.windows:
                w.alive = False
                self.metrics.extra["given_up_records"] += w.end - w.start

    async def stop(self) -> None:
        """Commit what the sinks confirmed (they confirmed before the graph stopped), leave
        the group, close."""
        consumer = getattr(self, "consumer", None)
        if consumer is None:
            return
        try:
            await self._commit()
        finally:
            await consumer.stop()


def _header(headers: Any) -> bytes | None:
    for k, v in headers or ():
        if k == HEADER_ID:
            return v
    return None


def _listener(node: KafkaSource) -> Any:
    """aiokafka's rebalance listener, bound to the node (a subclass of aiokafka's ABC, made
    here so that importing this module does not import aiokafka)."""
    from aiokafka.abc import ConsumerRebalanceListener

    class Rebalance(ConsumerRebalanceListener):
        async def on_partitions_revoked(self, revoked: Any) -> None:
            if revoked:
                await node._revoked(revoked)

        async def on_partitions_assigned(self, assigned: Any) -> None:
            node.metrics.extra["rebalances"] += 1
            node.log.info("assigned partitions %s", ", ".join(
                f"{tp.topic}/{tp.partition}" for tp in sorted(assigned)) or "(none)")

    return Rebalance()
