"""``dynamo`` sink: feed Dynamo's KV routers the way Dynamo's own publishers do.

Dynamo 1.6.1 runs its KV event plane over ZMQ unless a deployment chooses NATS: each worker's
publisher binds a PUB socket and registers it in Dynamo's discovery, and every router connects a
SUB to each publisher it finds there (``kvgraph/proto/dynamo_discovery.py`` has the records).
This node is such a publisher for every (worker_id, dp_rank) in its input: on the first event
of one, it binds a PUB on a free port, registers it, waits for a router to subscribe (up to
``subscriber_wait_s``: a PUB drops what it sends before anyone listens), and then publishes.
Records are kept alive while it runs and removed when it stops.

Wire format, per message: ``[b"kv-events", publisher_id u64 BE, sequence u64 BE, frame]``,
``frame`` = version 1 (u8) + payload length (u32 BE) + the msgpack envelope of the NATS event
plane (``publisher_id``, ``sequence`` from 0, ``published_at`` ms, ``topic``, ``payload`` = up to
128 RouterEvents). ``event_id`` is contiguous per (worker_id, dp_rank) from 1.

The worker_id must be the id under which Dynamo knows the worker (its instance id, the hex at the
end of its ``v1/instances/...`` record), and the worker must not run a publisher of its own: a
router takes one publisher per worker and ignores a worker with two.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

from ..codecs.dynamo import EnvelopeWriter
from ..codecs.messages import MessageEncoder
from ..node import Sink, integer, number, string
from ..proto.dynamo_discovery import DISCOVERY_OPTIONS, DiscoveryProbe
from ..proto.nats import CONNECTION_OPTIONS
from ..proto.nats import NATS_METRICS
from ..node import counter, gauge
from ..registry import register
from .nats import NatsSink

HEADER_VERSION = 1


def frame_envelope(envelope: bytes) -> bytes:
    """The ZMQ event plane's frame: a 5-byte header (version, length) and the envelope."""
    return bytes([HEADER_VERSION]) + len(envelope).to_bytes(4, "big") + envelope


@register
class DynamoSink(DiscoveryProbe, Sink):
    name = "dynamo"
    metrics = {**NATS_METRICS,
               "publishers": gauge("Dynamo publishers registered (one per worker and rank)."),
               "messages_sent": counter("Event-plane messages sent."),
               "not_main_group": counter("Events of KV groups other than the main one, not "
                                         "sent."),
               "resent_messages": counter("Messages published again (NATS transport)."),
               "held_events": gauge("Events written, not yet confirmed (NATS transport)."),
               "confirm_timeouts": counter("Confirmations that did not come in time."),
               "publish_retries": counter("Publishes retried.")}
    summary = "Publish to Dynamo's KV event plane (ZMQ), registered in Dynamo's discovery."
    confirms_delivery = False   # PUB sockets: a router that is not there misses the events
    options = {
        **DISCOVERY_OPTIONS,
        **CONNECTION_OPTIONS,
        "bind_host": string("Address the PUB sockets bind (a free port each).", "0.0.0.0"),
        "advertise_host": string("Host routers are told to connect to; empty: Dynamo's "
                                 "DYN_EVENT_PLANE_HOST, else bind_host unless a wildcard, else "
                                 "this machine's address.", ""),
        "block_size": integer("Tokens per KV block (for tokens_hash).", 16, minimum=1),
        "events_per_message": integer("Most events in one message (Dynamo: 128).", 128,
                                      minimum=1, maximum=128),
        "subscriber_wait_s": number("After registering a new worker's publisher, how long to "
                                    "wait for a router to subscribe before publishing anyway "
                                    "(a PUB drops what it sends before anyone listens).", 5.0,
                                    minimum=0),
        "hwm": integer("Send high-water mark of each PUB, in messages (Dynamo: 100,000).",
                       100_000, minimum=0),
        "linger_s": number("On stop, how long queued messages may still take to reach a "
                           "router (ZMQ LINGER).", 5.0, minimum=0),
    }
    example = 'namespace = "dynamo"\ncomponent = "backend"\nendpoint = "generate"'

    @classmethod
    def outside(cls, config: Mapping[str, Any]) -> str:
        return (f"Dynamo {config['namespace']}/{config['component']}/{config['endpoint']}, "
                f"{config['transport']} + {config['discovery']} discovery")

    def can_confirm(self) -> bool:
        plane = getattr(self, "_nats", None)
        return True if plane is None else plane.can_confirm()

    async def flush(self) -> None:
        """Over NATS, what the server confirmed (the `nats` sink's delivery rules); over ZMQ,
        nothing can be confirmed (a PUB cannot know who received)."""
        if getattr(self, "_nats", None) is not None:
            await self._nats.flush()

    # -- runtime ------------------------------------------------------------------------------

    async def start(self) -> None:
        from ..proto.dynamo_discovery import Registration, open_discovery
        from ..proto.zmq import OwnContext

        c = self.config
        # RouterEvents (ids, hashes, checks) as every bus sink makes them; only the envelope
        # differs: one publisher per (worker, rank), below.
        self._encoder = MessageEncoder(
            self, "dynamo-msgpack", block_size=c["block_size"], storage_tier=True,
            events_per_message=c["events_per_message"], max_bytes=lambda: 1 << 62, limit="",
            hint="")
        self._publishers: dict[tuple[int, int], _Publisher] = {}
        self._nats: _NatsPlane | None = None
        self._registration = Registration(
            open_discovery(c["discovery"], c["discovery_path"], c["etcd_endpoints"]), self.log)
        for name in ("publishers", "messages_sent"):
            self.metrics.extra.setdefault(name, 0)
        if c["transport"] == "nats":
            self._nats = _NatsPlane(self)
            await self._nats.start()
        else:
            self._zctx = OwnContext(asyncio=True)
            self._host = advertised_host(c["bind_host"], c["advertise_host"])
        self._keep_alive = self.ctx.spawn(self._registration.keep_alive_forever(), "keep-alive")
        self.log.info("publishing for Dynamo endpoint %s/%s/%s over %s, %s discovery",
                      c["namespace"], c["component"], c["endpoint"], c["transport"].upper(),
                      c["discovery"])

    async def _publisher(self, worker_id: int, dp_rank: int) -> _Publisher:
        """The publisher of one (worker, rank): bound, registered, and (within
        subscriber_wait_s) subscribed to, before its first message."""
        import zmq

        from ..proto.dynamo_discovery import new_publisher_id, publisher_records

        c = self.config
        sock = self._zctx.socket(zmq.XPUB)   # XPUB: it tells when a router has subscribed
        sock.setsockopt(zmq.SNDHWM, c["hwm"])
        port = sock.bind_to_random_port(f"tcp://{c['bind_host']}")
        endpoint = f"tcp://{self._host}:{port}"
        pub = _Publisher(sock, new_publisher_id(), EnvelopeWriter)
        records = publisher_records(c["namespace"], c["component"], c["endpoint"], pub.id,
                                    worker_id, dp_rank,
                                    {"kind": "Zmq", "config": {"endpoint": endpoint}})
        await self._registration.put(records)
        self.metrics.extra["publishers"] += 1
        self.log.info("worker %d rank %d: publisher %x at %s, registered", worker_id, dp_rank,
                      pub.id, endpoint)
        deadline = time.monotonic() + c["subscriber_wait_s"]
        while time.monotonic() < deadline:
            if await sock.poll(50, zmq.POLLIN):
                if (await sock.recv())[:1] == b"\x01":
                    break
        else:
            if c["subscriber_wait_s"]:
                self.log.warning("worker %d rank %d: no router subscribed within %.0f s; "
                                 "publishing anyway (a router that connects later misses what "
                                 "came before)", worker_id, dp_rank, c["subscriber_wait_s"])
        return pub

    async def write(self, batch: list[Any]) -> None:
        if self._nats is not None:
            await self._nats.write(batch)
            return
        routers_all, _, bad = self._encoder.router_events(batch)
        groups: dict[tuple[int, int], list[Any]] = {}
        for r in routers_all:
            groups.setdefault((r.worker_id, r.event.dp_rank), []).append(r)
        n = self.config["events_per_message"]
        now_ms = int(time.time() * 1000)
        for key, routers in groups.items():
            pub = self._publishers.get(key)
            if pub is None:
                pub = self._publishers[key] = await self._publisher(*key)
            for i in range(0, len(routers), n):
                seq = pub.writer.sequence
                envelope = pub.writer.encode(routers[i:i + n], now_ms)
                await pub.sock.send_multipart([b"kv-events", pub.id.to_bytes(8, "big"),
                                               seq.to_bytes(8, "big"),
                                               frame_envelope(envelope)])
                self.metrics.extra["messages_sent"] += 1
        await self.ctx.reject(bad)

    async def stop(self) -> None:
        """Records first (routers stop connecting), then the sockets, after their linger."""
        import asyncio

        task = getattr(self, "_keep_alive", None)
        if task is not None:
            task.cancel()
            await asyncio.wait((task,))   # its own error, if any, went to the owner
        if getattr(self, "_registration", None) is not None:
            await self._registration.close()
        if getattr(self, "_nats", None) is not None:
            await self._nats.stop()
        if getattr(self, "_zctx", None) is not None:
            await self._zctx.close([p.sock for p in self._publishers.values()],
                                   self.config["linger_s"], self.log)


class _NatsPlane(NatsSink):
    """Dynamo's event plane over NATS: the `nats` sink's delivery (confirmation tied to the
    connection, resending, bounds), with what Dynamo's NATS publishers add: a publisher id and
    discovery records per (worker, rank), and their messages never mixed."""

    def __init__(self, owner: DynamoSink):
        from ..proto.dynamo_discovery import subject_prefix

        c = owner.config
        config = {**NatsSink.defaults(), **{k: c[k] for k in CONNECTION_OPTIONS if k in c},
                  "subject": subject_prefix(c["namespace"], c["component"], c["endpoint"])
                  + ".kv-events", "format": "dynamo-msgpack", "block_size": c["block_size"],
                  "events_per_message": c["events_per_message"]}
        super().__init__(_WithConfig(owner.ctx, config))
        self._owner = owner
        self._writers: dict[tuple[int, int], Any] = {}

    async def write(self, batch: list[Any]) -> None:
        """Register the publishers of workers seen for the first time, then send."""
        from ..proto.dynamo_discovery import new_publisher_id, publisher_records, subject_prefix

        owner, c = self._owner, self._owner.config
        for e in batch:
            key = (e.worker_id, e.dp_rank)
            if key in self._writers:
                continue
            pid = new_publisher_id()
            prefix = subject_prefix(c["namespace"], c["component"], c["endpoint"])
            await owner._registration.put(publisher_records(
                c["namespace"], c["component"], c["endpoint"], pid, *key,
                {"kind": "Nats", "config": {"subject_prefix": prefix}}))
            self._writers[key] = EnvelopeWriter(pid)
            owner.metrics.extra["publishers"] += 1
            owner.log.info("worker %d rank %d: publisher %x on %s.kv-events, registered",
                           *key, pid, prefix)
        await super().write(batch)

    def _make_encoder(self) -> Any:
        return _PlaneEncoder(self, super()._make_encoder())


class _PlaneEncoder(MessageEncoder):
    """The `nats` sink's encoder, but each (worker, rank) has its own publisher (id and
    sequence), and their events never share an envelope."""

    def __init__(self, plane: _NatsPlane, base: MessageEncoder):
        self.__dict__.update(base.__dict__)
        self.plane = plane
        self.encode = self._encode_dynamo_msgpack

    def _encode_dynamo_msgpack(self, batch: list[Any]) -> tuple[list[tuple[Any, bytes, int]],
                                                                list[Any]]:
        routers, _, bad = self.router_events(batch)
        groups: dict[tuple[int, int], list[Any]] = {}
        for r in routers:
            groups.setdefault((r.worker_id, r.event.dp_rank), []).append(r)
        now_ms, n, out = int(time.time() * 1000), self.per_message, []
        plane = self.plane
        for key, items in groups.items():
            writer = plane._writers[key]
            for i in range(0, len(items), n):
                fitted: list[tuple[bytes, int]] = []
                self.fitted(items[i:i + n], writer.payload, writer.OVERHEAD, fitted, bad)
                out += [(plane._subject, writer.wrap(body, now_ms), k) for body, k in fitted]
        plane._owner.metrics.extra["messages_sent"] += len(out)
        return out, bad


class _WithConfig:
    """A node's context with another config: the NATS plane runs the `nats` sink's code with
    the options it derives, and counts and reports as the `dynamo` node."""

    def __init__(self, ctx: Any, config: dict[str, Any]):
        self._ctx, self.config = ctx, config

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)


class _Publisher:
    __slots__ = ("sock", "id", "writer")

    def __init__(self, sock: Any, publisher_id: int, writer_type: Any):
        self.sock, self.id = sock, publisher_id
        self.writer = writer_type(publisher_id)


def advertised_host(bind_host: str, advertise_host: str) -> str:
    """What routers are told to connect to (see the ``advertise_host`` option)."""
    import os
    import socket

    if advertise_host:
        return advertise_host
    if os.environ.get("DYN_EVENT_PLANE_HOST"):
        return os.environ["DYN_EVENT_PLANE_HOST"]
    if bind_host not in ("0.0.0.0", "*", "", "::"):
        return bind_host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
