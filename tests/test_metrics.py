"""Issue 14: the metrics endpoint speaks Prometheus properly: every family has HELP and TYPE,
counters are counters, label values are escaped, process_* and python_* are there, OpenMetrics
when asked, HEAD has no body; ``promtool check metrics`` accepts the page of a running graph
that holds every node type."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from kvgraph import registry
from kvgraph.node import Kind
from kvgraph.testing import KafkaBroker, NatsServer, RedisServer, free_port, terminate

from .helpers import FIXTURES, ROOT, GraphFile

PROMTOOL = shutil.which("promtool")
NO_PROMTOOL = "promtool is not installed (Debian: apt-get install prometheus)"


def every_type_graph(tmp: Path, nats_url: str, redis_url: str, kafka: str) -> GraphFile:
    """One node of every type that `kvgraph nodes` lists, wired into one graph."""
    (tmp / "fn.py").write_text("def keep(batch):\n    return batch\n")
    recording = sorted(FIXTURES.glob("vllm-*"))[0] / "live.jsonl"
    disc = tmp / "discovery"
    zmq_in, zmq_out = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    g = (GraphFile("every-type")
         .node("engines", "synthetic", rate=500, max_events=400, workers=2)
         .node("api", "api", worker_id=3)
         .node("recording", "file", kind="source", path=str(recording), format="vllm-frames")
         .node("engine", "zmq", kind="source", endpoint=zmq_in)   # no engine there: quiet
         .node("bus", "nats", kind="source", url=nats_url, subject="kv.metrics.in")
         .node("fleet", "dynamo", kind="source", discovery_path=str(disc), namespace="m1")
         .node("stream", "redis", kind="source", url=redis_url, stream="kv.in")
         .node("topic", "kafka", kind="source", bootstrap_servers=kafka, topic="kv.in",
               create_topic=True)
         .node("dedup", "dedup").node("batch", "batch")
         .node("filter", "filter", kinds=["stored", "removed", "cleared"])
         .node("fn", "python", function="fn:keep", path=str(tmp))
         .node("drop", "null").node("print", "stdout")
         .node("save", "file", kind="sink", path=str(tmp / "out.jsonl"))
         .node("router", "nats", kind="sink", url=nats_url, subject="kv.metrics.out",
               format="dynamo-msgpack", block_size=16)
         .node("republish", "zmq", kind="sink", endpoint=zmq_out)
         .node("plane", "dynamo", kind="sink", discovery_path=str(disc), namespace="m2",
               subscriber_wait_s=0)
         .node("index", "index", port=0, block_size=16)
         .node("audit", "redis", kind="sink", url=redis_url, stream="kv.out")
         .node("backbone", "kafka", kind="sink", bootstrap_servers=kafka, topic="kv.out",
               create_topic=True))
    for src in ("engines", "api", "recording", "engine", "bus", "fleet", "stream", "topic"):
        g.edge(src, "dedup")
    g.edge("dedup", "batch").edge("batch", "filter").edge("filter", "fn")
    for sink in ("drop", "print", "save", "router", "republish", "plane", "index", "audit",
                 "backbone"):
        g.edge("fn", sink)
    return g


def scrape(port: int, method: str = "GET", accept: str = "") -> tuple[int, str, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", method=method,
                                 headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, r.headers.get("Content-Type", ""), r.read()


def test_a_graph_of_every_node_type_passes_promtool(tmp_path) -> None:
    if PROMTOOL is None:
        pytest.skip(NO_PROMTOOL)
    types = {(t.name, t.kind) for t in registry.all_types()}
    server, redis, kafka = NatsServer().start(), RedisServer().start(), KafkaBroker().start()
    g = every_type_graph(tmp_path, server.url, redis.url, kafka.bootstrap)
    assert types <= {(n["type"], Kind(n.get("kind") or registry.named(n["type"])[0].kind))
                     for n in g.nodes.values()}, "a node type is missing from the graph"
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kvgraph", "run", str(g.write(tmp_path)),
                             "--status", "off", "--metrics-port", str(port)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:   # until the synthetic engines' events went through
            try:
                status, ctype, page = scrape(port)
                delivered = re.search(rb'kvgraph_node_events_out_total\{kind="sink",'
                                      rb'node="index",type="index"\} ([\d.]+)', page)
                if delivered and float(delivered.group(1)) > 0:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "no events reached the index"
            time.sleep(0.1)
        check = subprocess.run([PROMTOOL, "check", "metrics"], input=page,
                               capture_output=True)
        assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
        assert ctype.startswith("text/plain; version=0.0.4")
        text = page.decode()
        for family in ("process_resident_memory_bytes", "process_open_fds",
                       "python_gc_objects_collected_total", "kvgraph_node_seq_gaps_total",
                       "kvgraph_node_blocks", "kvgraph_edge_fill_batches"):
            assert family in text, family
        head = scrape(port, "HEAD")
        assert head[0] == 200 and head[2] == b""
        om = scrape(port, accept="application/openmetrics-text; version=1.0.0")
        assert om[1].startswith("application/openmetrics-text") and om[2].endswith(b"# EOF\n")
    finally:
        terminate(proc)
        server.close()
        redis.close()
        kafka.close()


def test_label_values_are_escaped_and_undeclared_extras_are_gauges() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from kvgraph.metrics import NodeMetrics, families

    m = NodeMetrics('a"b\\c', 'plug"in', "sink")
    m.extra["surprise"] = 3

    class One:
        def collect(self):
            return families([(m, {})], [], 1.0)

    reg = CollectorRegistry(auto_describe=False)
    reg.register(One())
    text = generate_latest(reg).decode()
    assert 'node="a\\"b\\\\c"' in text and 'type="plug\\"in"' in text
    assert "# TYPE kvgraph_node_surprise gauge" in text
    assert "# HELP kvgraph_node_surprise surprise: set by the node type" in text
    if PROMTOOL:
        check = subprocess.run([PROMTOOL, "check", "metrics"], input=text.encode(),
                               capture_output=True)
        assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()


def test_the_index_nodes_dynamo_metrics_pass_promtool() -> None:
    import asyncio

    from kvgraph.testing import run_text

    if PROMTOOL is None:
        pytest.skip(NO_PROMTOOL)
    graph = GraphFile("indexer").node("index", "index", port=0).text()

    async def go() -> bytes:
        async with run_text(graph) as rt:
            port = rt.nodes["index"].port
            get = lambda path: urllib.request.urlopen(  # noqa: E731
                f"http://127.0.0.1:{port}{path}", timeout=10).read()
            await asyncio.to_thread(get, "/health")   # a request, so latencies are there
            return await asyncio.to_thread(get, "/metrics")

    page = asyncio.run(go())
    assert b"dynamo_kvindexer_request_duration_seconds_bucket" in page
    check = subprocess.run([PROMTOOL, "check", "metrics"], input=page, capture_output=True)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
