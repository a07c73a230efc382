"""The prefix index: one test per rule of the router's semantics, its HTTP and Python APIs, and
property tests that dedup and batch leave the index state as the spec says."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvgraph.codecs.dynamo import tokens_hash
from kvgraph.event import Event
from kvgraph.prefix_index import IndexError_, PrefixIndex
from kvgraph.testing import FEEDS, capture, run_text, wait_for

from .helpers import content_chain
from .indexer_client import IndexerClient

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


def test_the_index_sink_keeps_tiers_apart_and_skips_other_groups_as_dynamo_does() -> None:
    """Issue 13: a CPU copy is not a GPU hit and its removal leaves the GPU block; CPU blocks
    extend a match in the cumulative ``cpu`` count; a sliding-window group (group_idx 1) is
    not indexed; a store whose tokens run out keeps its complete blocks, as Dynamo does."""
    FEEDS["tiers"] = [[
        stored(1, list(range(8)), [10, 11]),
        stored(1, list(range(8)), [10, 11], medium="CPU"),
        stored(2, list(range(8)), [10, 11], medium="CPU"),   # same content, same hashes
        stored(3, list(range(8)), [30, 31], group_idx=1),
        Event(kind="removed", worker_id=1, dp_rank=0, block_hashes=[11], medium="CPU"),
        stored(4, list(range(6)), [40, 41]),     # 1.5 blocks of 4
    ]]

    async def go():
        async with run_text(INDEX_GRAPH.format(feed="tiers")) as rt:
            node = rt.nodes["idx"]
            await wait_for(lambda: rt.contexts["idx"].metrics.events_in == 6)
            return (node.query(list(range(8))), node.dynamo_query(list(range(8))),
                    rt.contexts["idx"].metrics.extra)

    own, dyn, extra = asyncio.run(go())
    assert [(s["worker_id"], s["matched_blocks"]) for s in own["scores"]] == [(1, 2), (4, 1)]
    assert dyn["scores"] == {"1": {"0": 8}, "4": {"0": 4}}
    assert dyn["instances"]["2"] == {"longest_matched": 8, "gpu": 0, "dp": {"0": 0}, "cpu": 8,
                                     "disk": 8}
    assert extra["not_indexed"] == 1 and extra["blocks_without_tokens"] == 1


def test_index_sink_answers_queries_over_http_and_python() -> None:
    """kvgraph's own answers (under /kvgraph/) next to Dynamo's, for events from the graph."""
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
            c = IndexerClient(f"http://127.0.0.1:{node.port}")
            own = lambda body: c.call("POST", "/kvgraph/query", body)  # noqa: E731
            results = {
                "query": await asyncio.to_thread(own, {"token_ids": list(range(16))}),
                "lora": await asyncio.to_thread(own, {"token_ids": list(range(4)),
                                                      "lora_name": "a"}),
                "by_hash": await asyncio.to_thread(
                    c.call, "POST", "/kvgraph/query_by_hash",
                    {"block_hashes": tokens_hash(list(range(8)), 4)}),
                "dynamo": await asyncio.to_thread(c.query, list(range(16)), "default"),
                "workers": await asyncio.to_thread(c.call, "GET", "/kvgraph/workers"),
                "dump": await asyncio.to_thread(c.dump),
                "bad_json": await asyncio.to_thread(c.call, "POST", "/kvgraph/query", None,
                                                    b"{nope"),
                "wrong_type": await asyncio.to_thread(own, {"token_ids": ["a"]}),
                "not_object": await asyncio.to_thread(own, [1]),
                "huge": await asyncio.to_thread(c.call, "POST", "/kvgraph/query", None,
                                                b"x" * 10000),
                "missing": await asyncio.to_thread(c.call, "GET", "/nope"),
                "method": await asyncio.to_thread(c.call, "GET", "/kvgraph/query"),
            }
            c.close()
            py = node.query(list(range(16)))
        return results, py, rt

    r, py, rt = asyncio.run(go())
    status, data = r["query"]
    assert status == 200 and data == py
    assert [(s["worker_id"], s["matched_blocks"]) for s in data["scores"]] == [(1, 3), (2, 2)]
    assert data["query_blocks"] == 4 and data["tree_size"] == 4 and data["blocks"] == 6
    assert [s["worker_id"] for s in r["lora"][1]["scores"]] == [3]
    assert [(s["worker_id"], s["matched_blocks"])
            for s in r["by_hash"][1]["scores"]] == [(1, 2), (2, 2)]
    assert r["dynamo"][1]["scores"] == {"1": {"0": 12}, "2": {"0": 8}}
    assert r["workers"][1] == [{"worker_id": 1, "dp_rank": 0, "blocks": 3},
                               {"worker_id": 2, "dp_rank": 0, "blocks": 2},
                               {"worker_id": 3, "dp_rank": 0, "blocks": 1}]
    events = r["dump"][1]["default:default"]["events"]
    assert {e["worker_id"] for e in events} == {1, 2, 3}
    for key, status in (("bad_json", 400), ("wrong_type", 422), ("not_object", 422),
                        ("huge", 413), ("missing", 404), ("method", 405)):
        assert r[key][0] == status, key
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
            chain = content_chain(rng, contents, parent, 3)
            if chain is None:
                continue
            tokens, hashes = chain
            events.append(stored(w[0], tokens, hashes, parent=parent, dp_rank=w[1]))
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
