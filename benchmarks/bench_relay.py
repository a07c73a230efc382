"""The benchmark suite: vLLM ZMQ -> NATS relays end to end with real processes, side by side.

    python3 benchmarks/bench_relay.py [--repeat 5]    # the whole suite, one table per part
    python3 benchmarks/bench_relay.py --only kvgraph --events-per-message 16 [--rate 10000]
        [--engines 8 --workers 2] [--transforms "dedup batch"] [--format dynamo-json]
        [--profile FILE]                               # one configuration

Relays compared (each a separate process):
* ``kvgraph``: ``kvgraph run`` on a graph ``zmq (one per engine) -> nats (dynamo-msgpack)``;
* ``bare``: kvgraph's own codec functions in one hand-written loop, no runtime
  (``bare_relay.py``): kvgraph / bare is the framework's overhead;
* ``baseline``: a minimal hand-written relay, no kvgraph code (``baseline_relay.py``);
* ``dynamo``: Dynamo 1.6.1's Rust relay (``dynamo_relay.py``), when ``ai-dynamo-runtime`` is
  installed (``pip install -e '.[bench]'``); skipped with a message otherwise.

A producer (this process) binds a ZMQ XPUB like a vLLM engine and sends pre-encoded batches in
vLLM's wire format (map encoding, block_size 16, 4 blocks per event unless said, every event
chained to the previous one); a subscriber (this process, another thread) counts each event
once on a real nats-server.

* events/s = events received / (last receive - first send); lost = sent - received;
* latency = receive time - send time of the ZMQ message that carried the event (both clocks
  are this process's), at a paced rate;
* CPU% and peak RSS are the relay's (with its worker processes), from /proc;
* every configuration runs ``--repeat`` times, the relays back to back, and the tables show
  medians and the median of the pair-by-pair ratios, so that machine noise cancels;
* by default each relay runs alone on core 1 and everything else on core 0 (``--no-pin``).
See BENCHMARKS.md for what limits each figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
from kvgraph.testing import NatsServer  # noqa: E402

BS = 16


_POOL: list[int] = []


def make_messages(n_messages: int, per_message: int, blocks: int) -> list[bytes]:
    """Pre-encoded vLLM batches (map encoding), every event chained to the previous one.
    Tokens are windows of one random pool: their values do not change the relay's work."""
    import random

    if not _POOL:
        rng = random.Random(1)
        _POOL.extend(rng.choices(range(151936), k=1 << 16))
    n_tok = blocks * BS
    out = []
    h = 1
    for m in range(n_messages):
        events = []
        for k in range(per_message):
            start = (m * 7919 + k * 104729) % (len(_POOL) - n_tok)
            events.append(Event(kind="stored", worker_id=0, dp_rank=0,
                                block_hashes=list(range(h, h + blocks)), parent_hash=h - 1,
                                token_ids=_POOL[start:start + n_tok], block_size=BS,
                                medium="GPU"))
            h += blocks
        out.append(encode_payload(events, time.time(), 0, "map"))
    return out


def _tree(pid: int) -> list[int]:
    """The relay's process and its children (``--workers`` runs one process per worker)."""
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(d))
            except (OSError, IndexError, ValueError):
                continue
    return [pid, *kids]


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _rss_peak(pids: list[int]) -> int:
    """Sum of each process's peak RSS (with one process: its peak)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def _rss_now(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _stall(server: NatsServer, pid: int, t0: float, after_s: float, for_s: float,
           trace: list[tuple[float, float]], blocked_cpu: list[float]) -> None:
    """Freeze nats-server for a while; record the relay's RSS (MB) twice a second, and its CPU%
    over the second half of the stall (when backpressure holds everything: it must not spin)."""
    assert server.proc is not None
    stopped = resumed = False
    half = after_s + for_s / 2
    cpu_at_half = None
    while time.perf_counter() - t0 < after_s + for_s + 5:
        t = time.perf_counter() - t0
        if not stopped and t >= after_s:
            server.proc.send_signal(signal.SIGSTOP)
            stopped = True
        if stopped and not resumed and t >= after_s + for_s:
            server.proc.send_signal(signal.SIGCONT)
            resumed = True
        try:
            trace.append((t, _rss_now(pid)))
            if cpu_at_half is None and t >= half:
                cpu_at_half = (t, _cpu([pid]))
            elif cpu_at_half is not None and not blocked_cpu and t >= after_s + for_s - 0.5:
                blocked_cpu.append(100 * (_cpu([pid]) - cpu_at_half[1]) / (t - cpu_at_half[0]))
        except OSError:
            return
        time.sleep(0.5)


def dynamo_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("dynamo") is not None and \
        importlib.util.find_spec("dynamo._core") is not None


SUBJECT = "bench.kv-events"
PIN = (os.cpu_count() or 1) >= 2  # --no-pin turns it off


def relay_cmd(relay: str, tmp: Path, ports: list[int], url: str, fmt: str, transforms: str,
              workers: int, source_opts: str = "", sink_opts: str = "") -> tuple[list[str], str]:
    """The relay's command line and the subject it publishes on."""
    ep = f"tcp://127.0.0.1:{ports[0]}"
    if relay == "baseline":
        return [sys.executable, str(ROOT / "benchmarks" / "baseline_relay.py"), ep, url,
                SUBJECT], SUBJECT
    if relay == "bare":
        return [sys.executable, str(ROOT / "benchmarks" / "bare_relay.py"), ep, url,
                SUBJECT], SUBJECT
    if relay == "dynamo":
        from dynamo_relay import SUBJECT as DYNAMO_SUBJECT

        return [sys.executable, str(ROOT / "benchmarks" / "dynamo_relay.py"), ep, url], \
            DYNAMO_SUBJECT
    first = "t0" if transforms.split() else "router"
    chain = [*(f"t{i}" for i in range(len(transforms.split()))), "router"]
    text = ['[graph]\nname = "bench"\n']
    for i, port in enumerate(ports):
        text.append(f'[nodes.engine{i}]\ntype = "zmq"\nendpoint = "tcp://127.0.0.1:{port}"\n'
                    f'worker_id = {i}\n{source_opts}\n[[edges]]\nfrom = "engine{i}"\n'
                    f'to = "{first}"\n')
    text += [f'[nodes.t{i}]\ntype = "{t}"\n' for i, t in enumerate(transforms.split())]
    text.append(f'[nodes.router]\ntype = "nats"\nurl = "{url}"\nsubject = "{SUBJECT}"\n'
                f'format = "{fmt}"\n{sink_opts}\n')
    text += [f'[[edges]]\nfrom = "{a}"\nto = "{b}"\n' for a, b in zip(chain, chain[1:])]
    graph = tmp / "relay.toml"
    graph.write_text("".join(text))
    return [sys.executable, "-m", "kvgraph", "run", str(graph), "--status", "off",
            "--log-level", "warning", "--report", str(tmp / "report.json"),
            *(["--workers", str(workers)] if workers > 1 else []),
            "--loop", os.environ.get("BENCH_KVGRAPH_LOOP", "auto")], SUBJECT


def run_once(relay: str, per: int, blocks: int, total_events: int, fmt: str = "dynamo-msgpack",
             transforms: str = "", rate: float = 0.0, profile: str = "", engines: int = 1,
             workers: int = 1, stall: tuple[float, float] | None = None,
             source_opts: str = "", sink_opts: str = "", pin: bool | None = None
             ) -> dict[str, Any]:
    """One run: start nats-server and the relay, send ``total_events`` (split over
    ``engines`` engines, round-robin), count what a NATS subscriber receives (each event
    once: a copy resent after an outage counts as a duplicate, not as delivered).

    ``pin``: the relay runs alone on core 1 and everything else on core 0 (not with
    ``workers`` > 1, which needs both cores): each relay gets the same core to itself, which
    cut the run-to-run spread of a relay's throughput here from about ±30% to about ±8%.

    ``stall = (after_s, for_s)`` freezes nats-server (SIGSTOP) ``after_s`` into sending, for
    ``for_s`` seconds, and samples the relay's RSS every half second meanwhile."""
    # Threads and processes started from here on inherit this thread's cores.
    pinned = (PIN if pin is None else pin) and workers == 1
    os.sched_setaffinity(0, {0} if pinned else set(range(os.cpu_count() or 1)))
    n_msgs = max(1, total_events // (per * engines))
    msgs = make_messages(n_msgs, per, blocks)
    total = n_msgs * per * engines
    server = NatsServer().start()
    ctx = zmq.Context.instance()
    pubs, ports = [], []
    for _ in range(engines):  # the engines bind first, on ports the system picks
        pub = ctx.socket(zmq.XPUB)
        pub.setsockopt(zmq.SNDHWM, 0)
        pub.bind("tcp://127.0.0.1:*")
        ports.append(int(pub.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1]))
        pubs.append(pub)
    tmp = Path(tempfile.mkdtemp(prefix="kvgraph-bench-"))
    cmd, subject = relay_cmd(relay, tmp, ports, server.url, fmt, transforms, workers,
                             source_opts, sink_opts)
    sent_at = [0.0] * n_msgs
    received = [0]
    seen: set[tuple[int, int]] = set()
    copies = [0]
    rss_trace: list[tuple[float, float]] = []
    blocked_cpu: list[float] = []
    last_recv = [0.0]
    latencies: list[float] = []
    done = threading.Event()
    ready = threading.Event()
    first_hash_per_msg = per * blocks

    def count(body: bytes) -> list[tuple[int, int]]:
        """(worker_id, first block hash) of each event in a message."""
        if fmt == "dynamo-msgpack":
            routers = msgspec.msgpack.decode(msgspec.msgpack.decode(body)["payload"])
        elif fmt == "dynamo-json":
            routers = [msgspec.json.decode(body)]
        else:
            return [(d["worker_id"], d["block_hashes"][0])
                    for d in map(msgspec.json.decode, body.splitlines())]
        firsts = []
        for r in routers:
            hashes = [b["block_hash"] for b in r["event"]["data"]["stored"]["blocks"]]
            w = r["worker_id"]
            firsts += [(w, h) for h in hashes[::blocks]]  # a merged event: len/blocks events
        return firsts

    async def subscriber() -> None:
        import nats

        nc = await nats.connect(server.url, pending_size=256 * 1024 * 1024)

        async def cb(msg: Any) -> None:
            now = time.perf_counter()
            firsts = count(msg.data)
            n = len(seen)
            seen.update(firsts)
            copies[0] += len(firsts) - (len(seen) - n)
            received[0] = len(seen)
            last_recv[0] = now
            if rate and not stall:
                latencies.extend(now - sent_at[(h - 1) // first_hash_per_msg]
                                 for _, h in firsts)
            if received[0] >= total:
                done.set()

        await nc.subscribe(subject, cb=cb, pending_msgs_limit=10_000_000,
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
    if pinned:
        cmd = ["taskset", "-c", "1", *cmd]
    relay_proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        for pub in pubs:
            if not pub.poll(60_000, zmq.POLLIN):
                raise SystemExit(f"{relay} did not subscribe: {relay_proc.stderr.read()}")
            pub.recv()
        pids = _tree(relay_proc.pid)
        cpu0 = _cpu(pids)
        t0 = time.perf_counter()
        if stall:
            threading.Thread(target=_stall, args=(server, relay_proc.pid, t0, *stall,
                                                  rss_trace, blocked_cpu), daemon=True).start()
        interval = per / rate if rate else 0.0
        for i, payload in enumerate(msgs):
            if interval:  # sleep, not spin: the subscriber thread needs the GIL to timestamp
                delay = t0 + i * interval - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            sent_at[i] = time.perf_counter()
            seq = i.to_bytes(8, "big")
            for pub in pubs:
                pub.send_multipart([b"", seq, payload])
        done.wait(180)
        elapsed = (last_recv[0] or time.perf_counter()) - t0
        cpu = _cpu(pids) - cpu0
        rss = _rss_peak(pids)
    finally:
        relay_proc.send_signal(signal.SIGINT if profile else signal.SIGTERM)
        relay_proc.communicate(timeout=30)
        done.set()
        sub_thread.join()
        for pub in pubs:
            pub.close()
        server.close()
    latencies.sort()
    report = tmp / "report.json"
    metrics = json.loads(report.read_text())["metrics"] if report.exists() else {}

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3 \
            if latencies else float("nan")

    return {"relay": relay, "per": per, "blocks": blocks, "engines": engines,
            "workers": workers, "events_s": received[0] / elapsed,
            "blocks_s": received[0] * blocks / elapsed, "cpu": 100 * cpu / elapsed,
            "rss_mb": rss / 2**20, "lost": total - received[0], "copies": copies[0],
            "rss_trace": rss_trace, "metrics": metrics,
            "blocked_cpu": blocked_cpu[0] if blocked_cpu else float("nan"),
            "p50": pct(0.5), "p99": pct(0.99), "p999": pct(0.999)}


# -- the suite ---------------------------------------------------------------------------------

def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _ratio(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> float:
    """Median of the pair-by-pair ratios of events/s (runs i of a and b ran back to back)."""
    return statistics.median(x["events_s"] / y["events_s"] for x, y in zip(a, b))


TARGETS = {1: 64_000, 16: 114_000, 128: 135_000}  # Dynamo 1.6.1's Rust relay, issue 6


def suite(repeat: int, total: int, quick: bool = False) -> None:
    """Everything, in one run: the comparison, paced latency, scaling curves, the index."""
    relays = ["kvgraph", "bare", "baseline"] + (["dynamo"] if dynamo_available() else [])
    started = time.time()
    print(f"kvgraph benchmark suite, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{os.cpu_count()} cores, Python {sys.version.split()[0]}; medians of {repeat} "
          f"runs, relays run back to back so that ratios are pair by pair; "
          + ("each relay alone on core 1, nats-server, engine and subscriber on core 0"
             if PIN else "everything sharing all cores (--no-pin)"))
    if "dynamo" not in relays:
        print("Dynamo 1.6.1 relay: skipped (ai-dynamo-runtime is not installed: "
              "pip install ai-dynamo-runtime to include it); the targets column holds the "
              "figures issue 6 measured for it")

    print(f"\n1. Throughput, ZMQ -> NATS (dynamo-msgpack), 4 blocks/event, {total:,} events "
          "per run, lost must be 0")
    head = (f"{'ev/msg':>6}  {'relay':<9} {'events/s':>9} {'blocks/s':>10} {'CPU%':>5} "
            f"{'peak RSS':>9} {'lost':>5}  vs dynamo  vs bare  vs baseline")
    print(head)
    for per in (1, 16, 128):
        runs: dict[str, list[dict[str, Any]]] = {r: [] for r in relays}
        for _ in range(repeat):
            for relay in relays:
                runs[relay].append(run_once(relay, per, 4, total))
        for relay in relays:
            rs = runs[relay]
            line = (f"{per:>6}  {relay:<9} {_median(rs, 'events_s'):>9,.0f} "
                    f"{_median(rs, 'blocks_s'):>10,.0f} {_median(rs, 'cpu'):>5.0f} "
                    f"{max(r['rss_mb'] for r in rs):>7.0f}MB {sum(r['lost'] for r in rs):>5}")
            if relay == "kvgraph":
                vs_dyn = (f"{_ratio(rs, runs['dynamo']):.2f}" if "dynamo" in runs else
                          f"{_median(rs, 'events_s') / TARGETS[per]:.2f}*")
                line += (f"  {vs_dyn:>9}  {_ratio(rs, runs['bare']):>7.2f}  "
                         f"{_ratio(rs, runs['baseline']):>11.2f}")
            print(line)
    if "dynamo" not in relays:
        print("  * against the target (Dynamo's figure from issue 6), not a run here")

    print("\n2. Paced 10k events/s, 16 events/message (latency = engine send -> NATS receipt)")
    paced: dict[str, list[dict[str, Any]]] = {r: [] for r in relays}
    for _ in range(repeat):
        for relay in relays:
            paced[relay].append(run_once(relay, 16, 4, 30_000, rate=10_000))
    for relay, rs in paced.items():
        print(f"  {relay:<9} p50 {_median(rs, 'p50'):.2f} ms  p99 {_median(rs, 'p99'):.2f} ms "
              f"(runs: {', '.join(format(r['p99'], '.2f') for r in rs)})  p999 "
              f"{_median(rs, 'p999'):.2f} ms  CPU {_median(rs, 'cpu'):.0f}%  peak RSS "
              f"{max(r['rss_mb'] for r in rs):.0f} MB  lost {sum(r['lost'] for r in rs)}")

    print("\n3. Scaling, kvgraph, 16 events/message")
    curve_relays = ["kvgraph"] + (["dynamo"] if "dynamo" in relays else [])
    for blocks in (1, 4, 32):
        n = total if blocks <= 4 else max(20_000, total * 4 // blocks)
        for relay in curve_relays:
            rs = [run_once(relay, 16, blocks, n) for _ in range(1 if quick else repeat)]
            print(f"  {blocks:>2} blocks/event  {relay:<8} {_median(rs, 'events_s'):>9,.0f} "
                  f"events/s {_median(rs, 'blocks_s'):>10,.0f} blocks/s  CPU "
                  f"{_median(rs, 'cpu'):.0f}%  lost {sum(r['lost'] for r in rs)}")
    for engines in (1, 8, 64):
        for workers in (1, 2):
            if workers > engines:
                continue
            rs = [run_once("kvgraph", 16, 4, total, engines=engines, workers=workers)
                  for _ in range(1 if quick else repeat)]
            print(f"  {engines:>2} engines, --workers {workers}  {_median(rs, 'events_s'):>9,.0f} "
                  f"events/s  CPU {_median(rs, 'cpu'):.0f}%  peak RSS "
                  f"{max(r['rss_mb'] for r in rs):.0f} MB  lost {sum(r['lost'] for r in rs)}")

    print("\n4. Memory with a stalled sink: nats-server frozen (SIGSTOP) for 20 s while the "
          "engine sends a paced 10k events/s; small bounds (zmq hwm = 2000 messages, nats "
          "max_pending_events = 20000) so that they fill within the run")
    st = run_once("kvgraph", 16, 4, 300_000, rate=10_000, stall=(3.0, 20.0),
                  source_opts="hwm = 2000", sink_opts="max_pending_events = 20000")
    trace = st["rss_trace"]
    marks = [trace[min(len(trace) - 1, int(t * 2))] for t in (2, 5, 8, 11, 14, 17, 20, 23, 26)]
    counted = st["metrics"].get("engine0", {}).get("seq_missing", 0) * 16
    print("  kvgraph RSS: " + ", ".join(f"{mb:.0f} MB at {t:.0f} s" for t, mb in marks)
          + f"; CPU while held back (second half of the stall): {st['blocked_cpu']:.1f}%")
    print(f"  after it resumed: {st['lost']} events did not arrive; the relay counted "
          f"{counted} missing (seq gaps x 16 events/message); resent copies {st['copies']}")

    print("\n5. The index sink's apply path at 1M blocks (tokens_hash + store, in-process)")
    from bench_index import measure

    ix = measure(100_000 if quick else 1_000_000)
    print(f"  {ix['events_s']:,.0f} stored events/s ({ix['blocks_s']:,.0f} blocks/s) applied; "
          f"query of 64 blocks p50 {ix['p50_us']:.0f} us, p99 {ix['p99_us']:.0f} us; "
          f"{ix['bytes_per_block']:.0f} bytes per block")
    print("\n6. Start-up")
    from bench_validate import measure as measure_validate

    v = measure_validate()
    print(f"  `kvgraph validate graphs/demo.toml` as a whole process: {v['process_ms']:.0f} ms "
          f"(median of 7); a 1,000-node graph in-process: {v['big_ms']:.0f} ms")
    print(f"\nsuite took {time.time() - started:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=["kvgraph", "bare", "baseline", "dynamo"])
    ap.add_argument("--events-per-message", type=int, default=16)
    ap.add_argument("--events", type=int, default=160_000, help="events per run")
    ap.add_argument("--blocks-per-event", type=int, default=4)
    ap.add_argument("--engines", type=int, default=1, help="kvgraph only: engines (sources)")
    ap.add_argument("--workers", type=int, default=1, help="kvgraph only: run --workers N")
    ap.add_argument("--transforms", default="", help='kvgraph only, e.g. "dedup batch"')
    ap.add_argument("--format", default="dynamo-msgpack",
                    choices=["dynamo-msgpack", "dynamo-json", "jsonl"])
    ap.add_argument("--rate", type=float, default=0.0, help="pace at this many events/s")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true",
                    help="suite: one run per scaling point and a 100k-block index")
    ap.add_argument("--profile", metavar="FILE", default="",
                    help="with --only: sample the relay with py-spy into FILE (folded stacks; "
                         "summarise with benchmarks/profile_summary.py FILE)")
    ap.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], default="auto",
                    help="kvgraph's event loop (kvgraph run --loop)")
    ap.add_argument("--no-pin", action="store_true",
                    help="let the relay share both cores with nats-server and the benchmark "
                         "instead of having core 1 to itself")
    args = ap.parse_args()
    os.environ["BENCH_KVGRAPH_LOOP"] = args.loop   # read by relay_cmd
    global PIN
    PIN = PIN and not args.no_pin
    if not args.only:
        suite(args.repeat, args.events, args.quick)
        return
    if args.only == "dynamo" and not dynamo_available():
        raise SystemExit("ai-dynamo-runtime is not installed (pip install ai-dynamo-runtime)")
    r = run_once(args.only, args.events_per_message, args.blocks_per_event, args.events,
                 args.format, args.transforms, args.rate, args.profile, args.engines,
                 args.workers)
    path = " -> ".join(["ZMQ", *args.transforms.split(), "NATS"])
    print(f"{args.only} {path} ({args.format}, {args.events_per_message} events/message, "
          f"{args.blocks_per_event} blocks/event, {args.engines} engine(s), {args.workers} "
          f"worker(s)): {r['events_s']:,.0f} events/s ({r['blocks_s']:,.0f} blocks/s), CPU "
          f"{r['cpu']:.0f}%, peak RSS {r['rss_mb']:.0f} MB, lost {r['lost']}"
          + (f", latency p50 {r['p50']:.2f} ms p99 {r['p99']:.2f} ms p999 {r['p999']:.2f} ms"
             if args.rate else ""))


if __name__ == "__main__":
    main()
