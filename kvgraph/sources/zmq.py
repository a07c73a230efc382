"""``zmq`` source: reads the KV-event publishers of vLLM, SGLang and TensorRT-LLM.

Engines publish ``[topic, seq, payload]`` on a PUB socket (``kvgraph/codecs/vllm.py``).
By default this node connects a SUB socket to the engine, which binds (vLLM binds for ``*``,
``::``, ``ipc://`` and ``inproc://``); set ``bind = true`` when the engine connects instead.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any, Iterable, Mapping

from ..node import (Bind, CheckContext, Source, Problem, boolean, integer, number, string,
                    worker_id, worker_id_value)
from ..proto.zmq import Readable, parse_endpoint, rank_endpoints
from ._seq import SEQ_METRICS
from ..node import counter, gauge
from ..registry import register


@register
class ZmqSource(Source):
    name = "zmq"
    metrics = {**SEQ_METRICS,
               "read_ahead_bytes": gauge("Engine messages read ahead while the graph "
                                         "downstream was full, in bytes."),
               "read_ahead_dropped": counter("Messages dropped past max_read_ahead_bytes "
                                             "(seen as seq gaps)."),
               "reconnects": counter("Times the source connected to an endpoint again.")}
    summary = "Read KV events from a vLLM, SGLang or TensorRT-LLM ZMQ publisher."
    options = {
        "endpoint": string("The engine's PUB endpoint: tcp://HOST:PORT, ipc://PATH or "
                           "inproc://NAME. With dp_ranks > 1, the endpoint of rank 0.",
                           examples=["tcp://127.0.0.1:5557"]),
        "topic": string("Topic prefix to subscribe to; empty receives everything.", ""),
        "bind": boolean("Bind the SUB socket instead of connecting (when the engine connects).",
                        False),
        "replay_endpoint": string("The engine's ROUTER replay endpoint (vLLM "
                                  "`replay_endpoint`), used to repair sequence gaps."),
        "replay_on_connect": boolean("Fetch the engine's buffered history at start. Engines "
                                     "older than vLLM 0.26 reply without the topic: set `topic` "
                                     "to the engine's topic then.", False),
        "replay_timeout_s": number("How long a replay may take before its gap counts as lost.",
                                   2.0, exclusive_minimum=0),
        "replay_cooldown_s": number("Least time between two replays of one stream, so that a "
                                    "broken replay endpoint cannot cause a storm.", 1.0,
                                    minimum=0),
        "worker_id": worker_id("Worker id stamped on every event (Dynamo's worker instance "
                               "id).", 0),
        "worker_id_from": string("Where worker_id comes from: `config` (the option above) or "
                                 "`topic` (the pod of an llm-d `kv@<pod>@<model>` topic, hashed "
                                 "to 63 bits).", "config", enum=["config", "topic"]),
        "dp_ranks": integer("Number of data-parallel ranks of the engine to follow; rank r is "
                            "read at port + r * dp_rank_port_offset.", 1, minimum=1, maximum=1024),
        "dp_rank_port_offset": integer("Port step between DP ranks (vLLM uses 1).", 1, minimum=0),
        "hwm": integer("Receive high-water mark in messages; past it ZMQ drops (seen as a gap).",
                       100_000, minimum=0),
        "block_size": integer("Expected tokens per block; events that disagree go to `errors`. "
                              "0 accepts any.", 0, minimum=0),
        "max_batch_events": integer("Most events handed downstream in one batch.", 1024,
                                    minimum=1),
        "max_batch_bytes": integer("Most bytes of engine messages decoded into one batch (a "
                                   "decoded event takes 3 to 10 times its bytes): engines "
                                   "that store thousands of blocks at once make smaller "
                                   "batches, so that one batch cannot hold gigabytes.",
                                   4 * 1024 * 1024, minimum=1024),
        "max_frame_bytes": integer("Largest message accepted from the engine or its replay "
                                   "endpoint (ZMQ MAXMSGSIZE). A larger one is refused: ZMQ "
                                   "drops the connection, the source connects again, and the "
                                   "refused batch shows as a seq gap (repaired by replay, or "
                                   "reported lost). With hwm, it bounds what the socket holds.",
                                   16 * 1024 * 1024, minimum=1024),
        "max_read_ahead_bytes": integer("While the graph downstream is full, or the source "
                                        "is behind the engine, it keeps reading the engine "
                                        "into a queue of its own, up to this many bytes; "
                                        "past it messages are dropped and "
                                        "show as a seq gap (repaired by replay, or reported "
                                        "lost). ZMQ's own queue (`hwm`, in messages) then "
                                        "stays nearly empty.", 256 * 1024 * 1024,
                                        minimum=1024),
        "warn_silent_s": number("Until the first message arrives, warn after this many seconds "
                                "of silence, then after twice as long each time (ZMQ connects "
                                "lazily: an engine that is not there looks like a quiet one). "
                                "0 turns the warning off.", 10.0, minimum=0),
    }
    required = ("endpoint",)
    example = 'endpoint = "tcp://127.0.0.1:5557"\nworker_id = 7'

    @classmethod
    def check(cls, options: Mapping[str, Any], ctx: CheckContext) -> Iterable[Problem]:
        bind = options["bind"]
        ranks = options["dp_ranks"]
        for key in ("endpoint", "replay_endpoint"):
            if key not in options:
                continue
            try:
                ep = parse_endpoint(options[key])
            except ValueError as exc:
                yield Problem(key, f"{options[key]!r} is not a ZMQ endpoint", hint=str(exc))
                continue
            binding = bind and key == "endpoint"
            if ep.transport == "tcp" and (ep.host == "*" or ep.port is None) and not binding:
                yield Problem(key, f"{options[key]!r} has a wildcard, which only works when "
                              "binding", hint="name the engine's host, e.g. tcp://127.0.0.1:5557"
                              + (", or set bind = true" if key == "endpoint" else ""))
            elif ranks > 1 and (ep.transport != "tcp" or ep.port is None):
                yield Problem(key, "dp_ranks > 1 needs a tcp endpoint with a port, offset per "
                              "rank")
        if options.get("replay_on_connect") and "replay_endpoint" not in options:
            yield Problem("replay_on_connect", "replay_on_connect needs replay_endpoint")

    @classmethod
    def binds(cls, options: Mapping[str, Any]) -> Iterable[Bind]:
        if options.get("bind"):
            for ep in rank_endpoints(options["endpoint"], options["dp_ranks"],
                                     options["dp_rank_port_offset"]):
                yield Bind("endpoint", ep)

    @classmethod
    async def probe(cls, config: Mapping[str, Any]) -> list[Problem]:
        from ..proto.zmq import probe_bind, probe_connect

        problems = []
        for ep in rank_endpoints(config["endpoint"], config["dp_ranks"],
                                 config["dp_rank_port_offset"]):
            why = probe_bind(ep) if config.get("bind") else probe_connect(ep)
            if why:
                problems.append(Problem("endpoint", why, hint="is the engine running with "
                                        "KV events enabled?"))
        if "replay_endpoint" in config:
            for ep in rank_endpoints(config["replay_endpoint"], config["dp_ranks"],
                                     config["dp_rank_port_offset"]):
                why = probe_connect(ep)
                if why:
                    problems.append(Problem("replay_endpoint", why))
        return problems

    # -- runtime ------------------------------------------------------------------------------

    async def start(self) -> None:
        import zmq

        from ._frames import FrameIngest

        c = self.config
        self._zmq = zmq
        ctx = zmq.Context.instance()
        # A plain socket, drained with non-blocking receives; Readable awaits it when empty.
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, c["hwm"])
        sock.setsockopt(zmq.MAXMSGSIZE, c["max_frame_bytes"])
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, c["topic"].encode())
        endpoints = rank_endpoints(c["endpoint"], c["dp_ranks"], c["dp_rank_port_offset"])
        for ep in endpoints:
            (sock.bind if c["bind"] else sock.connect)(ep)
        self._sock = sock
        self._was_heard = False   # a message came (here, or to the instance this one replaced)
        self._ahead: deque[list[bytes] | _Dropped] = deque()   # read while the output edge was full
        self._ahead_bytes = 0
        self.metrics.extra.setdefault("read_ahead_dropped", 0)
        self._dealers: dict[int, Any] = {}
        replay_eps: list[tuple[Any, list[str]]] = []
        if "replay_endpoint" in c:
            for rank, ep in enumerate(rank_endpoints(c["replay_endpoint"], c["dp_ranks"],
                                                     c["dp_rank_port_offset"])):
                dealer = ctx.socket(zmq.DEALER)
                dealer.setsockopt(zmq.LINGER, 0)
                dealer.setsockopt(zmq.MAXMSGSIZE, c["max_frame_bytes"])
                dealer.connect(ep)
                self._dealers[rank] = dealer
                replay_eps.append((dealer, [ep]))
        self._readable = Readable([sock, *self._dealers.values()])
        from ..proto.zmq import Reconnector

        self._reconnector = Reconnector(([] if c["bind"] else [(sock, endpoints)]) + replay_eps,
                                        self.log, self.metrics)
        self._ingest = FrameIngest(self.id, self.metrics, worker_id_value(c["worker_id"]),
                                   c["worker_id_from"],
                                   c["block_size"], self.log,
                                   self._request if self._dealers else None,
                                   c["replay_cooldown_s"], c["replay_timeout_s"],
                                   c["topic"].encode())
        self._endpoints = ", ".join(endpoints)
        # ZMQ connects lazily and silently: nothing here says the engine is there. The first
        # message says so (see run), and so does a warning while none has come.
        self.log.info("%s %s; waiting for the first message", "bound to" if c["bind"]
                      else "connecting to", self._endpoints)

    async def adopt(self, old: "ZmqSource") -> None:
        """A reload changed this node. With the same connection options it takes the old
        instance's sockets, read-ahead and sequence tracking as they are: not one message
        is missed. With the same endpoints but other socket options (``topic``, ``hwm``...),
        its own sockets connected before the old ones closed: it takes the sequence
        tracking, skips what both read, and a batch missed in between is a gap (replayed or
        reported lost). With other endpoints it starts afresh."""
        same = all(self.config.get(k) == old.config.get(k) for k in _CONNECTION)
        self._was_heard = getattr(old, "_was_heard", False)
        if same and getattr(old, "_sock", None) is not None:
            await self.stop()   # the sockets this instance opened at start
            for name in ("_sock", "_dealers", "_readable", "_reconnector", "_ahead",
                         "_ahead_bytes"):
                setattr(self, name, getattr(old, name))
            old._sock, old._dealers, old._readable, old._reconnector = None, {}, None, None
            self.streams.continue_from(old.streams, overlapping=False)
        elif self._endpoints == old._endpoints:
            self.streams.continue_from(old.streams, overlapping=True)
        else:
            self._was_heard = False

    def _request(self, rank: int, start: int) -> bool:
        """Ask rank's replay endpoint for every buffered batch from ``start`` on."""
        dealer = self._dealers.get(rank)
        if dealer is None:
            return False
        try:
            dealer.send_multipart([b"", start.to_bytes(8, "big")], self._zmq.NOBLOCK)
        except self._zmq.Again:
            return False
        self.log.info("requesting replay from seq %d (rank %d)", start, rank)
        return True

    async def run(self) -> None:
        """Drain the sockets without awaiting each message; await only when all are empty."""
        zmq, sock = self._zmq, self._sock
        # Frames are received as zmq.Frame and their ``more`` flag read directly: pyzmq's
        # recv_multipart asks getsockopt(RCVMORE) per frame, which converts the option to an
        # enum each time; that was two thirds of the cost of receiving a 3-frame message.
        recv = sock.recv
        noblock = int(zmq.NOBLOCK)
        again = zmq.Again
        ingest = self._ingest
        streams = ingest.streams
        limit = self.config["max_batch_events"]
        byte_limit = self.config["max_batch_bytes"]
        stopping = self.ctx.stopping
        emit, reject = self.ctx.emit, self.ctx.reject
        if self.config["replay_on_connect"]:
            streams.replay_on_connect(sorted(self._dealers), time.time())
        silence = _Silence(self.config["warn_silent_s"])
        idle_wait = IDLE_WAIT_MIN_S
        while not stopping.is_set():
            events: list[Any] = []
            rejected: list[Any] = []
            got = False  # any message at all (an engine's empty batch says it is there too)
            now = time.time()
            for rank, dealer in self._dealers.items():
                for _ in range(limit):  # a flooding replay endpoint cannot hold the loop
                    try:
                        frames = dealer.recv_multipart(noblock)
                    except again:
                        break
                    streams.on_reply(rank, frames, events, rejected, now)
            if streams.replays:
                streams.tick(events, rejected, now)
            ahead = self._ahead
            nbytes = 0   # of the messages in this batch (their payloads)
            while ahead and len(events) + len(rejected) < limit and nbytes < byte_limit:
                nbytes += self._ingest_ahead(ahead.popleft(), events, rejected, now)
            while len(events) + len(rejected) < limit and nbytes < byte_limit:
                try:
                    frame = recv(noblock, copy=False)
                except again:
                    break
                frames = [frame.bytes]
                while frame.more:  # the rest of a message is already here
                    frame = recv(noblock, copy=False)
                    frames.append(frame.bytes)
                nbytes += len(frames[-1])
                ingest.ingest(frames, events, rejected, now)
                got = True
            if len(events) + len(rejected) >= limit or nbytes >= byte_limit:
                self._read_ahead()   # behind the engine: what ZMQ holds goes to the bound
            if events:
                self.metrics.events_in += len(events)
                if self.ctx.output_full():
                    await self._emit_reading_ahead(events)
                else:
                    await emit(events)
            if rejected:
                await reject(rejected)
            if got and silence.waiting and self._was_heard:
                silence.heard()   # the instance this one replaced had heard the engine
            elif got and silence.waiting:
                self._was_heard = True
                self.log.info("first message from %s after %.1f s", self._endpoints,
                              silence.heard())
            if not events and not rejected:
                self._reconnector.check()
                if silence.waiting and silence.due():
                    self.log.warning("nothing received from %s in %.0f s: is the engine running, "
                                     "with KV events enabled, publishing there?",
                                     self._endpoints, silence.elapsed())
                # The wait is capped, so that a missed edge (ZMQ's fd is edge-triggered) costs
                # at most the cap: 10 ms after traffic, doubling to 250 ms while the engine is
                # quiet (8 idle sources woke 800 times a second: 2.4% of a core for nothing).
                await self._readable.wait(idle_wait)
                idle_wait = IDLE_WAIT_MIN_S if got or streams.replays else \
                    min(idle_wait * 2, IDLE_WAIT_MAX_S)
            else:
                idle_wait = IDLE_WAIT_MIN_S
        # Stopping: batches held for a replay in flight are delivered, not dropped, and the
        # gap the replay did not fill is reported lost.
        events, rejected, nbytes = [], [], 0
        while self._ahead:   # what was read ahead is delivered too, a batch at a time
            nbytes += self._ingest_ahead(self._ahead.popleft(), events, rejected, time.time())
            if len(events) >= limit or nbytes >= byte_limit or not self._ahead:
                self.metrics.events_in += len(events)
                await emit(events)
                events, nbytes = [], 0
        self._ahead_bytes = 0
        streams.finish_all(events, rejected, time.time(), "kvgraph stopped before the replay "
                           "ended")
        if events:
            self.metrics.events_in += len(events)
            await emit(events)
        if rejected:
            await reject(rejected)

    async def _emit_reading_ahead(self, events: list[Any]) -> None:
        """Emit into a full edge while reading the engine ahead: a PUB cannot be paused, so
        waiting without reading only moves the queue into ZMQ, bounded in messages, not bytes
        (1.06 GB of big frames was seen there). Here it is bounded in bytes, and what does not
        fit is dropped and becomes a seq gap, exactly as a ZMQ queue past its hwm would."""
        emitting = asyncio.ensure_future(self.ctx.emit(events))
        try:
            while not emitting.done():
                self._read_ahead()
                await asyncio.wait((emitting,), timeout=0.002)
        finally:
            if not emitting.done():
                emitting.cancel()
                await asyncio.gather(emitting, return_exceptions=True)
        emitting.result()

    def _ingest_ahead(self, item: list[bytes] | _Dropped, events: list[Any],
                      rejected: list[Any], now: float) -> int:
        """Ingest one item of the read-ahead queue; returns its payload's size."""
        if type(item) is _Dropped:
            self._ingest.streams.on_dropped(
                item.topic, item.seq, item.rank, "dropped: the read-ahead queue was full "
                "(max_read_ahead_bytes)", rejected, now)
            return 0
        self._ahead_bytes -= sum(map(len, item))
        self._ingest.ingest(item, events, rejected, now)
        return len(item[-1])

    def _read_ahead(self) -> None:
        """Move what ZMQ holds into the read-ahead queue, within max_read_ahead_bytes. A
        message that does not fit leaves a marker in its place (runs of them, one), so that
        its seq is a gap when its turn comes, whatever follows."""
        from ..codecs.vllm import DecodeError, dp_rank_of, split_frames

        zmq, sock, ahead = self._zmq, self._sock, self._ahead
        bound = self.config["max_read_ahead_bytes"]
        dropped = 0
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            size = sum(map(len, frames))
            if self._ahead_bytes + size <= bound:
                ahead.append(frames)
                self._ahead_bytes += size
                continue
            dropped += 1
            try:
                topic, seq, payload = split_frames(frames)
                rank = dp_rank_of(payload)
            except DecodeError:
                continue   # malformed: it would have been rejected, and holds no seq
            last = ahead[-1] if ahead else None
            if type(last) is _Dropped and last.topic == topic and last.rank == rank:
                last.seq = seq
            else:
                ahead.append(_Dropped(topic, seq, rank))
        extra = self.metrics.extra
        extra["read_ahead_bytes"] = self._ahead_bytes
        if dropped:
            extra["read_ahead_dropped"] = extra.get("read_ahead_dropped", 0) + dropped
            self.log.problem("read ahead full", "the graph downstream is full and %d "
                             "message(s) did not fit in max_read_ahead_bytes: dropped, they "
                             "will show as a seq gap", dropped)

    def on_stop(self) -> None:
        readable = getattr(self, "_readable", None)
        if readable is not None:
            readable.wake()

    @property
    def streams(self) -> Any:
        """The per-engine sequence tracking (gap repair, replays) of this source."""
        return self._ingest.streams

    async def stop(self) -> None:
        if getattr(self, "_reconnector", None) is not None:
            self._reconnector.close()
        if getattr(self, "_readable", None) is not None:
            self._readable.close()
        for s in [getattr(self, "_sock", None), *getattr(self, "_dealers", {}).values()]:
            if s is not None:
                s.close(0)


IDLE_WAIT_MIN_S, IDLE_WAIT_MAX_S = 0.01, 0.25
#: The options that make the sockets: equal in the old and new configuration, a reload hands
#: the sockets over.
_CONNECTION = ("endpoint", "topic", "bind", "replay_endpoint", "dp_ranks",
               "dp_rank_port_offset", "hwm", "max_frame_bytes")


class _Dropped:
    """In the read-ahead queue, in place of the messages it could not hold: the last one's
    stream and seq."""

    __slots__ = ("topic", "seq", "rank")

    def __init__(self, topic: bytes, seq: int, rank: int | None):
        self.topic, self.seq, self.rank = topic, seq, rank


class _Silence:
    """Until a source hears from its engine: when to warn that it has not (after ``first_s``,
    then after twice as long each time, so that a long wait does not flood the log)."""

    def __init__(self, first_s: float):
        self.started = time.monotonic()
        self.waiting = True
        self._interval = first_s
        self._next = self.started + first_s if first_s > 0 else float("inf")

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def due(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._interval *= 2
        self._next = now + self._interval
        return True

    def heard(self) -> float:
        """The first message arrived; returns how long it took."""
        self.waiting = False
        return self.elapsed()
