"""How a ``nats`` source reads a partitioned stream as a member of a group: which partitions
it reads (leases, :mod:`kvgraph.proto.nats_leases`), one reader task per partition, and the
fence that makes a partition's order hold across readers.

A reader of partition ``P`` reads through the group's durable consumer ``GROUP-pP``. When it
takes the partition (from a member that died, left or stalled, or from itself after trouble)
it *fences* it: the consumer is recreated just after the group's ack floor, so what the last
reader received and did not acknowledge comes again in stream order, before anything newer;
a consumer's own redelivery would come after newer messages. A reader fences again after a
failed fetch or a reconnect (a fetch's answer lost on the way is redelivered only after
``ack_wait_s``, behind newer messages), once what it read is settled.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any


class GroupReading:
    """The partitions of one member (``node``, a ``nats`` source) and their readers."""

    def __init__(self, node: Any, leases: Any):
        self.node, self.leases = node, leases
        self.reading: dict[int, int] = {}        # partition -> the generation of its reader
        self.unsettled: dict[int, set[int]] = {}  # partition -> stream seqs in the graph
        self.generation = 0
        self.resume: dict[int, int] = {}         # partition -> where its last fence started
        for name in ("partitions_owned", "partitions_taken", "partitions_lost", "refences"):
            node.metrics.extra.setdefault(name, 0)

    async def run(self) -> None:
        import asyncio

        node, leases = self.node, self.leases
        c, log, stopping, extra = node.config, node.log, node.ctx.stopping, node.metrics.extra
        readers: dict[int, asyncio.Task[None]] = {}
        try:
            while not stopping.is_set():
                try:
                    taken, lost, surplus = await leases.tick()
                except Exception as exc:   # a reconnect in progress: renew at the next tick
                    log.problem("lease", "cannot renew the partition leases: %s: %s",
                                type(exc).__name__, exc)
                    taken, lost, surplus = [], [], []
                for p in lost:
                    self.reading.pop(p, None)
                    extra["partitions_lost"] += 1
                    log.warning("partition %d of %s was taken over (lease lost): stopped "
                                "reading it", p, c["stream"])
                for p in surplus:
                    if p in self.reading:
                        del self.reading[p]
                        node.ctx.spawn(self._give_back(p, readers.get(p)), f"release-p{p}")
                for p in taken:
                    extra["partitions_taken"] += 1
                    readers[p] = self.new_reader(p, readers.get(p))
                for p in self.reading:   # a reader that ended by an error, its lease held
                    if readers[p].done():
                        readers[p] = self.new_reader(p, readers[p])
                extra["partitions_owned"] = len(leases.owned)
                if taken:
                    log.info("reading partition(s) %s of %s (group %s, %d member(s))",
                             ", ".join(map(str, taken)), c["stream"], c["group"], leases.members)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stopping.wait(), c["lease_s"] / 3)
        finally:
            self.reading.clear()
            running = [t for t in readers.values() if not t.done()]
            if running:
                await asyncio.wait(running)

    def new_reader(self, p: int, previous: Any) -> Any:
        self.generation += 1
        self.reading[p] = self.generation
        return self.node.ctx.spawn(self._read_partition(p, self.generation, previous), f"p{p}")

    async def _settled(self, p: int, reader: Any) -> None:
        """Until partition ``p``'s reader ``reader`` ended and what it read is settled (the
        sinks confirmed it, the acks went out), within ack_wait_s: then the group's ack floor
        holds all of it, and a fence starts after it (no copy, no step back)."""
        import asyncio

        if reader is not None and not reader.done():
            await asyncio.wait({reader})
        deadline = time.monotonic() + self.node.config["ack_wait_s"]
        while self.unsettled.get(p) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def _give_back(self, p: int, reader: Any) -> None:
        """Partition ``p`` is one too many (a member joined): once what was read from it is
        settled, its lease goes back, and another member fences and reads it."""
        await self._settled(p, reader)
        await self.leases.release(p)
        self.node.metrics.extra["partitions_owned"] = len(self.leases.owned)
        self.node.log.info("gave partition %d back to the group", p)

    async def _read_partition(self, p: int, generation: int, previous: Any) -> None:
        """Read partition ``p`` for as long as this reader is its reader (``generation``).
        A reader of it before this one (this node lost the lease and took it again) ends
        first and what it read is settled. Opening the consumer can fail while the cluster
        elects a leader (a server died): tried again, with backoff."""
        import asyncio

        await self._settled(p, previous)
        wait = self.node.config["reconnect_wait_s"]
        mine = lambda: self.reading.get(p) == generation   # noqa: E731
        while mine() and not self.node.ctx.stopping.is_set():
            try:
                psub = await self._fenced_consumer(p)
            except Exception as exc:
                self.node.log.problem("fence", "cannot open the consumer of partition %d: "
                                      "%s: %s; trying again", p, type(exc).__name__, exc)
                await asyncio.sleep(wait)
                wait = min(wait * 2, self.node.config["lease_s"])
                continue
            try:
                troubled = await self.node._read(psub, mine, p)
            finally:
                with contextlib.suppress(Exception):
                    await psub.unsubscribe()
            if not troubled:
                return
            self.node.metrics.extra["refences"] += 1
            await self._settled(p, None)   # then fenced again: after what was acknowledged

    async def _fenced_consumer(self, p: int) -> Any:
        """The durable consumer of partition ``p``, started again just after what the group
        acknowledged: what the previous reader received and did not settle is delivered again,
        in stream order, before anything newer (a consumer's own redelivery would come after
        newer messages). A reader still holding the old consumer finds it gone."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
        from nats.js.errors import NotFoundError

        from ..proto.nats import partition_subject

        c = self.node.config
        stream, durable = c["stream"], f"{c['group']}-p{p}"
        start: int | None = self.resume.get(p)   # a fence that failed half-way left it
        try:
            info = await self.node.js.consumer_info(stream, durable)
            if info.delivered.stream_seq:
                start = max(start or 0, info.ack_floor.stream_seq + 1)
                self.resume[p] = start   # kept before the consumer (and its floor) is gone
            await self.node.js.delete_consumer(stream, durable)
        except NotFoundError:
            pass
        config = ConsumerConfig(
            durable_name=durable, ack_policy=AckPolicy.EXPLICIT, ack_wait=c["ack_wait_s"],
            max_ack_pending=c["max_ack_pending"], filter_subject=partition_subject(stream, p),
            deliver_policy=DeliverPolicy(c["deliver_policy"]) if start is None
            else DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start)
        await self.node.js.add_consumer(stream, config)
        return await self.node.js.pull_subscribe_bind(durable, stream)
