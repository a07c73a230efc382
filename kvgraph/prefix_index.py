"""The KV router's prefix index: Dynamo's compressed radix tree, keyed by ``tokens_hash``.

Semantics are Dynamo 1.6.1's RadixTree's, checked against the wheel on the edge cases issue 13
found and on generated streams (``tests/test_index_vs_dynamo.py``). Which blocks share an edge
decides what a remove takes, so the tree is compressed the way Dynamo's is:

* an *edge* is a chain of blocks, each a (``tokens_hash``, engine ``block_hash``) pair, with an
  index from hash to position (the last position wins; cutting an edge drops from the first
  part the hashes the second part has);
* a worker covers a whole edge or a prefix of it (a cutoff); its score for a query is the number
  of leading blocks it covers from the root;
* each (worker_id, dp_rank) names edges by engine hash; a name resolves through the edge's
  index, so a worker whose engine stored an existing block under another hash holds it but
  cannot name it;
* stored: the parent must resolve to a block the worker covers, and must not be one of the
  event's blocks, else the event is refused whole. Blocks that continue the parent's edge are
  covered again; a worker covering a leaf edge to its end extends it; otherwise the edge is cut
  after the parent and the blocks follow existing edges by tokens (cutting one where they
  differ) or make a new edge;
* removed: each name cuts the worker's coverage of its edge at that block (the rest of the edge
  goes with it, edges below stay and count again once the cut block is covered again); an edge
  nobody covers to its end loses everything below it, and an edge nobody covers at all goes;
  unknown names are skipped and counted;
* cleared: the worker leaves every edge it names.

A worker is a bit in an int, so an edge's full coverage is one bitmask and a query intersects
them with ``&``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator

WorkerKey = tuple[int, int]  # (worker_id, dp_rank)


class IndexError_(ValueError):
    """An event the index rejects; the message is the reason."""


class _Edge:
    __slots__ = ("keys", "hashes", "index", "full", "cut", "children", "parent", "internal")

    def __init__(self, parent: "_Edge | None", keys: list[int], hashes: list[int], full: int):
        self.keys = keys                  # tokens_hash per position
        self.hashes = hashes              # the engine hash each block was created for
        self.index = {h: i for i, h in enumerate(hashes)}   # last position wins
        self.full = full                  # workers covering the whole edge
        self.cut: dict[int, int] | None = None   # worker bit -> covered prefix length
        self.children: dict[int, _Edge] | None = None   # by the first tokens_hash
        self.parent = parent
        self.internal = False             # has had children: never extended as a leaf again

    def covered(self, bit: int) -> int:
        """How many leading blocks the worker covers."""
        if self.full >> bit & 1:
            return len(self.keys)
        return self.cut.get(bit, 0) if self.cut else 0

    def cover(self, bit: int, upto: int) -> None:
        """The worker covers at least the first ``upto`` blocks."""
        if upto >= len(self.keys):
            self.full |= 1 << bit
            if self.cut:
                self.cut.pop(bit, None)
        elif upto > 0 and not self.full >> bit & 1:
            cut = self.cut
            if cut is None:
                cut = self.cut = {}
            if cut.get(bit, 0) < upto:
                cut[bit] = upto

    def held(self) -> bool:
        return bool(self.full or self.cut)


@dataclass(frozen=True)
class Score:
    worker_id: int
    dp_rank: int
    matched_blocks: int


class PrefixIndex:
    def __init__(self, max_blocks: int = 1 << 62):
        self.root = _Edge(None, [], [], 0)
        self.root.internal = True
        self._positions = 0
        self.max_blocks = max_blocks
        self._bit: dict[WorkerKey, int] = {}
        self._workers: list[WorkerKey] = []
        self._maps: dict[WorkerKey, dict[int, _Edge]] = {}   # the names each worker uses

    @property
    def blocks(self) -> int:
        """Names held over all workers (Dynamo's ``current_size``)."""
        return sum(len(m) for m in self._maps.values())

    @property
    def nodes(self) -> int:
        """Blocks in the tree, whoever holds them (counted as edges grow and go)."""
        return self._positions

    def _bit_of(self, w: WorkerKey) -> int:
        b = self._bit.get(w)
        if b is None:
            b = self._bit[w] = len(self._workers)
            self._workers.append(w)
            self._maps[w] = {}
        return b

    # -- structure ----------------------------------------------------------------------------

    @staticmethod
    def _name(wmap: dict[int, _Edge], hashes: list[int], edge: _Edge) -> None:
        for h in hashes:
            wmap[h] = edge

    def _split(self, edge: _Edge, pos: int) -> _Edge:
        """Cut ``edge`` before ``pos``: the blocks from ``pos`` on become its only child, with
        its children; workers covering any of them name them there."""
        tail = _Edge(edge, edge.keys[pos:], edge.hashes[pos:], edge.full)
        for h in tail.hashes:
            edge.index.pop(h, None)
        del edge.keys[pos:], edge.hashes[pos:]
        if edge.cut:
            for bit, upto in list(edge.cut.items()):
                if upto >= pos:
                    del edge.cut[bit]
                    edge.full |= 1 << bit
                    if upto > pos:
                        if tail.cut is None:
                            tail.cut = {}
                        tail.cut[bit] = upto - pos
        tail.children, tail.internal = edge.children, edge.internal
        for child in (tail.children or {}).values():
            child.parent = tail
        edge.children = {tail.keys[0]: tail}
        edge.internal = True
        mask = tail.full
        while mask:
            low = mask & -mask
            wmap = self._maps[self._workers[low.bit_length() - 1]]
            for h in tail.hashes:
                wmap[h] = tail
            mask ^= low
        for bit, upto in (tail.cut or {}).items():
            wmap = self._maps[self._workers[bit]]
            for h in tail.hashes[:upto]:
                wmap[h] = tail
        return tail

    def _add_child(self, parent: _Edge, keys: list[int], hashes: list[int], bit: int,
                   wmap: dict[int, _Edge]) -> None:
        child = _Edge(parent, keys, hashes, 1 << bit)
        children = parent.children
        if children is None:
            children = parent.children = {}
        children[keys[0]] = child
        parent.internal = True
        self._positions += len(keys)
        for h in hashes:
            wmap[h] = child

    def _append(self, edge: _Edge, keys: list[int], hashes: list[int], bit: int,
                wmap: dict[int, _Edge]) -> None:
        """Extend a leaf edge the worker covers to its end; others cover what they did."""
        n = len(edge.keys)
        others = edge.full & ~(1 << bit)
        if others:
            if edge.cut is None:
                edge.cut = {}
            while others:
                low = others & -others
                edge.cut[low.bit_length() - 1] = n
                others ^= low
        edge.full = 1 << bit
        if edge.cut:
            edge.cut.pop(bit, None)
        for i, h in enumerate(hashes):
            edge.index[h] = n + i
        self._positions += len(keys)
        edge.keys += keys
        edge.hashes += hashes
        for h in hashes:
            wmap[h] = edge

    # -- events -------------------------------------------------------------------------------

    def store(self, w: WorkerKey, parent_hash: int | None, block_hashes: list[int],
              tokens_hashes: list[int]) -> None:
        """Apply a stored event; raises IndexError_ (and changes nothing) when it is invalid."""
        n = len(block_hashes)
        if n != len(tokens_hashes):
            raise IndexError_("block_hashes and tokens_hashes differ in length")
        if parent_hash is not None and parent_hash in block_hashes:
            raise IndexError_(f"parent {parent_hash} is one of the event's own blocks")
        if self.blocks + n > self.max_blocks:
            raise IndexError_(f"index is full ({self.max_blocks} blocks, max_blocks)")
        bit = self._bit_of(w)
        wmap = self._maps[w]
        if parent_hash is None:
            parent = self.root
        else:
            edge = wmap.get(parent_hash)
            pos = None if edge is None else edge.index.get(parent_hash)
            if edge is None or pos is None:
                raise IndexError_(f"parent {parent_hash} is unknown for worker {w[0]} rank {w[1]}")
            if pos >= edge.covered(bit):
                del wmap[parent_hash]
                raise IndexError_(f"parent {parent_hash} is no longer held by worker {w[0]} "
                                  f"rank {w[1]}")
            after_k, after_h = edge.keys[pos + 1:], edge.hashes[pos + 1:]
            same = 0
            while same < min(n, len(after_k)) and after_k[same] == tokens_hashes[same] \
                    and after_h[same] == block_hashes[same]:
                same += 1
            if same == n:                          # the blocks continue the parent's edge
                edge.cover(bit, pos + 1 + n)
                self._name(wmap, block_hashes, edge)
                return
            if same == len(after_k) and not edge.internal:   # extend the leaf edge
                self._append(edge, tokens_hashes[same:], block_hashes[same:], bit, wmap)
                self._name(wmap, block_hashes[:same], edge)
                return
            if after_k:
                self._split(edge, pos + 1)
            parent = edge
        i = 0
        while i < n:
            child = parent.children.get(tokens_hashes[i]) if parent.children else None
            if child is not None and not child.held():   # nobody holds it: a new edge instead
                self._unlink(child)
                child = None
            if child is None:
                if parent is not self.root and not parent.internal and \
                        parent.covered(bit) == len(parent.keys):
                    self._append(parent, tokens_hashes[i:], block_hashes[i:], bit, wmap)
                else:
                    self._add_child(parent, tokens_hashes[i:], block_hashes[i:], bit, wmap)
                return
            keys = child.keys
            match = 0
            while match < len(keys) and i + match < n and keys[match] == tokens_hashes[i + match]:
                match += 1
            if match < len(keys):
                if i + match == n:                 # the blocks end inside that edge
                    child.cover(bit, match)
                    self._name(wmap, block_hashes[i:], child)
                    return
                self._split(child, match)
                child.full |= 1 << bit
                if child.cut:
                    child.cut.pop(bit, None)
                self._name(wmap, block_hashes[i:i + match], child)
                self._add_child(child, tokens_hashes[i + match:], block_hashes[i + match:],
                                bit, wmap)
                return
            child.cover(bit, len(keys))
            self._name(wmap, block_hashes[i:i + match], child)
            parent, i = child, i + match

    def remove(self, w: WorkerKey, block_hashes: Iterable[int]) -> int:
        """Apply a removed event; returns how many names were unknown (and skipped)."""
        wmap = self._maps.get(w)
        hashes = list(block_hashes)
        if wmap is None:
            return len(hashes)
        bit = self._bit[w]
        unknown = 0
        gone: set[int] = set()        # names that went with an earlier block of this event
        for h in hashes:
            edge = wmap.pop(h, None)
            if edge is None:
                if h not in gone:
                    unknown += 1
                continue
            pos = edge.index.get(h)
            if pos is None:
                wmap[h] = edge
                unknown += 1
                continue
            gone.add(h)
            covered = edge.covered(bit)
            if pos >= covered:
                continue
            for stale in edge.hashes[pos:covered]:   # the names of what it no longer covers
                wmap.pop(stale, None)
                gone.add(stale)
            if pos == 0:
                edge.full &= ~(1 << bit)
                if edge.cut:
                    edge.cut.pop(bit, None)
            else:
                edge.full &= ~(1 << bit)
                if edge.cut is None:
                    edge.cut = {}
                edge.cut[bit] = pos
            self._settle(edge)
        return unknown

    def _settle(self, edge: _Edge) -> None:
        """An edge nobody covers to its end loses what is below it; one nobody covers at all
        goes from its parent."""
        if edge.full:
            return
        if edge.children:
            stack = list(edge.children.values())
            while stack:
                gone = stack.pop()
                self._positions -= len(gone.keys)
                if gone.children:
                    stack.extend(gone.children.values())
            edge.children = None
        if not edge.cut:
            self._unlink(edge)

    def _unlink(self, edge: _Edge) -> None:
        """Take an edge nobody holds (and what is below it) out of the tree."""
        parent = edge.parent
        if parent is None:
            return
        siblings = parent.children
        if siblings is not None and siblings.get(edge.keys[0]) is edge:
            del siblings[edge.keys[0]]
            self._positions -= len(edge.keys)
            stack = list((edge.children or {}).values())
            while stack:
                gone = stack.pop()
                self._positions -= len(gone.keys)
                stack.extend((gone.children or {}).values())
            if not siblings:
                parent.children = None

    def clear(self, w: WorkerKey) -> int:
        """Apply a cleared event; returns the number of names the worker lost."""
        wmap = self._maps.get(w)
        if not wmap:
            return 0
        bit = self._bit[w]
        n = len(wmap)
        for edge in {id(e): e for e in wmap.values()}.values():
            edge.full &= ~(1 << bit)
            if edge.cut:
                edge.cut.pop(bit, None)
            self._settle(edge)
        wmap.clear()
        return n

    def clear_worker(self, worker_id: int, dp_rank: int | None = None) -> None:
        """Every rank of ``worker_id`` (or just ``dp_rank``) leaves the index."""
        for w in [w for w in self._maps if w[0] == worker_id and dp_rank in (None, w[1])]:
            self.clear(w)

    # -- queries ------------------------------------------------------------------------------

    def query_hashes(self, tokens_hashes: Iterable[int]) -> list[Score]:
        """Per worker, the number of leading blocks of the request it covers."""
        out = [Score(*self._workers[b], n) for b, (n, _, _) in self._walk(tokens_hashes).items()
               if n > 0]
        out.sort(key=lambda s: (-s.matched_blocks, s.worker_id, s.dp_rank))
        return out

    def match_details(self, tokens_hashes: Iterable[int]) -> dict[WorkerKey, tuple[int, int]]:
        """Per worker that matches: (leading blocks covered, the engine hash of the last of
        them). The hash is where Dynamo continues the match into lower tiers (CPU, disk)."""
        workers = self._workers
        return {workers[b]: (n, edge.hashes[k - 1])
                for b, (n, edge, k) in self._walk(tokens_hashes).items() if n > 0}

    def _walk(self, tokens_hashes: Iterable[int]) -> dict[int, tuple[int, _Edge, int]]:
        """worker bit -> (blocks matched, the edge its last matched block is on, how many of
        that edge's blocks it matched)."""
        query = tokens_hashes if isinstance(tokens_hashes, list) else list(tokens_hashes)
        scores: dict[int, tuple[int, _Edge, int]] = {}
        edge, active, depth, first = self.root, 0, 0, True
        child = edge
        match = 0
        while depth < len(query):
            children = edge.children
            child = children.get(query[depth]) if children else None
            if child is None:
                child, match = edge, len(edge.keys)
                break
            keys, cut = child.keys, child.cut
            match = 1
            while match < len(keys) and depth + match < len(query) and \
                    keys[match] == query[depth + match]:
                match += 1
            if first:                      # partial holders of the first edge score there
                active, first = child.full, False
                for bit, upto in (cut or {}).items():
                    k = min(upto, match)
                    scores[bit] = (k, child, k)
            else:                          # workers that stop here score what they cover
                leaving = active & ~child.full
                while leaving:
                    low = leaving & -leaving
                    b = low.bit_length() - 1
                    k = min(cut[b], match) if cut and b in cut else 0
                    scores[b] = (depth + k, child, k) if k else (depth, edge, len(edge.keys))
                    leaving ^= low
                active &= child.full
            depth += match
            if not active or match < len(keys):
                break
            edge = child
        while active:
            low = active & -active
            scores[low.bit_length() - 1] = (depth, child, match)
            active ^= low
        return scores

    def workers(self) -> list[dict[str, int]]:
        return [{"worker_id": w[0], "dp_rank": w[1], "blocks": len(m)}
                for w, m in sorted(self._maps.items()) if m]

    def held(self, w: WorkerKey) -> dict[int, int]:
        """engine block_hash -> tokens_hash of every block the worker can name."""
        out = {}
        for h, e in self._maps.get(w, {}).items():
            pos = e.index.get(h)
            if pos is not None:
                out[h] = e.keys[pos]
        return out

    # -- dump ---------------------------------------------------------------------------------

    def dump(self) -> Iterator[tuple[WorkerKey, str, dict[str, Any]]]:
        """Events that rebuild this state's answers in an empty index: per worker, what it
        covers from the root, an edge (or its covered prefix) an event, parents first."""
        for w in sorted(self._maps):
            bit = self._bit[w]
            stack: list[tuple[_Edge, int | None]] = [
                (c, None) for c in (self.root.children or {}).values()]
            while stack:
                edge, parent_hash = stack.pop()
                k = edge.covered(bit)
                if not k:
                    continue
                yield w, "stored", {"parent_hash": parent_hash,
                                    "block_hashes": edge.hashes[:k],
                                    "tokens_hashes": edge.keys[:k]}
                if k == len(edge.keys):
                    stack += [(c, edge.hashes[-1]) for c in (edge.children or {}).values()]
