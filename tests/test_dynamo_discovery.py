"""The ``dynamo`` sink's discovery records, as Dynamo 1.6.1 writes its own (probed with the
wheel: see kvgraph/proto/dynamo_discovery.py): there while it runs, kept alive, gone when it
stops; left behind by SIGKILL. File and etcd backends; no Dynamo needed."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvgraph.proto.dynamo_discovery import (CHANNELS, KEEP_ALIVE_S, SOURCES, EtcdDiscovery,
                                            FileDiscovery, endpoint_key)
from kvgraph.testing import EtcdServer, run_text, wait_for

from .helpers import GraphFile

PREFIX = endpoint_key("dynamo", "backend", "generate")


def sink_graph(**discovery: object) -> GraphFile:
    return (GraphFile("records").node("engine", "api", worker_id=7, block_size=4)
            .node("router", "dynamo", advertise_host="127.0.0.1", block_size=4,
                  subscriber_wait_s=0, **discovery)
            .edge("engine", "router"))


def records(backend: FileDiscovery | EtcdDiscovery) -> dict[str, dict[str, object]]:
    """Both buckets, parsed, by bucket/key."""
    return {f"{bucket}/{key}": json.loads(value) for bucket in (CHANNELS, SOURCES)
            for key, value in backend.list(bucket, PREFIX).items()}


def assert_dynamo_shapes(found: dict[str, dict[str, object]], worker_id: int) -> None:
    channel = next(v for k, v in found.items() if k.startswith(CHANNELS))
    source = next(v for k, v in found.items() if k.startswith(SOURCES))
    scope = {"kind": "endpoint", "endpoint": {"namespace": "dynamo", "component": "backend",
                                              "name": "generate"}}
    pid = channel["instance_id"]
    assert channel == {"type": "EventChannel", "scope": scope, "topic": "kv-events",
                       "instance_id": pid, "transport": {"kind": "Zmq", "config": {
                           "endpoint": channel["transport"]["config"]["endpoint"]}}}
    assert channel["transport"]["config"]["endpoint"].startswith("tcp://127.0.0.1:")
    assert source == {"type": "EventSource", "scope": scope, "topic": "kv-events",
                      "publisher_id": pid, "metadata": {
                          "kv_state_endpoint": scope["endpoint"],
                          "worker": {"worker_id": worker_id, "dp_rank": 0},
                          "publisher_id": pid}}
    assert all(k.endswith(f"/{pid:x}") for k in found)


def test_file_records_are_there_while_running_kept_alive_and_removed_on_stop(tmp_path) -> None:
    root = tmp_path / "kv"
    backend = FileDiscovery(root)

    async def go():
        async with run_text(sink_graph(discovery_path=str(root)).text()) as rt:
            rt.publisher("engine").publish_stored([1, 2, 3, 4], 4, [11])
            await wait_for(lambda: len(records(backend)) == 2)
            assert_dynamo_shapes(records(backend), 7)
            files = [p for p in root.rglob("*") if p.is_file()]
            # Dynamo's names: the key URL-encoded, every byte but letters and digits as %XX
            assert {p.name for p in files} == {
                "namespace%2Fdynamo%2Fcomponent%2Fbackend%2Fendpoint%2Fgenerate%2Ftopic%2Fkv"
                "%2Devents%2F" + p.name.rsplit("%2F", 1)[1] for p in files}
            touched = {p: p.stat().st_mtime for p in files}
            await wait_for(lambda: all(p.stat().st_mtime > t for p, t in touched.items()),
                           timeout=KEEP_ALIVE_S * 3)

    asyncio.run(go())
    assert records(backend) == {}
    assert not [p for p in root.rglob("*") if p.is_file()]


def test_sigkill_leaves_file_records_behind(tmp_path) -> None:
    """What Dynamo then does: any of its processes using the directory deletes files untouched
    for 10 s (its TTL); until then a router may connect to a publisher that is gone and gets
    nothing from it (the README says what to do)."""
    root = tmp_path / "kv"
    graph = (GraphFile("killed").node("engine", "synthetic", workers=1, rate=50, seed=1)
             .node("router", "dynamo", discovery_path=str(root), advertise_host="127.0.0.1",
                   subscriber_wait_s=0)
             .edge("engine", "router")).write(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "kvgraph", "run", str(graph)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    backend = FileDiscovery(root)
    try:
        asyncio.run(wait_for(lambda: len(records(backend)) == 2, timeout=30))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    left = [p for p in root.rglob("*") if p.is_file()]
    assert len(left) == 2
    assert time.time() - min(p.stat().st_mtime for p in left) < 10   # until they expire


def test_etcd_records_live_under_a_lease_and_go_on_stop() -> None:
    if EtcdServer.available():
        pytest.skip(EtcdServer.available())
    etcd = EtcdServer().start()
    backend = EtcdDiscovery([etcd.url])

    async def go():
        async with run_text(sink_graph(discovery="etcd", etcd_endpoints=[etcd.url]).text()) as rt:
            rt.publisher("engine").publish_stored([1, 2, 3, 4], 4, [11])
            await wait_for(lambda: len(records(backend)) == 2)
            assert_dynamo_shapes(records(backend), 7)
            lease = rt.nodes["router"]._registration.discovery.lease
            assert lease and backend._call("/v3/lease/timetolive", {"ID": str(lease)})["TTL"]

    try:
        asyncio.run(go())
        assert records(backend) == {}
    finally:
        etcd.close()


def test_worker_ids_past_2_63_are_written_in_hex(tmp_path) -> None:
    """Dynamo's instance ids are unsigned 64-bit; TOML integers stop at 2^63-1."""
    root = tmp_path / "kv"
    graph = sink_graph(discovery_path=str(root))
    graph.nodes["engine"]["worker_id"] = "0xd3c1a2b3c4d5e6f7"
    backend = FileDiscovery(root)

    async def go():
        async with run_text(graph.text()) as rt:
            rt.publisher("engine").publish_stored([1, 2, 3, 4], 4, [11])
            await wait_for(lambda: len(records(backend)) == 2)
            assert_dynamo_shapes(records(backend), 0xd3c1a2b3c4d5e6f7)

    asyncio.run(go())


def test_a_dynamo_source_counts_a_publishers_sequence_gap_and_rejects_malformed_frames(
        tmp_path) -> None:
    """A publisher found through discovery sends sequences 0, 1, 3 and a frame with a bad
    header: seq 2 is a counted loss with a record on `errors`, the bad frame an error, and the
    rest goes through."""
    from kvgraph.codecs.dynamo import EnvelopeWriter, router_event
    from kvgraph.event import Event
    from kvgraph.proto.dynamo_discovery import publisher_records
    from kvgraph.sinks.dynamo import frame_envelope
    from kvgraph.testing import capture, free_port

    from .helpers import ZmqPublisher

    root = tmp_path / "kv"
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    pub = ZmqPublisher(endpoint)
    backend = FileDiscovery(root)
    for record in publisher_records("dynamo", "backend", "generate", 77, 5, 0,
                                    {"kind": "Zmq", "config": {"endpoint": endpoint}}):
        backend.put(*record)
    writer = EnvelopeWriter(77)

    def message(seq: int, block: int) -> list[bytes]:
        writer.sequence = seq
        e = Event(kind="removed", worker_id=5, dp_rank=0, block_hashes=[block])
        body = writer.encode([router_event(e, seq + 1, 4)], 0)
        return [b"kv-events", (77).to_bytes(8, "big"), seq.to_bytes(8, "big"),
                frame_envelope(body)]

    graph = (GraphFile("gaps").node("fleet", "dynamo", discovery_path=str(root), poll_s=0.05)
             .node("out", "capture").node("dead", "capture")
             .edge("fleet", "out").edge("fleet.errors", "dead"))

    async def go():
        async with run_text(graph.text()) as rt:
            await asyncio.to_thread(pub.wait_subscribed)
            for seq in (0, 1, 3):
                pub.send(message(seq, 100 + seq))
            bad = message(4, 104)
            bad[3] = b"\x02" + bad[3][1:]          # header version 2
            pub.send(bad)
            pub.send(message(5, 105))
            await wait_for(lambda: len(capture("out")) == 4 and len(capture("dead")) == 2)
        return rt.result()

    try:
        result = asyncio.run(go())
    finally:
        pub.close()
        backend.close()
    assert [e.block_hashes[0] for e in capture("out")] == [100, 101, 103, 105]
    m = result.metrics["fleet"]
    assert m["seq_lost"] == 1 and m["malformed"] == 1 and result.lost == {"fleet": 1}
    reasons = sorted(r.reason for r in capture("dead"))
    assert reasons[0].startswith("lost 1 message(s) of publisher 4d, sequence 2..2")
    assert "bad frame header" in reasons[1]


def test_validate_connect_checks_the_discovery_backend(tmp_path) -> None:
    from kvgraph.testing import free_port, load_text
    from kvgraph.validate import probe

    down = f"http://127.0.0.1:{free_port()}"
    graph = load_text(sink_graph(discovery="etcd", etcd_endpoints=[down]).text())
    problems = asyncio.run(probe(graph))
    assert any("no etcd endpoint answered" in d.format() and "router" in d.format()
               for d in problems), [d.format() for d in problems]
    ok = load_text(sink_graph(discovery_path=str(tmp_path / "kv")).text())
    assert not asyncio.run(probe(ok))
