"""``file`` sink: append events to a JSONL file, one event per line (kvgraph's own format).

The same format is read back by the ``file`` source with ``format = "jsonl"``, so a recording
can be replayed. Hashes are written as exact JSON integers (they may exceed 2^53).
"""

from __future__ import annotations

from ..node import Kind, NodeType, boolean, integer, string
from ..registry import register


@register
class FileSink(NodeType):
    name = "file"
    kind = Kind.SINK
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
