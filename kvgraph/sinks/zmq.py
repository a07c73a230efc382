"""``zmq`` sink: re-publish events in vLLM's wire format, so that any vLLM consumer can read them.

Frames are ``[topic, seq, payload]`` with seq counting from 0, one message per input batch and
(worker, DP rank) in it. With ``replay_endpoint`` it also serves vLLM's replay protocol (the
0.26+ reply shape, with the topic frame) from a buffer of the last ``buffer_steps`` messages.

"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Iterable, Mapping

from ..node import Bind, CheckContext, Sink, Problem, boolean, integer, number, string
from ..proto.zmq import parse_endpoint
from ..node import counter
from ..registry import register


@register
class ZmqSink(Sink):
    name = "zmq"
    metrics = {"replays_served": counter("Replay requests answered."),
               "bad_replay_requests": counter("Replay requests that made no sense (ignored).")}
    summary = "Re-publish events on a ZMQ PUB socket in vLLM's wire format."
    confirms_delivery = False  # a PUB socket cannot know whether anyone received a message
    options = {
        "endpoint": string("PUB endpoint, e.g. tcp://*:5557.", examples=["tcp://*:5557"]),
        "bind": boolean("Bind the PUB socket (the usual) or connect it to a binding SUB.", True),
        "topic": string("Topic frame of every message.", ""),
        "encoding": string("Event encoding: `map` (vLLM >= 0.24) or `array` (older).", "map",
                           enum=["map", "array"]),
        "replay_endpoint": string("ROUTER endpoint serving replay requests (always binds)."),
        "buffer_steps": integer("Batches kept for replay.", 10_000, minimum=1),
        "hwm": integer("Send high-water mark in messages.", 100_000, minimum=0),
        "linger_s": number("On stop, how long queued messages may still take to reach a "
                           "subscriber that reads more slowly (ZMQ LINGER); what is left after "
                           "it is dropped.", 5.0, minimum=0),
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
                connecting = key == "endpoint" and not options["bind"]
                if connecting and ep.transport == "tcp" and ep.host == "*":
                    yield Problem(key, "a wildcard host only works when binding")
        if "replay_endpoint" in options and options.get("replay_endpoint") == options["endpoint"]:
            yield Problem("replay_endpoint", "replay_endpoint must differ from endpoint")

    @classmethod
    def binds(cls, options: Mapping[str, Any]) -> Iterable[Bind]:
        if options["bind"]:
            yield Bind("endpoint", options["endpoint"])
        if "replay_endpoint" in options:
            yield Bind("replay_endpoint", options["replay_endpoint"])

    @classmethod
    async def probe(cls, config: Mapping[str, Any]) -> list[Problem]:
        from ..proto.zmq import probe_bind, probe_connect

        problems = []
        for key in ("endpoint", "replay_endpoint"):
            if key in config:
                bind = key == "replay_endpoint" or config["bind"]
                why = (probe_bind if bind else probe_connect)(config[key])
                if why:
                    problems.append(Problem(key, why))
        return problems

    # -- runtime ------------------------------------------------------------------------------

    async def start(self) -> None:
        import asyncio
        import zmq
        import zmq.asyncio

        from ..codecs.vllm import encode_payload

        c = self.config
        self._encode = encode_payload
        from ..proto.zmq import OwnContext

        self._zctx = OwnContext(asyncio=True)
        # sockets are kept before binding: after a failed bind, stop() still closes them (the
        # context's termination waits for every socket)
        sock = self._sock = self._zctx.socket(zmq.PUB)
        sock.setsockopt(zmq.SNDHWM, c["hwm"])
        (sock.bind if c["bind"] else sock.connect)(c["endpoint"])
        self._topic = c["topic"].encode()
        self._seq = 0
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=c["buffer_steps"])
        self._replay_task: asyncio.Task[None] | None = None
        if "replay_endpoint" in c:
            router = self._router = self._zctx.socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 0)
            router.bind(c["replay_endpoint"])
            self._replay_task = self.ctx.spawn(self._serve_replay(), "replay")

    async def write(self, batch: list[Any]) -> None:
        groups: dict[int, list[Any]] = {}
        for e in batch:
            groups.setdefault(e.dp_rank, []).append(e)
        now = time.time()
        for rank, events in groups.items():
            payload = self._encode(events, now, rank, self.config["encoding"])
            seq = self._seq
            self._seq += 1
            self._buffer.append((seq, payload))
            await self._sock.send_multipart([self._topic, seq.to_bytes(8, "big"), payload])

    async def _serve_replay(self) -> None:
        from ..codecs.vllm import SEQ_END

        router = self._router
        while True:
            frames = await router.recv_multipart()
            if len(frames) != 3 or len(frames[2]) != 8:
                self.metrics.add("bad_replay_requests")
                continue
            ident, start = frames[0], int.from_bytes(frames[2], "big")
            for seq, payload in list(self._buffer):
                if seq >= start:
                    await router.send_multipart([ident, b"", self._topic, seq.to_bytes(8, "big"),
                                                 payload])
            await router.send_multipart([ident, b"", b"", SEQ_END.to_bytes(8, "big"), b""])
            self.metrics.add("replays_served")

    async def stop(self) -> None:
        import asyncio
        if getattr(self, "_replay_task", None) is not None:
            self._replay_task.cancel()
            await asyncio.wait((self._replay_task,))
        if getattr(self, "_router", None) is not None:
            self._router.close(linger=0)
        if getattr(self, "_zctx", None) is not None:
            await self._zctx.close([getattr(self, "_sock", None)], self.config["linger_s"],
                                   self.log)
