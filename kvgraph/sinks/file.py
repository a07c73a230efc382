"""``file`` sink: append events to a JSONL file, one event per line (kvgraph's own format).

The same format is read back by the ``file`` source with ``format = "jsonl"``, so a recording
can be replayed. Hashes are written as exact JSON integers (they may exceed 2^53).

A write that fails (a full disk, a file that refuses writes) is a failure of the sink, not of
the events: the node fails (the graph stops, unless ``on_error = "skip"``), the batch being
written and everything still queued for it are counted lost, and the file is cut back to its
last complete line, so that it never ends in half an event. Writes are unbuffered (one system
call per batch), so that what counts as written is what the operating system took.
"""

from __future__ import annotations

import os
from typing import Any

from ..codecs.jsonl import encode_lines
from ..errors import NodeFailure
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
        self._path = path = self.ctx.path(self.config["path"])
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = path.open("ab" if self.config["append"] else "wb", buffering=0)
        self._end = self._tell()  # where the last complete line ends
        self._since_sync = 0

    def _tell(self) -> int:
        try:
            return self._f.seek(0, os.SEEK_END)
        except OSError:  # a device (/dev/full, a pipe): nothing to cut back
            return 0

    def _failed(self, exc: OSError) -> NodeFailure:
        try:  # cut a partly written batch off: the file ends with a whole line
            os.ftruncate(self._f.fileno(), self._end)
            self._f.seek(self._end)
        except OSError:
            pass
        return NodeFailure(f"cannot write to {self._path}: {exc.strerror or exc}")

    async def write(self, batch: list[Any]) -> None:
        data = memoryview(encode_lines(batch))
        try:
            while data:  # an unbuffered write may take only part of it
                data = data[self._f.write(data):]
        except OSError as exc:
            raise self._failed(exc) from None
        self._end += len(data.obj)

    async def flush(self) -> None:
        every = self.config["fsync_every"]
        if every:
            self._since_sync += 1
            if self._since_sync >= every:
                try:
                    os.fsync(self._f.fileno())
                except OSError as exc:
                    raise self._failed(exc) from None
                self._since_sync = 0

    async def stop(self) -> None:
        f = getattr(self, "_f", None)
        if f is not None:
            f.close()
