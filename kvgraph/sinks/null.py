"""``null`` sink: accept and discard everything; for benchmarks and for draining a port."""

from __future__ import annotations

from ..node import Kind, NodeType
from ..registry import register


@register
class NullSink(NodeType):
    name = "null"
    kind = Kind.SINK
    summary = "Discard events (counted as delivered)."
