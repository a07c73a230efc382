"""``nats`` sink: publish events to NATS for Dynamo's KV router, llm-d, or another kvgraph.

Formats: ``dynamo-msgpack`` (Dynamo 1.6.1 event plane: a msgpack envelope holding up to 128
RouterEvents), ``dynamo-json`` (one RouterEvent JSON per message, the legacy shape) and
``jsonl`` (kvgraph's own event lines). The subject is a template: ``{worker_id}`` and
``{dp_rank}`` are filled per event.
"""

from __future__ import annotations

import re
import time

from typing import Any, Iterable, Mapping

from ..errors import NodeFailure
from ..event import STORED, Event
from ..node import CheckContext, Sink, Problem, boolean, integer, number, string
from ..proto.nats import CONNECTION_OPTIONS, JETSTREAM_OPTIONS, NatsProbe, check_connection
from ..proto.nats import NATS_METRICS
from ..node import counter, gauge
from ..registry import register

FORMATS = ["dynamo-msgpack", "dynamo-json", "jsonl"]
PLACEHOLDERS = ("worker_id", "dp_rank")
_FIELD = re.compile(r"\{([^{}]*)\}")


@register
class NatsSink(NatsProbe, Sink):
    name = "nats"
    metrics = {**NATS_METRICS,
               "resent_messages": counter("Messages published again after a failed "
                                          "confirmation."),
               "held_events": gauge("Events written but not yet confirmed delivered."),
               "confirm_timeouts": counter("Confirmations that did not come in time."),
               "publish_retries": counter("Publishes retried."),
               "not_main_group": counter("Events of KV groups other than the main one, not "
                                         "sent (Dynamo has no place for them).")}
    summary = "Publish events to NATS in Dynamo's formats or kvgraph JSONL."
    # With --workers, every worker has its own connection and Dynamo publisher id.
    replicable = True
    options = {
        **CONNECTION_OPTIONS,
        "subject": string("Subject template; may use {worker_id} and {dp_rank}.", min_length=1,
                          examples=["namespace.dynamo.component.backend.endpoint.generate"
                                    ".kv-events"]),
        "format": string("Message format: `dynamo-msgpack` (Dynamo 1.6.1), `dynamo-json` "
                         "(legacy RouterEvent JSON) or `jsonl`.", "dynamo-msgpack",
                         enum=FORMATS),
        "block_size": integer("Tokens per block for Dynamo's tokens_hash; must match the "
                              "engine.", 16, minimum=1),
        "events_per_message": integer("Most events in one message (dynamo-msgpack, jsonl).", 128,
                                      minimum=1, maximum=65_536),
        **JETSTREAM_OPTIONS,
        "dedup_window_s": number("JetStream duplicate window: retries carry message ids.", 0,
                                 minimum=0),
        "ack_timeout_s": number("How long to wait for a JetStream publish ack before retrying.",
                                5.0, exclusive_minimum=0),
        "max_pending_events": integer("Events written but not yet confirmed by the server (held "
                                      "through an outage); past it the sink waits and the "
                                      "input edge's when_full applies.", 100_000, minimum=1),
        "max_pending_bytes": integer("The same bound in bytes.", 64 * 1024 * 1024,
                                     minimum=1024),
        "storage_tier": boolean("Write storage_tier, residency_domain and dp_rank (Dynamo "
                                "1.6.1 fields); false writes the minimal legacy RouterEvent.",
                                True),
    }
    required = ("subject",)
    example = ('url = "nats://127.0.0.1:4222"\n'
               'subject = "namespace.dynamo.component.backend.endpoint.generate.kv-events"')

    @classmethod
    def check(cls, options: Mapping[str, Any], ctx: CheckContext) -> Iterable[Problem]:
        yield from check_connection(options)
        subject = options["subject"]
        for name in _FIELD.findall(subject):
            if name not in PLACEHOLDERS:
                yield Problem("subject", f"unknown placeholder {{{name}}} in subject",
                              hint="only {worker_id} and {dp_rank} are filled in")
        if any(c in subject for c in " \t*>") or ".." in subject or subject.startswith(".") \
                or subject.endswith("."):
            yield Problem("subject", f"{subject!r} is not a publishable subject",
                          hint="tokens separated by '.', no spaces or wildcards")
        if options.get("jetstream") and not options.get("stream"):
            yield Problem("stream", "jetstream = true needs the stream name")

    # -- runtime ------------------------------------------------------------------------------
    #
    # Delivery: every message is kept in ``self.pending`` (:class:`Pending`) until a flush
    # (core NATS: PING/PONG, :class:`_CoreDelivery`) or its JetStream ack
    # (:class:`_JetStreamDelivery`) proves the server has it. A PONG proves only what was sent
    # on the connection it came back on: every connection has a generation (``_gen``, one more
    # at each disconnect), the messages sent so far carry the generation they were sent on
    # (``pending.sent_gen``), and a flush confirms them only when no disconnect came between sending
    # and the PONG (nats-py reconnects by itself, so a flush may be answered by a new
    # connection that never saw them). If the connection drops, nothing written since the last
    # confirmation counts as delivered: after the reconnect it is sent again, in
    # order (at-least-once; Dynamo's router drops a repeated event_id, and in JetStream mode the
    # message id makes the stream drop the copy). While the server is away, messages are held up
    # to max_pending_events / max_pending_bytes; past that bound ``write`` waits for the server,
    # so the input edge fills and its ``when_full`` decides: block (backpressure to the source)
    # or drop, counted on the edge.

    async def start(self) -> None:
        import asyncio
        from ..codecs import dynamo, jsonl
        from ..proto.nats import connect_node

        c = self.config
        self._dynamo, self._jsonl = dynamo, jsonl
        self._up = asyncio.Event()
        self._gen = 0  # the connection's generation (see "Delivery" above)
        self.nc = await connect_node(self, on_up=self._up.set, on_down=self._connection_lost)
        self._up.set()
        self._subject = c["subject"]
        self._templated = "{" in self._subject
        self._ids = dynamo.EventIds()
        self._envelope = dynamo.EnvelopeWriter()
        self._per_message = min(c["events_per_message"], dynamo.MAX_EVENTS_PER_ENVELOPE) \
            if c["format"] == "dynamo-msgpack" else c["events_per_message"]
        self._encode = {"dynamo-json": self._encode_dynamo_json,
                        "dynamo-msgpack": self._encode_dynamo_msgpack,
                        "jsonl": self._encode_jsonl}[c["format"]]
        self.pending = Pending()
        self._msg_seq = 0
        for name in ("resent_messages", "held_events", "confirm_timeouts"):
            self.metrics.extra.setdefault(name, 0)
        self.js = None
        self._delivery: _CoreDelivery | _JetStreamDelivery = _CoreDelivery(self)
        if c["jetstream"]:
            self.js = self.nc.jetstream(timeout=c["ack_timeout_s"])
            self._delivery = _JetStreamDelivery(self)
            await self._ensure_stream()

    async def _ensure_stream(self) -> None:
        from ..proto.nats import ensure_stream

        c = self.config
        subject = c["subject"].replace("{worker_id}", "*").replace("{dp_rank}", "*")
        if await ensure_stream(self.js, c, subject):
            self.log.info("created JetStream stream %s for %s", c["stream"], subject)

    def _connection_lost(self) -> None:
        """nats-py's disconnect callback: what was sent on the old connection is unconfirmed."""
        self._gen += 1
        self._up.clear()

    def _subject_of(self, e: Any) -> str:
        if not self._templated:
            return self._subject
        return self._subject.format(worker_id=getattr(e, "worker_id", "unknown"),
                                    dp_rank=getattr(e, "dp_rank", "unknown"))

    def _by_subject(self, items: list[Any]) -> dict[str, list[Any]]:
        if not self._templated:
            return {self._subject: items}
        groups: dict[str, list[Any]] = {}
        for e in items:
            groups.setdefault(self._subject_of(e), []).append(e)
        return groups

    # -- encoding -----------------------------------------------------------------------------

    def _fitted(self, items: list[Any], encode: Any, margin: int,
                out: list[tuple[bytes, int]], bad: list[Any]) -> None:
        """Encode ``items`` as messages that fit the server's max_payload (1 MiB by default):
        a message over it is cut in two, and so on; a single event over it cannot be sent
        (the server would refuse it, and the connection with it), so it is a loss record on
        `errors` and counted in `lost`. Encoded once when it fits, which is nearly always."""
        body = encode(items)
        limit = self.nc.max_payload - margin
        if len(body) <= limit:
            out.append((body, len(items)))
        elif len(items) > 1:
            half = len(items) // 2
            self._fitted(items[:half], encode, margin, out, bad)
            self._fitted(items[half:], encode, margin, out, bad)
        else:
            self.metrics.lost += 1
            who = getattr(items[0], "worker_id", "?")
            bad.append(self.ctx.rejected(
                f"lost 1 event of worker {who}: its message of {len(body):,} bytes is over the "
                f"NATS server's max_payload ({self.nc.max_payload:,} bytes); raise max_payload "
                "in the server's configuration", items[0] if isinstance(items[0], Event)
                else None))

    def _encode_jsonl(self, batch: list[Any]) -> tuple[list[tuple[str, bytes, int]], list[Any]]:
        n = self._per_message
        out: list[tuple[str, bytes, int]] = []
        bad: list[Any] = []
        for subject, items in self._by_subject(batch).items():
            for i in range(0, len(items), n):
                fitted: list[tuple[bytes, int]] = []
                self._fitted(items[i:i + n], self._jsonl.encode_lines, 0, fitted, bad)
                out += [(subject, body, k) for body, k in fitted]
        return out, bad

    def _router_events(self, batch: list[Any]) -> tuple[list[Any], list[Event], list[Any]]:
        """RouterEvents for the events that convert (and those events, when the subject
        depends on them); error records for the rest. Ids are taken only by events that are
        sent, so they stay contiguous. This loop runs once per event: it keeps to locals."""
        dynamo, bs, full = self._dynamo, self.config["block_size"], self.config["storage_tier"]
        hashes_for, router_event, failed = (dynamo.block_hashes_for, dynamo.router_event,
                                            dynamo.ConversionError)
        last_id = self._ids.last
        keep = self._templated
        routers: list[Any] = []
        sent: list[Event] = []
        bad: list[Any] = []
        for e in batch:
            if type(e) is not Event and not isinstance(e, Event):
                bad.append(self.ctx.rejected("not an event (an error record cannot be sent in "
                                             "a Dynamo format; use format = \"jsonl\")"))
                continue
            if e.group_idx:   # as Dynamo's relay: only the main KV group reaches routers
                self.metrics.extra["not_main_group"] = \
                    self.metrics.extra.get("not_main_group", 0) + 1
                continue
            try:  # computed (and checked) before an event id is taken
                hashes = hashes_for(e, bs) if e.kind == STORED else None
            except failed as exc:
                bad.append(self.ctx.rejected(str(exc), e))
                continue
            key = (e.worker_id, e.dp_rank)
            event_id = last_id[key] = last_id.get(key, 0) + 1
            routers.append(router_event(e, event_id, bs, full, hashes))
            if keep:
                sent.append(e)
        return routers, sent, bad

    def _encode_dynamo_json(self, batch: list[Any]) -> tuple[list[tuple[str, bytes, int]],
                                                             list[Any]]:
        routers, sent, bad = self._router_events(batch)
        enc = self._dynamo.encode_json
        subjects = [self._subject_of(e) for e in sent] if self._templated \
            else [self._subject] * len(routers)
        out = []
        for subject, r in zip(subjects, routers):
            fitted: list[tuple[bytes, int]] = []
            self._fitted([r], lambda one: enc(one[0]), 0, fitted, bad)
            out += [(subject, body, k) for body, k in fitted]
        return out, bad

    def _encode_dynamo_msgpack(self, batch: list[Any]) -> tuple[list[tuple[str, bytes, int]],
                                                                list[Any]]:
        routers, sent, bad = self._router_events(batch)
        n = self._per_message
        now_ms = int(time.time() * 1000)
        if self._templated:
            groups: dict[str, list[Any]] = {}
            for e, r in zip(sent, routers):
                groups.setdefault(self._subject_of(e), []).append(r)
        else:
            groups = {self._subject: routers}
        out = []
        envelope = self._envelope
        for subject, items in groups.items():
            for i in range(0, len(items), n):
                fitted: list[tuple[bytes, int]] = []
                self._fitted(items[i:i + n], envelope.payload, envelope.OVERHEAD, fitted, bad)
                out += [(subject, envelope.wrap(body, now_ms), k) for body, k in fitted]
        return out, bad

    # -- delivery -----------------------------------------------------------------------------

    def _over_bound(self) -> bool:
        c = self.config
        return self.pending.events >= c["max_pending_events"] or \
            self.pending.bytes >= c["max_pending_bytes"]

    async def write(self, batch: list[Any]) -> None:
        if self.js is not None:
            messages, bad = self._encode_identified(batch)
        else:
            encoded, bad = self._encode(batch)
            messages = [(s, p, n, "") for s, p, n in encoded]
        await self.ctx.reject(bad)
        for message in messages:
            while self._over_bound():
                if self._up.is_set() and self._delivery.confirms_to_make_room:
                    await self._confirm()       # make room by confirming what was sent
                else:
                    await self._wait_up()       # the server is away: hold, then backpressure
            self.pending.add(message)
            if self._up.is_set():
                await self._send_pending()
        self.metrics.extra["held_events"] = self.pending.events

    # JetStream message ids name a message's events, not their content. Events that carry
    # their origin (an engine's batch: worker, DP rank, seq and the batch's timestamp; a
    # JetStream input message: its stream sequence) are cut into messages at origin
    # boundaries, so that the same events always make the same messages, and the id is that
    # origin plus the chunk's index: a copy sent again after a reconnect or a restart of
    # kvgraph has the same id and the stream drops it, while distinct events, even identical
    # ones, never share an id (the timestamp tells an engine's seq 0 from the seq 0 it sends
    # after it restarts). Events with no origin (the api source, files without seq) get the
    # publisher id and a sequence: unique, so never dropped, but not recognisable after a
    # restart of kvgraph.

    def _encode_identified(self, batch: list[Any]) -> tuple[list[tuple[str, bytes, int, str]],
                                                            list[Any]]:
        out: list[tuple[str, bytes, int, str]] = []
        bad: list[Any] = []
        for origin, run in _runs_by_origin(batch):
            messages, rejected = self._encode(run)
            bad += rejected
            for chunk, (subject, payload, n) in enumerate(messages):
                out.append((subject, payload, n, self._msg_id(origin, chunk)))
        return out, bad

    def _msg_id(self, origin: tuple[Any, ...] | None, chunk: int) -> str:
        if origin is None:
            self._msg_seq += 1
            return f"{self._envelope.publisher_id:x}-{self._msg_seq}"
        worker, rank, seq, ts = origin
        return f"{worker}.{rank}.{seq}.{ts!r}.{chunk}"

    async def _send_pending(self) -> None:
        """Send what this connection has not sent yet, in order."""
        try:
            await self._delivery.send()
        except NodeFailure:
            raise
        except Exception as exc:  # the connection dropped while sending: resend later
            if self.nc.is_closed:
                raise NodeFailure(f"NATS connection closed: {exc}") from exc
            self._up.clear()

    async def _wait_up(self) -> None:
        import asyncio
        if self.nc.is_closed:
            raise NodeFailure("NATS connection closed for good (max_reconnect_attempts)")
        while not self._up.is_set():
            try:
                await asyncio.wait_for(self._up.wait(), 1.0)
            except asyncio.TimeoutError:
                if self.nc.is_closed:
                    raise NodeFailure("NATS connection closed for good") from None
        # Reconnected: everything unconfirmed may be lost with the old connection; send again
        # (the delivery sees the new generation).
        if self.pending.items:
            await self._send_pending()

    async def _confirm(self) -> None:
        """Return once the server has every message written so far."""
        await self._delivery.confirm()

    def can_confirm(self) -> bool:
        return self._up.is_set()

    async def flush(self) -> None:
        """Return once the server has everything written (waits through an outage)."""
        await self._confirm()
        self.metrics.extra["held_events"] = self.pending.events

    async def stop(self) -> None:
        nc = getattr(self, "nc", None)
        self._closing = True
        if nc is not None and not nc.is_closed:
            try:
                await nc.flush(timeout=2)
            except Exception:
                pass
            await nc.close()


def _runs_by_origin(batch: list[Any]) -> list[tuple[tuple[Any, ...] | None, list[Any]]]:
    """Consecutive items of one origin (worker, DP rank, seq, ts); items with no seq (or not
    events) have origin None."""
    runs: list[tuple[tuple[Any, ...] | None, list[Any]]] = []
    for e in batch:
        seq = getattr(e, "seq", None)
        origin = None if seq is None else (e.worker_id, e.dp_rank, seq, e.ts)
        if runs and runs[-1][0] == origin:
            runs[-1][1].append(e)
        else:
            runs.append((origin, [e]))
    return runs


Message = tuple[str, bytes, int, str]   # subject, payload, events in it, JetStream msg id


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


class _CoreDelivery:
    """Core NATS: publish in order; a PING/PONG on the same connection confirms what went out
    (a confirmation answered by a newer connection confirms nothing)."""

    confirms_to_make_room = True

    def __init__(self, sink: NatsSink):
        self.sink = sink

    async def send(self) -> None:
        sink, pending = self.sink, self.sink.pending
        if pending.sent_gen != sink._gen:
            sink.metrics.extra["resent_messages"] += pending.on_connection(sink._gen)
        publish = sink.nc.publish
        while pending.sent < len(pending.items):
            subject, payload, _, _ = pending.items[pending.sent]
            await publish(subject, payload)
            pending.sent += 1

    async def confirm(self) -> None:
        sink, pending = self.sink, self.sink.pending
        while True:
            if not sink._up.is_set():
                await sink._wait_up()
                continue
            await sink._send_pending()
            if not sink._up.is_set():
                continue
            gen = sink._gen  # the PONG must come back on the connection that carried them
            try:
                await sink.nc.flush(timeout=sink.config["ack_timeout_s"])
            except Exception as exc:
                if sink.nc.is_closed:
                    raise NodeFailure(f"NATS flush failed: {type(exc).__name__}: {exc}") from exc
                if sink.nc.is_connected:
                    # A slow or frozen server, not a lost connection (that calls the
                    # disconnect callback): keep what was sent held, and ask again. Clearing
                    # _up here would wait for a reconnect that never comes.
                    sink.metrics.add("confirm_timeouts")
                    sink.log.problem("confirm-timeout", "NATS has not confirmed %d held "
                                     "event(s) within %ss (%s); still waiting", pending.events,
                                     sink.config["ack_timeout_s"], type(exc).__name__)
                    continue
                sink._up.clear()  # the reconnect callback sets it again
                continue
            if not sink._up.is_set() or sink._gen != gen or pending.sent_gen != gen:
                continue  # a connection was lost since they were sent: send them again
            pending.drop_first(pending.sent)
            if not pending.items:
                return


class _JetStreamDelivery:
    """JetStream: publish with acks, 256 at a time; a message leaves ``pending`` only once the
    stream acknowledged it (the msg id makes the stream drop a copy sent again)."""

    confirms_to_make_room = False   # it waits for acks as it sends

    def __init__(self, sink: NatsSink):
        self.sink = sink

    async def send(self) -> None:
        import asyncio

        sink, pending = self.sink, self.sink.pending
        js = sink.js
        attempt = 0
        while pending.items:
            chunk = pending.items[:256]
            results = await asyncio.gather(
                *(js.publish(s, p, headers={"Nats-Msg-Id": mid}) for s, p, _, mid in chunk),
                return_exceptions=True)   # each result is read just below
            done = next((i for i, r in enumerate(results) if isinstance(r, BaseException)),
                        len(results))
            pending.drop_first(done)
            if done < len(chunk):
                attempt += 1
                sink.metrics.add("publish_retries")
                sink.log.problem("js-retry", "JetStream publish not acknowledged (%s); "
                                 "retrying", results[done])
                if sink.nc.is_closed:
                    raise NodeFailure("NATS connection closed with unacknowledged messages")
                await asyncio.sleep(min(0.05 * 2 ** attempt, 2.0))
        pending.sent = 0

    async def confirm(self) -> None:
        sink = self.sink
        while not sink._up.is_set():
            await sink._wait_up()
        await self.send()   # returns once every message is acknowledged

