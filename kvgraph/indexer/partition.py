"""One index of Dynamo's indexer: a (model_name, routing_group) pair, its block size, the device
tree and the lower tiers, and the answers Dynamo 1.6.1 gives from them.

Events are routed by ``medium`` exactly as the indexer routes them (not as its relay does):
no medium or a GPU name is the device tree; ``CPU``/``CPU_PINNED``/``CPU_TIER1`` host memory,
``CPU_TIER2``/``DISK``/``NVME``/``STORAGE`` disk, ``EXTERNAL``/``NETWORK``/``REMOTE``/``SHARED``
external; any other name (``cpu``, ``LOCAL_DISK``) is not indexed (``not_indexed``). Events of
KV groups other than the main one (``group_idx`` > 0, sliding-window layers) are not indexed
either: a score counts the full-attention blocks a request can reuse.
"""

from __future__ import annotations

from typing import Any, Iterator

from ..codecs import dynamo
from ..event import CLEARED, STORED, Event
from ..prefix_index import IndexError_, PrefixIndex
from .lower_tier import LowerTier

#: The order a match continues through the lower tiers, as Dynamo's.
LOWER_TIERS = ("host_pinned", "disk", "external")


class Partition:
    """The index of one (model_name, routing_group)."""

    def __init__(self, model_name: str, routing_group: str, block_size: int,
                 max_blocks: int = 1 << 62, stats: dict[str, int] | None = None):
        self.model_name, self.routing_group, self.block_size = model_name, routing_group, block_size
        self.device = PrefixIndex(max_blocks)
        self.lower: dict[str, LowerTier] = {}
        self.stats = stats if stats is not None else {}
        for k in ("not_indexed", "blocks_without_tokens", "unknown_removes", "rejected_stores"):
            self.stats.setdefault(k, 0)

    @property
    def key(self) -> str:
        return f"{self.model_name}:{self.routing_group}"

    @property
    def blocks(self) -> int:
        return self.device.blocks + sum(t.blocks for t in self.lower.values())

    # -- events -------------------------------------------------------------------------------

    def apply(self, e: Event) -> None:
        """Apply one event; IndexError_ or dynamo.ConversionError says why it was refused."""
        w = (e.worker_id, e.dp_rank)
        if e.kind == CLEARED:
            self.device.clear(w)
            for tier in self.lower.values():
                tier.clear(e.worker_id)
            return
        tier_name = "device" if e.medium is None else dynamo.TIERS.get(e.medium)
        if tier_name is None or e.group_idx:
            self.stats["not_indexed"] += 1     # a medium Dynamo's indexer does not know
            return
        if e.kind == STORED:
            hashes = dynamo.block_hashes_for(e, self.block_size)
            if len(hashes) < len(e.block_hashes):   # as Dynamo: the tokens ran out
                self.stats["blocks_without_tokens"] += len(e.block_hashes) - len(hashes)
            blocks = e.block_hashes[:len(hashes)]
            if tier_name == "device":
                self.device.store(w, e.parent_hash, blocks, hashes)
            else:
                self._tier(tier_name).store(w, e.parent_hash, blocks, hashes)
        elif tier_name == "device":
            self.stats["unknown_removes"] += self.device.remove(w, e.block_hashes)
        else:
            self.stats["unknown_removes"] += self._tier(tier_name).remove(w, e.block_hashes)

    def _tier(self, name: str) -> LowerTier:
        tier = self.lower.get(name)
        if tier is None:
            tier = self.lower[name] = LowerTier()
        return tier

    def remove_worker(self, worker_id: int, dp_rank: int | None = None) -> None:
        """What /unregister does: the worker's blocks go from every tier."""
        self.device.clear_worker(worker_id, dp_rank)
        for tier in self.lower.values():
            tier.clear(worker_id, dp_rank)

    # -- queries ------------------------------------------------------------------------------

    def tokens_hashes(self, token_ids: list[int], lora_name: str | None = None,
                      cache_salt: str | None = None) -> list[int]:
        return dynamo.tokens_hash(token_ids, self.block_size, lora_name, cache_salt)

    def answer(self, query: list[int]) -> dict[str, Any]:
        """Dynamo's /query answer: ``scores`` (device tier, tokens per worker and dp_rank),
        ``frequencies`` (empty, as Dynamo's default threaded indexer gives), and ``instances``
        (per worker: tokens matched on GPU, and cumulatively through CPU and disk)."""
        device = self.device.match_details(query)
        bs = self.block_size
        scores: dict[str, dict[str, int]] = {}
        for (wid, rank), (n, _) in sorted(device.items()):   # sorted: answers diff cleanly
            scores.setdefault(str(wid), {})[str(rank)] = n * bs
        extra: dict[str, dict[Any, int]] = {}
        if self.lower and query:
            at: dict[Any, tuple[int, int | None]] = {w: (n, h) for w, (n, h) in device.items()}
            for name in LOWER_TIERS:
                tier = self.lower.get(name)
                if tier is None:
                    continue
                for w in tier.root_workers(query[0]):
                    at.setdefault(w, (0, None))
                hits = tier.extend(query, at)
                extra[name] = {w: h[0] for w, h in hits.items()}
                at = {w: (p, last) for w, (_, p, last) in hits.items()}
        instances: dict[str, dict[str, Any]] = {}
        workers = set(device)
        for hits in extra.values():
            workers.update(hits)
        for w in sorted(workers):
            gpu = device[w][0] if w in device else 0
            cpu = gpu + extra.get("host_pinned", {}).get(w, 0)
            disk = cpu + extra.get("disk", {}).get(w, 0) + extra.get("external", {}).get(w, 0)
            s = instances.get(str(w[0]))
            if s is None:
                s = instances[str(w[0])] = {"longest_matched": 0, "gpu": 0, "dp": {},
                                            "cpu": 0, "disk": 0}
            s["dp"][str(w[1])] = gpu * bs
            s["gpu"] = max(s["gpu"], gpu * bs)
            s["cpu"] = max(s["cpu"], cpu * bs)
            s["disk"] = max(s["disk"], disk * bs)
        for s in instances.values():
            s["longest_matched"] = max(s["gpu"], s["cpu"], s["disk"])
        return {"scores": scores, "frequencies": [], "instances": instances}

    # -- dump ---------------------------------------------------------------------------------

    def dump(self) -> Iterator[Any]:
        """RouterEvents that rebuild this index: the device tree per worker (parents first),
        then each lower tier's blocks one event each, as Dynamo's /dump gives them. Lazy: the
        tree is read as the events are written, so a dump does not copy the index, and events
        applied meanwhile may or may not be in it (each event written is true when written)."""
        ids = dynamo.EventIds()
        for (wid, rank), kind, data in self.device.dump():
            e = Event(kind=kind, worker_id=wid, dp_rank=rank, block_hashes=data["block_hashes"],
                      parent_hash=data.get("parent_hash"), tokens_hashes=data.get("tokens_hashes"))
            yield dynamo.router_event(e, ids.next(wid, rank) - 1, self.block_size)
        for name, tier in list(self.lower.items()):
            medium = dynamo.MEDIUM_OF_TIER[name]
            for w in list(tier.held):
                for parent, h, t in tier.dump(w):
                    e = Event(kind=STORED, worker_id=w[0], dp_rank=w[1], block_hashes=[h],
                              parent_hash=parent, tokens_hashes=[t], medium=medium)
                    yield dynamo.router_event(e, 0, self.block_size)


__all__ = ["Partition", "IndexError_", "LOWER_TIERS"]
