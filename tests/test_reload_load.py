"""Issue 16's acceptance test: 100 reloads of a graph under load, through real ZMQ and a real
nats-server, and nothing lost, copied or reordered."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from kvgraph.testing import NatsServer, PacedEngine, run_text, wait_for
from tests.helpers import GraphFile

SUBJECT = "kv.events"


def relay(nats_url: str, engine1: str, engine2: str, tmp_path: Path, i: int) -> GraphFile:
    """Version ``i`` of the graph: engine e1 -> filter -> nats sink, always; an audit file sink
    every other pair of versions; e2 (a second engine) two versions in five; the filter's
    options change every version, the nats sink's every third."""
    g = (GraphFile("fleet")
         .node("e1", "zmq", endpoint=engine1, worker_id=1)
         .node("keep", "filter", kinds=["removed"] if i % 2 else ["stored", "removed"])
         .node("bus", "nats", url=nats_url, subject=SUBJECT, format="dynamo-json",
               name=f"kvgraph-{(i // 3) % 2}")
         .edge("e1", "keep").edge("keep", "bus"))
    if i % 4 >= 2:
        g.node("audit", "file", path=str(tmp_path / f"audit{i}.jsonl")).edge("keep", "audit")
    if i % 5 >= 3:
        g.node("e2", "zmq", endpoint=engine2, worker_id=2).edge("e2", "keep")
    return g


async def subscribe(url: str) -> tuple[object, list[dict]]:
    import nats

    nc = await nats.connect(url)
    got: list[dict] = []

    async def cb(msg) -> None:
        got.append(json.loads(msg.data))

    await nc.subscribe(SUBJECT, cb=cb)
    await nc.flush()
    return nc, got


def by_worker(got: list[dict], worker: int) -> tuple[list[int], list[int]]:
    """(event ids, block hashes) of one worker, in arrival order."""
    mine = [r for r in got if r["worker_id"] == worker]
    return ([r["event"]["event_id"] for r in mine],
            [h for r in mine for h in r["event"]["data"]["removed"]["block_hashes"]])


def test_100_reloads_under_load_lose_copy_and_reorder_nothing(tmp_path: Path) -> None:
    server = NatsServer().start()
    engine1 = PacedEngine(f"ipc://{tmp_path}/e1.sock", rate=2000)
    engine2 = PacedEngine(f"ipc://{tmp_path}/e2.sock", rate=500)

    async def go():
        nc, got = await subscribe(server.url)
        versions = [relay(server.url, engine1.endpoint, engine2.endpoint, tmp_path, i)
                    for i in range(101)]
        async with run_text(versions[0].text()) as rt:
            await asyncio.to_thread(engine1.wait_subscribed)
            engine1.start()
            engine2.start()
            e1 = rt.nodes["e1"]
            plans = []
            for i in range(1, 101):
                bus = rt.nodes["bus"]
                connection = bus.nc
                seen = len(got)
                await wait_for(lambda: len(got) >= seen + 20)   # events flow between reloads
                outcome = await rt.reconfigure(versions[i].text())
                assert outcome.result == "applied", outcome.as_json()
                plans.append(outcome.plan)
                if "bus" in outcome.plan.unchanged:   # never reconnected
                    assert rt.nodes["bus"] is bus and bus.nc is connection
            last1 = engine1.stop()
            engine2.stop()
            await wait_for(lambda: last1 in by_worker(got, 1)[1], timeout=20)
            assert rt.nodes["e1"] is e1   # the engine's socket was never touched
            metrics = {nid: c.metrics.snapshot() for nid, c in rt.contexts.items()}
        await nc.close()
        return got, plans, metrics, rt.result(), last1

    try:
        got, plans, metrics, result, last1 = asyncio.run(go())
    finally:
        engine1.close()
        engine2.close()
        server.close()
    ids1, hashes1 = by_worker(got, 1)
    assert hashes1 == list(range(1, last1 + 1))      # nothing lost, copied or reordered
    assert ids1 == list(range(1, len(ids1) + 1))     # event ids contiguous across the swaps
    ids2, hashes2 = by_worker(got, 2)
    assert hashes2 and hashes2 == sorted(set(hashes2))   # in order, no copy
    assert ids2 == list(range(1, len(ids2) + 1))
    assert metrics["e1"]["seq_gaps"] == 0 and metrics["e1"]["reconnects"] == 0
    assert metrics["bus"]["reconnects"] == 0 and metrics["bus"]["disconnects"] == 0
    assert result.ok and result.lost_events == 0
    changed = [{c.id for c in p.changed} for p in plans]
    assert all("keep" in c for c in changed)
    assert sum("bus" in c for c in changed) == 33
    assert [bool(p.added) for p in plans] == [i % 4 == 2 or i % 5 == 3 for i in range(1, 101)]
    assert [bool(p.removed) for p in plans] == [i % 4 == 0 or i % 5 == 0
                                                for i in range(1, 101)]
