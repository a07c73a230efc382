"""The ``dynamo`` node against Dynamo 1.6.1 itself (the ``ai-dynamo-runtime`` wheel): its
router consumes kvgraph as it consumes Dynamo's own publisher, and answers the same."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from kvgraph.event import Event
from kvgraph.testing import free_port, run_text, wait_for

from .helpers import GraphFile, ZmqPublisher

dynamo_wheel = pytest.importorskip(
    "dynamo._core", reason="ai-dynamo-runtime 1.6.1 is not installed (pip install -e '.[test]' "
    "on Linux): Dynamo's own router is the oracle of these tests")

PROCS = Path(__file__).with_name("dynamo_procs.py")
BS = 16


class DynamoProc:
    """One of Dynamo's processes (tests/dynamo_procs.py), spoken to in JSON lines."""

    def __init__(self, env: dict[str, str], role: str, *args: str):
        self.proc = subprocess.Popen([sys.executable, str(PROCS), role, *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **env})
        self.stderr: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        self.hello = self._read(60)

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def _read(self, timeout: float) -> Any:
        assert self.proc.stdout is not None
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(timeout)
        if not result or not result[0]:
            raise AssertionError(f"{self.proc.args[2]} said nothing in {timeout} s:\n"
                                 + "".join(self.stderr[-30:]))
        return json.loads(result[0])

    def ask(self, obj: Any, timeout: float = 30) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def stored(hashes: list[int], tokens: list[int], parent: int | None) -> Event:
    return Event(kind="stored", worker_id=0, dp_rank=0, block_hashes=hashes, token_ids=tokens,
                 parent_hash=parent, block_size=BS, medium="GPU")


def removed(hashes: list[int]) -> Event:
    return Event(kind="removed", worker_id=0, dp_rank=0, block_hashes=hashes, medium="GPU")


def recorded_stream() -> tuple[list[list[Event]], list[list[int]]]:
    """An engine's batches, as vLLM makes them, and 30 prompts. 10 conversations over 3 system
    prompts: a system prompt's blocks are stored once (the engine's prefix cache: the same
    tokens, the same hashes), each conversation's own blocks below it; then some conversations
    lose their last two blocks, and one system prompt loses its last block (Dynamo drops what the
    worker holds below it). Prompts: 10 whole conversations, 10 that leave them after 6 blocks,
    10 that share nothing."""
    def tokens(seed: int, n: int) -> list[int]:
        return [(seed * 7919 + i * 31) % 50_000 + 1 for i in range(n * BS)]

    batches: list[list[Event]] = []
    docs: list[list[int]] = []
    systems = {k: (tokens(100 + k, 4), [10 * k + 1 + i for i in range(4)]) for k in range(3)}
    for k, (toks, hashes) in systems.items():
        batches.append([stored(hashes, toks, None)])
    for c in range(10):
        system, sys_hashes = systems[c % 3]
        own = tokens(200 + c, 4 + c % 3)
        hashes = [1000 + 100 * c + i for i in range(len(own) // BS)]
        batches.append([stored(hashes, own, sys_hashes[-1])])
        if c % 4 == 1:
            batches.append([removed(hashes[-2:])])
        docs.append(system + own)
    batches.append([removed([systems[2][1][-1]])])
    prompts = [d + tokens(999, 1) for d in docs]                               # whole
    prompts += [d[:6 * BS] + tokens(300 + i, 3) for i, d in enumerate(docs)]   # in part
    prompts += [tokens(500 + i, 5) for i in range(10)]                         # misses
    return batches, prompts


def sentinel(n: int) -> list[Event]:
    return [stored([10**9 + n], [50_001 + n] * BS, None)]


class Plane:
    """Where Dynamo's processes and the graph find each other (a file directory or an etcd)
    and how events travel (Dynamo's ZMQ event plane, or NATS)."""

    def __init__(self, discovery: str, transport: str, tmp_path: Path):
        self.etcd = self.nats = None
        self.env = {"DYN_EVENT_PLANE_HOST": "127.0.0.1", "DYN_LOG": "warn"}
        self.args = ["--discovery", discovery]
        if discovery == "etcd":
            from kvgraph.testing import EtcdServer

            if EtcdServer.available():
                pytest.skip(EtcdServer.available())
            self.etcd = EtcdServer().start()
            self.env["ETCD_ENDPOINTS"] = self.etcd.url
            self.node_options: dict[str, Any] = {"discovery": "etcd",
                                                 "etcd_endpoints": [self.etcd.url]}
        else:
            self.env["DYN_FILE_KV"] = str(tmp_path / "discovery")
            self.node_options = {"discovery_path": self.env["DYN_FILE_KV"]}
        if transport == "nats":
            from kvgraph.testing import NatsServer

            self.nats = NatsServer().start()
            self.env["NATS_SERVER"] = self.nats.url
            self.args += ["--event-plane", "nats"]
            self.node_options.update(transport="nats", url=self.nats.url)

    def close(self) -> None:
        for server in (self.etcd, self.nats):
            if server is not None:
                server.close()


@pytest.fixture(params=[("file", "zmq"), ("etcd", "zmq"), ("file", "nats")],
                ids=["file-zmq", "etcd-zmq", "file-nats"])
def discovery(request, tmp_path: Path):
    plane = Plane(*request.param, tmp_path)
    yield plane
    plane.close()


def test_dynamo_router_answers_the_same_fed_by_kvgraph_as_by_its_own_publisher(
        discovery) -> None:
    """Issue 12: one router, two workers fed the same vLLM stream, worker 1 by Dynamo's own
    KvEventPublisher(zmq_endpoint=...), worker 2 by kvgraph (zmq -> dynamo), found through
    Dynamo's file or etcd discovery, over its ZMQ or NATS event plane. The router's per-worker
    overlaps agree on 30 prompts."""
    from kvgraph.codecs.vllm import encode_payload

    engine_ep = f"tcp://127.0.0.1:{free_port()}"
    engine = ZmqPublisher(engine_ep)
    env, args = discovery.env, discovery.args
    router = DynamoProc(env, "router", *args)
    own = DynamoProc(env, "worker", "--publish", engine_ep, *args)
    fed = DynamoProc(env, "worker", *args)
    w_own, w_fed = str(own.hello["instance_id"]), str(fed.hello["instance_id"])
    graph = (GraphFile("to-dynamo")
             .node("engine", "zmq", endpoint=engine_ep, worker_id=hex(int(w_fed)), block_size=BS)
             .node("router", "dynamo", advertise_host="127.0.0.1", block_size=BS,
                   **discovery.node_options)
             .edge("engine", "router"))
    batches, prompts = recorded_stream()
    seq = 0

    def publish(events: list[Event]) -> None:
        nonlocal seq
        engine.send([b"kv@test", seq.to_bytes(8, "big"), encode_payload(events, time.time(), 0)])
        seq += 1

    async def both_hold(n: int) -> None:
        """Until the router has sentinel n from both workers (publishing it again while not:
        a router connects to a publisher some time after it appears in discovery)."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            publish(sentinel(n))
            got = await asyncio.to_thread(router.ask, [50_001 + n] * BS)
            if got.get(w_own) == 1 and got.get(w_fed) == 1:
                return
            await asyncio.sleep(0.2)
        raise AssertionError(f"the router never had sentinel {n} from both workers: {got}")

    async def go() -> list[dict[str, int]]:
        async with run_text(graph.text()):
            await asyncio.to_thread(engine.wait_subscribed)   # Dynamo's publisher, kvgraph:
            await asyncio.to_thread(engine.wait_subscribed)   # both read the engine
            await both_hold(0)
            for b in batches:
                publish(b)
            await both_hold(1)                                # everything before it is in
            return [await asyncio.to_thread(router.ask, p) for p in prompts]

    try:
        answers = asyncio.run(go())
    finally:
        for p in (router, own, fed):
            p.close()
        engine.close()
    pairs = [(a.get(w_own, 0), a.get(w_fed, 0)) for a in answers]
    assert all(x == y for x, y in pairs), f"(dynamo's publisher, kvgraph) per prompt: {pairs}"
    # What the engine still holds of each whole conversation: its blocks, less the two evicted
    # (c % 4 == 1), and for system prompt 2 (c % 3 == 2) only its first 3 blocks: the remove of
    # its last block takes what lies below it.
    whole = [3 if c % 3 == 2 else 8 + c % 3 - (2 if c % 4 == 1 else 0) for c in range(10)]
    hits = [x for x, _ in pairs]
    print("router overlaps (dynamo publisher, kvgraph):", pairs)
    assert hits[:10] == whole
    assert hits[10:20] == [min(6, w) for w in whole]
    assert hits[20:] == [0] * 10                                   # misses


def test_a_dynamo_source_re_emits_exactly_what_dynamos_own_publisher_sent(discovery) -> None:
    """Issue 12: a kvgraph `dynamo` source finds Dynamo's KvEventPublisher (the wheel's, fed
    with its Python API) through discovery and re-emits its events, each once, as sent."""
    from kvgraph.codecs.dynamo import tokens_hash
    from kvgraph.testing import capture

    graph = (GraphFile("from-dynamo")
             .node("fleet", "dynamo", poll_s=0.05, **discovery.node_options)
             .node("out", "capture").edge("fleet", "out"))
    sent: list[tuple[str, Any]] = []
    for i in range(20):
        tokens = [i * 100 + t for t in range(2 * BS)]
        sent.append(("stored", [tokens, [i * 10 + 1, i * 10 + 2], None if i % 2 else 5]))
        if i % 5 == 4:
            sent.append(("removed", [i * 10 + 2]))

    async def go():
        async with run_text(graph.text()) as rt:
            fleet = rt.contexts["fleet"].metrics
            publisher = DynamoProc(discovery.env, "publisher", "--worker-id", "7", *discovery.args)
            try:
                await wait_for(lambda: fleet.extra["publishers"] == 1, timeout=30)
                # ZMQ connects some time after: a sentinel until one arrives
                while not capture("out"):
                    await asyncio.to_thread(publisher.ask, {"removed": [999]})
                    await asyncio.sleep(0.05)
                await asyncio.to_thread(publisher.ask, {"removed": [998]})   # the last one
                await wait_for(lambda: capture("out")[-1].block_hashes == [998])
                start = len(capture("out"))
                for kind, body in sent:
                    await asyncio.to_thread(publisher.ask, {kind: body})
                await wait_for(lambda: len(capture("out")) == start + len(sent))
                return capture("out")[start:], rt
            finally:
                publisher.close()

    got, rt = asyncio.run(go())
    want = []
    for kind, body in sent:
        if kind == "stored":
            tokens, hashes, parent = body
            want.append(("stored", 7, 0, hashes, parent, tokens_hash(tokens, BS)))
        else:
            want.append(("removed", 7, 0, body, None, None))
    assert [(e.kind, e.worker_id, e.dp_rank, e.block_hashes, e.parent_hash, e.tokens_hashes)
            for e in got] == want
    m = rt.result().metrics["fleet"]
    assert m["seq_lost"] == 0 and m["malformed"] == 0 and rt.result().ok
