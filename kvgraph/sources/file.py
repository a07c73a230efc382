"""``file`` source: replay a recording, so that a graph can run with no engine at all.

``vllm-frames`` reads the fixture format (one ``{"frames_b64": [topic, seq, payload]}`` per
line, exactly what a SUB socket received); ``jsonl`` reads kvgraph's own event lines, as the
``file`` sink writes them. A graph whose sources are all files ends when they are drained.
"""

from __future__ import annotations

import base64
import itertools
import json
import time

from ..codecs.jsonl import JsonlError, decode_line
from ..event import Event, Rejected
from ..node import Source, boolean, integer, number, string, worker_id, worker_id_value
from ._seq import SEQ_METRICS
from ..registry import register
from ._frames import FrameIngest


@register
class FileSource(Source):
    name = "file"
    metrics = SEQ_METRICS   # a recording of an engine's frames is followed as the engine
    summary = "Replay a recording: vLLM wire frames or kvgraph JSONL events."
    options = {
        "path": string("File to read; relative paths are relative to the graph file.",
                       min_length=1),
        "format": string("`vllm-frames` (captured ZMQ frames, base64 in JSON lines) or `jsonl` "
                         "(kvgraph events).", "vllm-frames", enum=["vllm-frames", "jsonl"]),
        "rate": number("Messages per second; 0 replays as fast as possible.", 0, minimum=0),
        "loop": boolean("Start again at the end of the file (never finishes).", False),
        "worker_id": worker_id("Worker id stamped on events that carry none.", 0),
    }
    required = ("path",)
    example = 'path = "recordings/vllm-0.29.0.jsonl"\nformat = "vllm-frames"'

    # -- runtime ------------------------------------------------------------------------------

    async def start(self) -> None:
        path = self.ctx.path(self.config["path"])
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        self._path = path

    async def run(self) -> None:
        c = self.config
        interval = 1.0 / c["rate"] if c["rate"] else 0.0
        while True:
            await self._replay_once(interval)
            if not c["loop"] or self.ctx.stopping.is_set():
                return

    async def _replay_once(self, interval: float) -> None:
        """One pass over the file, a batch per line group; paced when ``rate`` is set."""
        import asyncio
        c = self.config
        vllm = c["format"] == "vllm-frames"
        ingest = FrameIngest(self.id, self.metrics, worker_id_value(c["worker_id"]),
                             log=self.log) if vllm \
            else None
        chunk = 1 if interval else 256  # lines per emitted batch
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        with self._path.open("rb") as f:
            lineno = 0
            while not self.ctx.stopping.is_set():
                lines = list(itertools.islice(f, chunk))
                if not lines:
                    return
                events: list[Event] = []
                rejected: list[Rejected] = []
                now = time.time()
                for line in lines:
                    lineno += 1
                    if not line.strip():
                        continue
                    if ingest is not None:
                        try:
                            frames = [base64.b64decode(x) for x in
                                      json.loads(line)["frames_b64"]]
                        except (ValueError, KeyError, TypeError) as exc:
                            rejected.append(self.ctx.rejected(
                                f"line {lineno}: not a vllm-frames record: {exc}", raw=line))
                            continue
                        ingest.ingest(frames, events, rejected, now)
                    else:
                        try:
                            e = decode_line(line)
                        except JsonlError as exc:
                            rejected.append(self.ctx.rejected(f"line {lineno}: {exc}", raw=line))
                            continue
                        events.append(e)
                self.metrics.events_in += len(events)
                await self.ctx.emit(events)
                await self.ctx.reject(rejected)
                if interval:
                    next_at += interval
                    delay = next_at - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
