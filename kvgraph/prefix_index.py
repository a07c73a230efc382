"""The KV router's prefix index: a radix tree keyed by Dynamo's ``tokens_hash``.

Semantics, as Dynamo's router applies them (Dynamo 1.6.1's KvIndexer / RadixTree):

* state per (worker_id, dp_rank): a map from the engine's ``block_hash`` to a tree node; the tree
  is keyed by ``tokens_hash`` along the path from the root;
* stored: the parent must already be known for the same (worker, dp_rank) (no parent = the
  root); an unknown parent rejects the whole event, and so does a hash repeated in one event;
* removed: each hash is looked up for that worker, which leaves that node (no cascade); unknown
  hashes are skipped and reported;
* cleared: every block of that (worker, dp_rank) is gone;
* query: a worker's score is the number of leading blocks of the request it holds.

Memory is what limits an index, so a node is four slots: its children (a dict, or None for a
leaf), the set of workers holding it as an int bitmask over small worker indexes (one machine
word for up to 60 workers, and a query intersects masks with ``&``), its parent and its key.
Nodes that no worker holds and that have no children are pruned at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator

WorkerKey = tuple[int, int]  # (worker_id, dp_rank)


class IndexError_(ValueError):
    """An event the index rejects; the message is the reason."""


class _Node:
    __slots__ = ("children", "mask", "parent", "key", "block_hash")

    def __init__(self, parent: "_Node | None", key: int, block_hash: int):
        self.children: dict[int, _Node] | None = None
        self.mask = 0
        self.parent = parent
        self.key = key
        self.block_hash = block_hash  # an engine hash seen for it (used by dump)


@dataclass(frozen=True)
class Score:
    worker_id: int
    dp_rank: int
    matched_blocks: int


class PrefixIndex:
    def __init__(self, max_blocks: int = 1 << 62):
        self.root = _Node(None, 0, 0)
        self.max_blocks = max_blocks
        self.blocks = 0                      # (worker, block) entries held
        self.nodes = 0                       # tree nodes, root excluded
        self._bit: dict[WorkerKey, int] = {}  # worker -> its bit index
        self._workers: list[WorkerKey] = []
        self._maps: dict[WorkerKey, dict[int, _Node]] = {}

    # -- workers ------------------------------------------------------------------------------

    def _bit_of(self, w: WorkerKey) -> int:
        b = self._bit.get(w)
        if b is None:
            b = self._bit[w] = len(self._workers)
            self._workers.append(w)
            self._maps[w] = {}
        return b

    # -- events -------------------------------------------------------------------------------

    def store(self, w: WorkerKey, parent_hash: int | None, block_hashes: list[int],
              tokens_hashes: list[int]) -> None:
        """Apply a stored event; raises IndexError_ (and changes nothing) when it is invalid."""
        if len(block_hashes) != len(tokens_hashes):
            raise IndexError_("block_hashes and tokens_hashes differ in length")
        if len(set(block_hashes)) != len(block_hashes):
            raise IndexError_("a block hash is repeated inside one stored event")
        bit = self._bit_of(w)
        wmap = self._maps[w]
        if parent_hash is None:
            node = self.root
        else:
            node = wmap.get(parent_hash)  # type: ignore[assignment]
            if node is None:
                raise IndexError_(f"parent {parent_hash} is unknown for worker {w[0]} rank {w[1]}")
        new = sum(1 for h in block_hashes if h not in wmap)
        if self.blocks + new > self.max_blocks:
            raise IndexError_(f"index is full ({self.max_blocks} blocks, max_blocks)")
        flag = 1 << bit
        for bh, th in zip(block_hashes, tokens_hashes):
            children = node.children
            if children is None:
                children = node.children = {}
            child = children.get(th)
            if child is None:
                child = children[th] = _Node(node, th, bh)
                self.nodes += 1
            old = wmap.get(bh)
            if old is not child:
                if old is not None:  # the same engine hash now names another path
                    self._leave(old, flag)
                    self.blocks -= 1
                wmap[bh] = child
                self.blocks += 1
            child.mask |= flag
            node = child

    def remove(self, w: WorkerKey, block_hashes: Iterable[int]) -> int:
        """Apply a removed event; returns how many hashes were unknown (and skipped)."""
        wmap = self._maps.get(w)
        if wmap is None:
            return sum(1 for _ in block_hashes)
        flag = 1 << self._bit[w]
        unknown = 0
        for h in block_hashes:
            node = wmap.pop(h, None)
            if node is None:
                unknown += 1
                continue
            self.blocks -= 1
            self._leave(node, flag)
        return unknown

    def clear(self, w: WorkerKey) -> int:
        """Apply a cleared event; returns the number of blocks the worker lost."""
        wmap = self._maps.get(w)
        if not wmap:
            return 0
        flag = 1 << self._bit[w]
        n = len(wmap)
        for node in list(wmap.values()):
            self._leave(node, flag)
        wmap.clear()
        self.blocks -= n
        return n

    def _leave(self, node: _Node, flag: int) -> None:
        node.mask &= ~flag
        while node.mask == 0 and not node.children and node.parent is not None:
            parent = node.parent
            assert parent.children is not None
            del parent.children[node.key]
            if not parent.children:
                parent.children = None
            self.nodes -= 1
            node = parent

    # -- queries ------------------------------------------------------------------------------

    def query_hashes(self, tokens_hashes: Iterable[int]) -> list[Score]:
        """Per worker, the number of leading blocks of the request it holds (0s left out)."""
        scores: dict[int, int] = {}
        node = self.root
        active = -1
        depth = 0
        for th in tokens_hashes:
            children = node.children
            if children is None:
                break
            node = children.get(th)  # type: ignore[assignment]
            if node is None:
                break
            active &= node.mask
            if not active:
                break
            depth += 1
            a = active
            while a:
                low = a & -a
                scores[low.bit_length() - 1] = depth
                a ^= low
        out = [Score(*self._workers[b], n) for b, n in scores.items()]
        out.sort(key=lambda s: (-s.matched_blocks, s.worker_id, s.dp_rank))
        return out

    def workers(self) -> list[dict[str, int]]:
        return [{"worker_id": w[0], "dp_rank": w[1], "blocks": len(m)}
                for w, m in sorted(self._maps.items()) if m]

    def held(self, w: WorkerKey) -> dict[int, int]:
        """engine block_hash -> tokens_hash of every block the worker holds."""
        return {h: n.key for h, n in self._maps.get(w, {}).items()}

    # -- dump ---------------------------------------------------------------------------------

    def dump(self) -> Iterator[tuple[WorkerKey, str, dict[str, Any]]]:
        """Events that rebuild this state in an empty index: per worker, a stored event per
        node on the way to its blocks (parents first), then removes for the nodes it only
        passes through (possible because removes do not cascade)."""
        for w, wmap in sorted(self._maps.items()):
            if not wmap:
                continue
            hash_of = {id(n): h for h, n in wmap.items()}
            needed: dict[int, _Node] = {}
            for node in wmap.values():
                while node is not self.root and id(node) not in needed:
                    needed[id(node)] = node
                    node = node.parent  # type: ignore[assignment]
            passing: list[int] = []
            stack = [(self.root, None)]
            while stack:
                node, parent_hash = stack.pop()
                for child in (node.children or {}).values():
                    if id(child) not in needed:
                        continue
                    h = hash_of.get(id(child))
                    if h is None:  # a node this worker only passes through
                        h = child.block_hash
                        passing.append(h)
                    yield w, "stored", {"parent_hash": parent_hash, "block_hashes": [h],
                                        "tokens_hashes": [child.key]}
                    stack.append((child, h))
            if passing:
                yield w, "removed", {"block_hashes": passing}
