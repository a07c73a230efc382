"""``redis`` source: read a Redis stream through a consumer group, at least once.

Each entry's ``data`` field is a message in one of the bus formats (as the ``redis`` sink
writes it). Reading order, and why:

1. At start, the consumer's own pending entries (``XREADGROUP ... 0``): what it read before a
   crash or a restart and never acknowledged. They are delivered again (``redelivered``).
2. Then new entries (``XREADGROUP ... >``), up to ``max_in_flight`` entries unacknowledged.
3. Every ``claim_idle_s / 2``, ``XAUTOCLAIM`` takes over entries another consumer of the group
   left pending for longer than ``claim_idle_s`` (it died). Entries of ours still in the graph
   are first touched (``XCLAIM ... JUSTID``, which does not count a delivery), so that neither
   we nor another consumer take them while a slow sink holds them.

An entry is acknowledged (``XACK``) only after every sink downstream confirmed its events,
the same end-to-end acknowledgement as the JetStream ``nats`` source. One that was dropped on
the way is claimed again at once and redelivered. An entry delivered more than
``max_deliveries`` times (it crashed kvgraph each time, or never got through) is set aside: an
error record on ``errors``, and acknowledged. An entry whose ``id`` field (the sink's
idempotency id) was among the last ``dedup_ids`` delivered is a copy: acknowledged, counted in
``duplicates_dropped``, not emitted.

Replies are read raw (:mod:`kvgraph.proto.redis`): XAUTOCLAIM answers ``[cursor, entries]`` on
Redis 6.2 and ``[cursor, entries, deleted ids]`` on 7.x, and an entry deleted while pending is
``nil`` in 6.2's replies; such entries are acknowledged (there is nothing to deliver) and
counted in ``deleted_pending``.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

from ..codecs.messages import reading_options
from ..event import Event, Rejected
from ..node import (Source, counter, gauge, integer, number, string)
from ..proto.redis import CONNECTION_OPTIONS, REDIS_METRICS, RedisEdge
from ..registry import register

Entry = tuple[bytes, Any]   # id, fields (a flat [name, value, ...] list, or None if deleted)


@register
class RedisSource(RedisEdge, Source):
    name = "redis"
    summary = "Read a Redis stream through a consumer group; XACK once the sinks confirmed."
    min_version = (6, 2)   # XAUTOCLAIM
    metrics = {**REDIS_METRICS,
               "malformed": counter("Entries or lines that could not be decoded (sent to "
                                    "errors)."),
               "acked": counter("Entries acknowledged after delivery."),
               "redelivered": counter("Entries delivered again: pending after a restart, "
                                      "claimed from a dead consumer, or retried after a drop."),
               "set_aside": counter("Entries delivered more than max_deliveries times, sent to "
                                    "errors and acknowledged."),
               "duplicates_dropped": counter("Entries whose id was just delivered: copies, "
                                             "acknowledged and not emitted."),
               "deleted_pending": counter("Pending entries deleted from the stream before they "
                                          "were delivered (trimmed by MAXLEN or XDEL)."),
               "in_flight": gauge("Entries emitted and not yet acknowledged.")}
    options = {
        **CONNECTION_OPTIONS,
        "stream": string("The stream's key.", min_length=1, env=True),
        "group": string("Consumer group; created (with the stream) if missing.", "kvgraph",
                        min_length=1),
        "consumer": string("This reader's name in the group; keep it across restarts, so "
                           "that a restart re-reads its own pending entries. Default: the "
                           "machine's host name.", env=True, min_length=1),
        "field": string("The entry field that holds the message.", "data", min_length=1),
        "deliver_policy": string("Where a new group starts: `all` (the stream's first entry) "
                                 "or `new` (entries added from now on).", "all",
                                 enum=["all", "new"]),
        "read_count": integer("Entries per read.", 256, minimum=1, maximum=65_536),
        "max_in_flight": integer("Entries emitted and not yet acknowledged; past it reading "
                                 "waits.", 10_000, minimum=1),
        "claim_idle_s": number("Claim entries another consumer left pending this long "
                               "(XAUTOCLAIM); 0 never claims.", 60.0, minimum=0),
        "max_deliveries": integer("An entry delivered more times is set aside (errors port).",
                                  5, minimum=1),
        **reading_options(),
    }
    required = ("stream",)
    example = 'url = "redis://127.0.0.1:6379/0"\nstream = "kv-events"\ngroup = "kvgraph"'

    @classmethod
    def at_least_once(cls, options: Mapping[str, Any]) -> bool:
        return True

    # -- runtime ------------------------------------------------------------------------------

    async def start(self) -> None:
        import asyncio
        import socket

        from redis.exceptions import ResponseError

        from ..codecs.messages import MessageDecoder, RecentIds
        from ..errors import NodeFailure
        from ..proto.link import Link
        from ..proto.redis import connect, redact_url

        c = self.config
        self.redis = await connect(self)
        self.link = Link(self, f"Redis at {redact_url(c['url'])}")
        self.stream, self.group = c["stream"], c["group"]
        self.consumer = c.get("consumer") or socket.gethostname()
        try:
            await self.redis.xgroup_create(self.stream, self.group, mkstream=True,
                                           id="0" if c["deliver_policy"] == "all" else "$")
            self.log.info("created consumer group %s on %s", self.group, self.stream)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise NodeFailure(f"cannot create consumer group {self.group!r} on "
                                  f"{self.stream!r}: {exc}") from exc
        self.decoder = MessageDecoder.for_node(self)
        for name in ("acked", "redelivered", "set_aside", "duplicates_dropped",
                     "deleted_pending", "in_flight"):
            self.metrics.extra.setdefault(name, 0)
        self.inflight: dict[bytes, float] = {}   # entry id -> when it was emitted
        self.retry: list[bytes] = []             # dropped downstream: claim and emit again
        self.seen = RecentIds(c["dedup_ids"])   # idempotency ids delivered
        self._cursor = b"0-0"
        self._acking: set[Any] = set()      # XACK tasks
        # Entries delivered and acknowledged (or being acknowledged), the last ones: a read of
        # our own pending entries can cross their XACK, and must not deliver them again.
        self.acked = RecentIds(4 * c["max_in_flight"])
        self._settled = asyncio.Event()

    async def _call(self, *args: Any) -> Any:
        from ..proto.redis import retrying

        return await retrying(self.link, lambda: self.redis.execute_command(*args),
                              give_up=self.ctx.stopping.is_set)

    async def run(self) -> None:
        import asyncio

        c, stopping = self.config, self.ctx.stopping
        claim_every = c["claim_idle_s"] / 2
        next_claim = time.monotonic() + claim_every
        await self._own_pending()
        while not stopping.is_set():
            if claim_every and time.monotonic() >= next_claim:
                # First, even when full: touching our own slow entries keeps them ours.
                next_claim = time.monotonic() + claim_every
                await self._claim()
            elif len(self.inflight) >= c["max_in_flight"]:
                self._settled.clear()
                try:
                    await asyncio.wait_for(self._settled.wait(), 0.25)
                except asyncio.TimeoutError:
                    pass
            elif self.retry:
                ids, self.retry = self.retry, []
                reply = await self._call("XCLAIM", self.stream, self.group, self.consumer, 0,
                                         *ids)
                await self._emit([tuple(e) for e in reply or [] if e], again=True)
            else:
                reply = await self._call("XREADGROUP", "GROUP", self.group, self.consumer,
                                         "COUNT", c["read_count"], "BLOCK", 250,
                                         "STREAMS", self.stream, ">")
                if reply:
                    await self._emit(_entries(reply), again=False)

    async def _own_pending(self) -> None:
        """What this consumer read and never acknowledged (a restart): deliver it again."""
        start: bytes | str = "0"
        while not self.ctx.stopping.is_set():
            reply = await self._call("XREADGROUP", "GROUP", self.group, self.consumer, "COUNT",
                                     self.config["read_count"], "STREAMS", self.stream, start)
            entries = _entries(reply) if reply else []
            if not entries:
                return
            start = entries[-1][0]
            await self._emit(entries, again=True)

    async def _claim(self) -> None:
        """Touch our own entries still in the graph, then take over what others left."""
        c = self.config
        idle_ms = int(c["claim_idle_s"] * 1000)
        old = time.monotonic() - c["claim_idle_s"] / 3
        touch = [i for i, t in self.inflight.items() if t < old]
        if touch:
            await self._call("XCLAIM", self.stream, self.group, self.consumer, 0, *touch,
                             "JUSTID")
            now = time.monotonic()
            for i in touch:
                if i in self.inflight:
                    self.inflight[i] = now
        reply = await self._call("XAUTOCLAIM", self.stream, self.group, self.consumer, idle_ms,
                                 self._cursor, "COUNT", c["read_count"])
        if not reply:
            return
        self._cursor = reply[0]
        entries = [e if e is None else tuple(e) for e in reply[1] or []]
        if len(reply) > 2 and reply[2]:   # Redis 7.x: ids of entries deleted meanwhile
            self.metrics.extra["deleted_pending"] += len(reply[2])
        deleted = any(e is None for e in entries)
        entries = [e for e in entries if e is not None]
        await self._emit(entries, again=True)
        if deleted:
            # Redis 6.2: a deleted entry is nil, without its id; it is now ours to ack, and
            # re-reading our own pending entries finds it as [id, nil] (what is in flight or
            # being acknowledged is skipped there).
            await self._own_pending()

    async def _deliveries(self, entries: list[Entry]) -> dict[bytes, int]:
        """How often each entry was delivered (XPENDING over their range, this consumer)."""
        # The range may also hold entries of ours still in flight: count them in.
        reply = await self._call("XPENDING", self.stream, self.group, entries[0][0],
                                 entries[-1][0], len(entries) + len(self.inflight) + 16,
                                 self.consumer)
        return {row[0]: int(row[3]) for row in reply or []}

    async def _emit(self, entries: list[Entry], again: bool) -> None:
        from ..acks import Ack

        if not entries:
            return
        inflight, acked = self.inflight, self.acked
        # The first delivery is still in the graph, or was delivered: not again.
        entries = [e for e in entries if e[0] not in inflight and e[0] not in acked]
        if not entries:
            return
        c, extra = self.config, self.metrics.extra
        deliveries = await self._deliveries(entries) if again else {}
        field = c["field"].encode()
        events: list[Event] = []
        rejected: list[Rejected] = []
        taken: list[bytes] = []     # acked together once the events are delivered
        ids: dict[bytes, bytes] = {}   # their idempotency ids
        done_now: list[bytes] = []  # nothing to deliver: acked at once
        now = time.monotonic()
        for entry_id, fields in entries:
            if fields is None:
                extra["deleted_pending"] += 1
                done_now.append(entry_id)
                continue
            named = dict(zip(fields[::2], fields[1::2]))
            n = deliveries.get(entry_id, 1)
            if again:
                extra["redelivered"] += 1
            if n > c["max_deliveries"]:
                extra["set_aside"] += 1
                rejected.append(self.ctx.rejected(
                    f"entry {entry_id.decode()} of {self.stream} was delivered {n} times (more "
                    f"than max_deliveries = {c['max_deliveries']}); set aside",
                    raw=named.get(field, b"")[:4096]))
                done_now.append(entry_id)
                continue
            mid = named.get(b"id")
            if self.seen.copy_of_recent(mid):
                extra["duplicates_dropped"] += 1
                done_now.append(entry_id)
                continue
            if mid is not None:
                ids[entry_id] = mid
            data = named.get(field)
            if data is None:
                extra["malformed"] += 1
                rejected.append(self.ctx.rejected(
                    f"entry {entry_id.decode()} of {self.stream} has no {c['field']!r} field",
                    raw=repr(sorted(named))[:4096].encode()))
                done_now.append(entry_id)
                continue
            self.decoder.decode(data, events, rejected, origin=_origin(entry_id))
            self.inflight[entry_id] = now
            taken.append(entry_id)
        if done_now:
            self._ack(done_now)
        if taken:
            ack = Ack(lambda: self._settle(taken, ids, True),
                      lambda: self._settle(taken, ids, False))
            self.metrics.events_in += len(events)
            extra["in_flight"] = len(self.inflight)
            await self.ctx.emit(events, acks=(ack,))
            await self.ctx.reject(rejected)
            ack.release()
        else:
            await self.ctx.reject(rejected)

    def _settle(self, taken: list[bytes], ids: dict[bytes, bytes], ok: bool) -> None:
        for entry_id in taken:
            self.inflight.pop(entry_id, None)
        self.metrics.extra["in_flight"] = len(self.inflight)
        self._settled.set()
        if ok:
            self.acked.remember(taken)
            self._ack(taken)
            return
        self.seen.forget(ids.values())   # not delivered: its copy is no duplicate
        self.retry.extend(taken)

    def _ack(self, entry_ids: list[bytes]) -> None:
        async def ack() -> None:
            from ..proto.redis import retrying

            # Not acknowledged (Redis away until the end): the entries stay pending and are
            # delivered again after a restart, at least once.
            await retrying(self.link,
                           lambda: self.redis.xack(self.stream, self.group, *entry_ids),
                           give_up=lambda: self.ctx.stopping.is_set() and not self.link.up)
            self.metrics.extra["acked"] += len(entry_ids)

        task = self.ctx.spawn(ack(), "xack")
        self._acking.add(task)
        task.add_done_callback(self._acking.discard)

    async def stop(self) -> None:
        """Let the last acknowledgements reach Redis (they are sent as the sinks confirm,
        which is just before the graph stops), then close."""
        import asyncio

        if getattr(self, "_acking", None):
            await asyncio.wait(set(self._acking), timeout=self.config["connect_timeout_s"])
        r = getattr(self, "redis", None)
        if r is not None:
            await r.aclose()


def _entries(reply: Any) -> list[Entry]:
    """XREADGROUP's reply (RESP2 ``[[stream, entries]]`` or RESP3 ``{stream: entries}``) ->
    the entries of our one stream."""
    if isinstance(reply, dict):
        reply = list(reply.items())
    return [tuple(e) for e in reply[0][1]] if reply else []   # type: ignore[misc]


def _origin(entry_id: bytes) -> int:
    """An entry id ``ms-seq`` as one integer (the ``seq`` of events that carry none), so that
    a sink's idempotency ids stay the same when the entry is read again."""
    ms, _, seq = entry_id.partition(b"-")
    return (int(ms) << 20) | (int(seq or 0) & 0xFFFFF)
