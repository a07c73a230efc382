"""``nats`` sink: publish events to NATS for Dynamo's KV router, llm-d, or another kvgraph.

Formats: ``dynamo-msgpack`` (Dynamo 1.6.1 event plane: a msgpack envelope holding up to 128
RouterEvents), ``dynamo-json`` (one RouterEvent JSON per message, the legacy shape) and
``jsonl`` (kvgraph's own event lines). The subject is a template: ``{worker_id}`` and
``{dp_rank}`` are filled per event.
"""

from __future__ import annotations

import re

from typing import Any, Iterable, Mapping

from ..errors import NodeFailure
from ..node import CheckContext, Sink, Problem, number, string
from ..proto.nats import CONNECTION_OPTIONS, JETSTREAM_OPTIONS, NatsProbe, check_connection
from ..proto.nats import NATS_METRICS, check_partitions, stream_subject
from ..node import counter, gauge
from ..registry import register
from ..codecs.messages import encoding_options
from ._pending import PENDING_OPTIONS, Pending

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
        **encoding_options("dynamo-msgpack"),
        **JETSTREAM_OPTIONS,
        "dedup_window_s": number("JetStream duplicate window: retries carry message ids.", 0,
                                 minimum=0),
        "ack_timeout_s": number("How long to wait for a JetStream publish ack before retrying.",
                                5.0, exclusive_minimum=0),
        **PENDING_OPTIONS,
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
        yield from check_partitions(options, stream_subject(subject))

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
        from ..proto.nats import connect_node

        c = self.config
        self._up = asyncio.Event()
        self._gen = 0  # the connection's generation (see "Delivery" above)
        self.nc = await connect_node(self, on_up=self._up.set, on_down=self._connection_lost)
        self._up.set()
        self._subject = c["subject"]
        self._templated = "{" in self._subject
        self.encoder = self._make_encoder()
        self._encode = self.encoder.encode
        self.pending = Pending()
        for name in ("resent_messages", "held_events", "confirm_timeouts"):
            self.metrics.extra.setdefault(name, 0)
        self.js = None
        self._delivery: _CoreDelivery | _JetStreamDelivery = _CoreDelivery(self)
        if c["jetstream"]:
            self.js = self.nc.jetstream(timeout=c["ack_timeout_s"])
            self._delivery = _JetStreamDelivery(self)
            await self._ensure_stream()

    async def _ensure_stream(self) -> None:
        from ..proto.nats import ensure_stream, worker_token

        c = self.config
        subject = stream_subject(c["subject"])
        if await ensure_stream(self.js, c, subject, self.log, worker_token(c["subject"])):
            self.log.info("created JetStream stream %s for %s", c["stream"], subject)

    async def adopt(self, old: "NatsSink") -> None:
        """Event ids go on from the replaced sink (see ``MessageEncoder.continue_from``)."""
        self.encoder.continue_from(old.encoder)

    def _connection_lost(self) -> None:
        """nats-py's disconnect callback: what was sent on the old connection is unconfirmed."""
        self._gen += 1
        self._up.clear()

    def _subject_of(self, e: Any) -> str:
        if not self._templated:
            return self._subject
        return self._subject.format(worker_id=getattr(e, "worker_id", "unknown"),
                                    dp_rank=getattr(e, "dp_rank", "unknown"))

    # -- encoding -----------------------------------------------------------------------------

    def _make_encoder(self) -> Any:
        from ..codecs.messages import MessageEncoder

        c = self.config
        return MessageEncoder(
            self, c["format"], block_size=c["block_size"], storage_tier=c["storage_tier"],
            events_per_message=c["events_per_message"], max_bytes=lambda: self.nc.max_payload,
            limit="the NATS server's max_payload",
            hint="raise max_payload in the server's configuration", key_of=self._subject_of if self._templated else None,
            fixed_key=self._subject)

    # -- delivery -----------------------------------------------------------------------------

    async def write(self, batch: list[Any]) -> None:
        if self.js is not None:
            messages, bad = self.encoder.encode_identified(batch)
        else:
            encoded, bad = self._encode(batch)
            messages = [(s, p, n, "") for s, p, n in encoded]
        await self.ctx.reject(bad)
        for message in messages:
            while self.pending.over(self.config):
                if self._up.is_set() and self._delivery.confirms_to_make_room:
                    await self._confirm()       # make room by confirming what was sent
                else:
                    await self._wait_up()       # the server is away: hold, then backpressure
            self.pending.add(message)
            if self._up.is_set():
                await self._send_pending()
        self.metrics.extra["held_events"] = self.pending.events

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

