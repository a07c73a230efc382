"""``api`` source: engines publish from Python, shaped like Dynamo's ``KvEventPublisher``.

The running graph exposes one publisher per ``api`` node, with ``publish_stored``,
``publish_removed`` and ``publish_cleared``; they are safe to call from the event loop and from
an engine's own thread.
"""

from __future__ import annotations

from ..node import Kind, NodeType, integer, string
from ..registry import register


@register
class ApiSource(NodeType):
    name = "api"
    kind = Kind.SOURCE
    summary = "Events published by in-process Python calls (publish_stored/removed/cleared)."
    options = {
        "worker_id": integer("Worker id stamped on every event.", 0, minimum=0,
                             maximum=2**63 - 1),
        "dp_rank": integer("Data-parallel rank stamped on every event.", 0, minimum=0),
        "block_size": integer("Tokens per block; publish_stored checks token counts against it.",
                              16, minimum=1),
        "medium": string("Medium stamped on events that name none (GPU, CPU, DISK...).", "GPU"),
        "max_pending": integer("Events buffered before publish calls block (from a thread) or "
                               "raise (from the loop).", 65_536, minimum=1),
    }
    example = "worker_id = 3\nblock_size = 16"
