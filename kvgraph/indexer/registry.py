"""The partitions of an index and the engines it reads: Dynamo's indexer ``WorkerRegistry``.

An engine registered here (``/register``, or the index node's ``workers`` option) is read by a
listener: a small kvgraph graph of its own, a ``zmq`` source (with the engine's
``replay_endpoint``, so sequence gaps are repaired as in any kvgraph graph) feeding the
partition. Listeners run in the index node's task group and stop with it or on
``/unregister``.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from ..node import Kind, Sink
from .partition import Partition


class RegistryError(Exception):
    """A request the registry refuses; ``status`` is the HTTP status Dynamo answers with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def check_endpoint(endpoint: str, what: str = "ZMQ endpoint") -> None:
    """Dynamo's check: a scheme Dynamo's listener can connect with, and an address."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        raise RegistryError(400, f"invalid {what} `{endpoint}`: missing scheme")
    if scheme not in ("tcp", "ipc", "inproc") or not rest:
        raise RegistryError(400, f"invalid {what} `{endpoint}`: expected tcp://, ipc:// or "
                                 "inproc:// and an address")


@dataclass
class Registration:
    instance_id: int
    dp_rank: int
    model_name: str
    routing_group: str
    block_size: int
    endpoint: str
    replay_endpoint: str | None = None
    status: str = "active"
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    runtime: Any = field(default=None, repr=False)


class _Feed(Sink):
    """The listener graph's sink: events into a partition (set per listener, see below)."""

    name = "index-feed"
    hidden = True
    apply: ClassVar[Callable[[list[Any]], None]]

    async def write(self, batch: list[Any]) -> None:
        type(self).apply(batch)


class Registry:
    def __init__(self, max_blocks: int, stats: dict[str, Any], log: Any,
                 on_batch: Callable[[Partition, list[Any]], None], owner: str,
                 spawn: Callable[..., "asyncio.Task[Any]"]):
        self.partitions: dict[tuple[str, str], Partition] = {}
        self.registrations: dict[tuple[int, int], Registration] = {}
        self.peers: list[str] = []
        self.max_blocks, self.stats, self.log = max_blocks, stats, log
        self._on_batch = on_batch
        self.owner = owner   # the index node's id: its listeners' nodes are named after it
        self._spawn = spawn  # the index node's ctx.spawn: the node owns the listener tasks

    # -- partitions ---------------------------------------------------------------------------

    def partition(self, model_name: str, routing_group: str, block_size: int) -> Partition:
        """The partition, created on first use; RegistryError on another block size."""
        p = self.partitions.get((model_name, routing_group))
        if p is None:
            p = self.partitions[(model_name, routing_group)] = Partition(
                model_name, routing_group, block_size, self.max_blocks, self.stats)
        elif p.block_size != block_size:
            raise RegistryError(409, f"block_size mismatch for model={model_name} "
                                     f"routing_group={routing_group}: existing={p.block_size}, "
                                     f"requested={block_size}")
        return p

    def find(self, model_name: str, routing_group: str) -> Partition:
        p = self.partitions.get((model_name, routing_group))
        if p is None:
            raise RegistryError(404, f"no indexer for model={model_name} "
                                     f"routing_group={routing_group}")
        return p

    # -- engines ------------------------------------------------------------------------------

    def register(self, instance_id: int, endpoint: str, model_name: str, block_size: int,
                 routing_group: str = "default", dp_rank: int = 0,
                 replay_endpoint: str | None = None) -> Registration:
        check_endpoint(endpoint)
        if replay_endpoint is not None:
            check_endpoint(replay_endpoint, "replay endpoint")
        if (instance_id, dp_rank) in self.registrations:
            raise RegistryError(409, f"instance {instance_id} dp_rank {dp_rank} already "
                                     "registered")
        part = self.partition(model_name, routing_group, block_size)
        reg = Registration(instance_id, dp_rank, model_name, routing_group, block_size,
                           endpoint, replay_endpoint)
        self.registrations[(instance_id, dp_rank)] = reg
        coro = self._listen(reg, part)
        name = f"listener-{instance_id}-{dp_rank}"
        reg.task = self._spawn(coro, name)
        self.log.info("reading engine %d (dp_rank %d) at %s for %s", instance_id, dp_rank,
                      endpoint, part.key)
        return reg

    async def _listen(self, reg: Registration, part: Partition) -> None:
        from ..graph import Edge, Graph, Node
        from ..registry import get
        from ..runtime import Runtime

        zmq = get("zmq", Kind.SOURCE)
        assert zmq is not None
        # Small batches through a short edge: decoded events (token ids and all) take 3-10
        # times their wire bytes, so while the index is behind, an engine's backlog waits as
        # wire bytes in the source's read-ahead, and what is decoded is applied at once. With
        # the defaults (4 MiB batches, a 1024-batch edge) a 1M-block load from 8 engines left
        # 616 MiB of RSS per million blocks; decoded and applied at once, 120.
        options: dict[str, Any] = {"endpoint": reg.endpoint, "worker_id": f"0x{reg.instance_id:x}",
                                   "warn_silent_s": 0.0, "max_batch_events": 64,
                                   "max_batch_bytes": 256 * 1024}
        if reg.replay_endpoint:
            options.update(replay_endpoint=reg.replay_endpoint, replay_on_connect=True)
        feed = type("_PartitionFeed", (_Feed,), {"apply": staticmethod(
            lambda batch: self._on_batch(part, batch))})
        src = f"{self.owner}/engine-{reg.instance_id}-{reg.dp_rank}"
        dst = f"{self.owner}/feed"
        graph = Graph(name=src, nodes={src: Node(src, zmq, options), dst: Node(dst, feed, {})},
                      edges=[Edge(src, "out", dst, capacity=1, capacity_events=64,
                                  capacity_bytes=16 * 1024 * 1024)])
        rt = reg.runtime = Runtime(graph, {})
        try:
            await rt.start()
            result = await rt.wait()
            if result.failures:
                reg.status = "failed"
                self.log.problem("listener", "engine %d: %s", reg.instance_id,
                                 "; ".join(result.failures.values()))
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await rt.abort()
            raise
        except Exception as exc:  # a listener that cannot start is shown, not fatal
            reg.status = "failed"
            self.log.problem("listener", "engine %d at %s: %s", reg.instance_id, reg.endpoint,
                             exc)

    def unregister(self, instance_id: int, model_name: str, routing_group: str | None = None,
                   dp_rank: int | None = None) -> None:
        gone = [r for r in self.registrations.values()
                if r.instance_id == instance_id and r.model_name == model_name
                and routing_group in (None, r.routing_group) and dp_rank in (None, r.dp_rank)]
        if not gone:
            raise RegistryError(404, f"instance {instance_id} not found")
        for r in gone:
            del self.registrations[(r.instance_id, r.dp_rank)]
            if r.task is not None:
                r.task.cancel()
            p = self.partitions.get((r.model_name, r.routing_group))
            if p is not None:
                p.remove_worker(instance_id, r.dp_rank)

    def listed(self, model_name: str | None = None, routing_group: str | None = None
               ) -> list[dict[str, Any]]:
        """``GET /workers``: one entry per engine instance and partition, its ranks inside."""
        out: dict[tuple[int, str, str], dict[str, Any]] = {}
        for r in self.registrations.values():
            if model_name not in (None, r.model_name) or routing_group not in (None,
                                                                              r.routing_group):
                continue
            entry = out.setdefault((r.instance_id, r.model_name, r.routing_group), {
                "instance_id": r.instance_id, "source": "zmq", "status": "active",
                "model_name": r.model_name, "routing_group": r.routing_group,
                "block_size": r.block_size, "endpoints": {}, "listeners": {}})
            entry["endpoints"][str(r.dp_rank)] = r.endpoint
            entry["listeners"][str(r.dp_rank)] = {"endpoint": r.endpoint, "status": r.status}
            if r.status != "active":
                entry["status"] = r.status
        return list(out.values())

    def listener_counts(self) -> dict[str, int]:
        counts = {"active": 0, "failed": 0, "paused": 0, "pending": 0}
        for r in self.registrations.values():
            counts[r.status] = counts.get(r.status, 0) + 1
        return counts

    async def close(self) -> None:
        tasks = [r.task for r in self.registrations.values() if r.task is not None]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks)   # their errors, if any, went to the node's owner

    # -- peers --------------------------------------------------------------------------------

    def add_peer(self, url: str) -> None:
        if url not in self.peers:
            self.peers.append(url)

    def remove_peer(self, url: str) -> bool:
        if url in self.peers:
            self.peers.remove(url)
            return True
        return False

