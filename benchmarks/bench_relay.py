"""Throughput of the vLLM ZMQ -> NATS relay graph, end to end, with real processes.

    python3 benchmarks/bench_relay.py [--events-per-message 16] [--messages 20000]
                                      [--format dynamo-msgpack] [--blocks-per-event 4]

A producer (this process) binds a ZMQ PUB like a vLLM engine and sends pre-encoded batches in
vLLM's wire format (synthetic source, map encoding, block_size 16); `kvgraph run` relays them to a
real nats-server; a subscriber (this process, another thread's loop) counts the events that
arrive. events/s = events received / (last receive - first send). Lost = sent - received.
Everything shares this machine's cores, as in production on a small host.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgspec
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kvgraph.codecs.vllm import encode_payload  # noqa: E402
from kvgraph.event import Event  # noqa: E402
from kvgraph.testing import NatsServer, free_port  # noqa: E402


BLOCKS = [4]


def make_messages(n_messages: int, per_message: int, blocks: int, bs: int = 16
                  ) -> list[list[bytes]]:
    import random

    rng = random.Random(1)
    out = []
    h = 1
    for seq in range(n_messages):
        events = []
        for _ in range(per_message):
            events.append(Event(kind="stored", worker_id=0, dp_rank=0,
                                block_hashes=[h + i for i in range(blocks)], parent_hash=h - 1,
                                token_ids=[rng.randrange(151936) for _ in range(blocks * bs)],
                                block_size=bs, medium="GPU"))
            h += blocks
        out.append([b"", seq.to_bytes(8, "big"), encode_payload(events, time.time(), 0, "map")])
    return out


def count_events(body: bytes, fmt: str) -> int:
    """Events in a message; a merged RouterEvent counts as its blocks / blocks_per_event."""
    if fmt == "dynamo-msgpack":
        env = msgspec.msgpack.decode(body)
        routers = msgspec.msgpack.decode(env["payload"])
        return sum(len(r["event"]["data"]["stored"]["blocks"]) for r in routers) // BLOCKS[0]
    if fmt == "jsonl":
        return body.count(b"\n")
    return 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events-per-message", type=int, default=16)
    ap.add_argument("--messages", type=int, default=0, help="default: 320k events' worth")
    ap.add_argument("--blocks-per-event", type=int, default=4)
    ap.add_argument("--transforms", default="",
                    help='transforms between the ZMQ source and NATS, e.g. "dedup batch"')
    ap.add_argument("--format", default="dynamo-msgpack",
                    choices=["dynamo-msgpack", "dynamo-json", "jsonl"])
    args = ap.parse_args()
    per = args.events_per_message
    BLOCKS[0] = args.blocks_per_event
    n_msgs = args.messages or max(1, 320_000 // per)
    msgs = make_messages(n_msgs, per, args.blocks_per_event)
    total = n_msgs * per

    server = NatsServer().start()
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="kvgraph-bench-"))
    graph = tmp / "relay.toml"
    chain = ["engine", *(f"t{i}" for i in range(len(args.transforms.split()))), "router"]
    transforms = "".join(f'[nodes.t{i}]\ntype = "{t}"\n'
                         for i, t in enumerate(args.transforms.split()))
    edges = "".join(f'[[edges]]\nfrom = "{a}"\nto = "{b}"\n' for a, b in zip(chain, chain[1:]))
    graph.write_text(f"""
[graph]
name = "bench-relay"
[nodes.engine]
type = "zmq"
endpoint = "tcp://127.0.0.1:{port}"
{transforms}
[nodes.router]
type = "nats"
url = "{server.url}"
subject = "bench.kv-events"
format = "{args.format}"
{edges}""")
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.bind(f"tcp://127.0.0.1:{port}")

    received = [0]
    first_send = [0.0]
    last_recv = [0.0]
    done = threading.Event()

    async def subscriber(ready: threading.Event) -> None:
        import nats

        nc = await nats.connect(server.url, pending_size=64 * 1024 * 1024)

        async def cb(msg) -> None:
            received[0] += count_events(msg.data, args.format)
            last_recv[0] = time.perf_counter()
            if received[0] >= total:
                done.set()

        await nc.subscribe("bench.kv-events", cb=cb, pending_msgs_limit=10_000_000,
                           pending_bytes_limit=2**31)
        await nc.flush()
        ready.set()
        while not done.is_set():
            await asyncio.sleep(0.05)
        await nc.close()

    ready = threading.Event()
    sub_thread = threading.Thread(target=lambda: asyncio.run(subscriber(ready)))
    sub_thread.start()
    ready.wait(10)
    relay = subprocess.Popen([sys.executable, "-m", "kvgraph", "run", str(graph), "--status",
                              "off", "--log-level", "warning"], cwd=ROOT,
                             stderr=subprocess.PIPE, text=True)
    if not pub.poll(20_000, zmq.POLLIN):
        raise SystemExit("relay did not subscribe")
    pub.recv()
    cpu0 = _cpu(relay.pid)
    first_send[0] = time.perf_counter()
    for m in msgs:
        pub.send_multipart(m)
    done.wait(120)
    elapsed = last_recv[0] - first_send[0]
    cpu = _cpu(relay.pid) - cpu0
    rss = _rss_peak(relay.pid)
    relay.terminate()
    relay.communicate(timeout=30)
    done.set()
    sub_thread.join()
    server.close()
    lost = total - received[0]
    print(f"{'ZMQ -> ' + ' -> '.join(args.transforms.split() + ['NATS'])}: "
          f"format={args.format} events/message={per} blocks/event={args.blocks_per_event}: "
          f"{received[0] / elapsed:,.0f} events/s ({received[0] * args.blocks_per_event / elapsed:,.0f} "
          f"blocks/s), {total} events in {elapsed:.2f} s, relay CPU {100 * cpu / elapsed:.0f}%"
          f" of a core, relay peak RSS {rss / 1024:.0f} MB, lost {lost}")


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_peak(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


if __name__ == "__main__":
    main()
