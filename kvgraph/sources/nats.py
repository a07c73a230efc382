"""``nats`` source: consume events from NATS, so that graphs can chain through a bus.

Reads kvgraph's own ``jsonl`` events and Dynamo's ``dynamo-json`` (legacy, one RouterEvent per
message) and ``dynamo-msgpack`` (1.6.1 event-plane envelope) formats. In JetStream mode a
message is acknowledged only after every sink downstream confirmed it.
"""

from __future__ import annotations

import contextlib
import uuid
from collections import deque
from typing import Any, Iterable, Mapping

from ..event import Event, Rejected
from ..node import (CheckContext, Source, Problem, integer, number, string, worker_id)
from ..proto.nats import CONNECTION_OPTIONS, JETSTREAM_OPTIONS, NatsProbe, check_connection
from ..proto.nats import NATS_METRICS, check_partitions
from ..node import counter, gauge
from ..registry import register
from ..codecs.messages import FORMATS, RecentIds



@register
class NatsSource(NatsProbe, Source):
    name = "nats"
    metrics = {**NATS_METRICS,
               "malformed": counter("Messages that could not be decoded (sent to errors)."),
               "acked": counter("JetStream messages acknowledged after delivery."),
               "redelivery_requests": counter("JetStream messages handed back for redelivery."),
               "redeliveries_held": counter("Redelivered messages held back until their first "
                                            "copy was settled."),
               "caught_up": gauge("JetStream: 1 once the node has read its stream to the end "
                                  "and every sink confirmed it (a new index replica answers "
                                  "from then on), 0 before."),
               "partitions_owned": gauge("Partitions of the group's stream this node reads."),
               "partitions_taken": counter("Partitions this node took (at start, or from a "
                                           "member that died or left)."),
               "refences": counter("Partitions opened again after a failed fetch or a "
                                   "reconnect (messages it may have lost come again, in order)."),
               "partitions_lost": counter("Partitions whose lease this node lost (it stalled "
                                          "past lease_s): another member took them.")}
    summary = "Subscribe to a NATS subject (core or JetStream) and decode events."
    options = {
        **CONNECTION_OPTIONS,
        "subject": string("Subject to subscribe to; wildcards `*` and `>` allowed.",
                          min_length=1),
        "queue_group": string("Queue group, to share the subject among several kvgraphs."),
        "format": string("Message format.", "jsonl", enum=FORMATS),
        **JETSTREAM_OPTIONS,
        "durable": string("Durable consumer name (JetStream): resume where it stopped."),
        "deliver_policy": string("Where a new consumer starts (JetStream).", "all",
                                 enum=["all", "last", "new"]),
        "ack_wait_s": number("Seconds before an unacknowledged message is redelivered.", 30.0,
                             exclusive_minimum=0),
        "max_ack_pending": integer("Unacknowledged messages in flight (JetStream).", 10_000,
                                   minimum=1),
        "worker_id": worker_id("Override the worker id of every event received."),
        "max_buffered": integer("Messages buffered between the NATS client and the graph; "
                                "past it messages are dropped and counted (core NATS only; "
                                "JetStream redelivers).", 100_000, minimum=1),
        "group": string("Consumer group of a partitioned stream (`partitions`): the nodes "
                        "with this group share its partitions, each partition read by one of "
                        "them at a time, through a durable consumer GROUP-pP; when one dies, "
                        "the others take its partitions within about lease_s. Leases live "
                        "in the KV bucket `lease_bucket`."),
        "lease_s": number("How long a partition stays with a member that stopped renewing it "
                          "(it renews every third of it). Every member of a group must agree: "
                          "the bucket is created with it.", 3.0, minimum=0.5),
        "lease_bucket": string("The NATS KV bucket of the groups' leases.", "kvgraph-leases"),
    }
    required = ("subject",)
    example = 'url = "nats://127.0.0.1:4222"\nsubject = "kvgraph.events"\nformat = "jsonl"'

    @classmethod
    def at_least_once(cls, options: Mapping[str, Any]) -> bool:
        return bool(options.get("jetstream"))

    @classmethod
    def check(cls, options: Mapping[str, Any], ctx: CheckContext) -> Iterable[Problem]:
        yield from check_connection(options)
        if options.get("jetstream") and not options.get("stream"):
            yield Problem("stream", "jetstream = true needs the stream name")
        if "queue_group" in options and options.get("durable"):
            yield Problem("queue_group", "use durable (JetStream) or queue_group (core), not both")
        yield from check_partitions(options, options["subject"])
        if options["partitions"] and "group" not in options:
            yield Problem("group", "a partitioned stream is read by a group: set group",
                          hint='group = "indexers": every node of the group shares the '
                               "partitions")
        if "group" in options and not options["partitions"]:
            yield Problem("group", "group needs partitions (the stream's partition count)")
        if options["partitions"] and options.get("durable"):
            yield Problem("durable", "a group's consumers are named GROUP-pP: durable is not "
                          "used with partitions", severity="warning")

    # -- runtime ------------------------------------------------------------------------------

    async def start(self) -> None:
        import asyncio
        from ..codecs.messages import MessageDecoder
        from ..proto.nats import connect_node

        c = self.config
        self._decoder = MessageDecoder.for_node(self)
        self._buf: deque[bytes] = deque()
        self._wake = asyncio.Event()
        self.nc = await connect_node(self)
        if c["partitions"]:
            await self._start_partitioned()
            return
        if c["jetstream"]:
            await self._start_jetstream()
            return
        limit = c["max_buffered"]

        async def on_message(msg: Any) -> None:
            if len(self._buf) >= limit:
                self.metrics.discarded_unintentional += 1
                self.log.problem("overflow", "graph is slower than %s; dropping messages "
                                 "(max_buffered = %d)", c["subject"], limit)
                return
            self._buf.append(msg.data)
            self._wake.set()

        self.sub = await self.nc.subscribe(c["subject"], queue=c.get("queue_group", ""),
                                           cb=on_message)
        # Core NATS keeps nothing: a message published before the server has the
        # subscription is gone. The round trip makes "started" mean "subscribed".
        await self.nc.flush()

    async def _start_jetstream(self) -> None:
        """A pull consumer; each message is acked only once every sink downstream confirmed
        its events (end-to-end), and nak'ed for redelivery when they were dropped."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        from ..proto.nats import ensure_stream, while_electing

        c = self.config
        self.js = self.nc.jetstream()
        await ensure_stream(self.js, c, c["subject"], self.log)
        self._track_acks()
        config = ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=c["ack_wait_s"],
                                max_ack_pending=c["max_ack_pending"],
                                deliver_policy=DeliverPolicy(c["deliver_policy"]))
        self.psub = await while_electing(
            lambda: self.js.pull_subscribe(c["subject"], durable=c.get("durable"),
                                           stream=c["stream"], config=config), c, self.log)

    def _track_acks(self) -> None:
        for name in ("acked", "redelivery_requests", "redeliveries_held"):
            self.metrics.extra.setdefault(name, 0)
        self.metrics.extra["caught_up"] = 0
        self._idle: set[int | None] = set()   # partitions (None: the one consumer) read to
        #                                        the end with nothing unsettled, once
        # Stream sequences of the messages in the graph (emitted, not yet acked or nak'ed). A
        # message held downstream longer than ack_wait_s is delivered again by the server;
        # that copy is not emitted a second time, only marked in progress.
        self._inflight: set[int] = set()
        # ... and of the latest acked: a redelivery can cross our ack, and a fence can go back
        # (A count, not a time: a partition fenced again after trouble, or taken back after a
        # lease was lost, is delivered again from the group's ack floor, which may be far
        # behind what this node delivered and acked if acks were lost on the way.)
        self._acked_recently = RecentIds(max(4 * self.config["max_ack_pending"], 10_000))

    async def _start_partitioned(self) -> None:
        """A member of ``group``: partitions come and go with their leases (see
        :mod:`kvgraph.sources._nats_group`)."""
        from ..proto.nats import ensure_stream
        from ..proto.nats_leases import Leases, open_bucket
        from ._nats_group import GroupReading

        c = self.config
        self.js = self.nc.jetstream()
        await ensure_stream(self.js, c, c["subject"], self.log)
        self._track_acks()
        kv = await open_bucket(self.js, c, self.log)
        self.group = GroupReading(self, Leases(kv, c["group"], c["partitions"],
                                               f"{self.id}-{_member_suffix()}"))

    async def _run_jetstream(self) -> None:
        stopping = self.ctx.stopping
        await self._read(self.psub, lambda: not stopping.is_set())

    async def _read(self, psub: Any, going: Any, partition: int | None = None) -> bool:
        """Fetch, emit, and ack once every sink confirmed, while ``going()``.

        For a partition (whose order is promised), trouble ends the reading and returns True:
        a fetch that failed, or a reconnect, may have lost messages the server counts as
        delivered; it would deliver them again after ack_wait, behind newer ones. The caller
        settles what is in flight and fences the partition again instead."""
        import asyncio
        from ..acks import Ack

        reconnects = self.nc.stats.get("reconnects", 0)
        while going() and not self.ctx.stopping.is_set():
            if partition is not None and self.nc.stats.get("reconnects", 0) != reconnects:
                return True
            try:
                msgs = await psub.fetch(256, timeout=0.25)
            except asyncio.TimeoutError:
                if not self.metrics.extra["caught_up"]:
                    await self._at_end(psub, partition)
                continue
            except Exception as exc:  # e.g. a reconnect in progress; nats-py retries
                self.log.problem("fetch", "JetStream fetch failed: %s", exc)
                if partition is not None:
                    return True
                await asyncio.sleep(0.2)
                continue
            events: list[Event] = []
            rejected: list[Rejected] = []
            inflight = self._inflight
            acked = self._acked_recently
            fresh = []
            for msg in msgs:
                seq = msg.metadata.sequence.stream
                if seq in inflight:  # its first delivery is still in the graph: not again
                    self.metrics.extra["redeliveries_held"] += 1
                    await msg.in_progress()  # and the server's ack timer starts over
                    continue
                if seq in acked:  # redelivered while our ack was on its way: ack it again
                    self.metrics.extra["redeliveries_held"] += 1
                    await msg.ack()
                    continue
                inflight.add(seq)
                fresh.append(msg)
                self._decoder.decode(msg.data, events, rejected, origin=seq)
            if not fresh:
                continue
            if partition is not None:
                self.group.unsettled.setdefault(partition, set()).update(
                    m.metadata.sequence.stream for m in fresh)
            ack = Ack(lambda m=fresh: self._settle(m, True, partition),
                      lambda m=fresh: self._settle(m, False, partition))
            self.metrics.events_in += len(events)
            await self.ctx.emit(events, acks=(ack,))
            await self.ctx.reject(rejected)  # malformed: reported, and acked (no retry helps)
            ack.release()

    async def _at_end(self, psub: Any, partition: int | None) -> None:
        """A fetch found nothing: when the server says so too (nothing pending for the
        consumer, nothing unacknowledged: the sinks confirmed all it delivered), that
        partition (or the stream) is caught up; once all of this node's are, ``caught_up`` is
        1 for good. (An empty fetch alone is no proof: a consumer whose cluster is electing a
        leader delivers nothing for a while.)"""
        extra = self.metrics.extra
        unsettled = self.group.unsettled.get(partition) if partition is not None \
            else self._inflight
        if unsettled:
            return
        try:
            info = await psub.consumer_info()
        except Exception:
            return   # asked again at the next empty fetch
        if info.num_pending or info.num_ack_pending or extra["caught_up"]:
            return
        self._idle.add(partition)
        owned = set(self.group.leases.owned) if partition is not None else {None}
        if owned and owned <= self._idle:
            extra["caught_up"] = 1
            self.log.info("caught up with stream %s: %d event(s) read", self.config["stream"],
                          self.metrics.events_in)

    def _settle(self, msgs: list[Any], ok: bool, partition: int | None = None) -> None:
        seqs = [m.metadata.sequence.stream for m in msgs]
        self._inflight.difference_update(seqs)
        if partition is not None:
            self.group.unsettled.get(partition, set()).difference_update(seqs)
        if ok:
            self._acked_recently.remember(seqs)

        async def settle() -> None:
            for m in msgs:
                try:
                    await (m.ack() if ok else m.nak(delay=1.0))
                except Exception as exc:  # the server redelivers after ack_wait anyway
                    self.log.problem("ack", "could not ack: %s", exc)
            self.metrics.extra["acked" if ok else "redelivery_requests"] += len(msgs)

        self.ctx.spawn(settle(), "settle")

    def on_stop(self) -> None:
        if hasattr(self, "_wake"):
            self._wake.set()

    async def run(self) -> None:
        if self.config["partitions"]:
            await self.group.run()
            return
        if self.config["jetstream"]:
            await self._run_jetstream()
            return
        buf = self._buf
        while True:
            if not buf:
                if self.ctx.stopping.is_set():
                    break
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._emit_buffered()
        # Stopping: stop the subscription, then deliver what had already arrived.
        await self.sub.unsubscribe()
        while buf:
            await self._emit_buffered()

    async def _emit_buffered(self) -> None:
        events: list[Event] = []
        rejected: list[Rejected] = []
        buf = self._buf
        decode = self._decoder.decode
        while buf and len(events) < 4096:
            decode(buf.popleft(), events, rejected)
        self.metrics.events_in += len(events)
        await self.ctx.emit(events)
        await self.ctx.reject(rejected)

    async def stop(self) -> None:
        group = getattr(self, "group", None)
        if group is not None:   # the graph drained: what was read is settled; hand over now
            with contextlib.suppress(Exception):
                await group.leases.leave()
        nc = getattr(self, "nc", None)
        self._closing = True
        if nc is not None and not nc.is_closed:
            await nc.close()


def _member_suffix() -> str:
    """A member id unique across processes and restarts (a restarted member is a new one)."""
    return uuid.uuid4().hex[:8]
