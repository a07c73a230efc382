"""End to end, with real components: ZMQ sockets, a real nats-server, `kvgraph run` processes.

Engines are played by a test XPUB socket that binds (ipc:// in a temp dir); kvgraph's SUB
connects, and the test waits for its subscription instead of sleeping (ZMQ's slow joiner).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import pytest

from kvgraph.codecs.dynamo import tokens_hash
from kvgraph.errors import ApiError
from kvgraph.event import Rejected
from kvgraph.testing import (NatsServer, assert_metrics_contract, capture, run_text, wait_for)

from .helpers import (ROOT, GraphFile, ZmqPublisher, assert_event_matches, engine_graph,
                      expected_batches, fixture_dirs,
                      fixture_id, read_frames)


@pytest.fixture(scope="module")
def nats_url():
    server = NatsServer().start()
    yield server.url
    server.close()


async def subscribe(url: str, subject: str):
    """A nats-py subscriber collecting message bodies; returns (connection, bodies)."""
    import nats

    nc = await nats.connect(url)
    bodies: list[bytes] = []

    async def cb(msg):
        bodies.append(msg.data)

    await nc.subscribe(subject, cb=cb)
    await nc.flush()
    return nc, bodies


def kvgraph_run(graph: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "kvgraph", "run", str(graph), "--status",
                             "off", *extra], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "NO_COLOR": "1"})


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> tuple[int, str]:
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    return proc.returncode, err


# -- every fixture version: ZMQ -> kvgraph run -> NATS -> subscriber ---------------------------

@pytest.mark.parametrize("d", fixture_dirs(), ids=fixture_id)
def test_fixture_round_trips_through_kvgraph_run_and_nats(d: Path, tmp_path: Path,
                                                          nats_url: str) -> None:
    subject = "kvtest." + fixture_id(d).replace(".", "_")
    graph = tmp_path / "relay.toml"
    graph.write_text(f"""
[graph]
name = "relay"
[nodes.engine]
type = "zmq"
endpoint = "ipc://{tmp_path}/engine.sock"
worker_id = 7
[nodes.bus]
type = "nats"
url = "{nats_url}"
subject = "{subject}"
format = "jsonl"
[[edges]]
from = "engine"
to = "bus"
""")
    expected = [(b, e) for b in expected_batches(d) for e in b["events"]]

    async def go() -> list[dict]:
        nc, bodies = await subscribe(nats_url, subject)
        pub = ZmqPublisher(f"ipc://{tmp_path}/engine.sock")
        proc = kvgraph_run(graph, "--report", str(tmp_path / "report.json"))
        try:
            await asyncio.to_thread(pub.wait_subscribed)
            for frames in read_frames(d / "live.jsonl"):
                pub.send(frames)

            def received() -> int:
                return sum(b.count(b"\n") for b in bodies)

            await wait_for(lambda: received() >= len(expected), timeout=30)
            code, err = await asyncio.to_thread(stop, proc)
            assert code == 0, err
        finally:
            if proc.poll() is None:
                proc.kill()
            pub.close()
            await nc.close()
        return [json.loads(line) for b in bodies for line in b.splitlines()]

    got = asyncio.run(go())
    assert len(got) == len(expected)
    for i, (ev, (batch, want)) in enumerate(zip(got, expected)):
        assert ev["worker_id"] == 7 and ev["seq"] == batch["seq"] and ev["ts"] == batch["ts"]
        assert ev["dp_rank"] == (batch["dp_rank"] or 0)
        assert_event_matches(ev, want, f"{d.name} event {i}")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] and report["lost_events"] == 0
    for node in ("engine", "bus"):
        assert_metrics_contract(report["metrics"][node])
    assert report["metrics"]["bus"]["events_out"] == len(expected)
    assert report["metrics"]["engine"]["seq_gaps"] == 0


# -- Dynamo's format ---------------------------------------------------------------------------

def test_api_to_nats_in_dynamo_json(nats_url: str) -> None:
    text = f"""
[graph]
name = "api-dynamo"
[nodes.engine]
type = "api"
worker_id = 3
block_size = 4
[nodes.router]
type = "nats"
url = "{nats_url}"
subject = "namespace.test.component.backend.kv_events"
format = "dynamo-json"
block_size = 4
[nodes.dead]
type = "capture"
[[edges]]
from = "engine"
to = "router"
[[edges]]
from = "router.errors"
to = "dead"
"""

    async def go():
        nc, bodies = await subscribe(nats_url, "namespace.test.component.backend.kv_events")
        async with run_text(text) as rt:
            pub = rt.publisher("engine")
            pub.publish_stored(list(range(8)), 4, [2**64 - 1, 12], lora_name=None)
            pub.publish_stored(list(range(1, 9)), [4, 4], [13, 14], parent_hash=12,
                               lora_name="adapter-a")
            pub.publish_removed([2**64 - 1])
            pub.publish_cleared()
            await wait_for(lambda: len(bodies) == 4)
        await nc.close()
        return [json.loads(b) for b in bodies], rt

    routers, rt = asyncio.run(go())
    assert [r["event"]["event_id"] for r in routers] == [1, 2, 3, 4]
    first = routers[0]
    assert first["worker_id"] == 3 and first["storage_tier"] == "device"
    blocks = first["event"]["data"]["stored"]["blocks"]
    assert [b["block_hash"] for b in blocks] == [2**64 - 1, 12]
    assert [b["tokens_hash"] for b in blocks] == [9143094415614847814, 12124091508212882195]
    second = routers[1]["event"]["data"]["stored"]
    assert second["parent_hash"] == 12
    assert [b["tokens_hash"] for b in second["blocks"]] == tokens_hash(list(range(1, 9)), 4,
                                                                       "adapter-a")
    assert routers[2]["event"]["data"] == {"removed": {"block_hashes": [2**64 - 1]}}
    assert routers[3]["event"]["data"] == "cleared"
    assert_metrics_contract(rt.result().metrics["router"])
    assert_metrics_contract(rt.result().metrics["engine"])


def test_block_size_mismatch_is_an_error_event_and_takes_no_event_id(nats_url: str) -> None:
    text = f"""
[graph]
name = "mismatch"
[nodes.rec]
type = "file"
path = "{fixture_dirs()[-1] / 'live.jsonl'}"
[nodes.router]
type = "nats"
url = "{nats_url}"
subject = "mismatch"
format = "dynamo-json"
block_size = 32
[nodes.dead]
type = "capture"
[[edges]]
from = "rec"
to = "router"
[[edges]]
from = "router.errors"
to = "dead"
"""

    async def go():
        nc, bodies = await subscribe(nats_url, "mismatch")
        async with run_text(text) as rt:
            await wait_for(lambda: rt.contexts["router"].metrics.events_in > 0 and
                           rt.contexts["rec"].metrics.events_out ==
                           rt.contexts["router"].metrics.events_in)
            await wait_for(lambda: len(bodies) + len(capture("dead")) ==
                           rt.contexts["router"].metrics.events_in)
        await nc.close()
        return [json.loads(b) for b in bodies]

    sent = asyncio.run(go())
    dead = capture("dead")
    assert dead and all("block_size 16 differs from the configured block_size 32" in r.reason
                        or "token ids" in r.reason for r in dead)
    assert not any("stored" in r["event"]["data"] for r in sent if isinstance(
        r["event"]["data"], dict))
    assert [r["event"]["event_id"] for r in sent] == list(range(1, len(sent) + 1))


# -- chaining through NATS: the nats source --------------------------------------------------------

def test_nats_source_reads_jsonl_and_dynamo_json_and_rejects_garbage(nats_url: str) -> None:
    text = f"""
[graph]
name = "chain"
[nodes.bus]
type = "nats"
url = "{nats_url}"
subject = "chain.jsonl"
format = "jsonl"
[nodes.router]
type = "nats"
kind = "source"
url = "{nats_url}"
subject = "chain.dynamo"
format = "dynamo-json"
[nodes.out]
type = "capture"
[nodes.dead]
type = "capture"
[[edges]]
from = "bus"
to = "out"
[[edges]]
from = "router"
to = "out"
[[edges]]
from = "bus.errors"
to = "dead"
"""
    import nats

    async def go():
        async with run_text(text) as rt:
            nc = await nats.connect(nats_url)
            line = {"kind": "stored", "worker_id": 1, "dp_rank": 0,
                    "block_hashes": [2**64 - 1], "token_ids": [1, 2]}
            await nc.publish("chain.jsonl", (json.dumps(line) + "\n").encode() * 2)
            await nc.publish("chain.jsonl", b"{not json\n")
            await nc.publish("chain.dynamo", json.dumps(
                {"worker_id": 9, "event": {"event_id": 1, "data": "cleared"}}).encode())
            await nc.flush()
            await wait_for(lambda: len(capture("out")) == 3 and len(capture("dead")) == 1)
            await nc.close()
        return rt

    rt = asyncio.run(go())
    kinds = sorted((e.kind, e.worker_id) for e in capture("out"))
    assert kinds == [("cleared", 9), ("stored", 1), ("stored", 1)]
    assert [e.block_hashes for e in capture("out") if e.kind == "stored"] == [[2**64 - 1]] * 2
    assert "malformed jsonl message" in capture("dead")[0].reason
    m = rt.result().metrics["bus"]
    assert_metrics_contract(m)
    assert m["malformed"] == 1 and m["errors"] == 1


def publish_blocking(url: str, subject: str, payload: bytes) -> None:
    """Publish with a plain socket, without yielding to the event loop: nothing the loop
    still has to send (a subscription, say) can reach the server first."""
    import socket

    host, port = url.removeprefix("nats://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        f = s.makefile("rb")
        f.readline()  # INFO
        s.sendall(b'CONNECT {"verbose":false}\r\n'
                  + f"PUB {subject} {len(payload)}\r\n".encode() + payload + b"\r\nPING\r\n")
        while not f.readline().startswith(b"PONG"):
            pass


def test_a_started_core_nats_source_is_already_subscribed(nats_url: str) -> None:
    """Core NATS keeps nothing: what is published before the server has the subscription is
    lost. When start() returns, the subscription must be at the server."""
    graph = (GraphFile("subscribed").node("bus", "nats", url=nats_url, subject="early",
                                          format="jsonl", kind="source")
             .node("out", "capture").edge("bus", "out"))

    async def go():
        async with run_text(graph.text()):
            publish_blocking(nats_url, "early", b'{"kind":"cleared","worker_id":5,"dp_rank":0}\n')
            await wait_for(lambda: len(capture("out")) == 1, timeout=10)

    asyncio.run(go())
    assert capture("out")[0].worker_id == 5


# -- the zmq source: malformed input, gaps, restarts ------------------------------------------------

def zmq_graph(endpoint: str) -> str:
    return engine_graph(endpoint, "worker_id = 1")


def good(seq: int, hashes: list[int]) -> list[bytes]:
    payload = msgspec.msgpack.encode(
        [1.0, [{"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": None,
                "token_ids": list(range(16 * len(hashes))), "block_size": 16,
                "lora_id": None, "medium": "GPU", "lora_name": None}], 0])
    return [b"", seq.to_bytes(8, "big"), payload]


MALFORMED = {
    "wrong frame count": [b"", (1).to_bytes(8, "big")],
    "short seq": [b"", b"\x00\x01", msgspec.msgpack.encode([1.0, [], 0])],
    "garbage msgpack": [b"", (1).to_bytes(8, "big"), b"\xc1\xc1\xc1"],
    "unknown tag": [b"", (1).to_bytes(8, "big"),
                    msgspec.msgpack.encode([1.0, [["BlockTeleported", [1]]], 0])],
    "wrong field type": [b"", (1).to_bytes(8, "big"),
                         msgspec.msgpack.encode([1.0, [{"type": "BlockRemoved",
                                                        "block_hashes": "abc"}], 0])],
}


def test_malformed_zmq_messages_are_counted_and_skipped(tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/engine.sock"

    async def go():
        pub = ZmqPublisher(endpoint)
        async with run_text(zmq_graph(endpoint)) as rt:
            await asyncio.to_thread(pub.wait_subscribed)
            pub.send(good(0, [1]))
            for frames in MALFORMED.values():
                pub.send(frames)
            pub.send(good(1, [2]))
            await wait_for(lambda: len(capture("out")) == 2 and len(capture("dead")) == 5)
        pub.close()
        return rt

    rt = asyncio.run(go())
    assert [e.block_hashes for e in capture("out")] == [[1], [2]]
    dead = capture("dead")
    assert all(isinstance(r, Rejected) and r.reason.startswith("malformed message") for r in dead)
    assert "2 frame(s)" in dead[0].reason and "2 bytes" in dead[1].reason
    m = rt.result().metrics["engine"]
    assert_metrics_contract(m)
    assert m["malformed"] == 5 and m["errors"] == 5 and m["events_out"] == 2


def test_seq_gaps_without_replay_are_reported_and_restarts_emit_cleared(tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/engine.sock"

    async def go():
        pub = ZmqPublisher(endpoint)
        async with run_text(zmq_graph(endpoint)) as rt:
            await asyncio.to_thread(pub.wait_subscribed)
            for seq in (0, 1, 4, 5, 0, 1):  # 2 and 3 lost; then the engine restarts
                pub.send(good(seq, [seq + 100]))
            await wait_for(lambda: len(capture("out")) == 7 and len(capture("dead")) == 1)
        pub.close()
        return rt.result().metrics["engine"]

    m = asyncio.run(go())
    assert (m["seq_gaps"], m["seq_missing"], m["seq_lost"], m["seq_resets"]) == (1, 2, 2, 1)
    kinds = [(e.kind, e.block_hashes) for e in capture("out")]
    assert kinds == [("stored", [100]), ("stored", [101]), ("stored", [104]), ("stored", [105]),
                     ("cleared", []), ("stored", [100]), ("stored", [101])]
    assert "lost 2 batch(es), seq 2..3" in capture("dead")[0].reason


# -- the api source ------------------------------------------------------------------------------

API = """
[graph]
name = "api"
[nodes.engine]
type = "api"
worker_id = 5
block_size = 4
max_pending = 64
[nodes.out]
type = "capture"
[[edges]]
from = "engine"
to = "out"
"""


def test_api_source_from_the_loop_and_from_threads() -> None:
    async def go():
        async with run_text(API) as rt:
            pub = rt.publisher("engine")
            pub.publish_stored([1, 2, 3, 4], 4, [10])

            def engine_thread(base: int) -> None:
                for i in range(500):
                    pub.publish_stored([1, 2, 3, 4], 4, [base + i], parent_hash=None)
                pub.publish_removed([base])

            threads = [threading.Thread(target=engine_thread, args=(b,)) for b in (1000, 5000)]
            for t in threads:
                t.start()
            await asyncio.to_thread(lambda: [t.join() for t in threads])
            pub.publish_cleared()
            await wait_for(lambda: len(capture("out")) == 1 + 2 * 501 + 1)
        return rt

    rt = asyncio.run(go())
    events = capture("out")
    assert events[0].block_hashes == [10] and events[-1].kind == "cleared"
    for base in (1000, 5000):  # per-thread order is kept
        mine = [e.block_hashes[0] for e in events
                if e.block_hashes and base <= e.block_hashes[0] < base + 1000]
        assert mine[:500] == list(range(base, base + 500))
    assert all(e.worker_id == 5 for e in events)
    assert_metrics_contract(rt.result().metrics["engine"])


@pytest.mark.parametrize("call,match", [
    (lambda p: p.publish_stored([1, 2, 3], 4, [1]), "3 token ids for 1 block"),
    (lambda p: p.publish_stored([1, 2, 3, 4], 8, [1]), "block_size is 4"),
    (lambda p: p.publish_stored([1, 2, 3, 4], [4, 4], [1]), "2 entries for 1 block"),
    (lambda p: p.publish_stored([1, 2, 3, 4], 4, [2**64]), "out of the 64-bit range"),
    (lambda p: p.publish_stored([1, 2, 3, 4], 4, ["x"]), "is not an int"),
    (lambda p: p.publish_removed([1.5]), "is not an int"),
    (lambda p: p.publish_stored([1, 2, 3, -4], 4, [1]), r"0\.\.2\^32-1"),
])
def test_api_rejects_bad_arguments(call, match) -> None:
    async def go():
        async with run_text(API) as rt:
            with pytest.raises(ApiError, match=match):
                call(rt.publisher("engine"))

    asyncio.run(go())


# -- lifecycle as a process --------------------------------------------------------------------------

def test_sigterm_mid_stream_drains_loses_nothing_and_exits_0(tmp_path: Path,
                                                             nats_url: str) -> None:
    graph = tmp_path / "stream.toml"
    graph.write_text(f"""
[graph]
name = "stream"
[nodes.rec]
type = "file"
path = "{fixture_dirs()[-1].parent / 'live.jsonl'}"
rate = 400
loop = true
[nodes.bus]
type = "nats"
url = "{nats_url}"
subject = "stream"
format = "jsonl"
events_per_message = 1
[[edges]]
from = "rec"
to = "bus"
capacity = 4
""")

    async def go():
        nc, bodies = await subscribe(nats_url, "stream")
        proc = kvgraph_run(graph, "--report", str(tmp_path / "report.json"))
        try:
            await wait_for(lambda: len(bodies) >= 100, timeout=30)
            code, err = await asyncio.to_thread(stop, proc)
            await nc.flush()
        finally:
            if proc.poll() is None:
                proc.kill()
        n = len(bodies)
        await nc.close()
        return code, err, n

    code, err, received = asyncio.run(go())
    assert code == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] and report["lost_events"] == 0
    produced = report["metrics"]["rec"]["events_out"]
    assert report["metrics"]["bus"]["events_out"] == produced == received


def test_run_refuses_an_invalid_graph() -> None:
    proc = subprocess.run([sys.executable, "-m", "kvgraph", "run",
                           "tests/graphs/bad/cycle.toml"], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 1
    assert "cycle: a -> b -> c -> a" in proc.stderr and "not starting" in proc.stderr


def test_credentials_come_from_the_environment() -> None:
    server = NatsServer("--auth", "s3cret-token").start()
    text = f"""
[graph]
name = "auth"
[nodes.engine]
type = "api"
[nodes.bus]
type = "nats"
url = "{server.url}"
subject = "auth.events"
format = "jsonl"
token = "${{KVGRAPH_TEST_TOKEN}}"
connect_attempts = 1
[[edges]]
from = "engine"
to = "bus"
"""
    import nats

    async def go():
        nc = await nats.connect(server.url, token="s3cret-token")
        bodies: list[bytes] = []

        async def cb(msg):
            bodies.append(msg.data)

        await nc.subscribe("auth.events", cb=cb)
        await nc.flush()
        async with run_text(text, environ={"KVGRAPH_TEST_TOKEN": "s3cret-token"}) as rt:
            rt.publisher("engine").publish_cleared()
            await wait_for(lambda: len(bodies) == 1)
        await nc.close()
        return bodies

    try:
        assert b'"kind":"cleared"' in asyncio.run(go())[0]
        from kvgraph.errors import NodeFailure

        with pytest.raises(NodeFailure, match=r"cannot connect to nats://127\.0\.0\.1"):
            async def wrong():
                async with run_text(text, environ={"KVGRAPH_TEST_TOKEN": "wrong"}):
                    pass
            asyncio.run(wrong())
    finally:
        server.close()


def test_second_signal_aborts_and_reports_the_loss(tmp_path: Path) -> None:
    (tmp_path / "stuck.py").write_text(
        "import asyncio\nasync def f(batch):\n    await asyncio.sleep(3600)\n")
    graph = tmp_path / "stuck.toml"
    graph.write_text(f"""
[graph]
name = "stuck"
[nodes.src]
type = "synthetic"
rate = 0
max_events = 2000
[nodes.fn]
type = "python"
function = "stuck:f"
path = "{tmp_path}"
[nodes.out]
type = "null"
[[edges]]
from = "src"
to = "fn"
[[edges]]
from = "fn"
to = "out"
""")
    report = tmp_path / "report.json"
    proc = kvgraph_run(graph, "--report", str(report), "--status", "log",
                       "--status-interval", "0.05")
    try:
        while True:  # until a status line shows that the source produced something
            line = proc.stderr.readline()
            assert line, "kvgraph exited early"
            if "status: src +" in line and "status: src +0 " not in line:
                break
        proc.send_signal(signal.SIGTERM)
        while "send it again to abort" not in proc.stderr.readline():  # two signals sent at
            pass                                                      # once would merge
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    data = json.loads(report.read_text())
    assert data["aborted"] and data["lost_events"] > 0
    assert "ABORTED" in err and "lost in flight" in err


def test_sigterm_during_a_nats_outage_exits_within_the_drain_timeout(tmp_path: Path) -> None:
    """Issue 14: draining into a NATS server that is down used to last for ever; past
    --drain-timeout the run aborts, counts what it could not deliver, writes the report, and
    exits 3."""
    server = NatsServer().start()
    try:
        graph = (GraphFile("outage").node("src", "synthetic", rate=2000, workers=2)
                 .node("router", "nats", url=server.url, subject="kv.outage",
                       format="dynamo-msgpack", block_size=16)
                 .edge("src", "router").write(tmp_path))
        report = tmp_path / "report.json"
        proc = kvgraph_run(graph, "--drain-timeout", "2", "--report", str(report),
                           "--status", "log", "--status-interval", "0.05")
        try:
            while True:   # until events flow
                line = proc.stderr.readline()
                assert line, "kvgraph exited early"
                if "status: src +" in line and "status: src +0 " not in line:
                    break
            server.stop()
            while "disconnected from NATS" not in proc.stderr.readline():
                pass
            produced = 0   # events made during the outage: they cannot be delivered
            while produced < 3:
                line = proc.stderr.readline()
                assert line, "kvgraph exited early"
                if "status: src +" in line and "status: src +0 " not in line:
                    produced += 1
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
            elapsed = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
    finally:
        server.close()
    assert proc.returncode == 3, err
    assert elapsed < 2 + 1, elapsed
    data = json.loads(report.read_text())
    assert data["aborted"] and data["lost_events"] > 0
    assert sum(data["undelivered_edges"].values()) + sum(data["undelivered_nodes"].values()) \
        == data["lost_events"]
    assert "longer than --drain-timeout 2 s" in err and "undelivered:" in err


# -- Dynamo 1.6.1 end to end: synthetic engines -> ZMQ -> relay -> NATS -> a second graph's index

def _index_difference(want: dict, got: dict, rt, engines: subprocess.Popen[str],
                      relay_err: str) -> str:
    """What a failed index comparison needs to be understood: per worker, blocks missing and
    extra; the consumer's counters; the engines' and the relay's logs."""
    lines = [f"worker {w}: want {len(want[w])}, got {len(got[w])}, "
             f"missing {len(set(want[w]) - set(got[w]))}, extra {len(set(got[w]) - set(want[w]))}"
             for w in want]
    lines.append(f"consumer: {rt.contexts['bus'].metrics.snapshot()}, "
                 f"index: {rt.contexts['index'].metrics.snapshot()}")
    lines.append("engines: " + (engines.stderr.read() if engines.poll() is not None else
                                "still running")[-2000:])
    lines.append("relay: " + relay_err[-4000:])
    return "\n".join(lines)


def test_synthetic_zmq_relay_nats_index_equals_an_index_fed_directly(tmp_path: Path,
                                                                     nats_url: str) -> None:
    from kvgraph.prefix_index import PrefixIndex
    from kvgraph.sources._frames import worker_id_from_topic
    from kvgraph.sources.synthetic import Simulation

    workers, events_n, per_batch, seed = 3, 3000, 16, 11
    engines = tmp_path / "engines.toml"
    engines.write_text(f"""
[graph]
name = "engines"
[nodes.engines]
type = "synthetic"
workers = {workers}
seed = {seed}
rate = 0
max_events = {events_n}
events_per_batch = {per_batch}
cache_blocks = 200
clear_probability = 0.01
zmq_endpoint = "ipc://{tmp_path}/engines.sock"
zmq_wait_subscriber_s = 30
[nodes.sink]
type = "null"
[[edges]]
from = "engines"
to = "sink"
""")
    relay = tmp_path / "relay.toml"
    relay.write_text(f"""
[graph]
name = "relay"
[nodes.engines]
type = "zmq"
endpoint = "ipc://{tmp_path}/engines.sock"
worker_id_from = "topic"
[nodes.dedup]
type = "dedup"
[nodes.batch]
type = "batch"
[nodes.router]
type = "nats"
url = "{nats_url}"
subject = "namespace.t.component.backend.endpoint.generate.kv-events"
format = "dynamo-msgpack"
[[edges]]
from = "engines"
to = "dedup"
[[edges]]
from = "dedup"
to = "batch"
[[edges]]
from = "batch"
to = "router"
""")
    consumer = f"""
[graph]
name = "consumer"
[nodes.bus]
type = "nats"
url = "{nats_url}"
subject = "namespace.t.component.backend.endpoint.generate.kv-events"
format = "dynamo-msgpack"
[nodes.index]
type = "index"
port = 0
[[edges]]
from = "bus"
to = "index"
"""
    # The index fed directly, from the same deterministic simulation.
    sim = Simulation(workers, 16, seed, 8, 0.6, 8, 200, 0.01)
    direct = PrefixIndex()
    ids = {r: worker_id_from_topic(f"kv@synthetic-{r}@synthetic".encode())
           for r in range(workers)}
    produced = 0
    while produced < events_n:
        _, evs = sim.step(min(per_batch, events_n - produced))
        produced += len(evs)
        for e in evs:
            w = (ids[e.worker_id], 0)
            if e.kind == "stored":
                direct.store(w, e.parent_hash, e.block_hashes, tokens_hash(e.token_ids, 16))
            elif e.kind == "removed":
                direct.remove(w, e.block_hashes)
            else:
                direct.clear(w)
    want = {w: direct.held(w) for w in [(i, 0) for i in ids.values()]}

    async def go():
        async with run_text(consumer) as rt:
            idx = rt.nodes["index"].index
            p_engines = kvgraph_run(engines)
            p_relay = kvgraph_run(relay, "--report", str(tmp_path / "relay.json"))
            try:
                await asyncio.to_thread(p_engines.wait, 60)
                try:
                    await wait_for(lambda: {w: idx.held(w) for w in want} == want, timeout=60)
                except AssertionError:  # say what differs, and what the processes said
                    _, relay_err = await asyncio.to_thread(stop, p_relay)
                    raise AssertionError(_index_difference(
                        want, {w: idx.held(w) for w in want}, rt, p_engines, relay_err)) from None
                code, err = await asyncio.to_thread(stop, p_relay)
                assert code == 0, err
            finally:
                for p in (p_engines, p_relay):
                    if p.poll() is None:
                        p.kill()
            queries = [list(range(64)), sim.system[0] + [1] * 32]
            return [rt.nodes["index"].query(q) for q in queries], rt

    answers, rt = asyncio.run(go())
    for q, got in zip([list(range(64)), sim.system[0] + [1] * 32], answers):
        expected = [s.__dict__ for s in direct.query_hashes(tokens_hash(q, 16))]
        assert got["scores"] == expected
    assert answers[1]["scores"]  # the shared system prompt is held somewhere
    assert answers[1]["tree_size"] == direct.nodes
    report = json.loads((tmp_path / "relay.json").read_text())
    m = report["metrics"]
    assert m["engines"]["seq_gaps"] == 0 and m["engines"]["events_out"] == events_n
    assert m["batch"]["merged_away"] > 0  # batching really happened
    assert m["router"]["errors"] == 0


COUNTING_SUBSCRIBER = """
import sys, zmq
sub = zmq.Context().socket(zmq.SUB)
sub.setsockopt(zmq.SUBSCRIBE, b"")
sub.setsockopt(zmq.RCVHWM, 0)
sub.connect(sys.argv[1])
n, want = 0, int(sys.argv[2])
while n < want and sub.poll(10_000):   # up to the count expected, or 10 s of silence
    sub.recv_multipart()
    n += 1
print(n, flush=True)
"""


def test_a_publishing_kvgraph_that_exits_still_delivers_its_last_messages(
        tmp_path: Path) -> None:
    """The synthetic engines publish and end while their subscriber is held up (descheduled,
    as a busy relay is; here SIGSTOP): what ZMQ still queued must reach it once it reads
    again, not die with the exiting process (it did: ~30% of the messages)."""
    endpoint = f"ipc://{tmp_path}/engines.sock"
    messages = 3000
    graph = (GraphFile("engines")
             .node("engines", "synthetic", rate=0, max_events=messages * 16, events_per_batch=16,
                   clear_probability=0, zmq_endpoint=endpoint, zmq_wait_subscriber_s=30)
             .node("out", "null").edge("engines", "out").write(tmp_path))
    reader = subprocess.Popen([sys.executable, "-c", COUNTING_SUBSCRIBER, endpoint,
                               str(messages)],
                              stdout=subprocess.PIPE, text=True)
    engines = kvgraph_run(graph)
    try:
        while "running engines" not in engines.stderr.readline():
            pass                                      # the subscriber has subscribed
        reader.send_signal(signal.SIGSTOP)            # and stops reading
        while "finished" not in engines.stderr.readline():
            pass                                      # every message is sent to ZMQ
        try:
            engines.wait(timeout=1)                   # (before the fix: gone, with its queue)
        except subprocess.TimeoutExpired:
            pass
        reader.send_signal(signal.SIGCONT)
        received = int(reader.communicate(timeout=60)[0])
        assert engines.wait(timeout=30) == 0
    finally:
        for p in (reader, engines):
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
    assert received == messages


def test_zmq_sink_republishes_in_vllm_format_and_serves_replay(tmp_path: Path) -> None:
    """api -> zmq sink -> (a second graph's) zmq source: the vLLM wire format round-trips, and
    the replay endpoint answers a DEALER with the buffered messages and the end marker."""
    import zmq

    pub_ep, replay_ep = f"ipc://{tmp_path}/out.sock", f"ipc://{tmp_path}/replay.sock"
    producer = f"""
[graph]
name = "republish"
[nodes.rec]
type = "api"
[nodes.out]
type = "zmq"
endpoint = "{pub_ep}"
topic = "kv@relay@model"
replay_endpoint = "{replay_ep}"
[[edges]]
from = "rec"
to = "out"
"""
    consumer = zmq_graph(pub_ep)

    async def go():
        async with run_text(producer) as prod:
            async with run_text(consumer) as cons:
                # wait until the consumer's SUB is connected: probe until one arrives
                pub = prod.publisher("rec")
                while not capture("out"):
                    pub.publish_cleared()
                    await asyncio.sleep(0.01)
                base = len(capture("out"))
                pub.publish_stored(list(range(32)), 16, [2**64 - 1, 5], lora_name="x")
                pub.publish_removed([5])
                await wait_for(lambda: len(capture("out")) == base + 2)
                dealer = zmq.Context.instance().socket(zmq.DEALER)
                dealer.connect(replay_ep)
                dealer.send_multipart([b"", (0).to_bytes(8, "big")])
                replies = []
                while True:
                    assert await asyncio.to_thread(dealer.poll, 10_000)
                    msg = dealer.recv_multipart()
                    replies.append(msg)
                    if msg[2] == b"\xff" * 8:
                        break
                dealer.close()
        return replies, cons

    replies, _ = asyncio.run(go())
    got = capture("out")[-2:]
    assert got[0].kind == "stored" and got[0].block_hashes == [2**64 - 1, 5]
    assert got[0].lora_name == "x" and got[0].token_ids == list(range(32))
    assert got[1].kind == "removed" and got[1].block_hashes == [5]
    body, end = replies[:-1], replies[-1]
    assert end == [b"", b"", b"\xff" * 8, b""]
    assert [int.from_bytes(m[2], "big") for m in body] == list(range(len(body)))
    assert all(m[1] == b"kv@relay@model" for m in body)


# -- kvgraph run --workers N ------------------------------------------------------------------

def test_workers_split_engines_across_processes_keeping_each_engines_order(
        tmp_path: Path, nats_url: str) -> None:
    """Three engines, two worker processes: every event arrives once, each engine's events in
    order with contiguous event ids, from two publishers (one per process)."""
    from kvgraph.codecs.vllm import encode_payload
    from kvgraph.event import Event

    engines = {wid: ZmqPublisher(f"ipc://{tmp_path}/e{wid}") for wid in (1, 2, 3)}
    nodes = "".join(f'[nodes.engine{w}]\ntype = "zmq"\nendpoint = "{e.endpoint}"\n'
                    f'worker_id = {w}\n[[edges]]\nfrom = "engine{w}"\nto = "dedup"\n'
                    for w, e in engines.items())
    graph = tmp_path / "workers.toml"
    graph.write_text(f'[graph]\nname = "workers"\n{nodes}[nodes.dedup]\ntype = "dedup"\n'
                     f'[nodes.bus]\ntype = "nats"\nurl = "{nats_url}"\nsubject = "w"\n'
                     f'block_size = 4\n[[edges]]\nfrom = "dedup"\nto = "bus"\n')
    batches, per_batch = 30, 5

    async def go():
        nc, bodies = await subscribe(nats_url, "w")
        proc = kvgraph_run(graph, "--workers", "2", "--report", str(tmp_path / "r.json"))
        try:
            for e in engines.values():
                await asyncio.to_thread(e.wait_subscribed)
            h = 1
            for seq in range(batches):
                for e in engines.values():  # interleaved, as live engines would be
                    evs = [Event(kind="stored", worker_id=0, dp_rank=0, block_hashes=[h + i],
                                 parent_hash=h + i - 1 if seq or i else None,
                                 token_ids=[1, 2, 3, 4], block_size=4)
                           for i in range(per_batch)]
                    e.send([b"", seq.to_bytes(8, "big"), encode_payload(evs, 1.0)])
                h += per_batch
            await wait_for(lambda: sum(len(msgspec.msgpack.decode(
                msgspec.msgpack.decode(b)["payload"])) for b in bodies)
                >= 3 * batches * per_batch, timeout=30)
            code, err = await asyncio.to_thread(stop, proc)
        finally:
            if proc.poll() is None:
                proc.kill()
        await nc.close()
        return code, err, bodies

    code, err, bodies = asyncio.run(go())
    for e in engines.values():
        e.close()
    assert code == 0, err
    assert "worker 0/2: engine1, engine3" in err and "worker 1/2: engine2" in err
    publishers, per_worker = set(), {}
    for body in bodies:
        env = msgspec.msgpack.decode(body)
        publishers.add(env["publisher_id"])
        for r in msgspec.msgpack.decode(env["payload"]):
            per_worker.setdefault(r["worker_id"], []).append(
                (r["event"]["event_id"], r["event"]["data"]["stored"]["blocks"][0]["block_hash"]))
    assert len(publishers) == 2
    n = batches * per_batch
    for wid in (1, 2, 3):
        assert per_worker[wid] == [(i + 1, i + 1) for i in range(n)], wid
    reports = [json.loads((tmp_path / f"r.worker{i}.json").read_text()) for i in (0, 1)]
    assert set(reports[0]["metrics"]) == {"engine1", "engine3", "dedup", "bus"}
    assert set(reports[1]["metrics"]) == {"engine2", "dedup", "bus"}
    assert all(r["ok"] and r["lost_events"] == 0 for r in reports)


def test_workers_refuse_a_graph_that_cannot_be_split(tmp_path: Path) -> None:
    graph = tmp_path / "one.toml"
    graph.write_text('[graph]\nname = "one"\n[nodes.a]\ntype = "synthetic"\n'
                     '[nodes.idx]\ntype = "index"\n[[edges]]\nfrom = "a"\nto = "idx"\n')
    proc = subprocess.run([sys.executable, "-m", "kvgraph", "run", str(graph), "--workers",
                           "2"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "sink 'idx' (index) cannot run in several processes" in proc.stderr
    assert "--workers 2 needs at least 2 source nodes" in proc.stderr


def _two_source_graph(tmp_path: Path) -> Path:
    graph = tmp_path / "two.toml"
    graph.write_text('[graph]\nname = "two"\n'
                     + "".join(f'[nodes.s{i}]\ntype = "synthetic"\nrate = 200\nseed = {i}\n'
                               f'[[edges]]\nfrom = "s{i}"\nto = "out"\n' for i in (0, 1))
                     + '[nodes.out]\ntype = "null"\n')
    return graph


def _wait_for_status(proc: subprocess.Popen[str], workers: int) -> str:
    """Until every worker logged a status line (they run, with their sources started);
    returns what was read meanwhile."""
    seen: set[str] = set()
    read = []
    while len(seen) < workers:
        line = proc.stderr.readline()
        assert line, "kvgraph exited early"
        read.append(line)
        if "status:" in line and "[worker " in line:
            seen.add(line.split("[worker ", 1)[1].split("]")[0])
    return "".join(read)


def test_ctrl_c_on_the_terminal_drains_the_workers_once(tmp_path: Path) -> None:
    """A terminal's Ctrl-C signals the whole process group; the workers must see it once
    (from the supervisor), so they drain and exit 0 instead of aborting."""
    proc = subprocess.Popen([sys.executable, "-m", "kvgraph", "run",
                             str(_two_source_graph(tmp_path)), "--workers", "2", "--status",
                             "log", "--status-interval", "0.1"], cwd=ROOT, text=True,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        _wait_for_status(proc, 2)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err
    assert "ABORTED" not in err and err.count("done after") == 2


def test_sighup_to_a_run_with_workers_says_it_cannot_reload_and_runs_on(tmp_path: Path
                                                                       ) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "kvgraph", "run",
                             str(_two_source_graph(tmp_path)), "--workers", "2", "--status",
                             "log", "--status-interval", "0.1"], cwd=ROOT, text=True,
                            stderr=subprocess.PIPE)
    try:
        _wait_for_status(proc, 2)
        proc.send_signal(signal.SIGHUP)
        said = _wait_for_status(proc, 2)   # the workers still report
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "SIGHUP: a graph run with --workers cannot be reloaded" in said + err


def test_workers_stop_by_themselves_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    proc = subprocess.Popen([sys.executable, "-m", "kvgraph", "run",
                             str(_two_source_graph(tmp_path)), "--workers", "2", "--status",
                             "log", "--status-interval", "0.1", "--report", str(report)],
                            cwd=ROOT, text=True, stderr=subprocess.PIPE)
    _wait_for_status(proc, 2)
    proc.kill()
    proc.wait()
    reports = [tmp_path / f"r.worker{i}.json" for i in (0, 1)]
    asyncio.run(wait_for(lambda: all(r.exists() for r in reports), timeout=30))
    assert all(json.loads(r.read_text())["ok"] for r in reports)


# -- against Dynamo's own relay, when ai-dynamo-runtime is installed (pip install -e '.[bench]') --

def _flatten(bodies: list[bytes]) -> list[tuple]:
    """What a router applies, in order: stored blocks, removed hashes, clears (Dynamo merges
    a message's chained stores into one RouterEvent; the blocks are the same)."""
    out: list[tuple] = []
    for body in bodies:
        for r in msgspec.msgpack.decode(msgspec.msgpack.decode(body)["payload"]):
            data = r["event"]["data"]
            if data == "cleared":
                out.append(("cleared", r["worker_id"]))
            elif "stored" in data:
                out += [("stored", r["worker_id"], r["storage_tier"], b["block_hash"],
                         b["tokens_hash"]) for b in data["stored"]["blocks"]]
            else:
                out += [("removed", r["worker_id"], h) for h in data["removed"]["block_hashes"]]
    return out


def test_kvgraph_and_dynamos_own_relay_send_the_same_router_events(tmp_path: Path,
                                                                    nats_url: str) -> None:
    pytest.importorskip("dynamo._core", reason="ai-dynamo-runtime is not installed")
    from kvgraph.codecs.vllm import encode_payload
    from kvgraph.event import Event

    batches, h = [], 1
    for seq in range(6):
        evs = [Event(kind="stored", worker_id=0, dp_rank=0, block_hashes=[h, h + 1],
                     parent_hash=h - 1 if h > 1 else None, medium="GPU", block_size=16,
                     token_ids=[(h * 131 + k) % 151936 for k in range(32)])]
        h += 2
        if seq == 3:
            evs.append(Event(kind="removed", worker_id=0, dp_rank=0, block_hashes=[h - 1]))
        if seq == 4:   # the edge cases issue 13 found, as Dynamo's relay treats them
            tokens = list(range(48))
            evs += [Event(kind="stored", worker_id=0, dp_rank=0, block_hashes=[900, 901],
                          medium="GPU", block_size=16, token_ids=tokens[:24]),   # 1.5 blocks
                    Event(kind="stored", worker_id=0, dp_rank=0, block_hashes=[902, 903],
                          medium="GPU", block_size=16, token_ids=tokens[:40]),   # 2.5 blocks
                    Event(kind="stored", worker_id=0, dp_rank=0, block_hashes=[904],
                          medium="GPU", block_size=16, token_ids=tokens[:16],
                          cache_salt="tenant-a"),
                    Event(kind="stored", worker_id=0, dp_rank=0, block_hashes=[905],
                          medium="CPU", block_size=16, token_ids=tokens[:16]),
                    Event(kind="stored", worker_id=0, dp_rank=0, block_hashes=[906],
                          medium="GPU", block_size=16, token_ids=tokens[:16], group_idx=1)]
        if seq == 5:
            evs.append(Event(kind="cleared", worker_id=0, dp_rank=0))
        batches.append(encode_payload(evs, 1.0))
    graph = tmp_path / "relay.toml"
    seen = {}
    for relay in ("dynamo", "kvgraph"):
        engine = ZmqPublisher(f"ipc://{tmp_path}/{relay}")
        subject = ("namespace.bench.component.backend.endpoint.generate.kv-events"
                   if relay == "dynamo" else "kv")
        if relay == "dynamo":
            cmd = [sys.executable, str(ROOT / "benchmarks" / "dynamo_relay.py"),
                   engine.endpoint, nats_url]
        else:
            graph.write_text(f'[graph]\nname = "r"\n[nodes.e]\ntype = "zmq"\nendpoint = '
                             f'"{engine.endpoint}"\n[nodes.n]\ntype = "nats"\nurl = '
                             f'"{nats_url}"\nsubject = "kv"\n[[edges]]\nfrom = "e"\nto = "n"\n')
            cmd = [sys.executable, "-m", "kvgraph", "run", str(graph), "--status", "off"]

        async def go():
            nc, bodies = await subscribe(nats_url, subject)
            proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.DEVNULL)
            try:
                await asyncio.to_thread(engine.wait_subscribed, 30_000)
                for seq, payload in enumerate(batches):
                    engine.send([b"", seq.to_bytes(8, "big"), payload])
                await wait_for(lambda: any(b"cleared" in b for b in bodies), timeout=30)
            finally:
                proc.terminate()
                proc.wait(30)
            await nc.close()
            return bodies

        seen[relay] = _flatten(asyncio.run(go()))
        engine.close()
    assert seen["kvgraph"] == seen["dynamo"]
    assert len([x for x in seen["dynamo"] if x[0] == "stored"]) == 12 + 1 + 2 + 1 + 1
