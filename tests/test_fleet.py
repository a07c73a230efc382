"""A fleet across hosts (network namespaces on this machine): a 3-server NATS cluster with a
replicated, partitioned stream; 4 relay hosts, each with 2 engines over real ZMQ; 2 consumer
processes sharing the partitions; 3 index replicas. A NATS server, a relay and a consumer are
SIGKILLed during the run. Afterwards every event is in the stream exactly once, each worker's
events reached the consumers in order, and the index replicas answer alike."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from kvgraph.testing import Hosts, NatsCluster, free_port
from tests.helpers import ROOT, GraphFile, stream_events, wait_until
from tests.indexer_client import IndexerClient

RELAYS, ENGINES_PER_RELAY, PARTITIONS = 4, 2, 4
EVENTS, RATE, PER_BATCH = 1200, 150, 8            # per engine
STREAM, SUBJECT = "KV", "kv.ev.{worker_id}"
NATS_HOSTS, RELAY_HOST, CONSUMER_HOST, INDEX_HOST = 0, 3, 3 + RELAYS, 5 + RELAYS


def engine_graph(ip: str, relay: int) -> GraphFile:
    """Two simulated engines publishing vLLM's frames, each with its replay endpoint; an
    idle api node keeps the process (and the replay endpoints) up once they are done."""
    g = GraphFile(f"engines{relay}").node("idle", "api").node("nowhere", "null")
    g.edge("idle", "nowhere")
    for k in range(ENGINES_PER_RELAY):
        g.node(f"sim{k}", "synthetic", workers=1, rate=RATE, max_events=EVENTS,
               events_per_batch=PER_BATCH, seed=relay * 10 + k)
        g.node(f"pub{k}", "zmq", kind="sink", endpoint=f"tcp://{ip}:{5557 + 2 * k}",
               replay_endpoint=f"tcp://{ip}:{5558 + 2 * k}", buffer_steps=100_000)
        g.edge(f"sim{k}", f"pub{k}")
    return g


def worker_of(relay: int, k: int) -> int:
    return 100 + relay * 10 + k


def relay_graph(ip: str, relay: int, urls: list[str]) -> GraphFile:
    g = GraphFile(f"relay{relay}").node(
        "bus", "nats", url=urls, subject=SUBJECT, format="jsonl", jetstream=True,
        stream=STREAM, create_stream=True, replicas=3, partitions=PARTITIONS,
        dedup_window_s=600, reconnect_wait_s=0.2)
    for k in range(ENGINES_PER_RELAY):
        g.node(f"engine{k}", "zmq", endpoint=f"tcp://{ip}:{5557 + 2 * k}",
               replay_endpoint=f"tcp://{ip}:{5558 + 2 * k}", replay_on_connect=True,
               worker_id=worker_of(relay, k))
        g.edge(f"engine{k}", "bus")
    return g


def reader(urls: list[str], group: str) -> GraphFile:
    return GraphFile(group).node(
        "in", "nats", url=urls, subject="kv.ev.*", format="jsonl", jetstream=True,
        stream=STREAM, partitions=PARTITIONS, group=group, lease_s=1.0, ack_wait_s=5,
        reconnect_wait_s=0.2, replicas=3)


def consumer_graph(urls: list[str], out: Path) -> GraphFile:
    return reader(urls, "consumers").node("out", "file", path=str(out)).edge("in", "out")


def index_graph(urls: list[str], group: str, ip: str, port: int) -> GraphFile:
    return reader(urls, group).node("index", "index", host=ip, port=port, model_name="fleet",
                                    block_size=16).edge("in", "index")


class Fleet:
    def __init__(self, hosts: Hosts, tmp: Path):
        self.hosts, self.tmp = hosts, tmp
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def run(self, name: str, host: int, graph: GraphFile) -> None:
        """Start ``graph`` on ``host``; its log and, when it ends by itself or a signal,
        its report (``NAME.N.json``, N counting the runs of that name) go to the temp dir."""
        path = graph.write(self.tmp, f"{name}.toml")
        runs = len(list(self.tmp.glob(f"{name}.*.json"))) + (name in self.procs)
        log = open(self.tmp / f"{name}.log", "ab")
        self.procs[name] = self.hosts.run(host, [
            sys.executable, "-m", "kvgraph", "run", str(path), "--status", "off", "--report",
            str(self.tmp / f"{name}.{runs}.json")], cwd=ROOT, stdout=subprocess.DEVNULL,
            stderr=log)
        log.close()

    def delivered(self, name: str) -> int:
        """What the runs of ``name`` that ended by a signal (not SIGKILL) confirmed, node
        ``bus``."""
        return sum(json.loads(p.read_text())["metrics"]["bus"]["events_out"]
                   for p in self.tmp.glob(f"{name}.*.json"))

    def kill(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait()

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for name, p in self.procs.items():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def events_in(path: Path) -> list[dict]:
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:   # the last line of a process killed mid-write
                pass
    return out


def key(e: dict) -> tuple[int, int, float]:
    """An event's place: its worker's batch (seq) and the batch's time."""
    return (e["worker_id"], e["seq"], e["ts"])


def test_a_fleet_survives_a_dead_nats_server_relay_and_consumer(tmp_path: Path) -> None:
    hosts = Hosts(INDEX_HOST + 3)
    cluster = NatsCluster(hosts, 3, NATS_HOSTS)
    fleet = Fleet(hosts, tmp_path)
    ports = [8090 if hosts.isolated else free_port() for _ in range(3)]
    outs = [tmp_path / "consumer0.jsonl", tmp_path / "consumer1.jsonl"]
    try:
        cluster.start()
        urls = cluster.urls
        asyncio.run(cluster.wait_jetstream())
        for r in range(RELAYS):
            ip = hosts.ip(RELAY_HOST + r)
            fleet.run(f"engines{r}", RELAY_HOST + r, engine_graph(ip, r))
            fleet.run(f"relay{r}", RELAY_HOST + r, relay_graph(ip, r, urls))
        # the relays create the stream; the readers need it
        asyncio.run(cluster.wait_jetstream(lambda js: js.stream_info(STREAM), 60))
        for c in range(2):
            fleet.run(f"consumer{c}", CONSUMER_HOST + c, consumer_graph(urls, outs[c]))
        for i, group in enumerate(("index-a", "index-b")):
            fleet.run(group, INDEX_HOST + i, index_graph(urls, group, hosts.ip(INDEX_HOST + i),
                                                         ports[i]))
        wait_until(lambda: len(events_in(outs[0])) + len(events_in(outs[1])) > 1000, 60,
                   "events reaching the consumers")
        cluster.kill(1)                       # a NATS server dies...
        time.sleep(1.5)   # (the fault's length: what is tested is what happens meanwhile)
        fleet.kill("relay1")                  # ...a relay dies while it is down...
        cluster.start(1)                      # ...the server comes back...
        fleet.run("relay1", RELAY_HOST + 1, relay_graph(hosts.ip(RELAY_HOST + 1), 1, urls))
        fleet.kill("consumer1")               # ...and a consumer dies
        total = RELAYS * ENGINES_PER_RELAY * EVENTS
        wait_until(lambda: len({key(e) for e in events_in(outs[0]) + events_in(outs[1])})
                   >= total // PER_BATCH, 120, "every batch delivered")
        stream = asyncio.run(stream_events(urls, STREAM))
        fleet.run("index-c", INDEX_HOST + 2, index_graph(urls, "index-c",
                                                         hosts.ip(INDEX_HOST + 2), ports[2]))
        clients = [IndexerClient(f"http://{hosts.ip(INDEX_HOST + i)}:{ports[i]}")
                   for i in range(3)]
        for client in clients:
            wait_until(lambda: _status(client) == 200, 60, f"{client.url} ready")
        answers = _same_answers(clients, stream)
    finally:
        fleet.stop_all()
        cluster.close()
        hosts.close()

    # every event in the stream exactly once, each in the partition of its worker
    batches = Counter(key(e) for _, e in stream)
    assert len(stream) == total and set(batches.values()) == {PER_BATCH}
    assert fleet.delivered("relay1") == ENGINES_PER_RELAY * EVENTS
    partition_of: dict[int, set[str]] = {}
    for subject, e in stream:   # KV.part.<P>.<worker>
        assert subject.split(".")[-1] == str(e["worker_id"])
        partition_of.setdefault(e["worker_id"], set()).add(subject.split(".")[2])
    assert all(len(p) == 1 for p in partition_of.values())   # a worker: one partition
    in_stream: dict[int, list[tuple[int, float]]] = {}
    for _, e in stream:
        in_stream.setdefault(e["worker_id"], []).append((e["seq"], e["ts"]))
    for w, seqs in in_stream.items():
        assert seqs == sorted(seqs), f"worker {w} out of order in the stream"
    # each worker's events reached the consumers: all of them, and in order at each consumer
    got = [events_in(p) for p in outs]
    assert {key(e) for e in got[0] + got[1]} == set(batches)
    for events in got:
        per_worker: dict[int, list[tuple[int, float]]] = {}
        for e in events:
            per_worker.setdefault(e["worker_id"], []).append((e["seq"], e["ts"]))
        for w, seqs in per_worker.items():
            assert seqs == sorted(seqs), f"worker {w} out of order"
    assert "caught up with stream KV" in fleet.log("index-c")
    replayed = fleet.delivered("relay1")   # its second run: the first was SIGKILLed
    copies = len(got[0]) + len(got[1]) - len(stream)
    print(f"\nfleet: {total} events sent by {RELAYS * ENGINES_PER_RELAY} engines; the "
          f"restarted relay confirmed {replayed} (its engines' whole history, replayed: what "
          f"its first run had stored was dropped by message id); stream: {len(stream)} "
          f"stored, each once; consumers: {len(got[0]) + len(got[1])} delivered, {copies} "
          f"copies across members (what a killed member had not acknowledged), reorders 0; "
          f"index replicas: 1,000 queries, {answers} matching some worker, identical on the "
          f"3 replicas and on the one started after the run")
    assert answers > 100   # of the 1,000 queries, the same answers everywhere, and not empty


def _status(client: IndexerClient) -> int:
    """/health of a replica: 200 once it has caught up, 503 before, 0 while not listening."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(client.url + "/health", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _same_answers(clients: list[IndexerClient], stream: list[tuple[str, dict]]) -> int:
    """1,000 queries from the stored events' tokens, asked of every replica: the same answers.
    Returns how many matched some worker."""
    rng = random.Random(7)
    stored = [e for _, e in stream if e["kind"] == "stored" and e.get("token_ids")]
    matched = 0
    for e in rng.sample(stored, 1000):
        answers = [c.query(e["token_ids"], "fleet") for c in clients]
        assert answers[0][0] == 200 and all(a == answers[0] for a in answers), answers
        matched += bool(answers[0][1].get("scores"))
    dumps = [_blocks(c.dump()[1]) for c in clients]
    assert dumps[0] and all(d == dumps[0] for d in dumps)
    return matched


def _blocks(dump: dict) -> set[tuple]:
    """What a /dump holds, whatever the order it walks the index in: each block with its
    worker and its parent."""
    out: set[tuple] = set()
    for part, body in dump.items():
        for r in body["events"]:
            stored = r["event"]["data"].get("stored") if isinstance(r["event"]["data"], dict) \
                else None
            if stored is None:
                continue
            parent = stored.get("parent_hash")
            for b in stored["blocks"]:
                out.add((part, r["worker_id"], r["event"].get("dp_rank"), parent, b["block_hash"]))
                parent = b["block_hash"]
    return out
