"""kvgraph's index node against Dynamo 1.6.1's standalone indexer, side by side, in one run.

    python3 benchmarks/bench_indexer.py [--blocks 1000000] [--seconds 8]

Both servers are started as users start them (``python -m dynamo.indexer``; ``kvgraph run`` on
a graph of one ``index`` node) and each reads 8 simulated engines of its own over real ZMQ
(vLLM's wire format). Each engine stores 64-block prompts (1,024 tokens, block_size 16), every
prompt on two engines, until the index holds ``--blocks`` blocks. Then, per server:

* memory: RSS growth per million blocks held, and RSS;
* idle CPU: CPU time over 5 s with no traffic, as a share of one core;
* HTTP ``/query`` (a stored 64-block prompt) with ``wrk``: 1 and 8 keep-alive connections, and
  8 connections that each close after every request; requests/s, p50 and p99;
* events/s applied while 8 connections query (the engines store 2,000 more 64-block events);
* ``/dump`` while 8 connections query: the queries' p99, and the dump's size and time.

Needs ``wrk`` (Debian: ``apt-get install wrk``): a load generator in C, so that the client is
not what is measured. Without the ``ai-dynamo-runtime`` wheel (the ``bench`` extra), only
kvgraph's column is filled, with a message. The two servers share this 2-core machine with wrk;
each is measured while the other is idle.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kvgraph.codecs.vllm import encode_payload  # noqa: E402
from kvgraph.event import Event  # noqa: E402
from kvgraph.testing import free_port, terminate  # noqa: E402
from tests.helpers import TestEngine  # noqa: E402
from tests.indexer_client import IndexerClient  # noqa: E402

BS, PROMPT_BLOCKS, ENGINES = 16, 64, 8
HZ = os.sysconf("SC_CLK_TCK")


def proc_stat(pid: int) -> tuple[float, int]:
    """(CPU seconds used, RSS bytes) of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / HZ
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024
    return cpu, rss


class Server:
    def __init__(self, kind: str, tmp: Path):
        self.kind, self.port = kind, free_port()
        if kind == "dynamo":
            cmd = [sys.executable, "-m", "dynamo.indexer", "--port", str(self.port)]
        else:
            graph = tmp / "indexer.toml"
            graph.write_text(f'[graph]\nname = "indexer"\n[nodes.index]\ntype = "index"\n'
                             f'port = {self.port}\n')
            cmd = [sys.executable, "-m", "kvgraph", "run", str(graph), "--status", "off"]
        self.log = open(tmp / f"{kind}.log", "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, "NO_COLOR": "1"})
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = IndexerClient(self.url, timeout=120)
        self.client.wait_healthy()
        self.engines: list[TestEngine] = []

    def close(self) -> None:
        self.client.close()
        for e in self.engines:
            e.close()
        terminate(self.proc)


def prompt(p: int) -> list[int]:
    return [(p * 1024 + i) % 0xFFFFFFFF for i in range(PROMPT_BLOCKS * BS)]


def stored(p: int) -> Event:
    return Event(kind="stored", worker_id=0, dp_rank=0, token_ids=prompt(p), block_size=BS,
                 block_hashes=[p * PROMPT_BLOCKS + j + 1 for j in range(PROMPT_BLOCKS)])


def publish(s: Server, first: int, count: int) -> float:
    """Prompts first..first+count, each on engines p % 8 and (p + 1) % 8; returns the seconds
    until the server applied all of them (the last prompt of each engine matched)."""
    t0 = time.monotonic()
    per_engine: list[list[Event]] = [[] for _ in range(ENGINES)]
    for p in range(first, first + count):
        ev = stored(p)
        per_engine[p % ENGINES].append(ev)
        per_engine[(p + 1) % ENGINES].append(ev)
    for k, events in enumerate(per_engine):
        for i in range(0, len(events), 16):
            s.engines[k].publish(encode_payload(events[i:i + 16], time.time()))
    for k, events in enumerate(per_engine):
        if events:
            last = events[-1]
            s.client.wait_answer(last.token_ids, "bench", k + 1, timeout=600)
    return time.monotonic() - t0


def wrk(url: str, connections: int, seconds: float, body: Path, close: bool = False
        ) -> dict[str, float]:
    script = body.with_suffix(".lua")
    script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                      + ('wrk.headers["Connection"] = "close"\n' if close else "")
                      + f'local f = io.open("{body}", "r")\nwrk.body = f:read("*a")\nf:close()\n')
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency",
                          "-s", str(script), url + "/query"], capture_output=True, text=True,
                         check=True).stdout

    def lat(q: str) -> float:
        m = re.search(rf"^\s+{q}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        assert m, out
        return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p50_ms": lat("50"), "p99_ms": lat("99"),
            "non_2xx": int(errors.group(1)) if errors else 0}


def idle_cpu(pid: int, seconds: float = 5.0) -> float:
    c0, _ = proc_stat(pid)
    time.sleep(seconds)
    c1, _ = proc_stat(pid)
    return (c1 - c0) / seconds * 100


def measure(s: Server, blocks: int, seconds: float, tmp: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    for k in range(ENGINES):
        e = TestEngine(f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}")
        s.engines.append(e)
        status, body = s.client.register(k + 1, e.endpoint, "bench", BS)
        assert status == 201, body
        e.wait_subscribed()
    time.sleep(1.0)
    _, rss0 = proc_stat(s.proc.pid)
    out["idle_cpu_empty_pct"] = idle_cpu(s.proc.pid)
    prompts = blocks // (2 * PROMPT_BLOCKS)
    load_s = publish(s, 0, prompts)
    out["load_events_per_s"] = 2 * prompts / load_s
    time.sleep(6.0)   # settled: kvgraph returns a burst's freed heap after 2-4 quiet seconds
    _, rss1 = proc_stat(s.proc.pid)
    held = 2 * prompts * PROMPT_BLOCKS
    out["blocks"] = held
    out["rss_mib"] = rss1 / 2**20
    out["mib_per_m_blocks"] = (rss1 - rss0) / 2**20 / held * 1e6
    out["idle_cpu_pct"] = idle_cpu(s.proc.pid)
    body = tmp / "query.json"
    body.write_text(json.dumps({"token_ids": prompt(0), "model_name": "bench"}))
    status, answer = s.client.query(prompt(0), "bench")
    assert status == 200 and len(answer["scores"]) == 2, answer
    for name, conns, close in (("c1", 1, False), ("c8", 8, False), ("c8_new_conn", 8, True)):
        r = wrk(s.url, conns, seconds, body, close)
        out.update({f"{name}_{k}": v for k, v in r.items()})
    # events/s applied while 8 connections query
    script = body.with_suffix(".lua")   # written by the wrk runs above
    bg = subprocess.Popen(["wrk", "-t1", "-c8", "-d300s", "-s", str(script), s.url + "/query"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    extra = 1000
    during_s = publish(s, prompts, extra)
    out["events_per_s_while_queried"] = 2 * extra / during_s
    bg.terminate()
    bg.wait()
    # /dump while 8 connections query
    dump: dict[str, float] = {}

    def dumper() -> None:
        time.sleep(1.0)
        t0 = time.monotonic()
        with urllib.request.urlopen(s.url + "/dump", timeout=300) as r:
            size = len(r.read())
        dump.update(seconds=time.monotonic() - t0, mib=size / 2**20)

    d = threading.Thread(target=dumper)
    d.start()
    r = wrk(s.url, 8, max(seconds, 4.0), body)
    d.join()
    out.update(dump_s=dump.get("seconds", -1), dump_mib=dump.get("mib", -1),
               during_dump_p99_ms=r["p99_ms"], during_dump_rps=r["rps"])
    _, rss2 = proc_stat(s.proc.pid)
    out["rss_after_dump_mib"] = rss2 / 2**20
    return out


ROWS = [("blocks", "blocks held", "{:,.0f}"), ("rss_mib", "RSS, MiB", "{:.0f}"),
        ("mib_per_m_blocks", "MiB per 1M blocks", "{:.0f}"),
        ("idle_cpu_empty_pct", "idle CPU, empty (% of a core)", "{:.2f}"),
        ("idle_cpu_pct", "idle CPU, loaded (% of a core)", "{:.2f}"),
        ("load_events_per_s", "events/s applied (64 blocks each)", "{:,.0f}"),
        ("events_per_s_while_queried", "events/s applied while 8 clients query", "{:,.0f}"),
        ("c1_rps", "/query req/s, 1 keep-alive client", "{:,.0f}"),
        ("c1_p99_ms", "  p99 ms", "{:.2f}"),
        ("c8_rps", "/query req/s, 8 keep-alive clients", "{:,.0f}"),
        ("c8_p50_ms", "  p50 ms", "{:.2f}"), ("c8_p99_ms", "  p99 ms", "{:.2f}"),
        ("c8_new_conn_rps", "/query req/s, 8 clients, new connection each", "{:,.0f}"),
        ("c8_new_conn_p99_ms", "  p99 ms", "{:.2f}"),
        ("during_dump_p99_ms", "/query p99 ms during /dump (8 clients)", "{:.2f}"),
        ("dump_s", "/dump seconds", "{:.2f}"), ("dump_mib", "/dump MiB", "{:.0f}"),
        ("rss_after_dump_mib", "RSS after /dump, MiB", "{:.0f}")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=1_000_000)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--only", choices=["dynamo", "kvgraph"], help="measure one server")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        print("bench_indexer: needs wrk (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    kinds = ["kvgraph"]
    if args.only == "kvgraph":
        pass
    elif importlib.util.find_spec("dynamo") is not None:
        kinds.insert(0, "dynamo")
    else:
        print("bench_indexer: Dynamo's indexer is not installed (pip install -e '.[bench]'): "
              "kvgraph only", file=sys.stderr)
    results: dict[str, dict[str, float]] = {}
    if args.only == "dynamo":
        kinds = kinds[:1] if kinds[0] == "dynamo" else []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        servers = {k: Server(k, tmp) for k in kinds}
        try:
            for k, s in servers.items():
                print(f"measuring {k} ...", file=sys.stderr, flush=True)
                results[k] = measure(s, args.blocks, args.seconds, tmp)
                for e in s.engines:   # its engines stop: the next server runs alone
                    e.close()
                s.engines.clear()
        finally:
            for s in servers.values():
                s.close()
    cols = list(results)
    print("| figure | " + " | ".join(cols) + (" | kvgraph / dynamo |" if len(cols) == 2 else
                                               " |"))
    print("|---" * (len(cols) + 1 + (len(cols) == 2)) + "|")
    for key, label, fmt in ROWS:
        vals = [results[c].get(key) for c in cols]
        cells = [fmt.format(v) if v is not None else "-" for v in vals]
        ratio = ""
        if len(cols) == 2 and vals[0]:
            ratio = f" | {vals[1] / vals[0]:.2f}x" if vals[1] is not None else " | -"
        elif len(cols) == 2:
            ratio = " | -"
        print(f"| {label} | " + " | ".join(cells) + ratio + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
