"""NVIDIA Dynamo's KV-router formats: RouterEvent, tokens_hash, event ids, storage tiers.

The reference is Dynamo 1.6.1 itself (the ``ai-dynamo-runtime`` wheel). A RouterEvent (JSON, Dynamo 1.6.1):

    {"worker_id": 7, "storage_tier": "device", "residency_domain": "worker",
     "event": {"event_id": 1,
               "data": {"stored": {"parent_hash": null, "start_position": null,
                                   "blocks": [{"block_hash": 111, "tokens_hash": 9143..., "mm_extra_info": null}]}},
               "dp_rank": 0}}

``tokens_hash`` is Dynamo's own hash of a block's tokens (the router's tree key):
``XXH3_64(little-endian u32 tokens, seed)`` with ``seed = 1337`` plus ``XXH3_64(lora_name, 0)``
with a LoRA, plus ``XXH3_64(namespace, 1)`` with a cache namespace (wrapping at 2^64).
"""

from __future__ import annotations

import sys
from array import array
from typing import Any

import msgspec
import xxhash

from ..event import CLEARED, REMOVED, STORED, U64_MASK, Event

BASE_SEED = 1337
_xxh3 = xxhash.xxh3_64_intdigest
_BIG_ENDIAN = sys.byteorder != "little"

TIERS = {
    "GPU": "device", "DEVICE": "device",
    "CPU": "host_pinned", "CPU_PINNED": "host_pinned", "CPU_TIER1": "host_pinned",
    "CPU_TIER2": "disk", "DISK": "disk", "NVME": "disk", "STORAGE": "disk",
    "EXTERNAL": "external", "NETWORK": "external", "REMOTE": "external", "SHARED": "external",
}
MEDIUM_OF_TIER = {"device": "GPU", "host_pinned": "CPU", "disk": "DISK", "external": "EXTERNAL"}


class ConversionError(ValueError):
    """An event that cannot become a valid RouterEvent; the message is the reason."""


def seed_for(lora_name: str | None = None, cache_namespace: str | None = None) -> int:
    seed = BASE_SEED
    if lora_name:
        seed = (seed + _xxh3(lora_name.encode(), 0)) & U64_MASK
    if cache_namespace:
        seed = (seed + _xxh3(cache_namespace.encode(), 1)) & U64_MASK
    return seed


def tokens_hash(token_ids: list[int], block_size: int, lora_name: str | None = None,
                cache_namespace: str | None = None) -> list[int]:
    """Dynamo's per-block hashes of complete blocks (a trailing partial block is dropped).

    This is a third of the relay's cost per event, so it is written for speed: one C call
    packs the tokens, and a plain loop (cheaper than a comprehension's frame for 1-32 blocks)
    hashes each block's bytes."""
    n = len(token_ids) - len(token_ids) % block_size
    if not n:
        return []
    buf = array("I", token_ids if len(token_ids) == n else token_ids[:n])
    if _BIG_ENDIAN:  # pragma: no cover - big-endian hosts
        buf.byteswap()
    raw = buf.tobytes()  # slicing bytes beats memoryview slices for 64-byte blocks
    step = block_size * 4
    seed = seed_for(lora_name, cache_namespace) if lora_name or cache_namespace else BASE_SEED
    h = _xxh3
    if n == block_size:
        return [h(raw, seed)]
    out = []
    append = out.append
    for i in range(0, n * 4, step):
        append(h(raw[i:i + step], seed))
    return out


def storage_tier(medium: str | None) -> str:
    tier = _TIER_OF.get(medium)
    if tier is None:
        tier = TIERS.get(medium.upper(), "external")  # type: ignore[union-attr]
        if len(_TIER_OF) < 256:  # engines use a handful of media; never grow without bound
            _TIER_OF[medium] = tier
    return tier


_TIER_OF: dict[str | None, str] = {None: "device", **TIERS}  # the media seen so far


class EventIds:
    """event_id: contiguous per (worker_id, dp_rank), from 1. Only emitted events take one."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last: dict[tuple[int, int], int] = {}  # the last id given, per (worker, rank)

    def next(self, worker_id: int, dp_rank: int) -> int:
        key = (worker_id, dp_rank)
        n = self.last[key] = self.last.get(key, 0) + 1
        return n


def namespace_of(e: Event) -> str | None:
    """The cache namespace of an event (``cache_salt``, as Dynamo's publisher API takes it)."""
    return e.cache_salt or None


def block_hashes_for(e: Event, block_size: int) -> list[int]:
    """tokens_hash of each block of a stored event, or ConversionError with the reason."""
    if e.tokens_hashes is not None:
        if len(e.tokens_hashes) != len(e.block_hashes):
            raise ConversionError("tokens_hashes and block_hashes differ in length")
        return e.tokens_hashes
    if e.block_size is not None and e.block_size != block_size:
        raise ConversionError(
            f"engine block_size {e.block_size} differs from the configured block_size "
            f"{block_size}: set block_size = {e.block_size} on this node")
    # As Dynamo's relay: the blocks whose tokens are all there (extra tokens are ignored, and
    # blocks past the tokens are not published); an event with no complete block is none.
    n = len(e.block_hashes)
    complete = min(n, len(e.token_ids) // block_size)
    if not complete:
        raise ConversionError(
            f"stored event has {len(e.token_ids)} token ids for {n} block(s) of {block_size}: "
            "no complete block, so no tokens_hash"
            + (" (offload events carry no tokens: filter medium upstream)"
               if not e.token_ids else ""))
    if not isinstance(e.token_ids[0], int):
        raise ConversionError("token_ids are not plain integers (EAGLE pairs are not supported)")
    tokens = e.token_ids if len(e.token_ids) == complete * block_size \
        else e.token_ids[:complete * block_size]
    return tokens_hash(tokens, block_size, e.lora_name, namespace_of(e))


class _OutBlock(msgspec.Struct, gc=False):
    block_hash: int
    tokens_hash: int
    mm_extra_info: None = None


class _OutBlockLegacy(msgspec.Struct, gc=False):
    block_hash: int
    tokens_hash: int


class _OutStored(msgspec.Struct, gc=False):
    parent_hash: int | None
    start_position: None
    blocks: list[_OutBlock]


class _OutStoredLegacy(msgspec.Struct, gc=False):
    parent_hash: int | None
    blocks: list[_OutBlockLegacy]


class _OutRemoved(msgspec.Struct, gc=False):
    block_hashes: list[int]


class _StoredData(msgspec.Struct, gc=False):
    stored: _OutStored | _OutStoredLegacy


class _RemovedData(msgspec.Struct, gc=False):
    removed: _OutRemoved


class _OutEvent(msgspec.Struct, gc=False):
    event_id: int
    data: _StoredData | _RemovedData | str
    dp_rank: int


class _OutEventLegacy(msgspec.Struct, gc=False):
    event_id: int
    data: _StoredData | _RemovedData | str


class RouterEvent(msgspec.Struct, gc=False):
    """Dynamo 1.6.1's RouterEvent; encodes (JSON or msgpack) with its fields in the order
    Dynamo writes them, so the bytes match the spec's examples."""

    worker_id: int
    storage_tier: str
    residency_domain: str
    event: _OutEvent


class RouterEventLegacy(msgspec.Struct, gc=False):
    worker_id: int
    event: _OutEventLegacy


def router_event(e: Event, event_id: int, block_size: int, full: bool = True,
                 hashes: list[int] | None = None) -> RouterEvent | RouterEventLegacy:
    """The RouterEvent of one event. ``full`` adds the 1.6.1 fields (storage_tier,
    residency_domain, dp_rank); otherwise the minimal legacy shape. ``hashes``: the stored
    event's tokens_hash per block, when the caller already computed them. Structs, not dicts:
    building and encoding them is several times cheaper on the hot path."""
    data: Any
    if e.kind == STORED:
        if hashes is None:
            hashes = block_hashes_for(e, block_size)
        if full:
            data = _StoredData(_OutStored(e.parent_hash, None,
                                          list(map(_OutBlock, e.block_hashes, hashes))))
        else:
            data = _StoredData(_OutStoredLegacy(e.parent_hash,
                                                list(map(_OutBlockLegacy, e.block_hashes,
                                                         hashes))))
    elif e.kind == REMOVED:
        data = _RemovedData(_OutRemoved(e.block_hashes))
    else:
        data = "cleared"
    if not full:
        return RouterEventLegacy(e.worker_id, _OutEventLegacy(event_id, data))
    return RouterEvent(e.worker_id, storage_tier(e.medium), "worker",
                       _OutEvent(event_id, data, e.dp_rank))


_json = msgspec.json.Encoder()


def encode_json(obj: Any) -> bytes:
    return _json.encode(obj)


# -- decoding (the nats source reads Dynamo's stream too) --------------------------------------

class _Block(msgspec.Struct):
    block_hash: int
    tokens_hash: int | None = None


class _Stored(msgspec.Struct):
    blocks: list[_Block]
    parent_hash: int | None = None


class _Removed(msgspec.Struct):
    block_hashes: list[int]


class _Data(msgspec.Struct):
    stored: _Stored | None = None
    removed: _Removed | None = None


class _Inner(msgspec.Struct):
    event_id: int
    data: _Data | str
    dp_rank: int = 0


class _RouterEvent(msgspec.Struct):
    worker_id: int
    event: _Inner
    storage_tier: str | None = None


_router_json = msgspec.json.Decoder(_RouterEvent)


def _from_router(r: _RouterEvent) -> Event:
    medium = MEDIUM_OF_TIER.get(r.storage_tier) if r.storage_tier else None
    d, rank = r.event.data, r.event.dp_rank
    if isinstance(d, str):
        if d != "cleared":
            raise ConversionError(f"unknown RouterEvent data {d!r}")
        return Event(kind=CLEARED, worker_id=r.worker_id, dp_rank=rank)
    if d.stored is not None:
        th = [b.tokens_hash for b in d.stored.blocks]
        return Event(kind=STORED, worker_id=r.worker_id, dp_rank=rank, medium=medium,
                     block_hashes=[b.block_hash for b in d.stored.blocks],
                     parent_hash=d.stored.parent_hash,
                     tokens_hashes=None if None in th else th)  # type: ignore[arg-type]
    if d.removed is not None:
        return Event(kind=REMOVED, worker_id=r.worker_id, dp_rank=rank, medium=medium,
                     block_hashes=d.removed.block_hashes)
    raise ConversionError("RouterEvent data has neither stored, removed nor cleared")


def decode_router_json(body: bytes) -> Event:
    """One legacy RouterEvent JSON message -> Event."""
    try:
        return _from_router(_router_json.decode(body))
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ConversionError(f"not a RouterEvent: {exc}") from None


class _DumpEntry(msgspec.Struct):
    block_size: int
    events: list[_RouterEvent]


_dump_json = msgspec.json.Decoder(dict[str, _DumpEntry])


def decode_dump(body: bytes) -> dict[str, tuple[int, list[Event]]]:
    """The answer of a Dynamo indexer's ``GET /dump`` -> per ``model:routing_group``, its
    block size and events (lower-tier events keep their tier as ``medium``)."""
    try:
        dump = _dump_json.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ConversionError(f"not an indexer dump: {exc}") from None
    return {k: (v.block_size, [_from_router(r) for r in v.events]) for k, v in dump.items()}


# -- Dynamo 1.6.1 event plane: msgpack envelope around a list of RouterEvents -----------------

_msgpack = msgspec.msgpack.Encoder()
MAX_EVENTS_PER_ENVELOPE = 128


class _Envelope(msgspec.Struct):
    publisher_id: int
    sequence: int
    published_at: int
    topic: str
    payload: bytes


_envelope_dec = msgspec.msgpack.Decoder(_Envelope)
_router_list_dec = msgspec.msgpack.Decoder(list[_RouterEvent])


class EnvelopeWriter:
    """One publisher: a stable random ``publisher_id`` and ``sequence`` from 0 per message."""

    def __init__(self, publisher_id: int | None = None):
        import secrets

        self.publisher_id = secrets.randbits(63) if publisher_id is None else publisher_id
        self.sequence = 0

    #: What the envelope adds to its payload, at most (four keys, two u64, a u64, a bin header)
    OVERHEAD = 96

    def encode(self, router_events: list[Any], now_ms: int) -> bytes:
        return self.wrap(self.payload(router_events), now_ms)

    @staticmethod
    def payload(router_events: list[Any]) -> bytes:
        """The envelope's payload: what a caller can measure before a sequence is taken."""
        return _msgpack.encode(router_events)

    def wrap(self, payload: bytes, now_ms: int) -> bytes:
        """The envelope around ``payload``; takes the next sequence."""
        body = {"publisher_id": self.publisher_id, "sequence": self.sequence,
                "published_at": now_ms, "topic": "kv-events", "payload": payload}
        self.sequence += 1
        return _msgpack.encode(body)


def decode_envelope(body: bytes) -> tuple[int, int, list[Event]]:
    """A 1.6.1 event-plane message -> (publisher_id, sequence, events)."""
    try:
        env = _envelope_dec.decode(body)
        routers = _router_list_dec.decode(env.payload)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ConversionError(f"not a Dynamo event-plane message: {exc}") from None
    return env.publisher_id, env.sequence, [_from_router(r) for r in routers]
