"""Issue 11's memory attacks, rerun on a real ``kvgraph run`` process: peak RSS (VmHWM) of the
relay under each, beside its idle figure, and what the run reported.

    python3 benchmarks/attacks.py                 # all five, about a minute
    python3 benchmarks/attacks.py dump bodies     # some

- ``flood``: a replay endpoint that answers one request with batches for 2 s (was 1.37 GB).
- ``stall``: an engine sends 256 KB frames as fast as it can for 5 s while the sink's NATS
  server is frozen (SIGSTOP): the graph backs up to the source (ZMQ's queue held 1.06 GB).
- ``dump``: 100 clients ask ``GET /dump`` of a 100k-block index and never read (14.4 GB).
- ``bodies``: 100 clients declare 8 MB bodies, send half, and stall (1.41 GB for 30 s).
- ``query``: one query of 1M token ids (froze the relay for 165 ms); the time to its answer.

Each scenario prints one line; peak RSS is the relay process's own, read from /proc.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from kvgraph.testing import NatsServer, free_port  # noqa: E402

MB = 1024 * 1024


def peak_rss(pid: int) -> int:
    """VmHWM: the process's peak resident set, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Relay:
    """``kvgraph run GRAPH --report FILE`` in a process of its own; ``wait_log`` reads its
    stderr until a line matches."""

    def __init__(self, graph: str, workdir: Path, *flags: str):
        self.graph = workdir / "graph.toml"
        self.graph.write_text(f'[graph]\nname = "{workdir.name}"\n{graph}')
        self.report = workdir / "report.json"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvgraph", "run", str(self.graph), "--status", "off",
             "--report", str(self.report), *flags],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.lines: list[str] = []
        self._seen = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._seen:
                self.lines.append(line)
                self._seen.notify_all()

    def wait_log(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        with self._seen:
            while not any(text in ln for ln in self.lines):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"relay never logged {text!r}:\n" + "".join(self.lines))
                self._seen.wait(0.1)

    def stop(self) -> dict[str, Any]:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise RuntimeError("the relay did not stop in 120 s:\n" + "".join(self.lines[-30:]))
        return json.loads(self.report.read_text()) if self.report.exists() else {}


def engine_socket(endpoint: str) -> Any:
    import zmq

    pub = zmq.Context.instance().socket(zmq.XPUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(endpoint)
    return pub


def payload(first_hash: int, blocks: int, parent: int | None, distinct: bool = False) -> bytes:
    """One stored event of ``blocks`` blocks; its tokens all 7 (small: the decoded list holds
    one shared int), or ``distinct`` (every block its own tokens, so its own tokens_hash)."""
    from kvgraph.codecs.vllm import encode_payload
    from kvgraph.event import Event

    tokens = list(range(first_hash * 16, (first_hash + blocks) * 16)) if distinct \
        else [7] * (16 * blocks)
    e = Event(kind="stored", worker_id=1, dp_rank=0,
              block_hashes=list(range(first_hash, first_hash + blocks)),
              parent_hash=parent, token_ids=tokens, block_size=16, medium="GPU")
    return encode_payload([e], time.time(), 0, "map")


def flood(work: Path) -> dict[str, Any]:
    import zmq

    ep, rp = f"ipc://{work}/e.sock", f"ipc://{work}/r.sock"
    pub = engine_socket(ep)
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(rp)
    relay = Relay(f'[nodes.engine]\ntype = "zmq"\nendpoint = "{ep}"\nreplay_endpoint = "{rp}"\n'
                  'replay_timeout_s = 3600\n[nodes.out]\ntype = "null"\n'
                  '[[edges]]\nfrom = "engine"\nto = "out"\n', work)
    pub.recv()
    idle = rss(relay.proc.pid)
    for seq in (0, 1, 3):    # 2 is missing: a replay request
        pub.send_multipart([b"kv", seq.to_bytes(8, "big"), payload(seq * 10 + 1, 1, None)])
    router.poll(10_000)
    ident, _, _ = router.recv_multipart()
    one = payload(10**6, 1, None)
    sent, seq, end = 0, 100, time.monotonic() + 2
    while time.monotonic() < end:          # never the end marker
        for _ in range(1000):
            router.send_multipart([ident, b"", b"kv", seq.to_bytes(8, "big"), one])
            seq += 1
        sent += 1000
    time.sleep(1)
    peak = peak_rss(relay.proc.pid)
    report = relay.stop()
    pub.close()
    router.close()
    return {"idle": idle, "peak": peak, "what": f"{sent:,} replay replies in 2 s",
            "reported": f"lost {report.get('lost', {})}"}


def stall(work: Path) -> dict[str, Any]:
    ep = f"ipc://{work}/e.sock"
    server = NatsServer().start()
    pub = engine_socket(ep)
    relay = Relay(f'[nodes.engine]\ntype = "zmq"\nendpoint = "{ep}"\n'
                  f'[nodes.bus]\ntype = "nats"\nurl = "{server.url}"\nsubject = "kv"\n'
                  '[[edges]]\nfrom = "engine"\nto = "bus"\n', work)
    relay.wait_log("connected")
    pub.recv()
    idle = rss(relay.proc.pid)
    assert server.proc is not None
    server.proc.send_signal(signal.SIGSTOP)
    blocks = 4096                       # 65,536 token ids: about 256 KB a frame
    sent, nbytes, end = 0, 0, time.monotonic() + 5
    while time.monotonic() < end:
        frame = payload(1 + sent * blocks, blocks, None)
        pub.send_multipart([b"kv", sent.to_bytes(8, "big"), frame])
        sent += 1
        nbytes += len(frame)
    time.sleep(1)
    peak = peak_rss(relay.proc.pid)
    server.proc.send_signal(signal.SIGCONT)
    report = relay.stop()
    server.close()
    pub.close()
    return {"idle": idle, "peak": peak,
            "what": f"{sent:,} frames, {nbytes / MB:,.0f} MB in 5 s into a frozen sink",
            "reported": f"lost {report.get('lost', {})}, read_ahead_dropped "
                        f"{report.get('metrics', {}).get('engine', {}).get('read_ahead_dropped')}"}


def index_relay(work: Path, blocks: int) -> tuple[Relay, int]:
    """An index sink fed ``blocks`` blocks over ZMQ (chains of 100 over 8 workers), serving on
    a free port; returns once every block is in."""
    import urllib.request

    ep, per, port = f"ipc://{work}/e.sock", 100, free_port()
    pub = engine_socket(ep)
    relay = Relay(f'[nodes.engine]\ntype = "zmq"\nendpoint = "{ep}"\n'
                  f'[nodes.idx]\ntype = "index"\nport = {port}\nmax_blocks = {2 * blocks}\n'
                  '[[edges]]\nfrom = "engine"\nto = "idx"\n', work)
    pub.recv()
    for i in range(blocks // per):
        pub.send_multipart([b"kv", i.to_bytes(8, "big"), payload(i * per + 1, per, None, True)])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/workers", timeout=5) as r:
                if sum(w["blocks"] for w in json.load(r)) >= blocks:
                    break
        except OSError:
            pass
        time.sleep(0.2)
    else:
        raise RuntimeError("the index never held every block:\n" + "".join(relay.lines))
    pub.close()
    return relay, port


def hold(port: int, request: bytes, count: int) -> list[socket.socket]:
    held = []
    for _ in range(count):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", port))
        try:
            s.sendall(request)
        except ConnectionError:    # answered (503, say) and closed before all was sent
            s.close()
            continue
        held.append(s)
    return held


def dump(work: Path) -> dict[str, Any]:
    relay, port = index_relay(work, 100_000)
    idle = rss(relay.proc.pid)
    clients = hold(port, b"GET /dump HTTP/1.1\r\n\r\n", 100)
    time.sleep(12)          # past the 10 s write timeout
    peak = peak_rss(relay.proc.pid)
    for s in clients:
        s.close()
    report = relay.stop()
    m = report.get("metrics", {}).get("idx", {})
    return {"idle": idle, "peak": peak, "what": "100 unread GET /dump of 100k blocks, 12 s",
            "reported": f"answers refused {m.get('http_answers_refused')}, slow clients "
                        f"dropped {m.get('http_slow_clients_dropped')}"}


def bodies(work: Path) -> dict[str, Any]:
    relay, port = index_relay(work, 1_000)
    idle = rss(relay.proc.pid)
    head = b"POST /query HTTP/1.1\r\nContent-Length: 8000000\r\n\r\n"
    clients = hold(port, head + b"[" * 4_000_000, 100)
    time.sleep(5)
    refused = 100 - len(clients)
    peak = peak_rss(relay.proc.pid)
    for s in clients:
        s.close()
    relay.stop()
    return {"idle": idle, "peak": peak, "what": "100 clients, 8 MB bodies, half sent, 5 s",
            "reported": f"{refused} saw 503 before they had sent all (64 MiB body budget)"}


def query(work: Path) -> dict[str, Any]:
    """The freeze is what other clients see: the slowest of small requests sent meanwhile."""
    import urllib.error
    import urllib.request

    relay, port = index_relay(work, 1_000)
    idle = rss(relay.proc.pid)
    body = json.dumps({"token_ids": [7] * 1_000_000}).encode()
    slowest, done = [0.0], threading.Event()

    def probe() -> None:
        while not done.is_set():
            start = time.perf_counter()
            urllib.request.urlopen(f"http://127.0.0.1:{port}/workers", timeout=30).read()
            slowest[0] = max(slowest[0], time.perf_counter() - start)

    prober = threading.Thread(target=probe)
    prober.start()
    time.sleep(0.5)
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/query", body, timeout=30)
        status = 200
    except urllib.error.HTTPError as exc:
        status = exc.code
    time.sleep(0.5)
    done.set()
    prober.join()
    peak = peak_rss(relay.proc.pid)
    relay.stop()
    return {"idle": idle, "peak": peak, "what": "one query of 1M token ids",
            "reported": f"HTTP {status}; slowest other request meanwhile "
                        f"{slowest[0] * 1000:.0f} ms"}


SCENARIOS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "flood": flood, "stall": stall, "dump": dump, "bodies": bodies, "query": query}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scenarios", nargs="*", default=list(SCENARIOS))
    args = ap.parse_args()
    print("| attack | idle RSS | peak RSS | what | reported |\n|---|---|---|---|---|")
    for name in args.scenarios:
        with tempfile.TemporaryDirectory(prefix=f"kvgraph-{name}-") as d:
            r = SCENARIOS[name](Path(d))
        print(f"| {name} | {r['idle'] / MB:.0f} MB | {r['peak'] / MB:.0f} MB | {r['what']} | "
              f"{r['reported']} |", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
