"""The vLLM ZMQ -> NATS relay, end to end with real processes: kvgraph against the baseline.

    python3 benchmarks/bench_relay.py                      # the comparison table (both relays,
                                                           # 1, 16 and 128 events per message)
    python3 benchmarks/bench_relay.py --only kvgraph --events-per-message 16 [--transforms
        "dedup batch"] [--format dynamo-json] [--rate 10000]

A producer (this process) binds a ZMQ PUB like a vLLM engine and sends pre-encoded batches in
vLLM's wire format (map encoding, 4 blocks of 16 tokens per event, every event chained to the
previous one); the relay (a separate process) forwards them to a real nats-server; a subscriber
(this process, another thread) counts what arrives.

* events/s = events received / (last receive - first send); lost = sent - received;
* latency = receive time - send time of the ZMQ message that carried the event (both clocks
  are this process's), reported at a paced rate with ``--rate``;
* CPU% and peak RSS are the relay process's, from /proc.

Every relay runs ``--repeat`` times, alternating kvgraph and baseline, and the table shows
medians and the median of the pair-by-pair ratios, so that machine noise cancels. Dynamo's own
relay is measured when ``ai-dynamo-runtime`` is installed; it is not installed here, and the table
says so.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kvgraph.codecs.vllm import encode_payload  # noqa: E402
from kvgraph.event import Event  # noqa: E402
from kvgraph.testing import NatsServer, free_port  # noqa: E402

BS = 16


def make_messages(n_messages: int, per_message: int, blocks: int) -> list[bytes]:
    import random

    rng = random.Random(1)
    out = []
    h = 1
    for _ in range(n_messages):
        events = []
        for _ in range(per_message):
            events.append(Event(kind="stored", worker_id=0, dp_rank=0,
                                block_hashes=[h + i for i in range(blocks)], parent_hash=h - 1,
                                token_ids=[rng.randrange(151936) for _ in range(blocks * BS)],
                                block_size=BS, medium="GPU"))
            h += blocks
        out.append(encode_payload(events, time.time(), 0, "map"))
    return out


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_peak(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def kvgraph_cmd(tmp: Path, port: int, url: str, fmt: str, transforms: str) -> list[str]:
    chain = ["engine", *(f"t{i}" for i in range(len(transforms.split()))), "router"]
    nodes = "".join(f'[nodes.t{i}]\ntype = "{t}"\n' for i, t in enumerate(transforms.split()))
    edges = "".join(f'[[edges]]\nfrom = "{a}"\nto = "{b}"\n' for a, b in zip(chain, chain[1:]))
    graph = tmp / "relay.toml"
    graph.write_text(f'[graph]\nname = "bench"\n[nodes.engine]\ntype = "zmq"\n'
                     f'endpoint = "tcp://127.0.0.1:{port}"\n{nodes}[nodes.router]\ntype = "nats"'
                     f'\nurl = "{url}"\nsubject = "bench.kv-events"\nformat = "{fmt}"\n{edges}')
    return [sys.executable, "-m", "kvgraph", "run", str(graph), "--status", "off",
            "--log-level", "warning"]


def baseline_cmd(tmp: Path, port: int, url: str, fmt: str, transforms: str) -> list[str]:
    return [sys.executable, str(ROOT / "benchmarks" / "baseline_relay.py"),
            f"tcp://127.0.0.1:{port}", url, "bench.kv-events"]


def run_once(relay: str, per: int, blocks: int, total_events: int, fmt: str = "dynamo-msgpack",
             transforms: str = "", rate: float = 0.0, profile: str = "") -> dict[str, Any]:
    n_msgs = max(1, total_events // per)
    msgs = make_messages(n_msgs, per, blocks)
    total = n_msgs * per
    server = NatsServer().start()
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="kvgraph-bench-"))
    cmd = (kvgraph_cmd if relay == "kvgraph" else baseline_cmd)(tmp, port, server.url, fmt,
                                                                 transforms)
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.bind(f"tcp://127.0.0.1:{port}")
    sent_at = [0.0] * n_msgs
    received = [0]
    last_recv = [0.0]
    latencies: list[float] = []
    done = threading.Event()
    ready = threading.Event()
    first_hash_per_msg = per * blocks

    def count(body: bytes) -> list[int]:
        """The first block hash of each event in a message."""
        if fmt == "dynamo-msgpack":
            routers = msgspec.msgpack.decode(msgspec.msgpack.decode(body)["payload"])
        elif fmt == "dynamo-json":
            routers = [msgspec.json.decode(body)]
        else:
            return [msgspec.json.decode(line)["block_hashes"][0] for line in body.splitlines()]
        firsts = []
        for r in routers:
            hashes = [b["block_hash"] for b in r["event"]["data"]["stored"]["blocks"]]
            firsts += hashes[::blocks]  # a merged event stands for len/blocks events
        return firsts

    async def subscriber() -> None:
        import nats

        nc = await nats.connect(server.url, pending_size=256 * 1024 * 1024)

        async def cb(msg: Any) -> None:
            now = time.perf_counter()
            firsts = count(msg.data)
            received[0] += len(firsts)
            last_recv[0] = now
            if rate:
                latencies.extend(now - sent_at[(h - 1) // first_hash_per_msg] for h in firsts)
            if received[0] >= total:
                done.set()

        await nc.subscribe("bench.kv-events", cb=cb, pending_msgs_limit=10_000_000,
                           pending_bytes_limit=2**31)
        await nc.flush()
        ready.set()
        while not done.is_set():
            await asyncio.sleep(0.05)
        await nc.close()

    sub_thread = threading.Thread(target=lambda: asyncio.run(subscriber()))
    sub_thread.start()
    ready.wait(10)
    if profile:  # py-spy samples the relay; its folded stacks go to the file named
        cmd = ["py-spy", "record", "--format", "raw", "--rate", "250", "-o", profile, "--",
               *cmd]
    relay_proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        if not pub.poll(30_000, zmq.POLLIN):
            raise SystemExit(f"{relay} did not subscribe: {relay_proc.stderr.read()}")
        pub.recv()
        cpu0 = _cpu(relay_proc.pid)
        t0 = time.perf_counter()
        interval = per / rate if rate else 0.0
        for i, payload in enumerate(msgs):
            if interval:  # sleep, not spin: the subscriber thread needs the GIL to timestamp
                delay = t0 + i * interval - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            sent_at[i] = time.perf_counter()
            pub.send_multipart([b"", i.to_bytes(8, "big"), payload])
        done.wait(180)
        elapsed = (last_recv[0] or time.perf_counter()) - t0
        cpu = _cpu(relay_proc.pid) - cpu0
        rss = _rss_peak(relay_proc.pid)
    finally:
        relay_proc.send_signal(signal.SIGINT if profile else signal.SIGTERM)
        relay_proc.communicate(timeout=30)
        done.set()
        sub_thread.join()
        pub.close()
        server.close()
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3 \
            if latencies else float("nan")

    return {"relay": relay, "per": per, "events_s": received[0] / elapsed,
            "blocks_s": received[0] * blocks / elapsed, "cpu": 100 * cpu / elapsed,
            "rss_mb": rss / 2**20, "lost": total - received[0],
            "p50": pct(0.5), "p99": pct(0.99), "p999": pct(0.999)}


def compare(repeat: int, total: int) -> None:
    rows = []
    for per in (1, 16, 128):
        runs: dict[str, list[dict[str, Any]]] = {"kvgraph": [], "baseline": []}
        for _ in range(repeat):
            for relay in ("kvgraph", "baseline"):
                runs[relay].append(run_once(relay, per, 4, total))
        ratios = [k["events_s"] / b["events_s"] for k, b in zip(runs["kvgraph"],
                                                                 runs["baseline"])]
        for relay, rs in runs.items():
            rows.append((per, relay, statistics.median(r["events_s"] for r in rs),
                         statistics.median(r["cpu"] for r in rs),
                         max(r["rss_mb"] for r in rs), sum(r["lost"] for r in rs),
                         statistics.median(ratios) if relay == "kvgraph" else None))
    print(f"\nZMQ -> NATS (dynamo-msgpack), 4 blocks/event, {total:,} events per run, "
          f"median of {repeat} runs")
    print(f"{'ev/msg':>6}  {'relay':<9} {'events/s':>10} {'CPU%':>5} {'peak RSS':>9} "
          f"{'lost':>5}  kvgraph/baseline")
    for per, relay, evs, cpu, rss, lost, ratio in rows:
        print(f"{per:>6}  {relay:<9} {evs:>10,.0f} {cpu:>5.0f} {rss:>7.0f}MB {lost:>5}  "
              + (f"{ratio:.2f}" if ratio is not None else ""))
    print("Dynamo 1.6.1 relay: skipped (ai-dynamo-runtime is not installed: "
          "pip install ai-dynamo-runtime to include it)")
    lat = [run_once(r, 16, 4, 30_000, rate=10_000) for r in ("kvgraph", "baseline")]
    print("\npaced 10k events/s, 16 events per message:")
    for r in lat:
        print(f"  {r['relay']:<9} p50 {r['p50']:.2f} ms  p99 {r['p99']:.2f} ms  "
              f"p999 {r['p999']:.2f} ms  CPU {r['cpu']:.0f}%  peak RSS {r['rss_mb']:.0f} MB  "
              f"lost {r['lost']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=["kvgraph", "baseline"])
    ap.add_argument("--events-per-message", type=int, default=16)
    ap.add_argument("--events", type=int, default=160_000, help="events per run")
    ap.add_argument("--blocks-per-event", type=int, default=4)
    ap.add_argument("--transforms", default="", help='kvgraph only, e.g. "dedup batch"')
    ap.add_argument("--format", default="dynamo-msgpack",
                    choices=["dynamo-msgpack", "dynamo-json", "jsonl"])
    ap.add_argument("--rate", type=float, default=0.0, help="pace at this many events/s")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--profile", metavar="FILE", default="",
                    help="with --only: sample the relay with py-spy into FILE (folded stacks; "
                         "summarise with benchmarks/profile_summary.py FILE)")
    args = ap.parse_args()
    if not args.only:
        compare(args.repeat, args.events)
        return
    r = run_once(args.only, args.events_per_message, args.blocks_per_event, args.events,
                 args.format, args.transforms, args.rate, args.profile)
    path = " -> ".join(["ZMQ", *args.transforms.split(), "NATS"])
    print(f"{args.only} {path} ({args.format}, {args.events_per_message} events/message, "
          f"{args.blocks_per_event} blocks/event): {r['events_s']:,.0f} events/s "
          f"({r['blocks_s']:,.0f} blocks/s), CPU {r['cpu']:.0f}%, peak RSS {r['rss_mb']:.0f} "
          f"MB, lost {r['lost']}"
          + (f", latency p50 {r['p50']:.2f} ms p99 {r['p99']:.2f} ms" if args.rate else ""))


if __name__ == "__main__":
    main()
