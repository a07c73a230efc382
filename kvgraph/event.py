"""The one event type that flows inside a graph, whatever the source, and the error record.

Formats live only at the edges of the graph (sources decode, sinks encode); inside, every node
sees :class:`Event`. It is a ``msgspec.Struct``: creating one costs about as much as a tuple,
``gc=False`` keeps the garbage collector off the hot path (an event holds only scalars and lists
of scalars, so it cannot be part of a reference cycle), and msgspec encodes it to JSON or msgpack
in C.

Field names follow the engines' (vLLM's ``BlockStored``), with two normalisations: ``kind`` is
``stored`` / ``removed`` / ``cleared``, and every hash is an unsigned 64-bit int (see
:func:`normalize_hash`). ``None`` means "the engine did not say".

Events and batches are immutable once emitted: a batch sent to several edges is shared, so a
node that wants to change events makes new ones (``msgspec.structs.replace``).
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

STORED: Final = "stored"
REMOVED: Final = "removed"
CLEARED: Final = "cleared"
KINDS: Final = (STORED, REMOVED, CLEARED)

U64_MASK: Final = (1 << 64) - 1


class Event(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """One KV-cache event. ``kind``, ``worker_id`` and ``dp_rank`` are always set; the rest
    defaults to "unknown" (None or empty) and is left out of JSON when unknown."""

    kind: str
    worker_id: int
    dp_rank: int
    seq: int | None = None            # the engine's batch sequence number, when known
    ts: float | None = None           # the engine's batch timestamp (unix seconds)
    block_hashes: list[int] = []      # unsigned 64-bit
    parent_hash: int | None = None    # unsigned 64-bit; None = the start of a sequence
    token_ids: list[Any] = []         # ints (SGLang EAGLE: pairs of ints)
    block_size: int | None = None
    lora_id: int | None = None
    lora_name: str | None = None
    medium: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None
    lookahead_token_ids: list[Any] | None = None
    cache_salt: str | None = None     # Dynamo's cache namespace, when the publisher gives one
    tokens_hashes: list[int] | None = None  # Dynamo's per-block tokens_hash, when a source
    #                                         already had them (Dynamo formats carry no tokens)


class Rejected(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What travels on an ``errors`` port: an event (or raw input) a node could not handle."""

    node: str
    reason: str
    event: Event | None = None
    raw: bytes | None = None          # undecodable input, as received (base64 in JSON)
    ts: float | None = None


#: A decoded event's memory, estimated for the channels' ``capacity_bytes``: the struct and its
#: fields, plus a list slot and an int object per token id and block hash (measured with
#: tracemalloc on decoded vLLM batches: 2.58 MB for an event of 4,096 blocks of distinct token
#: ids, estimated 2.51 MB; 2.7 KB for 4 blocks, estimated 2.8 KB).
EVENT_BYTES = 400
ITEM_BYTES = 36


def batch_bytes(batch: list[Any]) -> int:
    """The estimated memory of a batch of events (error records count as plain events). Runs
    once per batch sent: 83 ns per event (a for loop took 121)."""
    items = sum([len(e.token_ids) + len(e.block_hashes) for e in batch if type(e) is Event])
    return EVENT_BYTES * len(batch) + ITEM_BYTES * items


def normalize_hash(h: int | bytes) -> int:
    """Engine hash -> unsigned 64-bit: two's complement for negatives, last 8 bytes of bytes."""
    if type(h) is int:
        return h & U64_MASK
    if isinstance(h, (bytes, bytearray, memoryview)):
        return int.from_bytes(bytes(h)[-8:], "big")
    raise TypeError(f"a block hash is an int or bytes, not {type(h).__name__}")


def normalize_hashes(hashes: list[Any]) -> list[int]:
    """Normalise a list of hashes; the common case (non-negative ints) costs one C-level scan."""
    if not hashes:
        return hashes
    try:
        if min(hashes) >= 0 and max(hashes) <= U64_MASK:
            return hashes
    except TypeError:  # bytes mixed in
        pass
    return [normalize_hash(h) for h in hashes]
