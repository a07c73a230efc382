"""Sequence tracking and gap repair for engine streams (the ``zmq`` source).

Engines number their batches per publisher (per topic and DP rank) from 0. PUB sockets drop
silently, so a jump in ``seq`` is the only trace of loss, and a ``seq`` going back means the
engine restarted with an empty cache. Per stream this module:

* applies batches in seq order;
* on a gap, when a replay endpoint is configured and not cooling down, asks the engine for the
  missing batches (``[b"", start_seq]`` on a DEALER), buffers the live batches that arrive
  meanwhile, applies the replies, then merges the buffer in seq order, applying nothing twice
  (an old store applied after a newer remove would resurrect a block);
* when the history is gone (the engine's buffer no longer reaches back) or the replay times out,
  emits a loss record on ``errors``, counts ``seq_lost`` and logs it: loss is never silent;
* on a restart, emits a ``cleared`` event for that (worker, DP rank) before the new batches;
* optionally fetches the buffered history at start (``replay_on_connect``).

* a batch repeated under the same seq (the same bytes) is a copy: skipped, counted;
* a seq no engine can send (2^63 and above; vLLM's end-of-replay marker is 2^64-1), a jump of
  more than ``MAX_SEQ_JUMP`` batches, or other content under the seq just applied, is an
  anomaly: the batch is rejected with the reason and counted, and the stream goes on as it was
  (taken as a restart or a gap, it would send a false ``cleared`` or report 9.2e18 batches lost).

Counters: ``seq_gaps``, ``seq_missing`` (batches missing when gaps were seen), ``replays``,
``replayed_batches``, ``seq_lost`` (batches finally lost), ``seq_resets``, ``seq_duplicates``,
``seq_anomalies``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import xxhash

from ..codecs.vllm import SEQ_END, DecodeError, decode_payload, parse_seq
from ..event import CLEARED, Event, Rejected
from ..node import counter

Key = tuple[bytes, int]  # (topic, dp_rank)

#: Batches held while a replay runs (live ones, and replayed ones), at most; past it the replay
#: is given up (and what it did not bring is reported lost), so that a slow replay, or one that
#: floods (seen: 1.37 GB in 2 s), cannot grow memory without bound.
MAX_HELD_BATCHES = 20_000

#: Larger jumps are anomalies, not gaps: 2^32 batches is seven weeks of an engine publishing a
#: thousand batches a second, all dropped, without the stream ever starting over.
MAX_SEQ_JUMP = 2**32
#: Engines count from 0 by one; no engine reaches 2^63 (vLLM's replay end marker is 2^64-1).
SEQ_LIMIT = 2**63


@dataclass
class _Stream:
    last: int | None = None                      # last seq applied
    last_payload: bytes = b""                    # its bytes: a copy of it is a duplicate
    repairing: bool = False
    # batches held while repairing, live and replayed alike: seq -> events
    pending: dict[int, list[Event]] = field(default_factory=dict)
    cooldown_until: float = 0.0
    dropped_upto: int | None = None              # highest seq dropped during a repair
    # content hashes of batches applied from a replay: a live copy of one of them arriving
    # late is a duplicate, not a restart (seq <= last means "restart" only for new content)
    replayed: dict[int, int] = field(default_factory=dict)
    # a reload gave the stream to a new socket that overlaps the old one: batches up to
    # ``last`` arrive again once, and are skipped, until the first new one
    handover: bool = False


@dataclass
class _Replay:
    key: Key | None = None          # the stream being repaired (None: replay on connect)
    deadline: float = 0.0


#: The metrics of every source that follows engines' sequence numbers (zmq).
SEQ_METRICS = {
    "seq_gaps": counter("Jumps in an engine's batch sequence number (each repaired or lost)."),
    "seq_missing": counter("Engine batches missing in those gaps."),
    "seq_resets": counter("Sequence numbers that went back: an engine restarted (a cleared "
                          "event went downstream)."),
    "seq_lost": counter("Engine batches no replay brought back: lost for good."),
    "replays": counter("Replay requests sent to engines' replay endpoints."),
    "replayed_batches": counter("Batches received from replays."),
    "late_duplicates": counter("Batches received again after they were applied (skipped)."),
    "seq_duplicates": counter("Batches with a sequence number seen just before (skipped)."),
    "seq_anomalies": counter("Sequence numbers that made no sense for their stream."),
    "malformed": counter("Messages that could not be decoded (sent to errors)."),
}


class SeqStreams:
    def __init__(self, node_id: str, metrics: Any, log: Any, worker_of: Callable[[bytes], int],
                 request: Callable[[int, int], bool] | None = None, cooldown_s: float = 1.0,
                 timeout_s: float = 2.0, default_topic: bytes = b""):
        self.node_id, self.metrics, self.log = node_id, metrics, log
        self.worker_of = worker_of
        self.request = request          # request(rank, start_seq) -> False if no endpoint
        self.cooldown_s, self.timeout_s = cooldown_s, timeout_s
        self.default_topic = default_topic
        self.streams: dict[Key, _Stream] = {}
        self.replays: dict[int, _Replay] = {}   # rank -> the replay in flight on its DEALER
        for name in ("seq_gaps", "seq_missing", "seq_resets", "seq_lost", "replays",
                     "replayed_batches", "late_duplicates", "seq_duplicates", "seq_anomalies"):
            metrics.extra.setdefault(name, 0)

    def continue_from(self, old: "SeqStreams", overlapping: bool) -> None:
        """A reload replaced the source: every stream goes on from its last seq, so that a
        batch missed in the swap is a gap (repaired or reported), not silence.
        ``overlapping``: the new socket may receive again batches the old one read; they are
        skipped once, up to the first new one (an engine restart in that window is then seen
        only at its first batch past the old ``last``)."""
        self.streams, self.replays = old.streams, old.replays
        if overlapping:
            for st in self.streams.values():
                st.handover = True

    def held_batches(self) -> int:
        """Batches held for replays in flight."""
        return sum(len(st.pending) for st in self.streams.values())

    def finish_all(self, out: list[Event], rejected: list[Rejected], now: float,
                   why: str) -> None:
        """End every replay in flight (the source is stopping): what is held is applied, in
        seq order, and what the replays did not bring is reported lost, with ``why``."""
        for rank, rp in list(self.replays.items()):
            self._finish(rank, rp, out, rejected, now, why)

    # -- helpers ------------------------------------------------------------------------------

    def _lost(self, key: Key, first: int, last: int, why: str, rejected: list[Rejected],
              now: float) -> None:
        n = last - first + 1
        if n <= 0:
            return
        self.metrics.extra["seq_lost"] += n
        self.metrics.lost += n
        topic = key[0].decode(errors="replace") or "(no topic)"
        reason = (f"lost {n} batch(es), seq {first}..{last} of {topic} rank {key[1]}: {why}")
        self.log.problem("lost", "%s", reason)
        rejected.append(Rejected(node=self.node_id, reason=reason, ts=now))

    def _anomaly(self, topic: bytes, rank: int, seq: int, last: int | None,
                 rejected: list[Rejected], now: float) -> None:
        self.metrics.extra["seq_anomalies"] += 1
        what = "other content under the seq just applied" if seq == last else \
            f"after {last}" if last is not None else "as a first seq"
        reason = (f"seq {seq} on {topic.decode(errors='replace') or '(no topic)'} rank {rank} "
                  f"({what}) is not a plausible engine sequence; batch rejected, the stream "
                  "goes on from seq " + ("?" if last is None else str(last)))
        self.log.problem("anomaly", "%s", reason)
        rejected.append(Rejected(node=self.node_id, reason=reason, ts=now))

    def _cleared(self, key: Key, out: list[Event], now: float) -> None:
        out.append(Event(kind=CLEARED, worker_id=self.worker_of(key[0]), dp_rank=key[1], ts=now))

    # -- live messages ------------------------------------------------------------------------

    def on_live(self, topic: bytes, seq: int, dp_rank: int | None, events: list[Event],
                out: list[Event], rejected: list[Rejected], now: float,
                payload: bytes = b"") -> None:
        rank = dp_rank or 0
        key = (topic, rank)
        st = self.streams.get(key)
        if st is None:
            st = self.streams[key] = _Stream()
            rp = self.replays.get(rank)
            if rp is not None and rp.key is None:  # a replay on connect is filling this rank
                st.repairing = True
        if st.repairing:
            st.pending.setdefault(seq, events)
            rp = self.replays.get(rank)
            if len(st.pending) >= MAX_HELD_BATCHES and rp is not None:  # memory stays bounded
                self._finish(rank, rp, out, rejected, now,
                             f"more than {MAX_HELD_BATCHES} live batches arrived during the replay")
            return
        last = st.last
        if st.handover:
            if last is not None and seq <= last:
                self.metrics.extra["late_duplicates"] += 1   # the old socket read it
                return
            st.handover = False
        if (last is None or seq == last + 1) and seq < SEQ_LIMIT:
            st.last = seq
            st.last_payload = payload
            out.extend(events)
            return
        if last is not None and seq <= last:
            if seq == last and payload == st.last_payload:
                self.metrics.extra["seq_duplicates"] += 1  # the same batch again: applied once
                return
            if st.replayed.get(seq) == xxhash.xxh3_64_intdigest(payload):
                self.metrics.extra["late_duplicates"] += 1  # already applied from the replay
                return
        if seq >= SEQ_LIMIT or last is not None and (seq > last + MAX_SEQ_JUMP
                                                      or seq == last != 0):
            self._anomaly(topic, rank, seq, last, rejected, now)
            return
        if seq <= last:
            self.metrics.extra["seq_resets"] += 1
            self.log.problem("reset", "seq went back on %s rank %d (%d -> %d): the engine "
                             "restarted; its cache is empty", topic.decode(errors="replace"),
                             rank, last, seq)
            self._cleared(key, out, now)
            st.last = None
            if seq == 0:
                st.last = 0
                out.extend(events)
                return
            last = -1  # batches 0..seq-1 of the new engine are missing
        self.metrics.extra["seq_gaps"] += 1
        self.metrics.extra["seq_missing"] += seq - last - 1
        if self._start_repair(key, st, last + 1, now):
            st.pending[seq] = events
            return
        self._lost(key, last + 1, seq - 1, "no replay" if self.request is None
                   else "replay cooling down", rejected, now)
        st.last = seq
        out.extend(events)

    def on_dropped(self, topic: bytes, seq: int, dp_rank: int | None, why: str,
                   rejected: list[Rejected], now: float) -> None:
        """The source had to drop the message at ``seq`` (and the ones before it since the
        last it kept): a gap that ends at ``seq``, repaired by a replay or reported lost, even
        when no message follows it to show the gap."""
        rank = dp_rank or 0
        key = (topic, rank)
        st = self.streams.setdefault(key, _Stream())
        if st.repairing:
            st.dropped_upto = seq if st.dropped_upto is None else max(st.dropped_upto, seq)
            return
        last = st.last
        if seq >= SEQ_LIMIT or last is not None and not last < seq <= last + MAX_SEQ_JUMP:
            return   # not a plausible next seq: nothing is known to be missing
        start = seq if last is None else last + 1
        self.metrics.extra["seq_gaps"] += 1
        self.metrics.extra["seq_missing"] += seq - start + 1
        if self._start_repair(key, st, start, now):
            st.dropped_upto = seq
            return
        self._lost(key, start, seq, why, rejected, now)
        st.last = seq

    def _start_repair(self, key: Key, st: _Stream, start: int, now: float) -> bool:
        rank = key[1]
        if self.request is None or now < st.cooldown_until or rank in self.replays:
            return False
        if not self.request(rank, start):
            return False
        self.metrics.extra["replays"] += 1
        self.replays[rank] = _Replay(key, now + self.timeout_s)
        st.repairing = True
        st.last = start - 1
        return True

    def replay_on_connect(self, ranks: list[int], now: float) -> None:
        for rank in ranks:
            if self.request is not None and self.request(rank, 0):
                self.metrics.extra["replays"] += 1
                self.replays[rank] = _Replay(None, now + self.timeout_s)

    # -- replies ------------------------------------------------------------------------------

    def on_reply(self, rank: int, frames: list[bytes], out: list[Event],
                 rejected: list[Rejected], now: float) -> None:
        rp = self.replays.get(rank)
        if rp is None:
            return  # a late reply of a replay that timed out
        try:
            if len(frames) == 4:    # vLLM >= 0.26: ["", topic, seq, payload]
                topic, seq_b, payload = frames[1], frames[2], frames[3]
            elif len(frames) == 3:  # up to 0.25: ["", seq, payload]
                topic, seq_b, payload = None, frames[1], frames[2]
            else:
                raise DecodeError(f"replay reply has {len(frames)} frames")
            seq = parse_seq(seq_b)
        except DecodeError as exc:
            rejected.append(Rejected(node=self.node_id, reason=f"malformed replay reply: {exc}",
                                     ts=now))
            return
        if seq == SEQ_END:
            self._finish(rank, rp, out, rejected, now, None)
            return
        if topic is None or rp.key is not None and topic == b"":
            topic = rp.key[0] if rp.key is not None else self.default_topic
        key = (topic, rank)
        if rp.key is not None and key != rp.key:
            return
        st = self.streams.setdefault(key, _Stream(repairing=True))
        if len(st.pending) >= MAX_HELD_BATCHES:  # a replay that floods: memory stays bounded
            self._finish(rank, rp, out, rejected, now,
                         f"the replay sent more than {MAX_HELD_BATCHES} batches")
            return
        self.metrics.extra["replayed_batches"] += 1
        st.replayed[seq] = xxhash.xxh3_64_intdigest(payload)
        if len(st.replayed) > 4 * 10_000:  # vLLM buffers 10,000 batches: keep the newest
            for old in sorted(st.replayed)[: len(st.replayed) - 10_000]:
                del st.replayed[old]
        try:
            _, _, events = decode_payload(payload, self.worker_of(topic), seq)
        except DecodeError as exc:
            rejected.append(Rejected(node=self.node_id, reason=f"malformed replayed batch "
                                     f"{seq}: {exc}", raw=payload[:4096], ts=now))
            events = []  # counted as handled: its seq is not a gap
        st.pending.setdefault(seq, events)

    def tick(self, out: list[Event], rejected: list[Rejected], now: float) -> None:
        """Give up on replays past their deadline."""
        for rank, rp in list(self.replays.items()):
            if now >= rp.deadline:
                self._finish(rank, rp, out, rejected, now, "the replay timed out")

    def _finish(self, rank: int, rp: _Replay, out: list[Event], rejected: list[Rejected],
                now: float, failure: str | None) -> None:
        """End of a replay: apply what it returned and what arrived live meanwhile, in seq
        order, each batch once; whatever is still missing is lost, and said so."""
        del self.replays[rank]
        keys = [rp.key] if rp.key is not None else [k for k in self.streams if k[1] == rank]
        for key in keys:
            st = self.streams[key]
            st.repairing = False
            st.cooldown_until = now + self.cooldown_s
            for seq in sorted(st.pending):
                if st.last is not None and seq <= st.last:
                    continue
                if st.last is not None and seq > st.last + 1:
                    self._lost(key, st.last + 1, seq - 1, failure or "older than the engine's "
                               "replay buffer", rejected, now)
                st.last = seq
                out.extend(st.pending[seq])
            st.pending.clear()
            if st.dropped_upto is not None and (st.last is None or st.dropped_upto > st.last):
                first = st.dropped_upto if st.last is None else st.last + 1
                self._lost(key, first, st.dropped_upto, failure or "older than the engine's "
                           "replay buffer", rejected, now)
                st.last = st.dropped_upto
            st.dropped_upto = None
