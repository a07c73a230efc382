"""``dedup`` transform: the reference-counted duplicate filter Dynamo added for vLLM.

Per (worker_id, dp_rank): a store always passes and counts the hash up; a remove counts it
down and passes only when the count reaches zero; a clear resets the counts. A remove of an
unknown hash passes (the index downstream may know it) and is counted.
"""

from __future__ import annotations

import msgspec

from ..event import REMOVED, STORED, Event
from ..node import Transform, integer, string
from ..node import counter
from ..registry import register


@register
class Dedup(Transform):
    name = "dedup"
    metrics = {"unknown_removes": counter("Removes of blocks not held (passed on)."),
               "duplicate_stores": counter("Stores of blocks already held (dropped)."),
               "forgotten": counter("Blocks forgotten past max_blocks (oldest first).")}
    summary = "Reference-counted store/remove filter, per worker and DP rank."
    replicable = True
    # A remove event whose hashes are partly still referenced passes with only the hashes
    # whose count reached zero; a remove that keeps none is discarded (intentionally).
    options = {
        "unknown_removes": string("What to do with a remove of a hash never stored: `pass` it "
                                  "on (counted) or `drop` it.", "pass", enum=["pass", "drop"]),
        "max_blocks": integer("Most hashes tracked per (worker, dp_rank) before the oldest "
                              "counts are forgotten (bounds memory).", 4_000_000, minimum=1),
    }

    # -- runtime ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._counts: dict[tuple[int, int], dict[int, int]] = {}
        for name in ("unknown_removes", "duplicate_stores", "forgotten"):
            self.metrics.extra.setdefault(name, 0)

    async def adopt(self, old: "Dedup") -> None:
        """The counts go on (a fresh memory would pass removes it should drop)."""
        self._counts = old._counts

    async def process(self, batch: list[Event]) -> None:
        out: list[Event] = []
        counts_of = self._counts
        extra = self.metrics.extra
        drop_unknown = self.config["unknown_removes"] == "drop"
        limit = self.config["max_blocks"]
        for e in batch:
            key = (e.worker_id, e.dp_rank)
            if e.kind == STORED:
                counts = counts_of.get(key)
                if counts is None:
                    counts = counts_of[key] = {}
                for h in e.block_hashes:
                    c = counts.get(h, 0)
                    if c:
                        extra["duplicate_stores"] += 1
                    counts[h] = c + 1
                if len(counts) > limit:
                    before = len(counts)
                    counts = counts_of[key] = _forget_oldest(counts, limit)
                    extra["forgotten"] += before - len(counts)
                out.append(e)
            elif e.kind == REMOVED:
                counts = counts_of.get(key, {})
                passing = []
                for h in e.block_hashes:
                    c = counts.get(h)
                    if c is None:
                        extra["unknown_removes"] += 1
                        if not drop_unknown:
                            passing.append(h)
                    elif c <= 1:
                        del counts[h]
                        passing.append(h)
                    else:
                        counts[h] = c - 1
                if len(passing) == len(e.block_hashes):
                    out.append(e)
                else:
                    if passing:
                        out.append(msgspec.structs.replace(e, block_hashes=passing))
            else:
                counts_of.pop(key, None)
                out.append(e)
        self.metrics.discarded_intentional += len(batch) - len(out)
        await self.ctx.emit(out)


def _forget_oldest(counts: dict[int, int], limit: int) -> dict[int, int]:
    """The newest ``limit - limit // 16`` counts, in a new dict.

    Forgetting one count at a time (``pop(next(iter(d)))``) made each insert past the limit
    walk the deleted slots at the front of the dict: 35 us per hash instead of 0.3 (measured
    with 100,000 blocks). Forgetting a sixteenth at once, into a fresh dict, costs O(1) per
    insert amortised, and memory stays at most ``limit`` counts."""
    from itertools import islice

    keep = limit - limit // 16
    return dict(islice(counts.items(), len(counts) - keep, None))
