"""A stream partitioned by worker (NATS's own `partition()` mapping) and read by a group of
`nats` sources, each partition by one member at a time, taken over when a member dies."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvgraph.testing import NatsServer, free_port, run_text, wait_for
from tests.helpers import ROOT, GraphFile, metric, metrics_page, stream_events, wait_until

WORKERS, PARTITIONS = 8, 4


@pytest.fixture
def nats_url():
    server = NatsServer().start()
    yield server.url
    server.close()


def producer(url: str) -> GraphFile:
    """Engines 0..7 (api nodes) -> a nats sink into stream KV, partitioned by worker."""
    g = GraphFile("producer").node("bus", "nats", url=url, subject="kv.ev.{worker_id}",
                                   format="jsonl", jetstream=True, stream="KV",
                                   create_stream=True, partitions=PARTITIONS,
                                   dedup_window_s=60)
    for w in range(WORKERS):
        g.node(f"w{w}", "api", worker_id=w).edge(f"w{w}", "bus")
    return g


def consumer(url: str, out: Path) -> GraphFile:
    return (GraphFile("consumer")
            .node("in", "nats", url=url, subject="kv.ev.*", format="jsonl", jetstream=True,
                  stream="KV", partitions=PARTITIONS, group="readers", lease_s=1.0,
                  ack_wait_s=5)
            .node("out", "file", path=str(out)).edge("in", "out"))


def start_consumer(graph: Path, port: int) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "kvgraph", "run", str(graph), "--status",
                             "off", "--metrics-port", str(port)], cwd=ROOT, text=True,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)


def owned(port: int) -> float:
    return metric(metrics_page(port), "kvgraph_node_partitions_owned", node="in",
                  type="nats") or 0


def received(path: Path) -> dict[int, list[int]]:
    """Per worker, the hashes in arrival order."""
    got: dict[int, list[int]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                e = json.loads(line)
            except json.JSONDecodeError:   # the last line of a member killed mid-write
                continue
            got.setdefault(e["worker_id"], []).extend(e["block_hashes"])
    return got


def test_a_group_shares_the_partitions_and_takes_over_a_dead_members(tmp_path, nats_url):
    outs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    ports = [free_port(), free_port()]
    published = {w: 0 for w in range(WORKERS)}
    takeover: list[float] = []

    async def publish(rt, n: int) -> None:
        for _ in range(n):
            for w in range(WORKERS):
                published[w] += 1
                rt.publisher(f"w{w}").publish_removed([w * 1_000_000 + published[w]])
            await asyncio.sleep(0)

    async def go():
        async with run_text(producer(nats_url).text()) as rt:
            await publish(rt, 50)   # the stream exists before the group starts
            procs = [start_consumer(consumer(nats_url, out).write(tmp_path, f"c{i}.toml"),
                                    port) for i, (out, port) in enumerate(zip(outs, ports))]
            try:
                await asyncio.to_thread(wait_until, lambda: owned(ports[0]) == 2
                                        and owned(ports[1]) == 2, 30, "two partitions each")
                await publish(rt, 200)
                procs[1].send_signal(signal.SIGKILL)   # dies holding two partitions
                procs[1].wait()
                killed = time.monotonic()
                await publish(rt, 200)
                await asyncio.to_thread(wait_until, lambda: owned(ports[0]) == 4, 30,
                                        "the survivor takes every partition")
                takeover.append(time.monotonic() - killed)
                await publish(rt, 50)
                await wait_for(lambda: all(
                    (received(outs[0]).get(w) or [0])[-1] == w * 1_000_000 + published[w]
                    for w in range(WORKERS)), timeout=30)
            finally:
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
                        p.communicate(timeout=30)

    asyncio.run(go())
    a, b = received(outs[0]), received(outs[1])
    copies = 0
    for w in range(WORKERS):
        want = [w * 1_000_000 + i for i in range(1, published[w] + 1)]
        got_a, got_b = a.get(w, []), b.get(w, [])
        # each member got a worker's events in order, without a copy of its own...
        assert got_a == sorted(set(got_a)) and got_b == sorted(set(got_b)), f"worker {w}"
        # ...and together every one: a copy only of what a member received and had not
        # acknowledged when it died or gave the partition back
        assert sorted(set(got_a) | set(got_b)) == want, f"worker {w}"
        copies += len(set(got_a) & set(got_b))
    assert copies <= 2 * WORKERS * 256   # at most what was in flight: a fetch per partition
    assert takeover[0] < 1.0 * 2 + 1   # lease_s = 1: expiry, then the next renewal (lease_s/3)
    print(f"\npartitions: taken over {takeover[0]:.2f} s after the SIGKILL (lease_s 1.0); "
          f"{copies} copies across members")


def test_a_sink_given_one_server_finds_the_cluster_and_survives_that_servers_death(tmp_path):
    """Only the first server's URL is configured: the client learns the others from the
    cluster, reconnects to one of them when the first dies, and sends again what was not
    confirmed; the stream (3 replicas) keeps every event once."""
    from kvgraph.testing import Hosts, NatsCluster

    with Hosts(3) as hosts:
        cluster = NatsCluster(hosts).start()
        try:
            asyncio.run(cluster.wait_jetstream())
            first = cluster.urls[0]
            g = (GraphFile("one-url").node("engine", "api", worker_id=7)
                 .node("bus", "nats", url=first, subject="kv.ev.{worker_id}", format="jsonl",
                       jetstream=True, stream="KV", create_stream=True, replicas=3,
                       dedup_window_s=60, reconnect_wait_s=0.1).edge("engine", "bus"))

            async def go():
                async with run_text(g.text()) as rt:
                    pub, bus = rt.publisher("engine"), rt.contexts["bus"].metrics
                    for h in range(1, 101):
                        pub.publish_removed([h])
                    await wait_for(lambda: bus.events_out == 100)
                    cluster.kill(0)
                    for h in range(101, 201):
                        pub.publish_removed([h])
                    await wait_for(lambda: bus.events_out == 200, timeout=30)
                    return rt.nodes["bus"].nc.connected_url.geturl(), bus.extra["reconnects"]

            connected, reconnects = asyncio.run(go())
            stored = [h for _, e in asyncio.run(stream_events(cluster.urls[1:], "KV"))
                      for h in e["block_hashes"]]
        finally:
            cluster.close()
    assert connected != first and reconnects >= 1
    assert stored == list(range(1, 201))
