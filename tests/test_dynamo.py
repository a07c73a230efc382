"""Dynamo's formats: tokens_hash test vectors, RouterEvent shapes, event ids, envelopes."""

from __future__ import annotations

import json

import msgspec
import pytest
import xxhash

from kvgraph.codecs.dynamo import (ConversionError, EnvelopeWriter, EventIds, decode_envelope,
                                   decode_router_json, encode_json, router_event,
                                   storage_tier, tokens_hash)
from kvgraph.event import Event


@pytest.mark.parametrize("tokens,bs,opts,want", [
    ([0, 1, 2, 3], 4, {}, [9143094415614847814]),
    (list(range(8)), 4, {}, [9143094415614847814, 12124091508212882195]),
    (list(range(9)), 4, {}, [9143094415614847814, 12124091508212882195]),
    (list(range(1, 9)), 4, {}, [14643705804678351452, 16777012769546811212]),
    ([0, 1, 2, 3], 4, {"lora_name": "adapter-a"}, [6665157333201000639]),
    ([0, 1, 2, 3], 4, {"cache_namespace": "tenant-a"}, [17009624042690211646]),
    ([0, 1, 2, 3], 4, {"lora_name": "", "cache_namespace": ""}, [9143094415614847814]),
])
def test_tokens_hash_vectors(tokens, bs, opts, want) -> None:
    assert tokens_hash(tokens, bs, **opts) == want


def test_xxh3_seed_vector() -> None:
    assert xxhash.xxh3_64_intdigest(b"test data", 1337) == 13226331709069118873


def stored(**kw) -> Event:
    base = dict(kind="stored", worker_id=7, dp_rank=0, block_hashes=[111],
                token_ids=[0, 1, 2, 3], block_size=4)
    return Event(**{**base, **kw})


def test_router_event_shape_matches_the_spec() -> None:
    r = msgspec.to_builtins(router_event(stored(), 1, 4))
    assert r == {"worker_id": 7, "storage_tier": "device", "residency_domain": "worker",
                 "event": {"event_id": 1, "data": {"stored": {
                     "parent_hash": None, "start_position": None,
                     "blocks": [{"block_hash": 111, "tokens_hash": 9143094415614847814,
                                 "mm_extra_info": None}]}}, "dp_rank": 0}}
    legacy = msgspec.to_builtins(router_event(stored(), 1, 4, full=False))
    assert legacy == {"worker_id": 7, "event": {"event_id": 1, "data": {"stored": {
        "parent_hash": None, "blocks": [{"block_hash": 111,
                                         "tokens_hash": 9143094415614847814}]}}}}
    removed = msgspec.to_builtins(router_event(
        Event(kind="removed", worker_id=7, dp_rank=2, block_hashes=[2**64 - 1]), 5, 4))
    assert removed["event"] == {"event_id": 5, "data": {"removed": {"block_hashes": [2**64 - 1]}},
                                "dp_rank": 2}
    assert router_event(Event(kind="cleared", worker_id=7, dp_rank=0), 6, 4).event.data \
        == "cleared"


def test_big_hashes_survive_json_exactly() -> None:
    e = stored(block_hashes=[2**64 - 1], parent_hash=2**63 + 1)
    body = encode_json(router_event(e, 1, 4))
    assert b"18446744073709551615" in body and b"9223372036854775809" in body
    assert json.loads(body)["event"]["data"]["stored"]["blocks"][0]["block_hash"] == 2**64 - 1
    assert decode_router_json(body).block_hashes == [2**64 - 1]


@pytest.mark.parametrize("medium,tier", [(None, "device"), ("GPU", "device"),
                                         ("CPU", "host_pinned"), ("CPU_PINNED", "host_pinned"),
                                         ("DISK", "disk"), ("STORAGE", "disk"),
                                         ("SHARED", "external")])
def test_storage_tiers(medium, tier) -> None:
    assert storage_tier(medium) == tier


def test_event_ids_are_contiguous_per_worker_and_rank() -> None:
    ids = EventIds()
    assert [ids.next(1, 0), ids.next(1, 0), ids.next(1, 1), ids.next(2, 0), ids.next(1, 0)] == \
        [1, 2, 1, 1, 3]


@pytest.mark.parametrize("event,match", [
    (stored(block_size=16), "block_size 16 differs"),
    (stored(token_ids=[1, 2, 3]), "3 token ids for 1 block.*no complete block"),
    (stored(token_ids=[], medium="CPU"), "offload events carry no tokens"),
])
def test_unconvertible_events_say_why(event, match) -> None:
    with pytest.raises(ConversionError, match=match):
        router_event(event, 1, 4)


def test_envelope_round_trip() -> None:
    w = EnvelopeWriter(publisher_id=42)
    routers = [router_event(stored(), i + 1, 4) for i in range(3)]
    first, second = w.encode(routers, 1000), w.encode(routers[:1], 1001)
    env = msgspec.msgpack.decode(first)
    assert set(env) == {"publisher_id", "sequence", "published_at", "topic", "payload"}
    assert env["topic"] == "kv-events" and env["sequence"] == 0 and env["published_at"] == 1000
    assert msgspec.msgpack.decode(second)["sequence"] == 1
    pid, seq, events = decode_envelope(first)
    assert (pid, seq, len(events)) == (42, 0, 3)
    assert events[0].tokens_hashes == [9143094415614847814]


SPEC_LITERAL = ('{"worker_id": 7, "storage_tier": "device", "residency_domain": "worker", '
                '"event": {"event_id": 1, "data": {"stored": {"parent_hash": null, '
                '"start_position": null, "blocks": [{"block_hash": 111, '
                '"tokens_hash": 9143094415614847814, "mm_extra_info": null}]}}, "dp_rank": 0}}')


def test_router_event_json_is_byte_identical_to_the_spec_literal() -> None:
    compact = json.dumps(json.loads(SPEC_LITERAL), separators=(",", ":")).encode()
    assert encode_json(router_event(stored(), 1, 4)) == compact


def test_envelope_bytes() -> None:
    """The 1.6.1 envelope, byte by byte: a msgpack map of five keys in the spec's order, the
    payload a msgpack bin holding a list of RouterEvent maps with named fields."""
    routers = [router_event(stored(), 1, 4)]
    body = EnvelopeWriter(publisher_id=5).encode(routers, 1_700_000_000_000)

    def s(text: str) -> bytes:  # fixstr
        return bytes([0xA0 | len(text)]) + text.encode()

    payload = msgspec.msgpack.encode(routers)
    assert payload[:1] == b"\x91" and payload[1:2] == b"\x84"  # list of 1, map of 4 keys
    assert s("worker_id") in payload and s("storage_tier") in payload
    expected = (b"\x85" + s("publisher_id") + b"\x05" + s("sequence") + b"\x00"
                + s("published_at") + b"\xcf" + (1_700_000_000_000).to_bytes(8, "big")
                + s("topic") + s("kv-events")
                + s("payload") + b"\xc4" + bytes([len(payload)]) + payload)
    assert body == expected
