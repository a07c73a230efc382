"""``zmq`` sink: re-publish events in vLLM's wire format, so that any vLLM consumer can read them.

Frames are ``[topic, seq, payload]`` with seq counting from 0; with ``replay_endpoint`` it also
serves vLLM's replay protocol from a buffer of recent batches.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from ..node import Bind, CheckContext, Sink, Problem, boolean, integer, string
from ..proto.zmq import parse_endpoint
from ..registry import register


@register
class ZmqSink(Sink):
    name = "zmq"
    summary = "Re-publish events on a ZMQ PUB socket in vLLM's wire format."
    options = {
        "endpoint": string("PUB endpoint, e.g. tcp://*:5557.", examples=["tcp://*:5557"]),
        "bind": boolean("Bind the PUB socket (the usual) or connect it to a binding SUB.", True),
        "topic": string("Topic frame of every message.", ""),
        "encoding": string("Event encoding: `map` (vLLM >= 0.24) or `array` (older).", "map",
                           enum=["map", "array"]),
        "replay_endpoint": string("ROUTER endpoint serving replay requests (always binds)."),
        "buffer_steps": integer("Batches kept for replay.", 10_000, minimum=1),
        "hwm": integer("Send high-water mark in messages.", 100_000, minimum=0),
    }
    required = ("endpoint",)
    example = 'endpoint = "tcp://*:5600"'

    @classmethod
    def check(cls, options: Mapping[str, Any], ctx: CheckContext) -> Iterable[Problem]:
        for key in ("endpoint", "replay_endpoint"):
            if key in options:
                try:
                    ep = parse_endpoint(options[key])
                except ValueError as exc:
                    yield Problem(key, f"{options[key]!r} is not a ZMQ endpoint", hint=str(exc))
                    continue
                connecting = key == "endpoint" and not options.get("bind", True)
                if connecting and ep.transport == "tcp" and ep.host == "*":
                    yield Problem(key, "a wildcard host only works when binding")
        if "replay_endpoint" in options and options.get("replay_endpoint") == options["endpoint"]:
            yield Problem("replay_endpoint", "replay_endpoint must differ from endpoint")

    @classmethod
    def binds(cls, options: Mapping[str, Any]) -> Iterable[Bind]:
        if options.get("bind", True):
            yield Bind("endpoint", options["endpoint"])
        if "replay_endpoint" in options:
            yield Bind("replay_endpoint", options["replay_endpoint"])
