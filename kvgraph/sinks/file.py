"""``file`` sink: append events to a JSONL file, one event per line (kvgraph's own format).

The same format is read back by the ``file`` source with ``format = "jsonl"``, so a recording
can be replayed. Hashes are written as exact JSON integers (they may exceed 2^53).
"""

from __future__ import annotations

import os
from typing import Any

from ..codecs.jsonl import encode_lines
from ..node import Sink, boolean, integer, string
from ..registry import register


@register
class FileSink(Sink):
    name = "file"
    summary = "Write events to a JSONL file."
    options = {
        "path": string("Output file; relative paths are relative to the graph file.",
                       min_length=1),
        "format": string("Only `jsonl` for now.", "jsonl", enum=["jsonl"]),
        "append": boolean("Append instead of truncating at start.", False),
        "fsync_every": integer("fsync after this many batches; 0 leaves it to the OS.", 0,
                               minimum=0),
    }
    required = ("path",)
    example = 'path = "events.jsonl"'

    async def start(self) -> None:
        path = self.ctx.path(self.config["path"])
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = path.open("ab" if self.config["append"] else "wb")
        self._since_sync = 0

    async def write(self, batch: list[Any]) -> None:
        self._f.write(encode_lines(batch))

    async def flush(self) -> None:
        self._f.flush()
        every = self.config["fsync_every"]
        if every:
            self._since_sync += 1
            if self._since_sync >= every:
                os.fsync(self._f.fileno())
                self._since_sync = 0

    async def stop(self) -> None:
        f = getattr(self, "_f", None)
        if f is not None:
            f.close()
