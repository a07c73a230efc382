"""``nats`` source: consume events from NATS, so that graphs can chain through a bus.

Reads kvgraph's own ``jsonl`` events and Dynamo's ``dynamo-json`` (legacy, one RouterEvent per
message) and ``dynamo-msgpack`` (1.6.1 event-plane envelope) formats. In JetStream mode a
message is acknowledged only after every sink downstream confirmed it.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from ..node import CheckContext, Kind, NodeType, Problem, integer, number, string
from ..proto.nats import CONNECTION_OPTIONS, JETSTREAM_OPTIONS, check_connection
from ..registry import register

FORMATS = ["jsonl", "dynamo-json", "dynamo-msgpack"]


@register
class NatsSource(NodeType):
    name = "nats"
    kind = Kind.SOURCE
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
        "worker_id": integer("Worker id for formats that carry none (jsonl without it).",
                             minimum=0, maximum=2**63 - 1),
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
