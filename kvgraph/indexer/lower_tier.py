"""Blocks that a worker keeps outside its GPU (CPU memory, disk, remote storage).

Dynamo 1.6.1 indexes each of these tiers apart from the device tree, as continuation edges:
``(parent engine hash, tokens_hash) -> child engine hash``, each with the workers that hold it.
A query does not score these tiers from the root; it continues each worker's device match from
its last matched block (or, for a worker with no device match, from the root when the tier
holds the request's first block), one tier after the other, and counts consecutive blocks.

Rules, as Dynamo's (checked against the wheel in ``tests/test_index_tiers.py``):

* stored: each block adds the worker to its edge; an edge that leads elsewhere (another child
  hash) is left as it is (the first mapping wins), and a block the worker already holds under
  another edge is skipped; the next block's parent is this block's hash either way;
* removed: each hash removes just that block (no cascade); an unknown hash stops the event
  there (counted);
* cleared: every rank of the worker_id leaves the tier.
"""

from __future__ import annotations

from typing import Iterable, Iterator

WorkerKey = tuple[int, int]          # (worker_id, dp_rank)
EdgeKey = tuple["int | None", int]   # (parent engine hash or None at the root, tokens_hash)


class LowerTier:
    __slots__ = ("edges", "held", "blocks")

    def __init__(self) -> None:
        # edge -> [child engine hash, the workers holding it]
        self.edges: dict[EdgeKey, tuple[int, set[WorkerKey]]] = {}
        self.held: dict[WorkerKey, dict[int, EdgeKey]] = {}   # worker -> its hash -> its edge
        self.blocks = 0

    def store(self, w: WorkerKey, parent: int | None, block_hashes: list[int],
              tokens_hashes: list[int]) -> None:
        mine = self.held.setdefault(w, {})
        edges = self.edges
        for h, t in zip(block_hashes, tokens_hashes):
            key = (parent, t)
            parent = h
            known = mine.get(h)
            if known is not None:
                continue                          # held already (here, or under another edge)
            edge = edges.get(key)
            if edge is None:
                edges[key] = (h, {w})
            elif edge[0] == h:
                edge[1].add(w)
            else:
                continue                          # the edge leads elsewhere: the first wins
            mine[h] = key
            self.blocks += 1

    def remove(self, w: WorkerKey, block_hashes: Iterable[int]) -> int:
        """Returns 1 when a hash was unknown (the rest of the event is then skipped)."""
        mine = self.held.get(w)
        if mine is None:
            return 1
        for h in block_hashes:
            key = mine.pop(h, None)
            if key is None:
                return 1
            self._leave(w, key)
        if not mine:
            del self.held[w]
        return 0

    def _leave(self, w: WorkerKey, key: EdgeKey) -> None:
        self.blocks -= 1
        edge = self.edges.get(key)
        if edge is not None:
            edge[1].discard(w)
            if not edge[1]:
                del self.edges[key]

    def clear(self, worker_id: int, dp_rank: int | None = None) -> None:
        """Every rank of ``worker_id`` (a cleared event), or just ``dp_rank``."""
        for w in [w for w in self.held if w[0] == worker_id and dp_rank in (None, w[1])]:
            for key in self.held.pop(w).values():
                self._leave(w, key)

    def root_workers(self, first: int) -> set[WorkerKey]:
        edge = self.edges.get((None, first))
        return set(edge[1]) if edge else set()

    def extend(self, query: list[int], start: dict[WorkerKey, tuple[int, int | None]]
               ) -> dict[WorkerKey, tuple[int, int, int | None]]:
        """Per worker: (blocks matched here, next position, last hash), continuing from
        ``start`` (position, last engine hash)."""
        out = {}
        edges, n = self.edges, len(query)
        for w, (pos, last) in start.items():
            p = pos
            while p < n:
                edge = edges.get((last, query[p]))
                if edge is None or w not in edge[1]:
                    break
                last = edge[0]
                p += 1
            out[w] = (p - pos, p, last)
        return out

    def dump(self, w: WorkerKey) -> Iterator[tuple[int | None, int, int]]:
        """(parent, block hash, tokens_hash) of each block the worker holds here."""
        for h, (parent, t) in list(self.held.get(w, {}).items()):
            yield parent, h, t
