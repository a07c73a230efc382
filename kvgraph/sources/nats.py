"""``nats`` source: consume events from NATS, so that graphs can chain through a bus.

Reads kvgraph's own ``jsonl`` events and Dynamo's ``dynamo-json`` (legacy, one RouterEvent per
message) and ``dynamo-msgpack`` (1.6.1 event-plane envelope) formats. In JetStream mode a
message is acknowledged only after every sink downstream confirmed it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Iterable, Mapping

import msgspec

from ..errors import NodeFailure
from ..event import Event, Rejected
from ..node import CheckContext, Source, Problem, integer, number, string
from ..proto.nats import CONNECTION_OPTIONS, JETSTREAM_OPTIONS, check_connection
from ..registry import register

FORMATS = ["jsonl", "dynamo-json", "dynamo-msgpack"]


@register
class NatsSource(Source):
    name = "nats"
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
        "worker_id": integer("Override the worker id of every event received.",
                             minimum=0, maximum=2**63 - 1),
        "max_buffered": integer("Messages buffered between the NATS client and the graph; "
                                "past it messages are dropped and counted (core NATS only; "
                                "JetStream redelivers).", 100_000, minimum=1),
    }
    required = ("subject",)
    example = 'url = "nats://127.0.0.1:4222"\nsubject = "kvgraph.events"\nformat = "jsonl"'

    @classmethod
    def check(cls, options: Mapping[str, Any], ctx: CheckContext) -> Iterable[Problem]:
        yield from check_connection(options)
        if options.get("jetstream") and not options.get("stream"):
            yield Problem("stream", "jetstream = true needs the stream name")
        if "queue_group" in options and options.get("durable"):
            yield Problem("queue_group", "use durable (JetStream) or queue_group (core), not both")

    # -- runtime ------------------------------------------------------------------------------

    async def start(self) -> None:
        from ..codecs import dynamo, jsonl
        from ..proto.nats import connect_node

        c = self.config
        if c["jetstream"]:
            raise NodeFailure("JetStream consuming is not available yet; set jetstream = false")
        self._dynamo, self._jsonl = dynamo, jsonl
        self._buf: deque[bytes] = deque()
        self._wake = asyncio.Event()
        self.metrics.extra.setdefault("malformed", 0)
        self.nc = await connect_node(self)
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

    def on_stop(self) -> None:
        self._wake.set()

    def _decode(self, body: bytes, events: list[Event], rejected: list[Rejected]) -> None:
        fmt = self.config["format"]
        try:
            if fmt == "jsonl":
                events.extend(self._jsonl.decode_line(line) for line in body.splitlines()
                              if line.strip())
            elif fmt == "dynamo-json":
                events.append(self._dynamo.decode_router_json(body))
            else:
                events.extend(self._dynamo.decode_envelope(body)[2])
        except (ValueError, msgspec.DecodeError) as exc:
            self.metrics.extra["malformed"] += 1
            rejected.append(self.ctx.rejected(f"malformed {fmt} message: {exc}",
                                              raw=body[:4096]))

    async def run(self) -> None:
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
        while buf and len(events) < 4096:
            self._decode(buf.popleft(), events, rejected)
        wid = self.config.get("worker_id")
        if wid is not None:
            events = [msgspec.structs.replace(e, worker_id=wid) for e in events]
        self.metrics.events_in += len(events)
        await self.ctx.emit(events)
        await self.ctx.reject(rejected)

    async def stop(self) -> None:
        nc = getattr(self, "nc", None)
        self._closing = True
        if nc is not None and not nc.is_closed:
            await nc.close()
