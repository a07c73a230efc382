"""Turning engine messages (``[topic, seq, payload]``) into events, for every source that reads
them (``zmq`` live, ``file`` from a recording): decoding, worker ids, and sequence tracking.

Sequence numbers count batches per publisher from 0. Per (topic, dp_rank) this tracks the last
seq and counts:

* ``seq_gaps`` / ``seq_missing``: seq jumped past last + 1 (messages lost: ZMQ drops silently
  past its high-water mark, and a gap is the only trace);
* ``seq_resets``: seq went backwards, i.e. the engine restarted with an empty cache.

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

_MAX_RAW = 4096  # bytes of a malformed message kept in its error record


def worker_id_from_topic(topic: bytes) -> int:
    """llm-d's ``kv@<pod>@<model>``: a stable 63-bit id from the pod name."""
    parts = topic.split(b"@")
    if len(parts) < 3 or parts[0] != b"kv" or not parts[1]:
        raise DecodeError(f"topic {topic[:80]!r} is not kv@<pod>@<model>")
    return xxhash.xxh3_64_intdigest(parts[1]) & ((1 << 63) - 1)


class FrameIngest:
    """Decode engine messages for one node; keeps per-publisher seq state and metrics."""

    def __init__(self, node_id: str, metrics: NodeMetrics, worker_id: int = 0,
                 worker_id_from: str = "config", block_size: int = 0, log: Optional[Any] = None):
        self.node_id = node_id
        self.log = log
        self.metrics = metrics
        self.worker_id = worker_id
        self.from_topic = worker_id_from == "topic"
        self.block_size = block_size
        self.last_seq: dict[tuple[bytes, int | None], int] = {}
        self._topic_ids: dict[bytes, int] = {}
        for name in ("seq_gaps", "seq_missing", "seq_resets", "malformed"):
            metrics.extra.setdefault(name, 0)

    def _worker(self, topic: bytes) -> int:
        if not self.from_topic:
            return self.worker_id
        wid = self._topic_ids.get(topic)
        if wid is None:
            wid = self._topic_ids[topic] = worker_id_from_topic(topic)
        return wid

    def ingest(self, frames: list[bytes], events: list[Event], rejected: list[Rejected],
               now: float) -> None:
        """Decode one message, appending its events or its error record."""
        try:
            topic, seq, payload = split_frames(frames)
            worker = self._worker(topic)
            _, dp_rank, evs = decode_payload(payload, worker, seq)
        except DecodeError as exc:
            self.metrics.extra["malformed"] += 1
            raw = b"".join(frames)[:_MAX_RAW] if all(isinstance(f, (bytes, bytearray))
                                                     for f in frames) else None
            rejected.append(Rejected(node=self.node_id, reason=f"malformed message: {exc}",
                                     raw=raw, ts=now))
            return
        self.track(topic, dp_rank, seq)
        if self.block_size:
            bad = [e for e in evs if e.block_size is not None and e.block_size != self.block_size]
            if bad:
                for e in bad:
                    rejected.append(Rejected(
                        node=self.node_id, event=e, ts=now,
                        reason=f"block_size {e.block_size} differs from the configured "
                               f"{self.block_size}"))
                evs = [e for e in evs if e.block_size is None or e.block_size == self.block_size]
        events.extend(evs)

    def track(self, topic: bytes, dp_rank: int | None, seq: int) -> str:
        """Record ``seq``; returns "ok", "first", "gap" or "reset"."""
        key = (topic, dp_rank)
        last = self.last_seq.get(key)
        self.last_seq[key] = seq
        if last is None:
            return "first"
        if seq == last + 1:
            return "ok"
        extra = self.metrics.extra
        name = topic.decode(errors="replace") or "(no topic)"
        if seq > last + 1:
            extra["seq_gaps"] += 1
            extra["seq_missing"] += seq - last - 1
            if self.log:
                self.log.problem("gap", "seq gap on %s rank %s: %d -> %d, %d batch(es) lost",
                                 name, dp_rank, last, seq, seq - last - 1)
            return "gap"
        extra["seq_resets"] += 1
        if self.log:
            self.log.problem("reset", "seq went back on %s rank %s (%d -> %d): the engine "
                             "restarted", name, dp_rank, last, seq)
        return "reset"
