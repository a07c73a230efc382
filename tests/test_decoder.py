"""The vLLM wire decoder against the real captured bytes of every fixture version."""

from __future__ import annotations

import json

import msgspec
import pytest

from kvgraph.codecs.vllm import (SEQ_END, DecodeError, decode_payload, encode_payload,
                                 parse_seq, split_frames)
from kvgraph.event import Event, normalize_hash, normalize_hashes

from .helpers import (assert_event_matches, expected_batches, fixture_dirs, fixture_id,
                      read_frames)

DIRS = fixture_dirs()


def test_all_ten_versions_are_here() -> None:
    assert len({d.name for d in DIRS if d.name.startswith("vllm-")}) == 10


@pytest.mark.parametrize("d", DIRS, ids=fixture_id)
def test_fixture_decodes_to_expected(d) -> None:
    meta = json.loads((d / "meta.json").read_text())
    frames = read_frames(d / "live.jsonl")
    expected = expected_batches(d)
    assert len(frames) == len(expected) == meta["num_batches"]
    for n, (msg, want) in enumerate(zip(frames, expected)):
        topic, seq, payload = split_frames(msg)
        assert topic == meta["topic"].encode() and seq == n == want["seq"]
        ts, dp_rank, events = decode_payload(payload, worker_id=7, seq=seq)
        assert ts == want["ts"] and dp_rank == want["dp_rank"]
        assert len(events) == len(want["events"])
        for i, (e, w) in enumerate(zip(events, want["events"])):
            assert e.worker_id == 7 and e.seq == n and e.ts == ts
            assert_event_matches(msgspec.to_builtins(e), w, f"{d.name} batch {n} event {i}")


@pytest.mark.parametrize("d", DIRS, ids=fixture_id)
def test_replay_replies_match_live_payloads(d) -> None:
    meta = json.loads((d / "meta.json").read_text())
    live = {split_frames(f)[1]: f[2] for f in read_frames(d / "live.jsonl")}
    replies = read_frames(d / "replay.jsonl")
    *body, end = [r[1:] for r in replies]  # drop the DEALER's empty delimiter
    if meta["replay_reply_has_topic"]:
        body = [r[1:] for r in body]
        end = end[1:]
    seqs = [parse_seq(r[0]) for r in body]
    assert seqs == list(range(meta["replay_from_seq"], len(live)))
    for r in body:
        assert r[1] == live[parse_seq(r[0])]
        decode_payload(r[1])
    assert parse_seq(end[0]) == SEQ_END and end[1] == b""


def test_hashes_normalise_to_unsigned_64_bit() -> None:
    assert normalize_hash(-5) == 2**64 - 5
    assert normalize_hash(-(2**63)) == 2**63
    assert normalize_hash(2**64 - 1) == 2**64 - 1
    assert normalize_hash(bytes(24) + (258).to_bytes(8, "big")) == 258
    assert normalize_hashes([1, -1, b"\x00" * 31 + b"\x07"]) == [1, 2**64 - 1, 7]


def test_signed_hashes_as_old_vllm_sglang_and_trtllm_send_them() -> None:
    payload = msgspec.msgpack.encode(
        [1.5, [["BlockStored", [-1, -(2**63), 5], -2, list(range(48)), 16, None]], 0])
    _, _, (e,) = decode_payload(payload)
    assert e.block_hashes == [2**64 - 1, 2**63, 5] and e.parent_hash == 2**64 - 2


def test_mixed_encodings_in_one_batch() -> None:
    payload = msgspec.msgpack.encode([2.0, [
        ["BlockStored", [1], None, list(range(16)), 16, None],
        {"type": "BlockRemoved", "block_hashes": [1], "medium": "GPU", "future_field": 1},
        ["AllBlocksCleared"],
    ], 3])
    ts, rank, events = decode_payload(payload)
    assert [e.kind for e in events] == ["stored", "removed", "cleared"]
    assert rank == 3 and all(e.dp_rank == 3 for e in events)


def test_extra_trailing_array_fields_are_ignored() -> None:
    fields = [[1], None, list(range(16)), 16, None, "GPU", None, None, 0, None, None, None, None,
              None, None, "a-field-from-the-future", 42]
    _, _, (e,) = decode_payload(msgspec.msgpack.encode([0.0, [["BlockStored", *fields]], 0]))
    assert e.block_hashes == [1] and e.medium == "GPU"


@pytest.mark.parametrize("payload,match", [
    (b"\xc1garbage", "payload"),
    (msgspec.msgpack.encode([1.0, [["BlockExploded", [1]]], 0]), "event 0"),
    (msgspec.msgpack.encode([1.0, [["BlockStored", "not-a-list"]], 0]), "event 0"),
    (msgspec.msgpack.encode([1.0, [{"type": "BlockRemoved", "block_hashes": [1.5]}], 0]),
     "event 0"),
    (msgspec.msgpack.encode({"ts": 1.0}), "payload"),
    (msgspec.msgpack.encode([1.0, [["BlockStored", [1], None, ["x"], 16]], 0]), "event 0"),
])
def test_malformed_payloads_raise_decode_error(payload: bytes, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        decode_payload(payload)


@pytest.mark.parametrize("frames,match", [
    ([b"topic", b"\x00" * 8], "2 frame"),
    ([b"topic", b"\x00" * 4, b"x"], "4 bytes"),
    ([b"a", b"b", b"c", b"d"], "4 frame"),
])
def test_malformed_frames(frames: list[bytes], match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        split_frames(frames)


@pytest.mark.parametrize("encoding", ["map", "array"])
def test_encode_then_decode_round_trips(encoding: str) -> None:
    events = [
        Event(kind="stored", worker_id=0, dp_rank=1, block_hashes=[2**64 - 1, 5],
              parent_hash=2**63, token_ids=list(range(32)), block_size=16, medium="GPU",
              lora_name="sql", group_idx=0),
        Event(kind="removed", worker_id=0, dp_rank=1, block_hashes=[5], medium="CPU"),
        Event(kind="cleared", worker_id=0, dp_rank=1),
    ]
    _, rank, back = decode_payload(encode_payload(events, 3.25, 1, encoding))
    assert rank == 1
    assert [msgspec.structs.replace(e, ts=None) for e in back] == events
