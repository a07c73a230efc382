"""``stdout`` sink: print events, for demos and debugging."""

from __future__ import annotations

from ..node import Kind, NodeType, string
from ..registry import register


@register
class StdoutSink(NodeType):
    name = "stdout"
    kind = Kind.SINK
    summary = "Print events: one readable line each, or JSONL."
    options = {
        "format": string("`text` (one short line per event) or `jsonl`.", "text",
                         enum=["text", "jsonl"]),
    }
