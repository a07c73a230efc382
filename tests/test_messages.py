"""The bus message formats shared by the nats, redis and kafka nodes: grouping by key and cutting
at origin boundaries give the same messages whether a batch is one engine's (the fast path) or
mixed, with error records among the events."""

from __future__ import annotations

from types import SimpleNamespace

from kvgraph.codecs.messages import MessageEncoder, runs_by_origin
from kvgraph.event import Event, Rejected
from kvgraph.metrics import NodeMetrics


def ev(worker: int, seq: int | None, h: int) -> Event:
    return Event(kind="stored", worker_id=worker, dp_rank=0, seq=seq, ts=1.0,
                 block_hashes=[h])


def bad(reason: str) -> Rejected:
    return Rejected(node="x", reason=reason)


def encoder(key_of=None) -> MessageEncoder:
    node = SimpleNamespace(metrics=NodeMetrics("n", "t", "sink"), ctx=None)
    return MessageEncoder(node, "jsonl", block_size=16, storage_tier=True,
                          events_per_message=128, max_bytes=lambda: 1 << 20, limit="",
                          hint="", key_of=key_of, fixed_key="k")


def test_runs_by_origin_one_engine_batch_and_mixed_batches() -> None:
    one = [ev(1, 7, h) for h in range(3)]
    assert runs_by_origin(one) == [((1, 0, 7, 1.0), one)]
    unseq = [ev(1, None, h) for h in range(2)]
    assert runs_by_origin(unseq) == [(None, unseq)]
    a, b, c = ev(1, 7, 0), ev(2, 7, 1), ev(1, 7, 2)
    assert [o for o, _ in runs_by_origin([a, b, c])] == [(1, 0, 7, 1.0), (2, 0, 7, 1.0),
                                                        (1, 0, 7, 1.0)]
    r = bad("oops")
    assert runs_by_origin([a, r, c]) == [((1, 0, 7, 1.0), [a]), (None, [r]),
                                          ((1, 0, 7, 1.0), [c])]


def test_messages_are_grouped_by_key_in_order_with_error_records_keyless() -> None:
    import operator

    enc = encoder(operator.attrgetter("worker_id"))
    batch = [ev(1, 1, 0), ev(2, 1, 1), ev(1, 1, 2), bad("oops")]
    messages, rejected = enc.encode(batch)
    assert rejected == []
    assert [(k, n) for k, _, n in messages] == [(1, 2), (2, 1), (None, 1)]
    same = [ev(3, 1, h) for h in range(5)]
    assert [(k, n) for k, _, n in enc.encode(same)[0]] == [(3, 5)]
    assert [(k, n) for k, _, n in encoder().encode(batch)[0]] == [("k", 4)]
