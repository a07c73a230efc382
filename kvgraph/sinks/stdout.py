"""``stdout`` sink: print events, for demos and debugging."""

from __future__ import annotations

import sys
from typing import Any

from ..codecs.jsonl import encode_lines
from ..event import Event, Rejected
from ..node import Sink, string
from ..registry import register


@register
class StdoutSink(Sink):
    name = "stdout"
    summary = "Print events: one readable line each, or JSONL."
    writes_terminal = True
    options = {
        "format": string("`text` (one short line per event) or `jsonl`.", "text",
                         enum=["text", "jsonl"]),
    }

    async def start(self) -> None:
        self._out = sys.stdout.buffer
        self._fmt = self.config["format"]

    async def write(self, batch: list[Any]) -> None:
        if self._fmt == "jsonl":
            data = encode_lines(batch)
        else:
            data = "".join(describe(x) + "\n" for x in batch).encode()
        self._out.write(data)

    async def flush(self) -> None:
        self._out.flush()


def _h(h: int | None) -> str:
    return "-" if h is None else f"{h:016x}"


def describe(x: Any) -> str:
    """One readable line per event (or error record)."""
    if isinstance(x, Rejected):
        return f"ERROR  {x.node}: {x.reason}"
    e: Event = x
    head = f"{e.kind:<8} w={e.worker_id} r={e.dp_rank}" + (f" seq={e.seq}" if e.seq is not None
                                                            else "")
    if e.kind == "cleared":
        return head
    hashes = ",".join(_h(h) for h in e.block_hashes[:3]) + (
        f",...(+{len(e.block_hashes) - 3})" if len(e.block_hashes) > 3 else "")
    line = f"{head} blocks={len(e.block_hashes)} [{hashes}]"
    if e.kind == "stored":
        line += f" parent={_h(e.parent_hash)} tokens={len(e.token_ids)}"
        if e.lora_name:
            line += f" lora={e.lora_name}"
    if e.medium and e.medium != "GPU":
        line += f" medium={e.medium}"
    return line
