"""Recomposing a running graph (kvgraph.reload): what is unchanged runs on untouched, what
changes is swapped without losing or reordering an event, and a reload that cannot be applied
changes nothing."""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

import pytest

from kvgraph.errors import ReloadError
from kvgraph.testing import capture, free_port, run_text, wait_for
from tests.helpers import GraphFile



def relay(keep: list[str] | None = None, delay_ms: int = 0, *extra: str) -> GraphFile:
    """engine (api) -> keep (filter) -> out (a capture sink that may be slowed)."""
    g = (GraphFile("relay")
         .node("engine", "api", worker_id=1, block_size=4)
         .node("keep", "filter", kinds=keep or ["stored", "removed", "cleared"])
         .node("out", "slow", delay_ms=delay_ms)
         .edge("engine", "keep", capacity=4).edge("keep", "out", capacity=4))
    return g


class Publisher:
    """Publishes removed events with hashes 1, 2, 3... as fast as the graph takes them, so
    that a reload always lands with events in flight."""

    def __init__(self, rt) -> None:
        self.pub = rt.publisher("engine")
        self.sent = 0
        self.stop = False

    async def run(self) -> None:
        while not self.stop:
            for _ in range(20):
                self.sent += 1
                self.pub.publish_removed([self.sent])
            await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def publishing(rt) -> AsyncIterator[Publisher]:
    p = Publisher(rt)
    task = asyncio.ensure_future(p.run())
    try:
        yield p
    finally:
        p.stop = True
        await task


def hashes(node: str) -> list[int]:
    return [e.block_hashes[0] for e in capture(node)]


async def test_swaps_of_a_transform_and_a_sink_under_load_lose_and_reorder_nothing():
    async with run_text(relay().text()) as rt:
        engine = rt.nodes["engine"]
        async with publishing(rt) as p:
            for i in range(20):   # the filter changes every time, the sink every other
                await wait_for(lambda: len(capture("out")) > 0)
                graph = relay(["removed", "stored"] if i % 2 == 0 else None,
                              delay_ms=(i // 2) % 2)
                outcome = await rt.reconfigure(graph.text())
                assert outcome.result == "applied"
                assert [c.id for c in outcome.plan.changed] == \
                    (["keep", "out"] if i % 2 == 0 and i else ["keep"])
        assert rt.nodes["engine"] is engine   # unchanged: never touched
    assert hashes("out") == list(range(1, p.sent + 1))
    assert rt.result().ok and rt.reloads == {"applied": 20}


async def test_an_added_sink_gets_every_event_from_its_start_and_a_removed_one_drains():
    both = relay().node("copy", "capture").edge("keep", "copy")
    async with run_text(relay().text()) as rt:
        async with publishing(rt) as p:
            await wait_for(lambda: p.sent > 100)
            outcome = await rt.reconfigure(both.text())
            assert outcome.plan.added == ["copy (sink capture)"]
            assert outcome.plan.edges_added == ["keep -> copy"]
            await wait_for(lambda: len(capture("copy")) > 200)
            await rt.reconfigure(relay().text())
            copied = hashes("copy")
            await wait_for(lambda: p.sent > copied[-1] + 200)
        assert "copy" not in rt.nodes and hashes("copy") == copied   # it ended when removed
    assert copied == list(range(copied[0], copied[-1] + 1))
    assert hashes("out") == list(range(1, p.sent + 1))


async def test_a_new_source_starts_after_its_consumers_and_a_removed_one_stops():
    second = (relay().node("engine2", "api", worker_id=2, block_size=4)
              .edge("engine2", "keep"))
    async with run_text(relay().text()) as rt:
        await rt.reconfigure(second.text())
        rt.publisher("engine2").publish_removed([7])
        await wait_for(lambda: [e.worker_id for e in capture("out")] == [2])
        await rt.reconfigure(relay().text())
        assert "engine2" not in rt.nodes
        rt.publisher("engine").publish_removed([8])
        await wait_for(lambda: len(capture("out")) == 2)
    assert rt.result().ok


async def test_an_invalid_file_changes_nothing_and_says_where():
    async with run_text(relay().text()) as rt:
        before = dict(rt.nodes)
        bad = relay().node("ghost", "nosuchtype").text()
        with pytest.raises(ReloadError) as caught:
            await rt.reconfigure(bad, source="graph.toml")
        outcome = caught.value.outcome
        assert outcome.result == "invalid"
        where = [d for d in outcome.diagnostics if d.severity == "error"]
        assert where and where[0].line > 0 and "nosuchtype" in where[0].message
        assert rt.nodes == before and rt.reloads == {"invalid": 1}
        rt.publisher("engine").publish_removed([1])
        await wait_for(lambda: hashes("out") == [1])


async def test_a_sink_that_cannot_bind_leaves_the_running_graph_untouched():
    import zmq

    taken = zmq.Context.instance().socket(zmq.PUB)
    port = taken.bind_to_random_port("tcp://127.0.0.1")
    mine = f"tcp://127.0.0.1:{free_port()}"
    with_pub = relay().node("pub", "zmq", endpoint=mine).edge("keep", "pub")
    try:
        async with run_text(with_pub.text()) as rt:
            before = dict(rt.nodes)
            # changed to a taken port: the new instance fails to start; the old one runs on
            moved = relay().node("pub", "zmq", endpoint=f"tcp://127.0.0.1:{port}") \
                .edge("keep", "pub")
            with pytest.raises(ReloadError, match="failed to start"):
                await rt.reconfigure(moved.text())
            # added on a taken port: the probe finds it before anything starts
            added = with_pub.node("pub2", "zmq", endpoint=f"tcp://127.0.0.1:{port}") \
                .edge("keep", "pub2")
            with pytest.raises(ReloadError) as caught:
                await rt.reconfigure(added.text())
            assert caught.value.outcome.result == "invalid"
            assert rt.nodes == before and rt.reloads == {"failed": 1, "invalid": 1}
            assert rt.graph.nodes["pub"].options["endpoint"] == mine
            rt.publisher("engine").publish_removed([1])
            await wait_for(lambda: hashes("out") == [1])
        assert rt.result().ok
    finally:
        taken.close(0)


async def test_a_node_that_binds_the_same_address_is_swapped_old_out_new_in():
    ep = f"tcp://127.0.0.1:{free_port()}"
    one = relay().node("pub", "zmq", endpoint=ep, hwm=1000).edge("keep", "pub")
    two = relay().node("pub", "zmq", endpoint=ep, hwm=2000).edge("keep", "pub")
    async with run_text(one.text()) as rt:
        async with publishing(rt) as p:
            await wait_for(lambda: p.sent > 100)
            outcome = await rt.reconfigure(two.text())
            assert [c.id for c in outcome.plan.changed] == ["pub"]
            await wait_for(lambda: rt.contexts["pub"].metrics.events_in > 0)
    assert hashes("out") == list(range(1, p.sent + 1))
    assert rt.result().ok


async def test_an_unchanged_text_is_no_change_and_reloads_queue():
    async with run_text(relay().text()) as rt:
        outcomes = await asyncio.gather(*(rt.reconfigure(relay(delay_ms=d).text())
                                          for d in (1, 1, 2)))
    assert [o.result for o in outcomes] == ["applied", "unchanged", "applied"]


def zmq_relay(endpoint: str, **options: object) -> GraphFile:
    return (GraphFile("engine").node("e1", "zmq", endpoint=endpoint, **options)
            .node("out", "capture").node("dead", "capture")
            .edge("e1", "out").edge("e1.errors", "dead"))


async def swap_under_load(tmp_path, versions: list[GraphFile]):
    """Run versions[0] reading a paced engine, apply the others in turn while it publishes;
    returns (runtime, the last hash published, the first instance's socket)."""
    from kvgraph.testing import PacedEngine

    engine = PacedEngine(f"ipc://{tmp_path}/engine.sock", rate=4000)
    try:
        async with run_text(versions[0].text()) as rt:
            await asyncio.to_thread(engine.wait_subscribed)
            engine.start()
            sock = rt.nodes["e1"]._sock
            for g in versions[1:]:
                seen = len(capture("out"))
                await wait_for(lambda: len(capture("out")) >= seen + 40)
                assert (await rt.reconfigure(g.text())).plan.changed[0].id == "e1"
            seen = len(capture("out"))   # a batch missed in a swap is a gap once the next
            await wait_for(lambda: len(capture("out")) >= seen + 40)   # one arrives
            last = engine.stop()
            await wait_for(lambda: rt.contexts["e1"].metrics.events_in
                           + 4 * rt.contexts["e1"].metrics.extra["seq_lost"] >= last)
        return rt, last, sock
    finally:
        engine.close()


async def test_a_changed_zmq_source_with_the_same_sockets_misses_nothing(tmp_path):
    ep = f"ipc://{tmp_path}/engine.sock"
    rt, last, sock = await swap_under_load(
        tmp_path, [zmq_relay(ep, max_batch_events=64 << (i % 2)) for i in range(21)])
    assert hashes("out") == list(range(1, last + 1))
    assert rt.nodes["e1"]._sock is sock   # handed over, never reconnected
    m = rt.result().metrics["e1"]
    assert m["seq_gaps"] == 0 and m["reconnects"] == 0 and capture("dead") == []


async def test_a_zmq_source_with_new_socket_options_loses_nothing_silently(tmp_path):
    """Other socket options: new sockets, connected before the old ones close. What both read
    is skipped once; a batch that neither read is a gap, reported lost: every batch the engine
    sent is either delivered, once and in order, or counted and recorded as lost."""
    ep = f"ipc://{tmp_path}/engine.sock"
    rt, last, sock = await swap_under_load(
        tmp_path, [zmq_relay(ep, hwm=1000 * (1 + i % 2)) for i in range(11)])
    got = hashes("out")
    assert got == sorted(set(got))
    m = rt.result().metrics["e1"]
    assert len(got) + 4 * m["seq_lost"] == last
    assert len(capture("dead")) == m["seq_gaps"]


async def test_a_failed_swap_of_a_node_that_binds_what_it_bound_restores_it():
    """Old and new bind the same endpoint, so the old one stops first; the new one then fails
    on its other port: the old configuration runs again, and no event is lost."""
    import zmq

    taken = zmq.Context.instance().socket(zmq.ROUTER)
    port = taken.bind_to_random_port("tcp://127.0.0.1")
    ep, replay = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
    one = relay().node("pub", "zmq", endpoint=ep, replay_endpoint=replay).edge("keep", "pub")
    two = relay().node("pub", "zmq", endpoint=ep, replay_endpoint=f"tcp://127.0.0.1:{port}") \
        .edge("keep", "pub")
    try:
        async with run_text(one.text()) as rt:
            async with publishing(rt) as p:
                await wait_for(lambda: p.sent > 100)
                with pytest.raises(ReloadError, match="runs again as it was") as caught:
                    await rt.reconfigure(two.text())
                assert caught.value.outcome.result == "failed"
                pub = rt.nodes["pub"]
                assert pub.config["replay_endpoint"] == replay and not rt.failures
                seen = pub.metrics.events_in
                await wait_for(lambda: pub.metrics.events_in > seen + 100)
        assert hashes("out") == list(range(1, p.sent + 1))
        assert rt.result().ok
    finally:
        taken.close(0)


async def test_the_live_view_shows_the_last_reload_and_its_plan():
    from rich.console import Console

    from kvgraph.live import reload_lines, render, snapshot
    from kvgraph.metrics import GraphCollector

    async with run_text(relay().text()) as rt:
        await rt.reconfigure(relay(delay_ms=1).text())
        snap = snapshot(GraphCollector(rt).collect(), rt.graph.name)
        snap.reload_lines = reload_lines(rt.last_reload)
    console = Console(record=True, width=120)
    console.print(render(snap, None))
    screen = console.export_text()
    assert "reloads: 1 applied; last 0 s ago" in screen
    assert "reload from reconfigure(): applied" in screen
    assert "change  node out (sink slow): delay_ms 0 -> 1" in screen


async def test_a_reload_that_would_replace_a_sink_in_an_outage_is_refused():
    """Its server is away: replacing it would drop what it holds. Refused, nothing changed."""
    from kvgraph.testing import NatsServer

    server = NatsServer().start()

    def bus(name: str) -> GraphFile:
        return (GraphFile("bus").node("engine", "api")
                .node("bus", "nats", url=server.url, subject="kv", name=name,
                      reconnect_wait_s=0.1).edge("engine", "bus"))

    try:
        async with run_text(bus("a").text()) as rt:
            sink = rt.nodes["bus"]
            server.close()
            await wait_for(lambda: not sink.can_confirm())
            with pytest.raises(ReloadError, match="cannot confirm delivery now") as caught:
                await rt.reconfigure(bus("b").text())
            assert caught.value.outcome.result == "failed" and rt.nodes["bus"] is sink
            rt.request_stop()
    finally:
        server.close()
