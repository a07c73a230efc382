"""``dedup`` transform: the reference-counted duplicate filter Dynamo added for vLLM.

Per (worker_id, dp_rank): a store always passes and counts the hash up; a remove counts it
down and passes only when the count reaches zero; a clear resets the counts. A remove of an
unknown hash passes (the index downstream may know it) and is counted.
"""

from __future__ import annotations

from ..node import Kind, NodeType, integer, string
from ..registry import register


@register
class Dedup(NodeType):
    name = "dedup"
    kind = Kind.TRANSFORM
    summary = "Reference-counted store/remove filter, per worker and DP rank."
    options = {
        "unknown_removes": string("What to do with a remove of a hash never stored: `pass` it "
                                  "on (counted) or `drop` it.", "pass", enum=["pass", "drop"]),
        "max_blocks": integer("Most hashes tracked per (worker, dp_rank) before the oldest "
                              "counts are forgotten (bounds memory).", 4_000_000, minimum=1),
    }
