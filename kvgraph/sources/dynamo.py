"""``dynamo`` source: tap a running Dynamo fleet's KV event plane.

Over ZMQ (Dynamo 1.6.1's default) it watches Dynamo's discovery (file or etcd,
``kvgraph/proto/dynamo_discovery.py``) for the publishers of one endpoint, connects a SUB to each
(and to those that appear later; it lets go of those that go), and decodes their messages
(``[b"kv-events", publisher_id, sequence, frame]``, the frame a 5-byte header and the
event-plane envelope) into kvgraph events. Over NATS every publisher of the endpoint sends the
envelope alone on one subject, ``namespace.NS.component.COMP.endpoint.EP.kv-events``, which the
source subscribes to; discovery then only names the publishers. Uses: bridge a fleet to
JetStream for durability, to a file for audit, or into kvgraph's own index.

Each publisher's ``sequence`` counts its messages from 0; a jump is messages this source never
got (a PUB drops what a slow or late subscriber misses, and Dynamo has no replay on this plane):
they are counted in ``seq_lost`` and ``lost``, with a loss record on ``errors``. A source that
joins a running publisher starts from whatever it sends next, without a loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from typing import Any, Mapping

from ..node import Source, integer, number
from ..proto.dynamo_discovery import DISCOVERY_OPTIONS, DiscoveryProbe
from ..proto.nats import CONNECTION_OPTIONS
from ..node import counter, gauge
from ..registry import register


@register
class DynamoSource(DiscoveryProbe, Source):
    name = "dynamo"
    metrics = {"publishers": gauge("Dynamo publishers followed (from discovery)."),
               "seq_lost": counter("Envelopes missing in a publisher's sequence: lost."),
               "malformed": counter("Messages that could not be decoded (sent to errors)."),
               "duplicates": counter("Envelopes received twice (skipped).")}
    summary = "Read Dynamo's KV event plane (ZMQ): every publisher of an endpoint, found in " \
              "Dynamo's discovery."
    options = {
        **DISCOVERY_OPTIONS,
        **CONNECTION_OPTIONS,
        "poll_s": number("How often discovery is read for publishers that came or went.", 1.0,
                         exclusive_minimum=0),
        "max_batch_events": integer("Most events handed downstream in one batch.", 1024,
                                    minimum=1),
        "hwm": integer("Messages held between the network and the graph (ZMQ's receive "
                       "high-water mark; over NATS, past it the subscription waits).",
                       100_000, minimum=1),
    }
    example = 'namespace = "dynamo"\ncomponent = "backend"\nendpoint = "generate"'

    @classmethod
    def outside(cls, config: Mapping[str, Any]) -> str:
        return (f"Dynamo {config['namespace']}/{config['component']}/{config['endpoint']}, "
                f"{config['transport']} + {config['discovery']} discovery")

    async def start(self) -> None:
        import zmq

        from ..codecs import dynamo
        from ..proto.dynamo_discovery import open_discovery
        from ..proto.zmq import Readable

        c = self.config
        self._zmq, self._dynamo = zmq, dynamo
        self._discovery = open_discovery(c["discovery"], c["discovery_path"], c["etcd_endpoints"])
        sock = zmq.Context.instance().socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, c["hwm"])
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, b"kv-events")
        self._sock = sock
        self._readable = Readable([sock])
        self._nats_queue: deque[bytes] = deque()   # envelopes received over NATS
        self._nc: Any = None
        if c["transport"] == "nats":
            await self._subscribe()
        self._connected: dict[int, str] = {}      # publisher id -> its endpoint
        self._last_seq: dict[int, int] = {}       # publisher id -> last sequence received
        for name in ("publishers", "seq_lost", "malformed", "duplicates"):
            self.metrics.extra.setdefault(name, 0)
        self.log.info("watching %s discovery for publishers of %s/%s/%s", c["discovery"],
                      c["namespace"], c["component"], c["endpoint"])

    async def _subscribe(self) -> None:
        import asyncio

        from ..proto.dynamo_discovery import subject_prefix
        from ..proto.nats import connect_node

        c = self.config
        self._nc = await connect_node(self)
        self._arrived, self._space = asyncio.Event(), asyncio.Event()
        queue, hwm = self._nats_queue, c["hwm"]

        async def on_message(msg: Any) -> None:
            while len(queue) >= hwm:    # the graph is behind: wait (nats-py buffers meanwhile)
                self._space.clear()
                await self._space.wait()
            queue.append(msg.data)
            self._arrived.set()

        subject = subject_prefix(c["namespace"], c["component"], c["endpoint"]) + ".kv-events"
        await self._nc.subscribe(subject, cb=on_message)
        await self._nc.flush()
        self.log.info("subscribed to %s", subject)

    async def _follow_discovery(self) -> None:
        """Connect to publishers that appeared, let go of those that went."""
        import asyncio

        from ..proto.dynamo_discovery import CHANNELS, SOURCES, DiscoveryError, endpoint_key

        c = self.config
        prefix = endpoint_key(c["namespace"], c["component"], c["endpoint"])
        try:
            channels, sources = await asyncio.to_thread(
                lambda: (self._discovery.list(CHANNELS, prefix),
                         self._discovery.list(SOURCES, prefix)))
        except (DiscoveryError, OSError) as exc:
            self.log.problem("discovery", "cannot read discovery (%s); trying again", exc)
            return
        found: dict[int, str] = {}
        for key, value in channels.items():
            try:
                record = json.loads(value)
                transport = record["transport"]
                if transport.get("kind") == "Zmq":
                    found[int(record["instance_id"])] = transport["config"]["endpoint"]
                elif transport.get("kind") == "Nats":
                    found[int(record["instance_id"])] = ""     # on the subscribed subject
            except (ValueError, KeyError, TypeError):
                self.log.problem("record", "unreadable discovery record %s", key)
        for pid, endpoint in found.items():
            if pid in self._connected and self._connected[pid] == endpoint:
                continue
            if endpoint:
                self._sock.connect(endpoint)
            self._connected[pid] = endpoint
            self.metrics.extra["publishers"] = len(self._connected)
            who = _worker_of(sources, prefix + f"{pid:x}")
            self.log.info("publisher %x at %s (%s): connected", pid, endpoint, who)
        for pid in [p for p in self._connected if p not in found]:
            endpoint = self._connected.pop(pid)
            if endpoint and endpoint not in self._connected.values():
                try:
                    self._sock.disconnect(endpoint)
                except self._zmq.ZMQError:
                    pass
            self._last_seq.pop(pid, None)
            self.metrics.extra["publishers"] = len(self._connected)
            self.log.info("publisher %x at %s: gone from discovery, disconnected", pid, endpoint)

    def _ingest(self, frames: list[bytes], events: list[Any], rejected: list[Any]) -> None:
        """One ZMQ message: its publisher and sequence (from the frames, so that a message
        whose body is malformed is an error, not also a gap), then its envelope."""
        if len(frames) != 4 or len(frames[1]) != 8 or len(frames[2]) != 8:
            return self._malformed(rejected, f"{len(frames)} frame(s), expected 4 (topic, "
                                   "publisher id, sequence, frame)", frames)
        if not self._in_sequence(int.from_bytes(frames[1], "big"),
                                 int.from_bytes(frames[2], "big"), rejected):
            return None
        frame = frames[3]
        if len(frame) < 5 or frame[0] != 1 or int.from_bytes(frame[1:5], "big") != len(frame) - 5:
            return self._malformed(rejected, "bad frame header (version 1 and the payload "
                                   "length expected)", frames)
        try:
            _, _, evs = self._dynamo.decode_envelope(memoryview(frame)[5:])
        except self._dynamo.ConversionError as exc:
            return self._malformed(rejected, str(exc), frames)
        events.extend(evs)
        return None

    def _envelope(self, body: bytes, events: list[Any], rejected: list[Any]) -> None:
        """One envelope as NATS carries it: publisher and sequence are inside."""
        try:
            pid, seq, evs = self._dynamo.decode_envelope(body)
        except self._dynamo.ConversionError as exc:
            return self._malformed(rejected, str(exc), [body])
        if self._in_sequence(pid, seq, rejected):
            events.extend(evs)
        return None

    def _in_sequence(self, pid: int, seq: int, rejected: list[Any]) -> bool:
        """False for a message already had; a jump in a publisher's sequence is counted lost."""
        last = self._last_seq.get(pid)
        if last is not None and seq <= last:
            self.metrics.extra["duplicates"] += 1
            return False
        if last is not None and seq > last + 1:
            n = seq - last - 1
            self.metrics.extra["seq_lost"] += n
            self.metrics.lost += n
            reason = (f"lost {n} message(s) of publisher {pid:x}, sequence {last + 1}..{seq - 1}: "
                      "the PUB dropped them (a slow or reconnecting subscriber)")
            self.log.problem("lost", "%s", reason)
            rejected.append(self.ctx.rejected(reason))
        self._last_seq[pid] = seq
        return True

    def _malformed(self, rejected: list[Any], why: str, frames: list[bytes]) -> None:
        self.metrics.extra["malformed"] += 1
        rejected.append(self.ctx.rejected(f"malformed event-plane message: {why}",
                                          raw=b"".join(frames)[:4096]))

    async def run(self) -> None:
        zmq, sock = self._zmq, self._sock
        limit = self.config["max_batch_events"]
        poll_s = self.config["poll_s"]
        next_poll = 0.0
        stopping = self.ctx.stopping
        while not stopping.is_set():
            if time.monotonic() >= next_poll:
                await self._follow_discovery()
                next_poll = time.monotonic() + poll_s
            events: list[Any] = []
            rejected: list[Any] = []
            queue = self._nats_queue
            if self._nc is not None:
                self._arrived.clear()      # before draining: what comes after sets it again
            while queue and len(events) < limit:
                self._envelope(queue.popleft(), events, rejected)
            if self._nc is not None:
                self._space.set()
            while len(events) < limit:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._ingest(frames, events, rejected)
            if events:
                self.metrics.events_in += len(events)
                await self.ctx.emit(events)
            if rejected:
                await self.ctx.reject(rejected)
            if not events and not rejected:
                if self._nc is None:
                    await self._readable.wait(min(0.05, poll_s))
                else:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._arrived.wait(), min(0.05, poll_s))

    async def stop(self) -> None:
        if getattr(self, "_nc", None) is not None:
            self._closing = True
            await self._nc.close()
        if getattr(self, "_readable", None) is not None:
            self._readable.close()
        if getattr(self, "_sock", None) is not None:
            self._sock.close(0)


def _worker_of(sources: dict[str, bytes], key: str) -> str:
    try:
        worker = json.loads(sources[key])["metadata"]["worker"]
        return f"worker {worker['worker_id']} rank {worker['dp_rank']}"
    except (KeyError, ValueError, TypeError):
        return "worker unknown"
