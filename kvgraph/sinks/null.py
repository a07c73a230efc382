"""``null`` sink: accept and discard everything; for benchmarks and for draining a port."""

from __future__ import annotations

from typing import Any

from ..node import Sink
from ..registry import register


@register
class NullSink(Sink):
    name = "null"
    summary = "Discard events (counted as delivered)."
    replicable = True

    async def write(self, batch: list[Any]) -> None:
        pass
