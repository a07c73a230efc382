"""Events as broker messages, and back: the three message formats every bus node speaks.

``jsonl`` (kvgraph's event lines, several per message), ``dynamo-json`` (one legacy RouterEvent
per message) and ``dynamo-msgpack`` (Dynamo 1.6.1's event-plane envelope of up to 128
RouterEvents). The ``nats``, ``redis`` and ``kafka`` nodes differ in how a message travels,
not in what it holds, so the encoding (with its size limit and its idempotency ids) and the
decoding live here once.
"""

from __future__ import annotations

import operator
import time
from typing import Any, Callable, Hashable, Iterable

import msgspec

from ..event import STORED, Event, Rejected
from . import dynamo, jsonl

FORMATS = ["jsonl", "dynamo-json", "dynamo-msgpack"]


def encoding_options(default_format: str) -> dict[str, Any]:
    """The options of every sink that writes these formats, as it declares them."""
    from ..node import boolean, integer, string

    return {
        "format": string("Message format: `dynamo-msgpack` (Dynamo 1.6.1), `dynamo-json` "
                         "(legacy RouterEvent JSON) or `jsonl` (kvgraph's event lines).",
                         default_format, enum=FORMATS),
        "block_size": integer("Tokens per block for Dynamo's tokens_hash; must match the "
                              "engine.", 16, minimum=1),
        "events_per_message": integer("Most events in one message (dynamo-msgpack: at most "
                                      "128; jsonl).", 128, minimum=1, maximum=65_536),
        "storage_tier": boolean("Write storage_tier, residency_domain and dp_rank (Dynamo "
                                "1.6.1 fields); false writes the minimal legacy RouterEvent.",
                                True),
    }

#: A message ready to send: its key (a subject, a partition key...), its bytes, and how many
#: events it holds.
Encoded = tuple[Any, bytes, int]
#: The same with an idempotency id (see :meth:`MessageEncoder.encode_identified`).
Identified = tuple[Any, bytes, int, str]


def reading_options() -> dict[str, Any]:
    """The options of every durable-bus source that reads these formats."""
    from ..node import integer, string, worker_id

    return {
        "format": string("Message format.", "jsonl", enum=FORMATS),
        "dedup_ids": integer("Message ids (written by a kvgraph sink) remembered to drop "
                             "copies; 0 remembers none.", 100_000, minimum=0),
        "worker_id": worker_id("Override the worker id of every event received."),
    }


class MessageEncoder:
    """Cuts batches of events into messages of one format, grouped by ``key_of(event)``.

    ``node`` is the sink (its ``ctx.rejected`` builds error records, its metrics count losses
    and events of other KV groups); ``max_bytes()`` is the largest message the bus takes, and
    ``limit`` says in words what sets it and ``hint`` how to raise it, for the error when
    one event alone is over it.
    ``key_of`` None puts every event under the key ``fixed_key``.
    """

    def __init__(self, node: Any, fmt: str, *, block_size: int, storage_tier: bool,
                 events_per_message: int, max_bytes: Callable[[], int], limit: str, hint: str,
                 key_of: Callable[[Any], Hashable] | None = None, fixed_key: Any = None):
        self.node, self.format = node, fmt
        self.block_size, self.storage_tier = block_size, storage_tier
        self.per_message = min(events_per_message, dynamo.MAX_EVENTS_PER_ENVELOPE) \
            if fmt == "dynamo-msgpack" else events_per_message
        self.max_bytes, self.limit, self.hint = max_bytes, limit, hint
        self.key_of, self.fixed_key = key_of, fixed_key
        self.ids = dynamo.EventIds()
        self.envelope = dynamo.EnvelopeWriter()
        self._msg_seq = 0
        self.encode: Callable[[list[Any]], tuple[list[Encoded], list[Any]]] = {
            "dynamo-json": self._encode_dynamo_json, "dynamo-msgpack": self._encode_dynamo_msgpack,
            "jsonl": self._encode_jsonl}[fmt]

    # -- grouping -----------------------------------------------------------------------------

    def _by_key(self, items: list[Any], keys: list[Any] | None = None) -> dict[Any, list[Any]]:
        """``items`` by key, in order; ``keys`` (the events the items came from) when the
        items are RouterEvents. A batch is nearly always of one key (one engine's batch): that
        case costs one C-level pass, not a Python call per event."""
        if self.key_of is None:
            return {self.fixed_key: items}
        source = keys if keys is not None else items
        key_of = self.key_of
        try:
            all_keys = list(map(key_of, source))
        except AttributeError:   # an error record (jsonl) among the events: it has no key
            all_keys = [key_of(e) if isinstance(e, Event) else None for e in source]
        if all_keys and all_keys.count(all_keys[0]) == len(all_keys):
            return {all_keys[0]: items}
        groups: dict[Any, list[Any]] = {}
        for item, key in zip(items, all_keys):
            groups.setdefault(key, []).append(item)
        return groups

    # -- size ---------------------------------------------------------------------------------

    def fitted(self, items: list[Any], encode: Callable[[list[Any]], bytes], margin: int,
               out: list[tuple[bytes, int]], bad: list[Any]) -> None:
        """Encode ``items`` as messages that fit ``max_bytes()``: a message over it is cut in
        two, and so on; a single event over it cannot be sent (the bus would refuse it), so it
        is a loss record on `errors` and counted in `lost`. Encoded once when it fits, which
        is nearly always."""
        body = encode(items)
        limit = self.max_bytes() - margin
        if len(body) <= limit:
            out.append((body, len(items)))
        elif len(items) > 1:
            half = len(items) // 2
            self.fitted(items[:half], encode, margin, out, bad)
            self.fitted(items[half:], encode, margin, out, bad)
        else:
            self.node.metrics.lost += 1
            who = getattr(items[0], "worker_id", "?")
            bad.append(self.node.ctx.rejected(
                f"lost 1 event of worker {who}: its message of {len(body):,} bytes is over "
                f"{self.limit} ({self.max_bytes():,} bytes); {self.hint}",
                items[0] if isinstance(items[0], Event) else None))

    # -- formats ------------------------------------------------------------------------------

    def _encode_jsonl(self, batch: list[Any]) -> tuple[list[Encoded], list[Any]]:
        n = self.per_message
        out: list[Encoded] = []
        bad: list[Any] = []
        for key, items in self._by_key(batch).items():
            for i in range(0, len(items), n):
                fitted: list[tuple[bytes, int]] = []
                self.fitted(items[i:i + n], jsonl.encode_lines, 0, fitted, bad)
                out += [(key, body, k) for body, k in fitted]
        return out, bad

    def router_events(self, batch: list[Any]) -> tuple[list[Any], list[Event], list[Any]]:
        """RouterEvents for the events that convert (and those events, when messages are
        grouped by key); error records for the rest. Ids are taken only by events that are
        sent, so they stay contiguous. This loop runs once per event: it keeps to locals."""
        node, bs, full = self.node, self.block_size, self.storage_tier
        hashes_for, router_event, failed = (dynamo.block_hashes_for, dynamo.router_event,
                                            dynamo.ConversionError)
        last_id = self.ids.last
        keep = self.key_of is not None
        routers: list[Any] = []
        sent: list[Event] = []
        bad: list[Any] = []
        for e in batch:
            if type(e) is not Event and not isinstance(e, Event):
                bad.append(node.ctx.rejected("not an event (an error record cannot be sent in "
                                             "a Dynamo format; use format = \"jsonl\")"))
                continue
            if e.group_idx:   # as Dynamo's relay: only the main KV group reaches routers
                node.metrics.extra["not_main_group"] = \
                    node.metrics.extra.get("not_main_group", 0) + 1
                continue
            try:  # computed (and checked) before an event id is taken
                hashes = hashes_for(e, bs) if e.kind == STORED else None
            except failed as exc:
                bad.append(node.ctx.rejected(str(exc), e))
                continue
            key = (e.worker_id, e.dp_rank)
            event_id = last_id[key] = last_id.get(key, 0) + 1
            routers.append(router_event(e, event_id, bs, full, hashes))
            if keep:
                sent.append(e)
        return routers, sent, bad

    def _encode_dynamo_json(self, batch: list[Any]) -> tuple[list[Encoded], list[Any]]:
        routers, sent, bad = self.router_events(batch)
        enc = dynamo.encode_json
        out: list[Encoded] = []
        for key, items in self._by_key(routers, sent).items():
            for r in items:
                fitted: list[tuple[bytes, int]] = []
                self.fitted([r], lambda one: enc(one[0]), 0, fitted, bad)
                out += [(key, body, k) for body, k in fitted]
        return out, bad

    def _encode_dynamo_msgpack(self, batch: list[Any]) -> tuple[list[Encoded], list[Any]]:
        routers, sent, bad = self.router_events(batch)
        n = self.per_message
        now_ms = int(time.time() * 1000)
        out: list[Encoded] = []
        envelope = self.envelope
        for key, items in self._by_key(routers, sent).items():
            for i in range(0, len(items), n):
                fitted: list[tuple[bytes, int]] = []
                self.fitted(items[i:i + n], envelope.payload, envelope.OVERHEAD, fitted, bad)
                out += [(key, envelope.wrap(body, now_ms), k) for body, k in fitted]
        return out, bad

    # -- idempotency ids ----------------------------------------------------------------------
    #
    # A message id names a message's events, not their content. Events that carry their origin
    # (an engine's batch: worker, DP rank, seq and the batch's timestamp; a message read from a
    # durable bus: its position there, see MessageDecoder) are cut into messages at origin
    # boundaries, so that the same events always make the same messages, and the id is that
    # origin plus the chunk's index: a copy sent again after a reconnect or a restart of
    # kvgraph has the same id (JetStream drops it; a Redis or Kafka reader can), while distinct
    # events, even identical ones, never share an id (the timestamp tells an engine's seq 0
    # from the seq 0 it sends after it restarts). Events with no origin (the api source, files
    # without seq) get the publisher id and a sequence: unique, so never dropped, but not
    # recognisable after a restart of kvgraph.

    def encode_identified(self, batch: list[Any]) -> tuple[list[Identified], list[Any]]:
        out: list[Identified] = []
        bad: list[Any] = []
        for origin, run in runs_by_origin(batch):
            messages, rejected = self.encode(run)
            bad += rejected
            for chunk, (key, payload, n) in enumerate(messages):
                out.append((key, payload, n, self._msg_id(origin, chunk)))
        return out, bad

    def continue_from(self, old: "MessageEncoder") -> None:
        """A reload replaced the sink (:meth:`kvgraph.node.NodeType.adopt`): event ids
        (contiguous per worker and rank), message ids and the envelope's publisher and
        sequence go on from where ``old`` stopped, as if one sink had sent everything."""
        self.ids, self._msg_seq, self.envelope = old.ids, old._msg_seq, old.envelope

    def _msg_id(self, origin: tuple[Any, ...] | None, chunk: int) -> str:
        if origin is None:
            self._msg_seq += 1
            return f"{self.envelope.publisher_id:x}-{self._msg_seq}"
        worker, rank, seq, ts = origin
        return f"{worker}.{rank}.{seq}.{ts!r}.{chunk}"


def runs_by_origin(batch: list[Any]) -> list[tuple[tuple[Any, ...] | None, list[Any]]]:
    """Consecutive items of one origin (worker, DP rank, seq, ts); items with no seq (or not
    events) have origin None. An engine's batch is one origin: checked in one C-level pass."""
    try:
        origins = list(map(_ORIGIN, batch))
    except AttributeError:   # error records among the events
        origins = [_ORIGIN(e) if isinstance(e, Event) else (None, None, None, None)
                   for e in batch]
    if origins and origins.count(origins[0]) == len(origins):
        first = origins[0]
        return [(None if first[2] is None else first, batch)]
    runs: list[tuple[tuple[Any, ...] | None, list[Any]]] = []
    for e, origin in zip(batch, origins):
        if origin[2] is None:
            origin = None
        if runs and runs[-1][0] == origin:
            runs[-1][1].append(e)
        else:
            runs.append((origin, [e]))
    return runs


_ORIGIN = operator.attrgetter("worker_id", "dp_rank", "seq", "ts")


class MessageDecoder:
    """Messages of one format -> events; a message that does not decode is one error record
    (with its first 4 KiB) and counted in the node's ``malformed``.

    ``worker_id`` overrides the worker of every event. ``origin`` (given per message by a
    source that reads a durable bus: a stream sequence, an offset) becomes the ``seq`` of
    events that carry none, so that a sink's message ids stay the same when the message is
    read again after a restart of kvgraph."""

    def __init__(self, node: Any, fmt: str, worker_id: int | None = None):
        self.node, self.format, self.worker_id = node, fmt, worker_id
        node.metrics.extra.setdefault("malformed", 0)

    @classmethod
    def for_node(cls, node: Any) -> "MessageDecoder":
        """The decoder a source's :func:`reading_options` ask for."""
        from ..node import worker_id_value

        wid = node.config.get("worker_id")
        return cls(node, node.config["format"], None if wid is None else worker_id_value(wid))

    def decode(self, body: bytes, events: list[Event], rejected: list[Rejected],
               origin: int | None = None) -> None:
        first = len(events)
        fmt = self.format
        if fmt == "jsonl":  # line by line: one bad line costs that line only
            for line in body.splitlines():
                if line.strip():
                    try:
                        events.append(jsonl.decode_line(line))
                    except ValueError as exc:
                        self._malformed(line, exc, rejected)
        else:
            try:
                events.extend([dynamo.decode_router_json(body)] if fmt == "dynamo-json"
                              else dynamo.decode_envelope(body)[2])
            except (ValueError, msgspec.DecodeError) as exc:
                self._malformed(body, exc, rejected)
                return
        if self.worker_id is not None or origin is not None:
            events[first:] = self._stamped(events[first:], origin)

    def _malformed(self, raw: bytes, exc: Exception, rejected: list[Rejected]) -> None:
        self.node.metrics.extra["malformed"] += 1
        rejected.append(self.node.ctx.rejected(f"malformed {self.format} message: {exc}",
                                               raw=raw[:4096]))

    def _stamped(self, events: list[Event], origin: int | None) -> list[Event]:
        wid = self.worker_id
        out = []
        for e in events:
            changes: dict[str, Any] = {}
            if wid is not None:
                changes["worker_id"] = wid
            if origin is not None and e.seq is None:
                changes["seq"] = origin
            out.append(msgspec.structs.replace(e, **changes) if changes else e)
        return out


class RecentIds:
    """The ids of the last ``size`` messages delivered, to tell a copy (a sink's resend, a
    redelivery) from a new message. ``size`` 0 remembers nothing. Any hashable id: message
    ids (bytes), or JetStream stream sequences."""

    def __init__(self, size: int):
        from collections import OrderedDict

        self.size = size
        self._ids: "OrderedDict[bytes, None]" = OrderedDict()

    def __contains__(self, mid: bytes) -> bool:
        return mid in self._ids

    def remember(self, mids: Iterable[bytes]) -> None:
        ids = self._ids
        for mid in mids:
            ids[mid] = None
        while len(ids) > self.size:
            ids.popitem(last=False)

    def copy_of_recent(self, mid: bytes | None) -> bool:
        """True when ``mid`` was seen (a copy); otherwise it is remembered from now on."""
        if not self.size or mid is None:
            return False
        if mid in self._ids:
            return True
        self.remember((mid,))
        return False

    def forget(self, mids: Iterable[bytes]) -> None:
        """These were not delivered after all: their next copy is not a duplicate."""
        for mid in mids:
            self._ids.pop(mid, None)
