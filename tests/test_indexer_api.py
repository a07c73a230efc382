"""Issue 13: kvgraph's index node in place of Dynamo 1.6.1's standalone indexer.

Both servers are started as users start them (``python -m dynamo.indexer``; ``kvgraph run`` on
a graph of one ``index`` node), read the same engines over real ZMQ, and are asked the same
things by one client written for Dynamo's API (``tests/indexer_client.py``). Their answers must
be equal: statuses, shapes, scores, tiers, dumps. Without the wheel, the comparisons are skipped
with a message and the kvgraph-only tests still run.
"""

from __future__ import annotations

import random
import time
from typing import Any, Iterator

import pytest

from kvgraph.codecs.dynamo import tokens_hash
from kvgraph.codecs.vllm import encode_payload
from kvgraph.event import Event
from kvgraph.testing import free_port

from .helpers import GraphFile, TestEngine, content_chain
from .indexer_client import IndexerClient
from .indexer_servers import Server, start

BS = 4


@pytest.fixture
def pair(tmp_path) -> Iterator[tuple[Server, Server]]:
    dyn = start("dynamo", tmp_path)
    try:
        kv = start("kvgraph", tmp_path)
    except BaseException:
        dyn.close()
        raise
    yield dyn, kv
    dyn.close()
    kv.close()


@pytest.fixture
def kv(tmp_path) -> Iterator[Server]:
    s = start("kvgraph", tmp_path)
    yield s
    s.close()


class Engines:
    """Test engines (XPUB + replay ROUTER, bound on free ports), one per instance id, each
    registered on every server under test."""

    def __init__(self, servers: list[Server]):
        self.servers, self.engines = servers, {}

    def add(self, instance_id: int, model: str, block_size: int = BS, **extra: Any
            ) -> TestEngine:
        ep, rp = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
        eng = TestEngine(ep, rp)
        self.engines[instance_id] = (eng, model)
        for s in self.servers:
            status, body = s.client.register(instance_id, ep, model, block_size,
                                             replay_endpoint=rp, **extra)
            assert status == 201, (s.kind, body)
        for _ in self.servers:
            eng.wait_subscribed()
        return eng

    def send(self, instance_id: int, *events: Event, dp_rank: int = 0) -> None:
        self.engines[instance_id][0].publish(encode_payload(list(events), time.time(),
                                                            dp_rank=dp_rank))

    def settle(self) -> None:
        """A marker block per engine, then wait until every server matched it: everything each
        engine sent before is then applied."""
        for wid, (eng, model) in self.engines.items():
            tokens = marker(wid)
            self.send(wid, stored(wid, tokens, [10**12 + wid]))
            for s in self.servers:
                s.client.wait_answer(tokens, model, wid)

    def close(self) -> None:
        for eng, _ in self.engines.values():
            eng.close()


def marker(wid: int) -> list[int]:
    return [900_000 + wid * 10 + i for i in range(BS)]


def stored(wid: int, tokens: list[int], hashes: list[int], parent: int | None = None,
           **kw: Any) -> Event:
    return Event(kind="stored", worker_id=wid, dp_rank=0, block_hashes=hashes,
                 parent_hash=parent, token_ids=tokens, block_size=BS, **kw)


def removed(wid: int, hashes: list[int], **kw: Any) -> Event:
    return Event(kind="removed", worker_id=wid, dp_rank=0, block_hashes=hashes, **kw)


def cleared(wid: int) -> Event:
    return Event(kind="cleared", worker_id=wid, dp_rank=0)


T = list(range(100, 140))   # the tokens every scenario's prompt is made of


# Issue 13's edge cases and the tier rules probed from the wheel: one engine (and model) each.
SCENARIOS: dict[str, list[Event]] = {
    "remove_cascades": [stored(0, T[:12], [1, 2, 3]), removed(0, [2]), stored(0, T[4:8], [2], 1)],
    "same_hash_other_tokens": [stored(0, T[:8], [1, 2]), stored(0, T[20:24], [2], 1)],
    "self_parent": [stored(0, T[:4], [1]), stored(0, T[4:8], [2], 2)],
    "cache_salt": [stored(0, T[:8], [1, 2], cache_salt="tenant-a")],
    "tokens_run_out": [stored(0, T[:6], [1, 2])],
    "sliding_window_group": [stored(0, T[:8], [1, 2], group_idx=1), stored(0, T[:4], [3])],
    "cpu_only": [stored(0, T[:12], [1, 2, 3], medium="CPU")],
    "cpu_overlaps_gpu": [stored(0, T[:8], [1, 2]), stored(0, T[:16], [1, 2, 3, 4], medium="CPU")],
    "disk_after_gpu": [stored(0, T[:8], [1, 2]), stored(0, T[8:12], [3], 2, medium="DISK")],
    "gap_in_cpu": [stored(0, T[:4], [1]), stored(0, T[8:12], [3], 2, medium="CPU")],
    "cpu_disk_cpu": [stored(0, T[:4], [1]), stored(0, T[4:8], [2], 1, medium="CPU"),
                     stored(0, T[8:12], [3], 2, medium="DISK"),
                     stored(0, T[12:16], [4], 3, medium="CPU")],
    "cpu_remove_keeps_gpu": [stored(0, T[:12], [1, 2, 3]), stored(0, T[:12], [1, 2, 3], medium="CPU"),
                             removed(0, [2], medium="CPU")],
    "gpu_remove_keeps_cpu": [stored(0, T[:12], [1, 2, 3]), stored(0, T[:12], [1, 2, 3], medium="CPU"),
                             removed(0, [2])],
    "cleared_all_tiers": [stored(0, T[:12], [1, 2, 3]), stored(0, T[12:16], [4], 3, medium="CPU"),
                          cleared(0)],
    "unknown_media": [stored(0, T[:4], [1]), stored(0, T[4:8], [2], 1, medium="LOCAL_DISK"),
                      stored(0, T[8:12], [3], 2, medium="cpu")],
    "external_tier": [stored(0, T[:4], [1]), stored(0, T[4:8], [2], 1, medium="NETWORK")],
    "unknown_remove": [stored(0, T[:8], [1, 2]), removed(0, [77, 1])],
}

QUERIES = [T[:4], T[:8], T[:12], T[:16], T[:24], T[4:12], T[20:24], T[:6]]


def flat_dump(dump: dict[str, Any]) -> set[tuple[Any, ...]]:
    """A dump as a set of blocks with their parent: what it rebuilds, whatever the event
    boundaries, ids and order."""
    out = set()
    for key, entry in dump.items():
        for ev in entry["events"]:
            stored_ = ev["event"]["data"]["stored"]
            parent = stored_["parent_hash"]
            for b in stored_["blocks"]:
                out.add((key, entry["block_size"], ev["worker_id"], ev["event"]["dp_rank"],
                         ev["storage_tier"], parent, b["block_hash"], b["tokens_hash"]))
                parent = b["block_hash"]
    return out


def answers(s: Server, model: str, queries: list[list[int]], **extra: Any) -> list[Any]:
    return [s.client.query(q, model, **extra) for q in queries]


def test_same_answers_and_dumps_on_every_edge_case(pair) -> None:
    engines = Engines(list(pair))
    try:
        for i, (name, events) in enumerate(SCENARIOS.items()):
            engines.add(100 + i, name)
            engines.send(100 + i, *events)
        engines.settle()
        dyn, kv = pair
        for name in SCENARIOS:
            for q in QUERIES:
                want, got = dyn.client.query(q, name), kv.client.query(q, name)
                assert got == want, (name, q)
            salted = dyn.client.query(T[:8], "cache_salt", cache_salt="tenant-a")
            assert salted[1]["scores"] and kv.client.query(
                T[:8], "cache_salt", cache_salt="tenant-a") == salted
            by_hash = tokens_hash(T[:16], BS)
            assert kv.client.query_by_hash(by_hash, name) == dyn.client.query_by_hash(by_hash,
                                                                                     name)
        assert flat_dump(kv.client.dump()[1]) == flat_dump(dyn.client.dump()[1])
    finally:
        engines.close()


def random_stream(rng: random.Random, wid: int, n: int) -> list[Event]:
    """Engine-like: chains on blocks the engine holds, stores again, removes, tiers, clears.
    Block hashes name (parent, content), so the same content stored twice is the same block."""
    contents = [[rng.randrange(50) for _ in range(BS)] for _ in range(6)]
    held: dict[str, list[int]] = {"GPU": [], "CPU": [], "DISK": []}
    out = []
    for _ in range(n):
        roll = rng.random()
        medium = rng.choice(["GPU", "GPU", "GPU", "CPU", "DISK"])
        mine = held[medium]
        if roll < 0.6:
            parent = rng.choice(mine) if mine and rng.random() < 0.7 else None
            chain = content_chain(rng, contents, parent, 4)
            if chain is None:
                continue
            tokens, hashes = chain
            out.append(stored(wid, tokens, hashes, parent,
                              medium=None if medium == "GPU" else medium))
            mine.extend(hashes)
        elif roll < 0.9 and mine:
            gone = rng.sample(mine, min(len(mine), rng.randint(1, 2)))
            out.append(removed(wid, gone, medium=None if medium == "GPU" else medium))
            for h in gone:
                mine.remove(h)
        elif roll >= 0.98:
            out.append(cleared(wid))
            for m in held.values():
                m.clear()
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_same_answers_on_generated_streams(pair, seed) -> None:
    rng = random.Random(seed)
    engines = Engines(list(pair))
    try:
        for wid in range(3):
            engines.add(wid + 1, "gen")
        streams = {wid + 1: random_stream(rng, wid + 1, 150) for wid in range(3)}
        for wid, events in streams.items():
            for k in range(0, len(events), 7):
                engines.send(wid, *events[k:k + 7])
        engines.settle()
        contents_queries = []
        for events in streams.values():
            for e in events:
                if e.kind == "stored" and e.parent_hash is None:
                    contents_queries.append(e.token_ids + [1, 2, 3, 4])
        dyn, kv = pair
        for q in contents_queries[:60]:
            assert kv.client.query(q, "gen") == dyn.client.query(q, "gen"), q
        assert flat_dump(kv.client.dump()[1]) == flat_dump(dyn.client.dump()[1])
    finally:
        engines.close()


def test_statuses_and_shapes_are_dynamos(pair) -> None:
    """Every route, right and wrong: the same status, and the same JSON where JSON."""
    engines = Engines(list(pair))
    try:
        engines.add(7, "m")
        engines.add(8, "m", dp_rank=1)
        engines.send(7, stored(7, T[:12], [1, 2, 3]),
                     stored(7, T[12:16], [11], 3, medium="CPU"))
        engines.send(8, stored(8, T[:8], [1, 2]), dp_rank=1)
        engines.settle()
        ep = engines.engines[7][0].endpoint
        calls: list[tuple[str, str, Any, bytes | None, str]] = [
            ("POST", "/register", {"instance_id": 7, "endpoint": ep, "model_name": "m",
                                   "block_size": BS}, None, "application/json"),
            ("POST", "/register", {"instance_id": 9, "endpoint": ep, "model_name": "m",
                                   "block_size": 8}, None, "application/json"),
            ("POST", "/register", {"instance_id": 9, "endpoint": "bogus", "model_name": "x",
                                   "block_size": 8}, None, "application/json"),
            ("POST", "/register", {"instance_id": 9, "endpoint": ep, "model_name": "x"}, None,
             "application/json"),
            ("POST", "/query", {"token_ids": T[:16], "model_name": "m"}, None,
             "application/json"),
            ("POST", "/query", {"token_ids": T[:16], "model_name": "m", "routing_group": "x"},
             None, "application/json"),
            ("POST", "/query", {"token_ids": T[:16]}, None, "application/json"),
            ("POST", "/query", {"token_ids": [-1], "model_name": "m"}, None, "application/json"),
            ("POST", "/query", {"token_ids": "x", "model_name": "m"}, None, "application/json"),
            ("POST", "/query", None, b"{not json", "application/json"),
            ("POST", "/query", None, b'{"token_ids": [1], "model_name": "m"}', "text/plain"),
            ("POST", "/query", None, b"[1, 2]", "application/json"),
            ("POST", "/query", {"token_ids": T[:3], "model_name": "m", "extra": 1}, None,
             "application/json"),
            ("POST", "/query_by_hash", {"block_hashes": [1, -2], "model_name": "m"}, None,
             "application/json"),
            ("POST", "/query_by_hash", {"block_hashes": [2**63], "model_name": "m"}, None,
             "application/json"),
            ("POST", "/query_by_hash", {"block_hashes": [1], "model_name": "m",
                                        "cache_salt": "s"}, None, "application/json"),
            ("GET", "/query", None, None, ""),
            ("POST", "/workers", None, None, ""),
            ("HEAD", "/health", None, None, ""),
            ("HEAD", "/workers", None, None, ""),
            ("GET", "/nothing", None, None, ""),
            ("GET", "/workers?model_name=m", None, None, ""),
            ("GET", "/workers?model_name=nothing", None, None, ""),
            ("GET", "/peers", None, None, ""),
            ("POST", "/register_peer", {"url": "http://127.0.0.1:1"}, None, "application/json"),
            ("GET", "/peers", None, None, ""),
            ("POST", "/deregister_peer", {"url": "http://127.0.0.1:1"}, None,
             "application/json"),
            ("POST", "/deregister_peer", {"url": "http://127.0.0.1:1"}, None,
             "application/json"),
            ("POST", "/unregister", {"instance_id": 8, "model_name": "m",
                                     "routing_group": "default", "dp_rank": 1}, None,
             "application/json"),
            ("POST", "/unregister", {"instance_id": 8, "model_name": "m"}, None,
             "application/json"),
            ("POST", "/query", {"token_ids": T[:16], "model_name": "m"}, None,
             "application/json"),
            ("POST", "/reopen_logs", None, None, ""),
        ]
        dyn, kv = pair
        for method, path, body, raw, ctype in calls:
            want = dyn.client.call(method, path, body, raw, ctype)
            got = kv.client.call(method, path, body, raw, ctype)
            where = f"{method} {path} {body or raw!r}"
            assert got[0] == want[0], (where, got, want)
            if isinstance(want[1], (dict, list)):
                if path.startswith("/workers"):   # Dynamo's list has no order
                    want = (want[0], sorted(want[1], key=lambda w: w["instance_id"]))
                    got = (got[0], sorted(got[1], key=lambda w: w["instance_id"]))
                assert got == want, where
        names = {line.split("{")[0].split(" ")[0] for line in kv.client.metrics().splitlines()
                 if line and not line.startswith("#")}
        for metric in ("dynamo_kvindexer_requests_total", "dynamo_kvindexer_errors_total",
                       "dynamo_kvindexer_request_duration_seconds_bucket",
                       "dynamo_kvindexer_listeners", "dynamo_kvindexer_models",
                       "dynamo_kvindexer_workers"):
            assert metric in names
    finally:
        engines.close()


@pytest.mark.parametrize("first", ["dynamo", "kvgraph"])
def test_recovers_from_a_peers_dump_at_start(tmp_path, first) -> None:
    """Dynamo's ``--peers``: a new indexer loads a running one's /dump before it listens."""
    from .indexer_servers import start

    a = start(first, tmp_path)
    engines = Engines([a])
    try:
        engines.add(1, "m")
        engines.add(2, "m")
        engines.send(1, stored(1, T[:12], [1, 2, 3]), stored(1, T[12:16], [4], 3, medium="CPU"))
        engines.send(2, stored(2, T[:8], [1, 2]))
        engines.settle()
        b = start("kvgraph", tmp_path, peers=[a.url])
        try:
            for q in QUERIES:
                assert b.client.query(q, "m") == a.client.query(q, "m"), q
            assert flat_dump(b.client.dump()[1]) == flat_dump(a.client.dump()[1])
            assert "recovered" in b.output()
        finally:
            b.close()
    finally:
        engines.close()
        a.close()


def test_workers_option_reads_engines_from_the_start(tmp_path) -> None:
    """Dynamo's ``--workers``: engines listed in the graph are read without a /register."""
    eng = TestEngine(f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}")
    try:
        s = start("kvgraph", tmp_path, block_size=BS, model_name="m",
                  workers=[{"instance_id": "0xfedcba9876543210", "endpoint": eng.endpoint},
                           {"instance_id": 5, "endpoint": eng.endpoint, "dp_rank": 1}])
        try:
            eng.wait_subscribed()
            eng.wait_subscribed()
            eng.publish(encode_payload([stored(0, marker(1), [1])], time.time()))
            s.client.wait_answer(marker(1), "m", 0xfedcba9876543210)
            answer = s.client.wait_answer(marker(1), "m", 5)   # each listener in its own time
            assert answer["scores"] == {str(0xfedcba9876543210): {"0": BS}, "5": {"0": BS}}
            status, listed = s.client.workers(model_name="m")
            assert status == 200 and {w["instance_id"] for w in listed} == {
                0xfedcba9876543210, 5}
        finally:
            s.close()
    finally:
        eng.close()


def test_what_clients_can_make_the_server_hold_is_bounded(kv) -> None:
    """A query over max_query_tokens is a 413, a body over max_body_bytes too (before it is
    read); a body that never arrives is a 408 after READ_TIMEOUT_S (10 s: not waited for here,
    see the unit below); a /dump client that stops reading is dropped after WRITE_TIMEOUT_S,
    and queries are answered meanwhile."""
    import socket

    c = kv.client
    status, _ = c.call("POST", "/kvgraph/query", {"token_ids": list(range(1_048_577))})
    assert status == 413
    s = socket.create_connection(("127.0.0.1", kv.port))
    s.sendall(b"POST /query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 99999999\r\n\r\n{")
    assert s.recv(100).startswith(b"HTTP/1.1 413")
    s.close()
    # an engine with a big state, then a client that asks for /dump and never reads it
    engines = Engines([kv])
    try:
        engines.add(1, "m")
        for k in range(200):
            engines.send(1, stored(1, [k] * 4 * 100, list(range(k * 1000 + 1, k * 1000 + 101))))
        engines.settle()
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect(("127.0.0.1", kv.port))
        slow.sendall(b"GET /dump HTTP/1.1\r\nHost: x\r\n\r\n")
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.0:   # queries go on while the dump waits
            assert c.query([0] * 16, "m")[0] == 200
        slow.close()
    finally:
        engines.close()


def raw_http(port: int, request: bytes, then: bytes = b"", read_first: bool = False
             ) -> bytes:
    """One request on a fresh socket, as bytes; with ``read_first``, the server's interim
    answer is read before ``then`` (the body) is sent."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        first = s.recv(65536) if read_first else b""
        s.sendall(then)
        out = b""   # the requests say Connection: close
        while chunk := s.recv(65536):
            out += chunk
    return first + out


def test_keep_alive_head_and_expect_100_continue(kv) -> None:
    body = b'{"token_ids": [1, 2, 3, 4], "model_name": "nothing"}'
    head = (b"POST /query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n" % len(body))
    answer = raw_http(kv.port, head, body, read_first=True)
    assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404"), answer[:200]
    assert raw_http(kv.port, b"HEAD /workers HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                    ).startswith(b"HTTP/1.1 200")
    c = kv.client   # one connection, many requests: keep-alive
    for _ in range(3):
        assert c.health() == 200
    sock = c.conn.sock
    assert c.workers()[0] == 200 and c.conn.sock is sock


def test_a_body_that_does_not_arrive_is_a_408_and_is_not_held(monkeypatch) -> None:
    import asyncio
    import socket

    from kvgraph.indexer import http_api
    from kvgraph.testing import run_text

    monkeypatch.setattr(http_api, "READ_TIMEOUT_S", 0.5)
    graph = GraphFile("indexer").node("index", "index", port=0).text()

    async def go():
        async with run_text(graph) as rt:
            port = rt.nodes["index"].port
            extra = rt.contexts["index"].metrics.extra

            def slow() -> bytes:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                    s.sendall(b"POST /query HTTP/1.1\r\nHost: x\r\nContent-Type: "
                              b"application/json\r\nContent-Length: 5000\r\n\r\n{")
                    return s.recv(65536)

            answer = await asyncio.to_thread(slow)
            return answer, extra["http_body_bytes"]

    answer, held = asyncio.run(go())
    assert answer.startswith(b"HTTP/1.1 408") and held == 0


def test_a_dump_taken_while_events_arrive_rebuilds_a_valid_index() -> None:
    """/dump reads the tree as it writes: events applied meanwhile may or may not be in it, but
    every event it gives applies cleanly (parents first) in an empty index."""
    import asyncio

    import msgspec

    from kvgraph.codecs.dynamo import decode_dump
    from kvgraph.indexer import http_api
    from kvgraph.indexer.partition import Partition
    from kvgraph.testing import FEEDS, run_text

    rng = random.Random(5)
    streams = [random_stream(rng, w, 400) for w in range(1, 4)]
    FEEDS["dump-live"] = [s[i:i + 5] for s in streams for i in range(0, len(s), 5)]
    graph = (GraphFile("indexer").node("src", "feed", feed="dump-live")
             .node("index", "index", port=0, block_size=BS).edge("src", "index").text())

    async def go():
        old = http_api.DUMP_CHUNK_BYTES
        http_api.DUMP_CHUNK_BYTES = 256   # many chunks: the feed runs between them
        try:
            async with run_text(graph) as rt:
                c = IndexerClient(f"http://127.0.0.1:{rt.nodes['index'].port}")
                dumps = []
                for _ in range(5):
                    dumps.append(await asyncio.to_thread(c.call, "GET", "/dump"))
                c.close()
                return dumps
        finally:
            http_api.DUMP_CHUNK_BYTES = old

    for status, body in asyncio.run(go()):
        assert status == 200
        for key, (bs, events) in decode_dump(msgspec.json.encode(body)).items():
            p = Partition(*key.split(":"), bs)
            for e in events:
                p.apply(e)   # raises on a parent it has not seen
