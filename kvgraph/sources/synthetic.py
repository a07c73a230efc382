"""``synthetic`` source: simulated engines with shared prefixes, for demos and benchmarks.

Each simulated engine serves requests whose prompts share system prompts and earlier chat
turns, stores full blocks, evicts under a cache capacity and now and then clears its cache.
Deterministic for a given ``seed``. With ``zmq_endpoint`` it also publishes in vLLM's wire
format through a real PUB socket, standing in for engines in front of any consumer.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from ..node import (Bind, CheckContext, Kind, NodeType, Problem, integer, number, string)
from ..proto.zmq import parse_endpoint, rank_endpoints
from ..registry import register


@register
class SyntheticSource(NodeType):
    name = "synthetic"
    kind = Kind.SOURCE
    summary = "Load generator: simulated engines sharing prefixes, evicting and clearing."
    options = {
        "workers": integer("Number of simulated engines (worker ids 0..workers-1).", 4,
                           minimum=1, maximum=100_000),
        "rate": number("Events per second over all engines; 0 is as fast as possible.", 1000,
                       minimum=0),
        "block_size": integer("Tokens per block.", 16, minimum=1),
        "seed": integer("Random seed: the same seed gives the same stream.", 0, minimum=0),
        "duration_s": number("Stop after this many seconds; 0 runs until stopped or max_events.",
                             0, minimum=0),
        "max_events": integer("Stop after this many events; 0 is unlimited.", 0, minimum=0),
        "events_per_batch": integer("Events per batch (one engine step).", 16, minimum=1),
        "prompt_blocks_mean": number("Mean prompt length, in blocks.", 8, exclusive_minimum=0),
        "prefix_share": number("Fraction of requests that start with a shared system prompt or "
                               "continue an earlier conversation.", 0.6, minimum=0),
        "system_prompts": integer("Distinct shared system prompts.", 8, minimum=1),
        "cache_blocks": integer("Blocks each engine holds before it evicts.", 4096, minimum=1),
        "clear_probability": number("Chance per batch that an engine clears its cache.", 0.0005,
                                    minimum=0),
        "zmq_endpoint": string("Also publish through ZMQ PUB sockets in vLLM's wire format: "
                               "worker r binds port + r of this tcp endpoint."),
        "zmq_encoding": string("Event encoding on ZMQ: `map` (vLLM >= 0.24) or `array`.",
                               "map", enum=["map", "array"]),
    }
    example = "workers = 4\nrate = 2000\nseed = 1\nmax_events = 10000"

    @classmethod
    def check(cls, options: Mapping[str, Any], ctx: CheckContext) -> Iterable[Problem]:
        if options.get("prefix_share", 0) > 1:
            yield Problem("prefix_share", "prefix_share is a fraction between 0 and 1")
        if "zmq_endpoint" in options:
            try:
                ep = parse_endpoint(options["zmq_endpoint"])
            except ValueError as exc:
                yield Problem("zmq_endpoint", f"{options['zmq_endpoint']!r} is not a ZMQ "
                              "endpoint", hint=str(exc))
                return
            if ep.transport != "tcp" and options.get("workers", 4) > 1:
                yield Problem("zmq_endpoint", "several workers need a tcp endpoint: worker r "
                              "binds port + r")
            elif ep.transport == "tcp" and ep.port is None:
                yield Problem("zmq_endpoint", "give a port number: worker r binds port + r")

    @classmethod
    def binds(cls, options: Mapping[str, Any]) -> Iterable[Bind]:
        if "zmq_endpoint" in options:
            ep = options["zmq_endpoint"]
            n = options.get("workers", 4) if ep.startswith("tcp://") else 1
            for address in rank_endpoints(ep, n, 1):
                yield Bind("zmq_endpoint", address)
