"""``nats`` source: consume events from NATS, so that graphs can chain through a bus.

Reads kvgraph's own ``jsonl`` events and Dynamo's ``dynamo-json`` (legacy, one RouterEvent per
message) and ``dynamo-msgpack`` (1.6.1 event-plane envelope) formats. In JetStream mode a
message is acknowledged only after every sink downstream confirmed it.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import Any, Iterable, Mapping

from ..event import Event, Rejected
from ..node import (CheckContext, Source, Problem, integer, number, string, worker_id)
from ..proto.nats import CONNECTION_OPTIONS, JETSTREAM_OPTIONS, NatsProbe, check_connection
from ..proto.nats import NATS_METRICS
from ..node import counter
from ..registry import register
from ..codecs.messages import FORMATS



@register
class NatsSource(NatsProbe, Source):
    name = "nats"
    metrics = {**NATS_METRICS,
               "malformed": counter("Messages that could not be decoded (sent to errors)."),
               "acked": counter("JetStream messages acknowledged after delivery."),
               "redelivery_requests": counter("JetStream messages handed back for redelivery."),
               "redeliveries_held": counter("Redelivered messages held back until their first "
                                            "copy was settled.")}
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

        from ..proto.nats import ensure_stream

        c = self.config
        self.js = self.nc.jetstream()
        await ensure_stream(self.js, c, c["subject"])
        config = ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=c["ack_wait_s"],
                                max_ack_pending=c["max_ack_pending"],
                                deliver_policy=DeliverPolicy(c["deliver_policy"]))
        self.psub = await self.js.pull_subscribe(c["subject"], durable=c.get("durable"),
                                                 stream=c["stream"], config=config)
        for name in ("acked", "redelivery_requests", "redeliveries_held"):
            self.metrics.extra.setdefault(name, 0)
        # Stream sequences of the messages in the graph (emitted, not yet acked or nak'ed). A
        # message held downstream longer than ack_wait_s is delivered again by the server;
        # that copy is not emitted a second time, only marked in progress.
        self._inflight: set[int] = set()
        # ... and of those acked in the last 2 x ack_wait_s: a redelivery can cross our ack.
        self._acked_recently: OrderedDict[int, float] = OrderedDict()

    async def _run_jetstream(self) -> None:
        import asyncio
        from ..acks import Ack

        stopping = self.ctx.stopping
        while not stopping.is_set():
            try:
                msgs = await self.psub.fetch(256, timeout=0.25)
            except asyncio.TimeoutError:
                continue
            except Exception as exc:  # e.g. a reconnect in progress; nats-py retries
                self.log.problem("fetch", "JetStream fetch failed: %s", exc)
                await asyncio.sleep(0.2)
                continue
            events: list[Event] = []
            rejected: list[Rejected] = []
            inflight = self._inflight
            acked = self._acked_recently
            horizon = time.monotonic() - 2 * self.config["ack_wait_s"]
            while acked and next(iter(acked.values())) < horizon:
                acked.popitem(last=False)
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
            ack = Ack(lambda m=fresh: self._settle(m, True), lambda m=fresh: self._settle(m, False))
            self.metrics.events_in += len(events)
            await self.ctx.emit(events, acks=(ack,))
            await self.ctx.reject(rejected)  # malformed: reported, and acked (no retry helps)
            ack.release()

    def _settle(self, msgs: list[Any], ok: bool) -> None:
        now = time.monotonic()
        for m in msgs:
            seq = m.metadata.sequence.stream
            self._inflight.discard(seq)
            if ok:
                self._acked_recently[seq] = now

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
        nc = getattr(self, "nc", None)
        self._closing = True
        if nc is not None and not nc.is_closed:
            await nc.close()
