"""``batch`` transform: merge adjacent events as Dynamo's publisher does.

Consecutive stores merge when each continues the previous chain; consecutive removes merge.
A run is flushed on a kind change, a worker, DP rank or tier change, a chain break, a clear,
``max_events`` or ``max_delay_ms``. The merged output builds exactly the same index state.
"""

from __future__ import annotations

from ..node import Transform, integer, number
from ..registry import register


@register
class Batch(Transform):
    name = "batch"
    summary = "Merge adjacent stores (same chain) and removes into larger events."
    options = {
        "max_events": integer("Most input events merged into one output event.", 128,
                              minimum=1),
        "max_delay_ms": number("Longest an event waits for a merge partner.", 5, minimum=0),
    }
