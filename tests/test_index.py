"""The prefix index: one test per rule of the router's semantics, its HTTP and Python APIs, and
property tests that dedup and batch leave the index state as the spec says."""

from __future__ import annotations

import asyncio
import json
import random
import urllib.error
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvgraph.codecs.dynamo import tokens_hash
from kvgraph.event import Event
from kvgraph.prefix_index import IndexError_, PrefixIndex
from kvgraph.testing import FEEDS, capture, run_text, wait_for

W0, W1 = (1, 0), (2, 0)


def chain(idx: PrefixIndex, w, parent, hashes, keys=None) -> None:
    idx.store(w, parent, hashes, keys or [h + 1000 for h in hashes])


# -- semantics, one rule each ------------------------------------------------------------------

def test_stored_with_unknown_parent_is_rejected_whole() -> None:
    idx = PrefixIndex()
    with pytest.raises(IndexError_, match="parent 99 is unknown"):
        chain(idx, W0, 99, [1, 2])
    assert idx.blocks == 0 and idx.nodes == 0


def test_parent_must_be_known_for_the_same_worker_and_rank() -> None:
    idx = PrefixIndex()
    chain(idx, W0, None, [1])
    with pytest.raises(IndexError_):
        chain(idx, W1, 1, [2])
    with pytest.raises(IndexError_):
        chain(idx, (1, 1), 1, [2])  # same worker, other DP rank
    chain(idx, W0, 1, [2])
    assert idx.held(W0) == {1: 1001, 2: 1002}


def test_a_parent_among_the_events_own_blocks_is_refused() -> None:
    idx = PrefixIndex()
    chain(idx, W0, None, [1])
    with pytest.raises(IndexError_, match="one of the event's own blocks"):
        chain(idx, W0, 2, [2, 3])


def test_a_remove_takes_the_rest_of_the_blocks_stored_with_it() -> None:
    """As in Dynamo: a chain stored by one worker is one edge; removing a block of it takes
    the blocks after it (their names too), and storing it again does not bring them back."""
    idx = PrefixIndex()
    chain(idx, W0, None, [1, 2, 3])
    assert idx.remove(W0, [2]) == 0
    assert idx.held(W0) == {1: 1001}
    chain(idx, W0, 1, [2])
    assert [s.matched_blocks for s in idx.query_hashes([1001, 1002, 1003])] == [2]


def test_unknown_removes_are_skipped_and_reported() -> None:
    idx = PrefixIndex()
    chain(idx, W0, None, [1])
    assert idx.remove(W0, [1, 7, 8]) == 2
    assert idx.remove((9, 0), [1]) == 1
    assert idx.blocks == 0 and idx.nodes == 0  # pruned


def test_cleared_is_per_worker_and_rank() -> None:
    idx = PrefixIndex()
    chain(idx, W0, None, [1, 2])
    chain(idx, (1, 1), None, [1, 2])
    chain(idx, W1, None, [1])
    assert idx.clear(W0) == 2
    assert idx.held(W0) == {} and len(idx.held((1, 1))) == 2 and len(idx.held(W1)) == 1


def test_query_scores_leading_blocks_per_worker() -> None:
    idx = PrefixIndex()
    chain(idx, W0, None, [1, 2, 3])
    chain(idx, W1, None, [1, 2])
    chain(idx, (3, 0), None, [5])
    scores = idx.query_hashes([1001, 1002, 1003, 1004])
    assert [(s.worker_id, s.matched_blocks) for s in scores] == [(1, 3), (2, 2)]


def test_dump_rebuilds_the_same_state() -> None:
    rng = random.Random(3)
    idx = PrefixIndex()
    for w in (W0, W1, (3, 1)):
        parent = None
        for i in range(30):
            h = rng.randrange(1 << 64)
            chain(idx, w, parent, [h], [h % 97])
            parent = h
        idx.remove(w, [h for h in list(idx.held(w))[::4]])
    rebuilt = PrefixIndex()
    for w, kind, data in idx.dump():
        if kind == "stored":
            rebuilt.store(w, data["parent_hash"], data["block_hashes"], data["tokens_hashes"])
        else:
            rebuilt.remove(w, data["block_hashes"])
    for w in (W0, W1, (3, 1)):
        assert rebuilt.held(w) == idx.held(w)
    assert rebuilt.nodes == idx.nodes


# -- the index sink: HTTP and Python APIs --------------------------------------------------------

INDEX_GRAPH = """
[graph]
name = "index"
[nodes.src]
type = "feed"
feed = "{feed}"
[nodes.idx]
type = "index"
port = 0
block_size = 4
max_body_bytes = 4096
[nodes.dead]
type = "capture"
[[edges]]
from = "src"
to = "idx"
[[edges]]
from = "idx.errors"
to = "dead"
"""


def stored(w, tokens, hashes, parent=None, dp_rank=0, **kw) -> Event:
    return Event(kind="stored", worker_id=w, dp_rank=dp_rank, block_hashes=hashes,
                 parent_hash=parent, token_ids=tokens, block_size=4, **kw)


def http(port: int, method: str, path: str, body: bytes | None = None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_the_index_sink_scores_the_device_tier_of_the_main_group_as_dynamo_does() -> None:
    """Issue 13: a CPU copy is not a GPU hit and its removal leaves the GPU block; a
    sliding-window group (group_idx 1) is not indexed; a store whose tokens run out keeps its
    complete blocks, as Dynamo's relay does."""
    FEEDS["tiers"] = [[
        stored(1, list(range(8)), [10, 11]),
        stored(2, list(range(8)), [20, 21], medium="CPU"),
        stored(3, list(range(8)), [30, 31], group_idx=1),
        Event(kind="removed", worker_id=1, dp_rank=0, block_hashes=[11], medium="CPU"),
        stored(4, list(range(6)), [40, 41]),     # 1.5 blocks of 4
    ]]

    async def go():
        async with run_text(INDEX_GRAPH.format(feed="tiers")) as rt:
            node = rt.nodes["idx"]
            await wait_for(lambda: rt.contexts["idx"].metrics.events_in == 5)
            return node.query(list(range(8))), rt.contexts["idx"].metrics.extra

    answer, extra = asyncio.run(go())
    assert [(s["worker_id"], s["matched_blocks"]) for s in answer["scores"]] == [(1, 2), (4, 1)]
    assert extra["not_indexed"] == 3 and extra["blocks_without_tokens"] == 1


def test_index_sink_answers_queries_over_http_and_python() -> None:
    FEEDS["idx"] = [[
        stored(1, list(range(12)), [10, 11, 12]),
        stored(2, list(range(8)), [10, 11]),
        stored(3, list(range(4)), [10], lora_name="a"),
        stored(4, list(range(4)), [10], parent=999),           # unknown parent: rejected
        Event(kind="removed", worker_id=1, dp_rank=0, block_hashes=[77]),  # unknown: counted
    ]]

    async def go():
        async with run_text(INDEX_GRAPH.format(feed="idx")) as rt:
            node = rt.nodes["idx"]
            await wait_for(lambda: rt.contexts["idx"].metrics.events_in == 5)
            port = node.port
            q = json.dumps({"token_ids": list(range(16))}).encode()
            results = {
                "query": await asyncio.to_thread(http, port, "POST", "/query", q),
                "lora": await asyncio.to_thread(http, port, "POST", "/query", json.dumps(
                    {"token_ids": list(range(4)), "lora_name": "a"}).encode()),
                "by_hash": await asyncio.to_thread(http, port, "POST", "/query_by_hash",
                                                   json.dumps({"block_hashes": tokens_hash(
                                                       list(range(8)), 4)}).encode()),
                "workers": await asyncio.to_thread(http, port, "GET", "/workers"),
                "dump": await asyncio.to_thread(http, port, "GET", "/dump"),
                "bad_json": await asyncio.to_thread(http, port, "POST", "/query", b"{nope"),
                "wrong_type": await asyncio.to_thread(http, port, "POST", "/query",
                                                      b'{"token_ids": ["a"]}'),
                "not_object": await asyncio.to_thread(http, port, "POST", "/query", b"[1]"),
                "huge": await asyncio.to_thread(http, port, "POST", "/query", b"x" * 10000),
                "missing": await asyncio.to_thread(http, port, "GET", "/nope"),
                "method": await asyncio.to_thread(http, port, "GET", "/query"),
            }
            py = node.query(list(range(16)))
        return results, py, rt

    r, py, rt = asyncio.run(go())
    status, body = r["query"]
    data = json.loads(body)
    assert status == 200 and data == py
    assert [(s["worker_id"], s["matched_blocks"]) for s in data["scores"]] == [(1, 3), (2, 2)]
    assert data["query_blocks"] == 4 and data["tree_size"] == 4 and data["blocks"] == 6
    assert [s["worker_id"] for s in json.loads(r["lora"][1])["scores"]] == [3]
    assert [(s["worker_id"], s["matched_blocks"])
            for s in json.loads(r["by_hash"][1])["scores"]] == [(1, 2), (2, 2)]
    assert json.loads(r["workers"][1]) == [{"worker_id": 1, "dp_rank": 0, "blocks": 3},
                                           {"worker_id": 2, "dp_rank": 0, "blocks": 2},
                                           {"worker_id": 3, "dp_rank": 0, "blocks": 1}]
    dump = [json.loads(line) for line in r["dump"][1].splitlines()]
    assert {d["worker_id"] for d in dump} == {1, 2, 3}
    for key, status in (("bad_json", 400), ("wrong_type", 422), ("not_object", 422),
                        ("huge", 413), ("missing", 404), ("method", 405)):
        assert r[key][0] == status, key
        assert "error" in json.loads(r[key][1])
    m = rt.result().metrics["idx"]
    assert m["unknown_removes"] == 1 and m["errors"] == 1
    assert "parent 999 is unknown" in capture("dead")[0].reason


# -- properties: dedup and batch in front of the index ---------------------------------------------

@st.composite
def streams(draw):
    """Random but engine-like streams: chains stored on known parents, duplicate stores,
    removes of stored (and unknown) hashes, clears; 3 workers, 2 DP ranks. As with a real
    engine, a store's parent is a block the worker still holds (a removed hash is no longer
    chosen as a parent: see test_batch_on_an_unknown_parent for the other case), and a block
    hash names its content: it is computed from the parent's hash and the block's tokens, drawn
    from a few contents so that the same blocks are stored again."""
    rng = random.Random(draw(st.integers(0, 2**32)))
    n = draw(st.integers(1, 120))
    contents = [[rng.randrange(100) for _ in range(4)] for _ in range(5)]
    held: dict[tuple[int, int], list[int]] = {}
    events = []
    for _ in range(n):
        w = (rng.randrange(3), rng.randrange(2))
        mine = held.setdefault(w, [])
        roll = rng.random()
        if roll < 0.55:
            parent = rng.choice(mine) if mine and rng.random() < 0.7 else None
            picked = [rng.randrange(len(contents)) for _ in range(rng.randint(1, 3))]
            hashes, prev = [], parent or 0
            for c in picked:
                prev = (hash((prev, c)) & 0xFFFFFF) + 1
                hashes.append(prev)
            if len(set(hashes)) < len(hashes) or parent in hashes:
                continue
            events.append(stored(w[0], [t for c in picked for t in contents[c]], hashes,
                                 parent=parent, dp_rank=w[1]))
            mine.extend(hashes)
        elif roll < 0.9:
            pool = mine + [rng.randrange(40, 50)]
            gone = rng.choice(pool)
            events.append(Event(kind="removed", worker_id=w[0], dp_rank=w[1],
                                block_hashes=[gone]))
            mine[:] = [h for h in mine if h != gone]
        else:
            events.append(Event(kind="cleared", worker_id=w[0], dp_rank=w[1]))
            mine.clear()
    cut = sorted(rng.sample(range(len(events) + 1), min(4, len(events) + 1)))
    return [events[a:b] for a, b in zip([0, *cut], [*cut, len(events)]) if events[a:b]]


def apply(idx: PrefixIndex, events) -> None:
    for e in events:
        w = (e.worker_id, e.dp_rank)
        try:
            if e.kind == "stored":
                idx.store(w, e.parent_hash, e.block_hashes, tokens_hash(e.token_ids, 4))
            elif e.kind == "removed":
                idx.remove(w, e.block_hashes)
            else:
                idx.clear(w)
        except IndexError_:
            pass


def state(idx: PrefixIndex):
    return {w: idx.held(w) for w in [(a, b) for a in range(3) for b in range(2)]}


def through(transforms: str, batches) -> list[Event]:
    """Run the batches through `feed -> transforms... -> capture` in a real runtime."""
    FEEDS["prop"] = batches
    nodes = ['[nodes.src]\ntype = "feed"\nfeed = "prop"\n', '[nodes.out]\ntype = "capture"\n']
    chain_ids = ["src"]
    for i, t in enumerate(transforms.split()):
        nodes.append(f'[nodes.t{i}]\ntype = "{t}"\n' + ("max_delay_ms = 0\n" if t == "batch"
                                                        else ""))
        chain_ids.append(f"t{i}")
    chain_ids.append("out")
    edges = "".join(f'[[edges]]\nfrom = "{a}"\nto = "{b}"\n'
                    for a, b in zip(chain_ids, chain_ids[1:]))

    async def go():
        async with run_text('[graph]\nname = "p"\n' + "".join(nodes) + edges):
            pass

    asyncio.run(go())
    return capture("out")


class RefCounted:
    """The reference model of dedup: per (worker, rank) counts; a remove reaches the index only
    when the count of that hash reaches zero (or the hash was never stored)."""

    def __init__(self) -> None:
        self.idx = PrefixIndex()
        self.counts: dict[tuple[int, int], dict[int, int]] = {}

    def feed(self, events) -> None:
        for e in events:
            w = (e.worker_id, e.dp_rank)
            counts = self.counts.setdefault(w, {})
            if e.kind == "stored":
                for h in e.block_hashes:
                    counts[h] = counts.get(h, 0) + 1
                apply(self.idx, [e])
            elif e.kind == "removed":
                passing = []
                for h in e.block_hashes:
                    c = counts.get(h, 0)
                    if c <= 1:
                        counts.pop(h, None)
                        passing.append(h)
                    else:
                        counts[h] = c - 1
                self.idx.remove(w, passing)
            else:
                counts.clear()
                self.idx.clear(w)


SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(streams())
def test_batch_leaves_the_index_state_unchanged(batches) -> None:
    direct = PrefixIndex()
    apply(direct, [e for b in batches for e in b])
    merged = through("batch", batches)
    via = PrefixIndex()
    apply(via, merged)
    assert state(via) == state(direct)
    assert len(merged) <= sum(map(len, batches))


@SETTINGS
@given(streams())
def test_dedup_then_batch_equals_the_reference_counted_model(batches) -> None:
    model = RefCounted()
    model.feed([e for b in batches for e in b])
    via = PrefixIndex()
    apply(via, through("dedup batch", batches))
    assert state(via) == state(model.idx)


def test_batch_on_an_unknown_parent() -> None:
    """The one case where merging changes the index state, as the batch node documents: a
    store on a parent the index does not know (a stream error, e.g. after an unrepaired gap)
    is rejected, and a merged run is rejected with it, including a continuation that alone
    would have been accepted because its parent block was already held."""
    batches = [[stored(0, [1] * 4, [5]),                  # 5 held
                Event(kind="removed", worker_id=0, dp_rank=0, block_hashes=[7]),
                stored(0, [2] * 4, [5], parent=7),        # parent 7 unknown: rejected
                stored(0, [3] * 4, [8], parent=5)]]       # alone: accepted (5 is held)
    direct, via = PrefixIndex(), PrefixIndex()
    apply(direct, [e for b in batches for e in b])
    apply(via, through("batch", batches))
    assert direct.held((0, 0)) != via.held((0, 0))
    assert 8 in direct.held((0, 0)) and 8 not in via.held((0, 0))


def test_what_clients_can_make_the_http_server_hold_is_bounded(monkeypatch) -> None:
    """Issue 11: a 1M-token query held the relay for 165 ms, clients that never read a big
    answer grew memory by gigabytes, partial bodies were held for 30 s. Now: a query over
    max_query_tokens is a 413; bodies in flight share a budget (503 past it); so do answers
    waiting for their clients (503 past it); an answer a client does not read is dropped after
    WRITE_TIMEOUT_S."""
    import socket

    from kvgraph import http as server

    monkeypatch.setattr(server, "WRITE_TIMEOUT_S", 2.0)
    monkeypatch.setattr(server, "BODY_BUDGET", 3000)
    monkeypatch.setattr(server, "ANSWER_BUDGET", 3000)
    blocks = 20_000   # a /dump of about 10 MB: more than the sockets' buffers can take
    FEEDS["bounds"] = [[stored(w, list(range(4 * blocks)),
                               list(range(w * 10**6, w * 10**6 + blocks))) for w in range(1, 9)]]
    graph = INDEX_GRAPH.format(feed="bounds").replace(
        "max_body_bytes = 4096", "max_body_bytes = 4096\nmax_query_tokens = 64")

    def connect(request: bytes) -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", port))
        s.sendall(request)
        return s

    async def go():
        nonlocal port
        async with run_text(graph) as rt:
            port = rt.nodes["idx"].port
            stats = rt.contexts["idx"].metrics.extra
            await wait_for(lambda: rt.contexts["idx"].metrics.events_in == 8)
            too_long = await asyncio.to_thread(http, port, "POST", "/query", json.dumps(
                {"token_ids": list(range(65))}).encode())
            held = connect(b"POST /query HTTP/1.1\r\nContent-Length: 2500\r\n\r\n{")
            await wait_for(lambda: stats["http_body_bytes"] == 2500)
            over_budget = await asyncio.to_thread(http, port, "POST", "/query", json.dumps(
                {"token_ids": list(range(4))}).encode().ljust(1000))
            unread = connect(b"GET /dump HTTP/1.1\r\n\r\n")   # and never read
            await wait_for(lambda: stats["http_answer_bytes"] > 3000)
            second_dump = await asyncio.to_thread(http, port, "GET", "/dump")
            await wait_for(lambda: stats["http_slow_clients_dropped"] == 1, timeout=10)
            assert stats["http_answer_bytes"] == 0 and stats["http_answers_refused"] == 1
            held.close()
            unread.close()
        return too_long, over_budget, second_dump

    port = 0
    too_long, over_budget, second_dump = asyncio.run(go())
    assert second_dump[0] == 503 and b"waiting for their clients" in second_dump[1]
    assert too_long[0] == 413 and b"max_query_tokens" in too_long[1]
    assert over_budget[0] == 503
