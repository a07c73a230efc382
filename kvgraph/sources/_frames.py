"""Turning engine messages (``[topic, seq, payload]``) into events, for every source that reads
them (``zmq`` live, ``file`` from a recording): decoding, worker ids, and sequence tracking.

Sequence numbers count batches per publisher from 0; gaps, repairs by replay and restarts are
handled per (topic, DP rank) by :mod:`kvgraph.sources._seq`.

Malformed messages (wrong frame count, a short seq, bad msgpack, an unknown tag, a wrong field
type) become :class:`~kvgraph.event.Rejected` records with the reason and the raw bytes; the
caller counts, logs and forwards them, and the events around them are unaffected.
"""

from __future__ import annotations

from typing import Any, Optional

import xxhash

from ..codecs.vllm import DecodeError, decode_payload, split_frames
from ..event import Event, Rejected
from ..metrics import NodeMetrics
from ._seq import SeqStreams

_MAX_RAW = 4096  # bytes of a malformed message kept in its error record


def worker_id_from_topic(topic: bytes) -> int:
    """llm-d's ``kv@<pod>@<model>``: a stable 63-bit id from the pod name."""
    parts = topic.split(b"@")
    if len(parts) < 3 or parts[0] != b"kv" or not parts[1]:
        raise DecodeError(f"topic {topic[:80]!r} is not kv@<pod>@<model>")
    return xxhash.xxh3_64_intdigest(parts[1]) & ((1 << 63) - 1)


class FrameIngest:
    """Decode engine messages for one node: worker ids, block-size checks, and the per-stream
    sequence tracking of :class:`~kvgraph.sources._seq.SeqStreams` (gaps, repairs, restarts)."""

    def __init__(self, node_id: str, metrics: NodeMetrics, worker_id: int = 0,
                 worker_id_from: str = "config", block_size: int = 0, log: Optional[Any] = None,
                 request: Any = None, cooldown_s: float = 1.0, timeout_s: float = 2.0,
                 default_topic: bytes = b""):
        self.node_id = node_id
        self.metrics = metrics
        self.worker_id = worker_id
        self.from_topic = worker_id_from == "topic"
        self.block_size = block_size
        self._topic_ids: dict[bytes, int] = {}
        metrics.extra.setdefault("malformed", 0)
        self.streams = SeqStreams(node_id, metrics, log or _NoLog(), self.worker_of, request,
                                  cooldown_s, timeout_s, default_topic)

    def worker_of(self, topic: bytes) -> int:
        if not self.from_topic:
            return self.worker_id
        wid = self._topic_ids.get(topic)
        if wid is None:
            wid = self._topic_ids[topic] = worker_id_from_topic(topic)
        return wid

    def ingest(self, frames: list[bytes], events: list[Event], rejected: list[Rejected],
               now: float) -> None:
        """Decode one message; its events (in seq order, repaired) or error records follow."""
        try:
            topic, seq, payload = split_frames(frames)
            worker = self.worker_of(topic)
            _, dp_rank, evs = decode_payload(payload, worker, seq)
        except DecodeError as exc:
            self.metrics.extra["malformed"] += 1
            raw = b"".join(frames)[:_MAX_RAW] if all(isinstance(f, (bytes, bytearray))
                                                     for f in frames) else None
            rejected.append(Rejected(node=self.node_id, reason=f"malformed message: {exc}",
                                     raw=raw, ts=now))
            return
        if self.block_size:
            bad = [e for e in evs if e.block_size is not None and e.block_size != self.block_size]
            if bad:
                for e in bad:
                    rejected.append(Rejected(
                        node=self.node_id, event=e, ts=now,
                        reason=f"block_size {e.block_size} differs from the configured "
                               f"{self.block_size}"))
                evs = [e for e in evs if e.block_size is None or e.block_size == self.block_size]
        self.streams.on_live(topic, seq, dp_rank, evs, events, rejected, now, payload)


class _NoLog:
    def problem(self, *args: Any) -> None:
        pass
