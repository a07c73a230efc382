"""The runtime, in-process: channels, fan-out/fan-in, backpressure, failures, metrics."""

from __future__ import annotations

import asyncio
import urllib.request

import pytest

from kvgraph import registry
from kvgraph.channel import Channel, Inbox
from kvgraph.event import Rejected
from kvgraph.runtime import Runtime
from kvgraph.testing import assert_metrics_contract, capture, load_text, run_text, wait_for

SYNTH = '[nodes.src]\ntype = "synthetic"\nworkers = 3\nseed = 5\nrate = 0\nmax_events = {n}\n'


def graph(body: str) -> str:
    return '[graph]\nname = "t"\n' + body


def run(text: str, environ: dict | None = None):
    async def go():
        rt = Runtime(load_text(graph(text), environ), environ or {}, ".")
        await rt.start()
        return rt, await rt.wait()

    return asyncio.run(go())


# -- channels -----------------------------------------------------------------------------------

def test_channel_statistics_and_policies() -> None:
    async def go():
        ch = Channel("a -> b", 2, "drop_newest")
        inbox = Inbox([ch])
        assert [await ch.send([1]), await ch.send([2, 3]), await ch.send([4, 5, 6])] == [0, 0, 3]
        st = ch.statistics()
        assert (st.current, st.current_events, st.peak, st.dropped_batches,
                st.dropped_events) == (2, 3, 2, 1, 3)
        old = Channel("x", 1, "drop_oldest")
        Inbox([old])
        await old.send([1])
        assert await old.send([2, 2]) == 1
        assert old.get_nowait() == [2, 2]
        assert inbox.get_nowait() == [1]

    asyncio.run(go())


def test_block_policy_suspends_the_sender_until_there_is_room() -> None:
    async def go():
        ch = Channel("a", 1, "block")
        inbox = Inbox([ch])
        await ch.send([1])
        sender = asyncio.create_task(ch.send([2]))
        await wait_for(lambda: ch.statistics().waiting_senders == 1)
        assert not sender.done()
        assert await inbox.get() == [1]
        await sender
        ch.close()
        assert await inbox.get() == [2]
        assert await inbox.get() is None

    asyncio.run(go())


def test_inbox_reads_all_inputs_round_robin() -> None:
    async def go():
        a, b = Channel("a", 10), Channel("b", 10)
        inbox = Inbox([a, b])
        for i in range(3):
            await a.send([f"a{i}"])
            await b.send([f"b{i}"])
        a.close()
        b.close()
        got = []
        while (x := await inbox.get()) is not None:
            got += x
        assert got == ["a0", "b0", "a1", "b1", "a2", "b2"]

    asyncio.run(go())


# -- graphs -------------------------------------------------------------------------------------

def test_finite_graph_ends_by_itself_with_fan_out_and_fan_in() -> None:
    rt, result = run(SYNTH.format(n=500) + """
[nodes.src2]
type = "synthetic"
workers = 1
seed = 9
rate = 0
max_events = 300
[nodes.keep]
type = "filter"
kinds = ["stored"]
[nodes.all]
type = "capture"
[nodes.stored_only]
type = "capture"
[[edges]]
from = "src"
to = "all"
[[edges]]
from = "src2"
to = "all"
[[edges]]
from = "src"
to = "keep"
[[edges]]
from = "keep"
to = "stored_only"
""")
    assert result.ok and not result.lost_events
    assert len(capture("all")) == 800
    stored = [e for e in capture("all") if e.kind == "stored" and e.worker_id < 3]
    src_stored = [e for e in capture("stored_only")]
    assert len(src_stored) == result.metrics["keep"]["events_out"]
    assert result.metrics["keep"]["discarded_intentional"] == 500 - len(src_stored)
    assert result.metrics["all"]["events_out"] == 800 and stored


def test_slow_sink_with_block_slows_the_source_and_loses_nothing() -> None:
    async def go():
        text = graph(SYNTH.format(n=4000).replace("rate = 0", "rate = 0\nevents_per_batch = 16")
                     + '[nodes.out]\ntype = "slow"\ndelay_ms = 2\n'
                     '[[edges]]\nfrom = "src"\nto = "out"\ncapacity = 4\n')
        async with run_text(text) as rt:
            ch = rt.channels[0]
            await wait_for(lambda: ch.statistics().waiting_senders == 1, timeout=10)
            # The source is held back: it cannot run ahead of the sink by more than the channel.
            produced = rt.contexts["src"].metrics.events_out
            assert produced - len(capture("out")) <= (4 + 2) * 16
            await wait_for(lambda: len(capture("out")) == 4000, timeout=60)
        assert rt.channels[0].statistics().peak <= 4
        assert rt.result().ok and rt.channels[0].dropped_events == 0

    asyncio.run(go())


def test_drop_newest_bounds_memory_and_counts_drops() -> None:
    rt, result = run(SYNTH.format(n=3000) + '[nodes.out]\ntype = "slow"\ndelay_ms = 1\n'
                     '[[edges]]\nfrom = "src"\nto = "out"\ncapacity = 2\nwhen_full = "drop_newest"\n')
    st = rt.channels[0].statistics()
    assert st.peak <= 2 and st.dropped_events > 0
    assert len(capture("out")) + st.dropped_events == 3000
    assert result.metrics["src"]["discarded_unintentional"] == st.dropped_events


def test_a_raising_python_node_sends_events_to_errors_and_the_graph_goes_on(tmp_path) -> None:
    (tmp_path / "userfn.py").write_text(
        "def f(batch):\n"
        "    if any(e.kind == 'cleared' for e in batch):\n"
        "        raise ValueError('no clears here')\n"
        "    return [e for e in batch if e.kind == 'stored']\n")
    text = SYNTH.format(n=2000).replace("seed = 5", "seed = 5\nclear_probability = 0.2") + f"""
[nodes.fn]
type = "python"
function = "userfn:f"
path = "{tmp_path}"
[nodes.ok]
type = "capture"
[nodes.dead]
type = "capture"
[[edges]]
from = "src"
to = "fn"
[[edges]]
from = "fn"
to = "ok"
[[edges]]
from = "fn.errors"
to = "dead"
"""
    rt, result = run(text)
    assert result.ok
    dead = capture("dead")
    assert dead and all(isinstance(r, Rejected) for r in dead)
    assert "ValueError: no clears here (at userfn.py:3 in f)" in dead[0].reason
    assert all(e.kind == "stored" for e in capture("ok"))
    m = result.metrics["fn"]
    assert m["errors"] == len(dead)
    assert m["events_in"] == m["events_out"] + m["errors"] + m["discarded_intentional"]


def test_on_error_fail_stops_the_graph(tmp_path) -> None:
    (tmp_path / "boom.py").write_text("def f(batch):\n    raise RuntimeError('boom')\n")
    text = f"""
[nodes.src]
type = "synthetic"
rate = 1000
[nodes.fn]
type = "python"
function = "boom:f"
path = "{tmp_path}"
on_error = "fail"
[nodes.out]
type = "capture"
[[edges]]
from = "src"
to = "fn"
[[edges]]
from = "fn"
to = "out"
"""
    rt, result = run(text)  # an endless source: only the failure can end this run
    assert not result.ok and "boom" in result.failures["fn"]


def test_missing_env_var_refuses_to_start() -> None:
    from kvgraph.errors import ConfigError

    text = graph('[nodes.a]\ntype = "api"\n[nodes.b]\ntype = "nats"\nsubject = "x"\n'
                 'token = "${KVGRAPH_NOPE}"\n[[edges]]\nfrom = "a"\nto = "b"\n')
    with pytest.raises(ConfigError, match="b.token: environment variable KVGRAPH_NOPE"):
        asyncio.run(Runtime(load_text(text), {}).start())


def test_declared_but_unimplemented_types_are_refused_clearly() -> None:
    from kvgraph import Sink, register
    from kvgraph.errors import UsageError

    @register
    class DeclaredOnly(Sink):
        name = "test_declared_only"
        hidden = True
        summary = "Declared, with no write()."

    try:
        text = graph('[nodes.a]\ntype = "api"\n[nodes.n]\ntype = "test_declared_only"\n'
                     '[[edges]]\nfrom = "a"\nto = "n"\n')
        with pytest.raises(UsageError, match=r"cannot run yet: n \(sink test_declared_only\)"):
            asyncio.run(Runtime(load_text(text), {}).start())
    finally:
        registry._types.pop(("test_declared_only", DeclaredOnly.kind))


CONTRACT_GRAPHS = {
    ("source", "synthetic"): SYNTH.format(n=50) + '[nodes.n]\ntype = "capture"\n'
                                                  '[[edges]]\nfrom = "src"\nto = "n"\n',
    ("source", "file"): '[nodes.src]\ntype = "file"\npath = "{fixture}"\n[nodes.n]\ntype = '
                        '"capture"\n[[edges]]\nfrom = "src"\nto = "n"\n',
}


def _contract_graph(t, fixture: str) -> str | None:
    key = (t.kind.value, t.name)
    if key in CONTRACT_GRAPHS:
        return CONTRACT_GRAPHS[key].format(fixture=fixture)
    kind = f'kind = "{t.kind}"\n' if len(registry.named(t.name)) > 1 else ""
    node = f'[nodes.n]\ntype = "{t.name}"\n{kind}'
    if t.kind.value == "transform":
        return (SYNTH.format(n=50) + node + {"filter": 'kinds = ["stored"]\n',
                                             "python": 'function = "builtins:list"\n'}.get(
            t.name, "") + '[nodes.out]\ntype = "capture"\n'
                '[[edges]]\nfrom = "src"\nto = "n"\n[[edges]]\nfrom = "n"\nto = "out"\n')
    if t.kind.value == "sink" and t.name in ("null", "stdout", "file", "capture", "index", "zmq"):
        opts = {"file": 'path = "{tmp}/out.jsonl"\n', "index": "port = 0\n",
                "zmq": 'endpoint = "ipc://{tmp}/z.sock"\n'}.get(t.name, "")
        return SYNTH.format(n=50) + node + opts + '[[edges]]\nfrom = "src"\nto = "n"\n'
    return None  # needs a service: covered by test_e2e_nats


@pytest.mark.parametrize("t", [t for t in registry.all_types() if t.implemented()],
                         ids=lambda t: f"{t.kind}-{t.name}")
def test_every_type_emits_the_metrics_contract(t, tmp_path, capsys) -> None:
    from .helpers import FIXTURES

    text = _contract_graph(t, str(FIXTURES / "vllm-0.29.0" / "live.jsonl"))
    if text is None:
        pytest.skip(f"{t.kind} {t.name} needs a service; its contract is checked end to end")
    rt, result = run(text.replace("{tmp}", str(tmp_path)))
    assert result.ok
    snap = result.metrics["n"] if "n" in result.metrics else result.metrics["src"]
    assert_metrics_contract(snap)
    assert snap["events_in"] > 0
    if t.kind.value == "sink":
        assert snap["events_out"] == snap["events_in"]  # delivered = received here


def test_prometheus_endpoint() -> None:
    from kvgraph.status import serve_metrics

    async def go():
        async with run_text(graph(SYNTH.format(n=100) + '[nodes.out]\ntype = "capture"\n'
                                  '[[edges]]\nfrom = "src"\nto = "out"\n')) as rt:
            await wait_for(lambda: len(capture("out")) == 100)
            server = await serve_metrics(rt, "127.0.0.1", 0)
            body = await asyncio.to_thread(
                lambda: urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics").read())
            await server.close()
        return body.decode()

    text = asyncio.run(go())
    assert 'kvgraph_node_events_out_total{kind="source",node="src",type="synthetic"} 100.0' \
        in text
    assert 'kvgraph_node_discarded_total{kind="sink",node="out",reason="unintentional",' \
           'type="capture"} 0.0' in text
    assert 'kvgraph_edge_capacity_batches{dst="out",edge="src -> out",src="src"} 1024.0' in text


def test_channels_are_bounded_in_events_too() -> None:
    async def go():
        ch = Channel("a", 1024, "block", capacity_events=10)
        inbox = Inbox([ch])
        await ch.send(list(range(8)))
        await ch.send(list(range(8)))  # 16 queued: at the bound now
        sender = asyncio.create_task(ch.send(list(range(8))))
        await wait_for(lambda: ch.statistics().waiting_senders == 1)
        assert len(ch) == 2  # 2 batches of 1024 allowed, but the events bound holds
        inbox.get_nowait()
        inbox.get_nowait()
        await sender
        big = Channel("b", 4, "block", capacity_events=10)
        Inbox([big])
        await big.send(list(range(50)))  # larger than the bound, into an empty channel: allowed
        assert big.full

    asyncio.run(go())


def test_channels_are_bounded_in_bytes_of_decoded_events() -> None:
    """Issue 11: a stalled graph of events of 4,096 blocks held 1.9 GB in 4,096 queued events;
    the sender's estimate of each batch bounds a channel in bytes too."""
    from kvgraph.event import Event, batch_bytes

    def big(n: int) -> list[Event]:   # n events of 1,000 blocks of 16 distinct tokens
        return [Event(kind="stored", worker_id=1, dp_rank=0, block_hashes=list(range(1000)),
                      token_ids=list(range(16_000)), block_size=16) for _ in range(n)]

    async def go():
        batch = big(2)
        size = batch_bytes(batch)
        assert 1_000_000 < size < 1_500_000           # 17,000 items of 36 bytes each, twice
        ch = Channel("a", 1024, "block", capacity_events=4096, capacity_bytes=2 * size)
        inbox = Inbox([ch])
        await ch.send(batch, size)
        await ch.send(batch, size)                     # at the bytes bound: 4 events queued
        sender = asyncio.create_task(ch.send(batch, size))
        await wait_for(lambda: ch.statistics().waiting_senders == 1)
        assert ch.statistics().current_bytes == 2 * size and ch.statistics().current_events == 4
        inbox.get_nowait()
        await sender
        assert ch.statistics().current_bytes == 2 * size

    asyncio.run(go())


def test_kvgraph_open_and_start_in_a_thread(tmp_path) -> None:
    import kvgraph

    path = tmp_path / "g.toml"
    path.write_text('[graph]\nname = "emb"\n[nodes.engine]\ntype = "api"\nblock_size = 2\n'
                    f'[nodes.out]\ntype = "file"\npath = "{tmp_path}/out.jsonl"\n'
                    '[[edges]]\nfrom = "engine"\nto = "out"\n')

    async def in_loop():
        async with kvgraph.open(path) as g:
            g.publisher("engine").publish_stored([1, 2], 2, [7])
        return g.result()

    assert asyncio.run(in_loop()).metrics["out"]["events_out"] == 1
    bg = kvgraph.start(path)
    for i in range(100):
        bg.publisher("engine").publish_removed([i])
    result = bg.stop()
    assert result is not None and result.ok and result.metrics["out"]["events_out"] == 100
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 100


def test_dedup_forgets_its_oldest_counts_past_max_blocks() -> None:
    """Past max_blocks the oldest counts are forgotten (a sixteenth at a time, so that an
    insert costs O(1): forgetting one at a time cost 35 us per hash); a remove of a forgotten
    hash passes as unknown, as the index downstream may still hold it."""
    from kvgraph.event import Event
    from kvgraph.testing import FEEDS

    from .helpers import GraphFile

    stores = [[Event(kind="stored", worker_id=1, dp_rank=0, block_hashes=[h])]
              for h in range(1, 41)]
    FEEDS["dedup"] = stores + [[Event(kind="removed", worker_id=1, dp_rank=0,
                                      block_hashes=list(range(1, 41)))]]
    graph = (GraphFile("forgetting").node("feed", "feed", feed="dedup")
             .node("dedup", "dedup", max_blocks=32).node("out", "capture")
             .edge("feed", "dedup").edge("dedup", "out"))

    async def go():
        async with run_text(graph.text()) as rt:
            pass
        return rt.result().metrics["dedup"]

    m = asyncio.run(go())
    removed = capture("out")[-1]
    assert removed.kind == "removed" and removed.block_hashes == list(range(1, 41))
    # 40 hashes, at most 32 kept: at 33 counts the oldest 3 go (30 stay), three times over
    assert m["forgotten"] == 9 and m["unknown_removes"] == 9
