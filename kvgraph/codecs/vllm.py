"""vLLM's KV-event wire format (also SGLang's and TensorRT-LLM's): ``[topic, seq, payload]``.

The payload is a msgpack batch ``[ts, events, dp_rank]`` (``[ts, events]`` in vLLM 0.9.0). Each
event is a tagged union in one of two encodings, which may even be mixed in one stream:

* tagged arrays (vLLM <= 0.23): ``["BlockStored", f1, f2, ...]``, fields by position; arrays
  grow as versions add fields, so missing trailing fields are None and extra ones are ignored;
* tagged maps (vLLM >= 0.24): ``{"type": "BlockStored", ...}``, fields equal to their default
  omitted, unknown keys ignored.

Decoding uses msgspec typed structs: a homogeneous batch (the normal case) is decoded by one C
call, and wrong field types, unknown tags and bad msgpack all surface as one ``DecodeError``
with msgspec's precise location. Mixed batches fall back to per-event dispatch on the first
byte. The reference is vLLM's own ``vllm/distributed/kv_events.py``; ``tests/fixtures`` holds
what it sends, per version.
"""

from __future__ import annotations

from typing import Annotated, Any, Optional, Union

import msgspec

from ..event import CLEARED, REMOVED, STORED, Event, normalize_hash, normalize_hashes

Hash = Union[int, bytes]
SEQ_END = 0xFFFFFFFFFFFFFFFF  # the replay end marker's seq


class DecodeError(ValueError):
    """A message that cannot be decoded; the reason names the frame and the field."""


# -- the wire structs (one set per encoding; field order is wire order) ------------------------
#
# Each encoding has a fast decoder and a general one, tried only when the fast one fails. The
# fast one takes what engines send almost always: token ids that are plain ints (not SGLang
# EAGLE's pairs) and hashes that are non-negative ints (not bytes, nor negative). It is a fifth
# faster, and its hashes need no normalising afterwards.

_U64 = Annotated[int, msgspec.Meta(ge=0)]


def _stored_fields(tokens: Any, hash_t: Any = Hash) -> list[tuple[Any, ...]]:
    return [
        ("block_hashes", list[hash_t]),  # type: ignore[valid-type]
        ("parent_block_hash", Optional[hash_t], None),
        ("token_ids", tokens, []),
        ("block_size", Optional[int], None),
        ("lora_id", Optional[int], None),
        ("medium", Optional[str], None),
        ("lora_name", Optional[str], None),
        ("extra_keys", Optional[list[Any]], None),
        ("group_idx", Optional[int], None),
        ("kv_cache_spec_kind", Optional[str], None),
        ("kv_cache_spec_sliding_window", Optional[int], None),
        ("locality", Optional[str], None),
        ("ownership", Optional[str], None),
        ("session_id", Optional[str], None),
        ("lookahead_token_ids", Optional[list[list[int]]], None),
        ("cache_salt", Optional[str], None),   # salts tokens_hash (Dynamo's cache namespace)
    ]


def _removed_fields(hash_t: Any = Hash) -> list[tuple[Any, ...]]:
    return [
        ("block_hashes", list[hash_t]),  # type: ignore[valid-type]
        ("medium", Optional[str], None),
        ("group_idx", Optional[int], None),
        ("locality", Optional[str], None),
        ("ownership", Optional[str], None),
    ]


def _encoding(array: bool, general: bool) -> tuple[type, type, type]:
    """The (stored, removed, cleared) structs of one encoding: tagged arrays or tagged maps."""
    kw: dict[str, Any] = {"array_like": True} if array else {"tag_field": "type"}
    tokens, hash_t = (_PAIRS, Hash) if general else (list[int], _U64)
    return (msgspec.defstruct("BlockStored", _stored_fields(tokens, hash_t), tag="BlockStored",
                              **kw),
            msgspec.defstruct("BlockRemoved", _removed_fields(hash_t), tag="BlockRemoved", **kw),
            msgspec.defstruct("AllBlocksCleared", [], tag="AllBlocksCleared", **kw))


_PAIRS = list[Union[int, list[int]]]
_ENCODINGS = {(array, general): _encoding(array, general)
              for array in (False, True) for general in (False, True)}
_STORED_TYPES = frozenset(t[0] for t in _ENCODINGS.values())
_REMOVED_TYPES = frozenset(t[1] for t in _ENCODINGS.values())
_NORMALISED = frozenset(t for key, ts in _ENCODINGS.items() if not key[1] for t in ts)


def _batch(events: Any) -> msgspec.Struct:
    return msgspec.defstruct("Batch", [("ts", float), ("events", list[events]),
                                       ("data_parallel_rank", Optional[int], None)],
                             array_like=True)


_BatchRaw = _batch(msgspec.Raw)
# Most common first (vLLM >= 0.24 writes maps); the one that worked last moves to the front.
_typed = [msgspec.msgpack.Decoder(_batch(Union[_ENCODINGS[key]]))
          for key in ((False, False), (True, False), (False, True), (True, True))]
_dec_raw = msgspec.msgpack.Decoder(_BatchRaw)
_dec_event_m = msgspec.msgpack.Decoder(Union[_ENCODINGS[False, True]])
_dec_event_a = msgspec.msgpack.Decoder(Union[_ENCODINGS[True, True]])

_OPTIONAL_STORED = ("lora_id", "lora_name", "extra_keys", "group_idx", "kv_cache_spec_kind",
                    "kv_cache_spec_sliding_window", "locality", "ownership", "session_id",
                    "lookahead_token_ids", "cache_salt")


def _decode_batch(payload: bytes) -> Any:
    for i, dec in enumerate(_typed):
        try:
            batch = dec.decode(payload)
        except (msgspec.DecodeError, UnicodeDecodeError):
            continue
        if i:
            _typed.insert(0, _typed.pop(i))
        return batch
    # Mixed encodings, or malformed: decode event by event for a precise reason.
    try:
        raw = _dec_raw.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise DecodeError(f"payload: {exc}") from None
    events = []
    for i, r in enumerate(raw.events):
        first = memoryview(r)[0] if len(r) else 0
        is_map = 0x80 <= first <= 0x8F or first in (0xDE, 0xDF)
        try:
            events.append((_dec_event_m if is_map else _dec_event_a).decode(r))
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise DecodeError(f"payload: event {i}: {exc}") from None
    raw.events = events
    return raw


def dp_rank_of(payload: bytes) -> int | None:
    """The DP rank of a batch, without decoding its events (they are only scanned)."""
    try:
        return _dec_raw.decode(payload).data_parallel_rank
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise DecodeError(f"payload: {exc}") from None


def decode_payload(payload: bytes, worker_id: int = 0, seq: int | None = None
                   ) -> tuple[float, int | None, list[Event]]:
    """Decode one batch payload into events. Raises DecodeError on anything malformed."""
    b = _decode_batch(payload)
    dp_rank = b.data_parallel_rank
    rank = dp_rank or 0
    ts = b.ts
    out: list[Event] = []
    append = out.append
    for e in b.events:
        t = type(e)
        if t in _STORED_TYPES:
            parent = e.parent_block_hash
            if t in _NORMALISED:
                hashes = e.block_hashes
            else:
                hashes = normalize_hashes(e.block_hashes)
                parent = None if parent is None else normalize_hash(parent)
            ev = Event(kind=STORED, worker_id=worker_id, dp_rank=rank, seq=seq, ts=ts,
                       block_hashes=hashes, parent_hash=parent, token_ids=e.token_ids,
                       block_size=e.block_size, medium=e.medium)
            # Setting the optional fields only when some are present (rare) costs a fifth of
            # passing them all; one test of them all is cheaper still than a loop.
            if (e.lora_id is not None or e.lora_name is not None or e.extra_keys is not None
                    or e.group_idx is not None or e.kv_cache_spec_kind is not None
                    or e.kv_cache_spec_sliding_window is not None or e.locality is not None
                    or e.ownership is not None or e.session_id is not None
                    or e.lookahead_token_ids is not None or e.cache_salt is not None):
                for name in _OPTIONAL_STORED:
                    value = getattr(e, name)
                    if value is not None:
                        setattr(ev, name, value)
            append(ev)
        elif t in _REMOVED_TYPES:
            append(Event(kind=REMOVED, worker_id=worker_id, dp_rank=rank, seq=seq, ts=ts,
                         block_hashes=e.block_hashes if t in _NORMALISED
                         else normalize_hashes(e.block_hashes), medium=e.medium,
                         group_idx=e.group_idx, locality=e.locality, ownership=e.ownership))
        else:
            append(Event(kind=CLEARED, worker_id=worker_id, dp_rank=rank, seq=seq, ts=ts))
    return ts, dp_rank, out


def parse_seq(frame: bytes) -> int:
    if len(frame) != 8:
        raise DecodeError(f"seq frame is {len(frame)} bytes, expected 8 (big-endian uint64)")
    return int.from_bytes(frame, "big")


def split_frames(frames: list[bytes]) -> tuple[bytes, int, bytes]:
    """``[topic, seq, payload]`` -> its parts, or DecodeError naming what is wrong."""
    if len(frames) != 3:
        raise DecodeError(f"message has {len(frames)} frame(s), expected 3 "
                          "(topic, seq, payload)")
    topic, seq, payload = frames
    return topic, parse_seq(seq), payload


# -- encoding (the zmq sink and the synthetic source speak vLLM too) ---------------------------

_STORED_ARRAY_FIELDS = tuple(f[0] for f in _stored_fields(_PAIRS))
_REMOVED_ARRAY_FIELDS = tuple(f[0] for f in _removed_fields())
_encoder = msgspec.msgpack.Encoder()


def _wire_value(e: Event, name: str) -> Any:
    return e.parent_hash if name == "parent_block_hash" else getattr(e, name)


def event_to_wire(e: Event, encoding: str = "map") -> Any:
    """One event as vLLM would put it on the wire (``map`` as vLLM >= 0.24, or ``array``)."""
    if e.kind == STORED:
        tag, fields = "BlockStored", _STORED_ARRAY_FIELDS
    elif e.kind == REMOVED:
        tag, fields = "BlockRemoved", _REMOVED_ARRAY_FIELDS
    else:
        return ["AllBlocksCleared"] if encoding == "array" else {"type": "AllBlocksCleared"}
    if encoding == "array":
        return [tag, *(_wire_value(e, f) for f in fields)]
    out: dict[str, Any] = {"type": tag}
    for i, f in enumerate(fields):
        v = _wire_value(e, f)
        if v is not None or i < (7 if tag == "BlockStored" else 2):  # vLLM's required fields
            out[f] = v
    return out


def encode_payload(events: list[Event], ts: float, dp_rank: int | None = 0,
                   encoding: str = "map") -> bytes:
    body: list[Any] = [ts, [event_to_wire(e, encoding) for e in events]]
    if dp_rank is not None:
        body.append(dp_rank)
    return _encoder.encode(body)
