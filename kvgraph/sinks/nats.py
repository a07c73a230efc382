"""``nats`` sink: publish events to NATS for Dynamo's KV router, llm-d, or another kvgraph.

Formats: ``dynamo-msgpack`` (Dynamo 1.6.1 event plane: a msgpack envelope holding up to 128
RouterEvents), ``dynamo-json`` (one RouterEvent JSON per message, the legacy shape) and
``jsonl`` (kvgraph's own event lines). The subject is a template: ``{worker_id}`` and
``{dp_rank}`` are filled per event.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

from ..node import CheckContext, Kind, NodeType, Problem, boolean, integer, number, string
from ..proto.nats import CONNECTION_OPTIONS, JETSTREAM_OPTIONS, check_connection
from ..registry import register

FORMATS = ["dynamo-msgpack", "dynamo-json", "jsonl"]
PLACEHOLDERS = ("worker_id", "dp_rank")
_FIELD = re.compile(r"\{([^{}]*)\}")


@register
class NatsSink(NodeType):
    name = "nats"
    kind = Kind.SINK
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
