"""Soak: an engine -> ``kvgraph run`` (zmq -> core-NATS sink) with nats-server restarted every
``--restart-every`` seconds. At the end, every event sent must be delivered or reported lost:

    delivered (distinct events in the stream) + reported lost (the relay's report) == sent

The server keeps a JetStream stream on the subject, so that what reached it is counted there,
whatever happened to core subscribers during the restarts (they would miss messages while they
reconnect, which is core NATS's promise, not the relay's). The engine is a thread with a real
ZMQ PUB socket: 16 events per message, each event a store of one block with a unique hash.

    python3 benchmarks/soak_nats.py --duration 600 --restart-every 120 --rate 10000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgspec

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from kvgraph.testing import NatsServer, free_port, stream_lines  # noqa: E402

EVENTS_PER_MESSAGE = 16


def engine(endpoint: str, rate: float, stop: threading.Event, sent: list[int]) -> None:
    """Publish vLLM-shaped batches at ``rate`` events/s until ``stop``; ``sent[0]`` counts."""
    import zmq

    from kvgraph.codecs.vllm import encode_payload
    from kvgraph.event import Event

    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.bind(endpoint)
    pub.recv()  # the relay subscribed
    seq, block, start = 0, 1, time.monotonic()
    while not stop.is_set():
        events = [Event(kind="stored", worker_id=1, dp_rank=0, block_hashes=[block + i],
                        token_ids=list(range(16)), block_size=16, medium="GPU")
                  for i in range(EVENTS_PER_MESSAGE)]
        pub.send_multipart([b"kv@soak@m", seq.to_bytes(8, "big"),
                            encode_payload(events, time.time(), 0, "map")])
        seq += 1
        block += EVENTS_PER_MESSAGE
        sent[0] += EVENTS_PER_MESSAGE
        delay = start + sent[0] / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    pub.close(linger=5000)
    ctx.term()


async def stream_contents(url: str) -> tuple[set[int], int]:
    """The distinct events the server's stream holds, and how many lines in all."""
    lines = await stream_lines(url, "soak.events", "SOAK", idle_s=2)
    return {msgspec.json.decode(line)["block_hashes"][0] for line in lines}, len(lines)


async def make_stream(url: str) -> None:
    import nats
    from nats.js.api import StorageType, StreamConfig

    nc = await nats.connect(url)
    await nc.jetstream().add_stream(StreamConfig(name="SOAK", subjects=["soak.events"],
                                                 storage=StorageType.FILE))
    await nc.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=600)
    ap.add_argument("--restart-every", type=float, default=120)
    ap.add_argument("--rate", type=float, default=10_000, help="events/s")
    args = ap.parse_args()

    server = NatsServer().start()
    asyncio.run(make_stream(server.url))
    tmp = Path(tempfile.mkdtemp(prefix="kvgraph-soak-"))
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    graph = tmp / "soak.toml"
    graph.write_text(f'''[graph]
name = "soak"
[nodes.engine]
type = "zmq"
endpoint = "{endpoint}"
worker_id = 1
[nodes.bus]
type = "nats"
url = "{server.url}"
subject = "soak.events"
format = "jsonl"
reconnect_wait_s = 0.2
[[edges]]
from = "engine"
to = "bus"
''')
    report = tmp / "report.json"
    relay = subprocess.Popen([sys.executable, "-m", "kvgraph", "run", str(graph), "--status",
                              "log", "--report", str(report)], cwd=HERE.parent,
                             stderr=open(tmp / "relay.log", "w"))
    stop, sent = threading.Event(), [0]
    t = threading.Thread(target=engine, args=(endpoint, args.rate, stop, sent))
    t.start()
    started = time.monotonic()
    restarts = 0
    while time.monotonic() - started < args.duration:
        next_restart = started + (restarts + 1) * args.restart_every
        time.sleep(max(0.0, min(next_restart, started + args.duration) - time.monotonic()))
        if time.monotonic() - started >= args.duration:
            break
        server.stop()                       # SIGTERM: the server stores what it acknowledged
        server.start(server.port)
        restarts += 1
        print(f"{time.monotonic() - started:6.0f} s: restarted nats-server ({restarts}); "
              f"sent {sent[0]}", flush=True)
    stop.set()
    t.join()
    relay.send_signal(signal.SIGTERM)
    relay.wait(120)
    result = json.loads(report.read_text())
    m = result["metrics"]
    lost = result["lost_events"] + EVENTS_PER_MESSAGE * m["engine"].get("seq_lost", 0)
    seen, total = asyncio.run(stream_contents(server.url))
    server.close()
    summary = {
        "duration_s": args.duration, "restarts": restarts, "rate": args.rate,
        "sent": sent[0], "delivered_distinct": len(seen), "copies": total - len(seen),
        "reported_lost": lost, "relay_ok": result["ok"], "relay_exit": relay.returncode,
        "resent_messages": m["bus"].get("resent_messages", 0),
        "reconnects": m["bus"].get("reconnects", 0),
        "balanced": len(seen) + lost == sent[0] and seen <= set(range(1, sent[0] + 1)),
    }
    print(json.dumps(summary, indent=2))
    print(f"relay log: {tmp / 'relay.log'}")
    return 0 if summary["balanced"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
