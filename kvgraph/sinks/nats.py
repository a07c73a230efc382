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
from ..event import Event
from ..node import CheckContext, Sink, Problem, boolean, integer, number, string
from ..proto.nats import CONNECTION_OPTIONS, JETSTREAM_OPTIONS, check_connection
from ..registry import register

FORMATS = ["dynamo-msgpack", "dynamo-json", "jsonl"]
PLACEHOLDERS = ("worker_id", "dp_rank")
_FIELD = re.compile(r"\{([^{}]*)\}")


@register
class NatsSink(Sink):
    name = "nats"
    summary = "Publish events to NATS in Dynamo's formats or kvgraph JSONL."
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
        "max_pending_events": integer("Events held while the server is unreachable; past it "
                                      "the edge's when_full applies.", 1_000_000, minimum=1),
        "max_pending_bytes": integer("Bytes held while the server is unreachable.",
                                     256 * 1024 * 1024, minimum=1024),
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

    async def start(self) -> None:
        from ..codecs import dynamo, jsonl
        from ..proto.nats import connect_node

        c = self.config
        if c["jetstream"]:
            raise NodeFailure("JetStream publishing is not available yet; set jetstream = false")
        self._dynamo, self._jsonl = dynamo, jsonl
        self.nc = await connect_node(self)
        self._subject = c["subject"]
        self._templated = "{" in self._subject
        self._ids = dynamo.EventIds()
        self._envelope = dynamo.EnvelopeWriter()
        self._per_message = min(c["events_per_message"], dynamo.MAX_EVENTS_PER_ENVELOPE) \
            if c["format"] == "dynamo-msgpack" else c["events_per_message"]
        self._write = {"dynamo-json": self._write_dynamo_json,
                       "dynamo-msgpack": self._write_dynamo_msgpack,
                       "jsonl": self._write_jsonl}[c["format"]]

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

    async def write(self, batch: list[Any]) -> None:
        await self._write(batch)

    async def _write_jsonl(self, batch: list[Any]) -> None:
        publish, n = self.nc.publish, self._per_message
        for subject, items in self._by_subject(batch).items():
            for i in range(0, len(items), n):
                await publish(subject, self._jsonl.encode_lines(items[i:i + n]))

    def _router_events(self, batch: list[Any]) -> tuple[list[tuple[Event, dict[str, Any]]],
                                                        list[Any]]:
        """RouterEvents for the events that convert; error records for the rest. Ids are
        taken only by events that are sent, so they stay contiguous."""
        dynamo, bs, full = self._dynamo, self.config["block_size"], self.config["storage_tier"]
        ok, bad = [], []
        for e in batch:
            if not isinstance(e, Event):
                bad.append(self.ctx.rejected("not an event (an error record cannot be sent in "
                                             "a Dynamo format; use format = \"jsonl\")"))
                continue
            try:
                if e.kind == "stored":
                    dynamo.block_hashes_for(e, bs)  # raises before an id is taken
            except dynamo.ConversionError as exc:
                bad.append(self.ctx.rejected(str(exc), e))
                continue
            ok.append((e, dynamo.router_event(e, self._ids.next(e.worker_id, e.dp_rank), bs,
                                              full)))
        return ok, bad

    async def _write_dynamo_json(self, batch: list[Any]) -> None:
        ok, bad = self._router_events(batch)
        publish, enc = self.nc.publish, self._dynamo.encode_json
        for e, r in ok:
            await publish(self._subject_of(e), enc(r))
        await self.ctx.reject(bad)

    async def _write_dynamo_msgpack(self, batch: list[Any]) -> None:
        ok, bad = self._router_events(batch)
        publish, n = self.nc.publish, self._per_message
        now_ms = int(time.time() * 1000)
        groups: dict[str, list[dict[str, Any]]] = {}
        for e, r in ok:
            groups.setdefault(self._subject_of(e), []).append(r)
        for subject, routers in groups.items():
            for i in range(0, len(routers), n):
                await publish(subject, self._envelope.encode(routers[i:i + n], now_ms))
        await self.ctx.reject(bad)

    async def flush(self) -> None:
        """Core NATS has no acks: a flush (PING/PONG) proves the server has everything."""
        try:
            await self.nc.flush(timeout=self.config["connect_timeout_s"] * 5)
        except Exception as exc:
            raise NodeFailure(f"NATS flush failed: {type(exc).__name__}: {exc}") from exc

    async def stop(self) -> None:
        nc = getattr(self, "nc", None)
        self._closing = True
        if nc is not None and not nc.is_closed:
            try:
                await nc.flush(timeout=2)
            except Exception:
                pass
            await nc.close()
