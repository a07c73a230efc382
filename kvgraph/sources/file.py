"""``file`` source: replay a recording, so that a graph can run with no engine at all.

``vllm-frames`` reads the fixture format (one ``{"frames_b64": [topic, seq, payload]}`` per
line, exactly what a SUB socket received); ``jsonl`` reads kvgraph's own event lines, as the
``file`` sink writes them. A graph whose sources are all files ends when they are drained.
"""

from __future__ import annotations

from ..node import Kind, NodeType, boolean, integer, number, string
from ..registry import register


@register
class FileSource(NodeType):
    name = "file"
    kind = Kind.SOURCE
    summary = "Replay a recording: vLLM wire frames or kvgraph JSONL events."
    options = {
        "path": string("File to read; relative paths are relative to the graph file.",
                       min_length=1),
        "format": string("`vllm-frames` (captured ZMQ frames, base64 in JSON lines) or `jsonl` "
                         "(kvgraph events).", "vllm-frames", enum=["vllm-frames", "jsonl"]),
        "rate": number("Messages per second; 0 replays as fast as possible.", 0, minimum=0),
        "loop": boolean("Start again at the end of the file (never finishes).", False),
        "worker_id": integer("Worker id stamped on events that carry none.", 0, minimum=0,
                             maximum=2**63 - 1),
    }
    required = ("path",)
    example = 'path = "../shared/fixtures/vllm-0.29.0/live.jsonl"\nformat = "vllm-frames"'
