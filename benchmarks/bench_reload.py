"""The pause a reload causes on a path it does not change: latency of an unchanged
``zmq -> nats`` path while the graph is reloaded, against the same run without reloads.

    python3 benchmarks/bench_reload.py [--seconds 20] [--rate 4000] [--reload-every 0.2]

The relay is ``kvgraph run`` (its own process) on: engine (``zmq``) -> bus (``nats``, jsonl),
and, from the same engine, a side path engine -> side (``filter``) -> audit (``file``). A
test engine (this process, :class:`kvgraph.testing.PacedEngine`) publishes removed events at a
steady ``--rate``, each one's send time kept; a nats-py subscriber (this process) takes the
time each event arrives. Latency is arrival minus send, per event.

Two phases of ``--seconds`` each, on the same relay: first no reload; then a reload every
``--reload-every`` seconds through ``POST /graph``, each one changing the side path (the filter's
options or the file sink's path every time, and every fourth time the side path removed, then
added again whole), so that the engine -> bus path is never changed: what it shows is
what a swap beside it costs, including the fan-out: the engine's batches go to both paths.
The first second of each phase is not counted (warm-up).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kvgraph.testing import NatsServer, PacedEngine, free_port, terminate  # noqa: E402
from tests.helpers import GraphFile  # noqa: E402

SUBJECT = "bench.reload"


def version(engine: str, nats_url: str, tmp: Path, i: int) -> str:
    g = (GraphFile("reload-bench").node("engine", "zmq", endpoint=engine, worker_id=1)
         .node("bus", "nats", url=nats_url, subject=SUBJECT, format="jsonl")
         .edge("engine", "bus"))
    if i % 4 != 3:   # the side path: there three versions in four, changing every time
        g.node("side", "filter", kinds=["removed"] if i % 2 else ["stored", "removed"])
        g.node("audit", "file", path=str(tmp / f"audit{(i // 2) % 2}.jsonl"))
        g.edge("engine", "side").edge("side", "audit")
    return g.text()


def post(port: int, text: str) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/graph", data=text.encode(),
                                 method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def percentiles(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=1000)
    return {"n": len(values), "p50_ms": q[499] * 1000, "p99_ms": q[989] * 1000,
            "p999_ms": q[998] * 1000, "max_ms": max(values) * 1000}


async def measure(args: argparse.Namespace) -> dict:
    import nats

    tmp = Path(tempfile.mkdtemp(prefix="kvgraph-bench-reload-"))
    server = NatsServer().start()
    engine = PacedEngine(f"ipc://{tmp}/engine.sock", rate=args.rate, per_batch=4)
    graph = tmp / "graph.toml"
    graph.write_text(version(engine.endpoint, server.url, tmp, 0))
    port = free_port()
    log = open(tmp / "relay.log", "w")   # a pipe nobody reads would fill and block it
    relay = subprocess.Popen([sys.executable, "-m", "kvgraph", "run", str(graph), "--status",
                              "off", "--metrics-port", str(port)], stderr=log)
    arrived: dict[int, float] = {}
    nc = await nats.connect(server.url)

    async def on_message(msg) -> None:
        now = time.monotonic()
        for line in msg.data.splitlines():
            for h in json.loads(line)["block_hashes"]:
                arrived[h] = now

    await nc.subscribe(SUBJECT, cb=on_message)
    await nc.flush()
    try:
        await asyncio.to_thread(engine.wait_subscribed, 30_000)
        engine.start()
        phases: dict[str, tuple[float, float]] = {}
        reloads: list[float] = []
        begin = time.monotonic()
        await asyncio.sleep(args.seconds)
        phases["without reloads"] = (begin + 1, time.monotonic())
        begin = time.monotonic()
        i = 0
        while time.monotonic() - begin < args.seconds:
            i += 1
            t0 = time.monotonic()
            answer = await asyncio.to_thread(post, port, version(engine.endpoint, server.url,
                                                                 tmp, i))
            assert answer["result"] == "applied", answer
            reloads.append(time.monotonic() - t0)
            await asyncio.sleep(max(0.0, args.reload_every - (time.monotonic() - t0)))
        phases["with reloads"] = (begin + 1, time.monotonic())
        last = engine.stop()
        deadline = time.monotonic() + 30
        while last not in arrived and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        engine.close()
        await nc.close()
        terminate(relay)
        log.close()
        server.close()
    missing = [h for h in range(1, last + 1) if h not in arrived]
    out: dict = {"rate": args.rate, "seconds": args.seconds, "reloads": len(reloads),
                 "reload_ms": percentiles(reloads) if len(reloads) > 2 else {},
                 "missing": len(missing)}
    for name, (start, end) in phases.items():
        lat = [arrived[h] - sent for h, sent in engine.sent_at.items()
               if start <= sent < end and h in arrived]
        out[name] = percentiles(lat)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--rate", type=float, default=4000.0, help="events per second")
    p.add_argument("--reload-every", type=float, default=0.2, metavar="S")
    args = p.parse_args()
    r = asyncio.run(measure(args))
    print(f"engine -> bus at {r['rate']:.0f} events/s, {r['seconds']:.0f} s per phase; "
          f"{r['reloads']} reloads of the side path; events missing: {r['missing']}")
    if r["reload_ms"]:
        print(f"  a reload (POST /graph round trip): p50 {r['reload_ms']['p50_ms']:.1f} ms, "
              f"max {r['reload_ms']['max_ms']:.1f} ms")
    base = r["without reloads"]
    for name in ("without reloads", "with reloads"):
        s = r[name]
        print(f"  {name:16} n={s['n']:7d}  p50 {s['p50_ms']:6.2f} ms  p99 {s['p99_ms']:6.2f} ms"
              f"  p99.9 {s['p999_ms']:6.2f} ms  max {s['max_ms']:7.2f} ms"
              + ("" if s is base else f"   p99 x{s['p99_ms'] / base['p99_ms']:.2f}"))


if __name__ == "__main__":
    main()
