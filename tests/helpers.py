"""Helpers shared by the tests: paths and running the real CLI."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
import subprocess
import sys
from pathlib import Path
from typing import Callable

from kvgraph.testing import ZmqPublisher  # noqa: F401 (tests import it from here too)

ROOT = Path(__file__).resolve().parent.parent
GRAPHS = ROOT / "graphs"
TEST_GRAPHS = Path(__file__).resolve().parent / "graphs"


def kvgraph(*args: str, env: dict[str, str] | None = None, timeout: float = 60
            ) -> subprocess.CompletedProcess[str]:
    """Run the real CLI as a user would, in a fresh process."""
    return subprocess.run([sys.executable, "-m", "kvgraph", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "NO_COLOR": "1", **(env or {})})

FIXTURES = Path(__file__).resolve().parent / "fixtures"  # vLLM recordings (fixtures/README.md)


def fixture_dirs() -> list[Path]:
    """Every fixture stream: each vLLM version, and its bytes_hashes stream where present."""
    out = []
    for d in sorted(FIXTURES.glob("vllm-*"), key=lambda p: tuple(map(int, p.name[5:].split(".")))):
        out.append(d)
        if (d / "bytes_hashes").is_dir():
            out.append(d / "bytes_hashes")
    if not out:  # never a silent "empty parameter set": the data ships with the repository
        raise RuntimeError(f"no vLLM fixtures in {FIXTURES}; they are part of the repository "
                           "(git checkout tests/fixtures)")
    return out


def fixture_id(d: Path) -> str:
    return d.name if d.name != "bytes_hashes" else f"{d.parent.name}-bytes"


def read_frames(path: Path) -> list[list[bytes]]:
    import base64
    import json

    return [[base64.b64decode(f) for f in json.loads(line)["frames_b64"]]
            for line in path.read_text().splitlines() if line.strip()]


def from_json(v):  # {"hex": ...} -> bytes, recursively (fixtures/README.md)
    if isinstance(v, dict):
        return bytes.fromhex(v["hex"]) if set(v) == {"hex"} else {k: from_json(x)
                                                                   for k, x in v.items()}
    return [from_json(x) for x in v] if isinstance(v, list) else v


def expected_batches(d: Path) -> list[dict]:
    import json

    return [from_json(json.loads(line)) for line in (d / "expected.jsonl").read_text().splitlines()]


KIND_OF_TYPE = {"BlockStored": "stored", "BlockRemoved": "removed",
                "AllBlocksCleared": "cleared"}


def assert_event_matches(got: dict, want: dict, where: str = "") -> None:
    """``got`` is a kvgraph event as a dict (JSON or struct fields); ``want`` an expected.jsonl
    event. Every field of ``want`` must match exactly; hashes after normalisation."""
    from kvgraph.event import normalize_hash

    assert got["kind"] == KIND_OF_TYPE[want["type"]], where
    for key, value in want.items():
        if key == "type":
            continue
        name = "parent_hash" if key == "parent_block_hash" else key
        if key == "block_hashes":
            value = [normalize_hash(h) for h in value]
        elif key == "parent_block_hash" and value is not None:
            value = normalize_hash(value)
        default = [] if name in ("block_hashes", "token_ids") else None
        assert got.get(name, default) == value, f"{where}: {name}: {got.get(name)!r} != {value!r}"


class TestEngine(ZmqPublisher):
    """A vLLM-like publisher with its replay server: a ROUTER that answers ``[b"", start]``
    with every buffered batch from ``start`` and the end marker, in the reply shape of vLLM
    >= 0.26 (``reply_topic``) or <= 0.25. ``publish(..., drop=True)`` buffers a batch but does
    not send it live: the loss a PUB socket causes past its high-water mark."""

    __test__ = False

    def __init__(self, endpoint: str, replay_endpoint: str, topic: bytes = b"kv@pod-a@m",
                 reply_topic: bool = True, keep: int = 10_000):
        import collections

        super().__init__(endpoint)
        self.topic, self.reply_topic, self.seq = topic, reply_topic, 0
        self.buffer: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=keep)
        self.lock = threading.Lock()
        self.router = self.ctx.socket(self.zmq.ROUTER)
        self.router.setsockopt(self.zmq.LINGER, 0)
        self.router.bind(replay_endpoint)
        self.requests: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def publish(self, payload: bytes, drop: bool = False) -> int:
        seq = self.seq
        self.seq += 1
        with self.lock:
            self.buffer.append((seq, payload))
        if not drop:
            self.send([self.topic, seq.to_bytes(8, "big"), payload])
        return seq

    def restart(self) -> None:
        """A new engine process: seq from 0, empty replay buffer."""
        with self.lock:
            self.seq = 0
            self.buffer.clear()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self.router.poll(50):
                continue
            ident, _, start = self.router.recv_multipart()
            start = int.from_bytes(start, "big")
            self.requests.append(start)
            with self.lock:
                items = [(s, p) for s, p in self.buffer if s >= start]
            head = [ident, b""] + ([self.topic] if self.reply_topic else [])
            for s, p in items:
                self.router.send_multipart(head + [s.to_bytes(8, "big"), p])
            end = [ident, b""] + ([b""] if self.reply_topic else [])
            self.router.send_multipart(end + [b"\xff" * 8, b""])

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.router.close()
        super().close()


def engine_graph(endpoint: str, options: str = "") -> str:
    """A graph reading one engine: `zmq` node "engine" (with ``options``) -> capture "out", its
    errors -> capture "dead"."""
    return f"""
[graph]
name = "engine"
[nodes.engine]
type = "zmq"
endpoint = "{endpoint}"
{options}
[nodes.out]
type = "capture"
[nodes.dead]
type = "capture"
[[edges]]
from = "engine"
to = "out"
[[edges]]
from = "engine.errors"
to = "dead"
"""


def _toml(value: object) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string is a JSON string


class GraphFile:
    """A graph file built in code, so that a test reads like the graph it runs:

        GraphFile("relay").node("engine", "zmq", endpoint=ep).node("out", "null")
                          .edge("engine", "out").write(tmp_path)
    """

    def __init__(self, name: str):
        self.name = name
        self.nodes: dict[str, dict[str, object]] = {}
        self.edges: list[dict[str, object]] = []

    def node(self, node_id: str, type_: str, **options: object) -> "GraphFile":
        self.nodes[node_id] = {"type": type_, **options}
        return self

    def edge(self, src: str, dst: str, **options: object) -> "GraphFile":
        self.edges.append({"from": src, "to": dst, **options})
        return self

    def text(self) -> str:
        out = [f"[graph]\nname = {_toml(self.name)}\n"]
        for nid, table in self.nodes.items():
            out.append(f"\n[nodes.{nid}]\n" + "".join(f"{k} = {_toml(v)}\n"
                                                     for k, v in table.items()))
        for e in self.edges:
            out.append("\n[[edges]]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in e.items()))
        return "".join(out)

    def write(self, directory: Path, file: str | None = None) -> Path:
        path = directory / (file or f"{self.name}.toml")
        path.write_text(self.text())
        return path
class FaultyLink:
    """A TCP proxy in front of a server, on threads, that plays network faults: ``drop_next``
    swallows the next chunk the client sends that contains ``marker`` and then cuts both
    sides (the client believes it wrote the data; the server never saw it), ``cut`` breaks
    every connection now. New connections are accepted and forwarded again at once."""

    def __init__(self, upstream_port: int, host: str = "127.0.0.1"):
        import socket
        import threading

        self.upstream = (host, upstream_port)
        self.listener = socket.create_server((host, 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.links: list[tuple[socket.socket, socket.socket]] = []
        self.marker: bytes | None = None
        self.dropped = 0
        self.connections = 0
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            with self.lock:
                self.links.append((client, server))
                self.connections += 1
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False),
                             daemon=True).start()

    def _pump(self, src, dst, from_client: bool) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                self._close(src, dst)
                return
            if from_client:
                with self.lock:
                    drop = self.marker is not None and self.marker in data
                    if drop:
                        self.marker = None
                        self.dropped += 1
                if drop:
                    self.cut()
                    return
            try:
                dst.sendall(data)
            except OSError:
                self._close(src, dst)
                return

    @staticmethod
    def _close(*socks) -> None:
        import socket
        import struct

        for s in socks:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()       # a reset, as a broken network gives
            except OSError:
                pass

    def drop_next(self, marker: bytes) -> None:
        with self.lock:
            self.marker = marker

    def cut(self) -> None:
        with self.lock:
            links, self.links = self.links, []
        for client, server in links:
            self._close(client, server)

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        self.cut()


def content_chain(rng: "random.Random", contents: list[list[int]], parent: int | None,
                  most: int) -> tuple[list[int], list[int]] | None:
    """A chain of 1..``most`` blocks drawn from ``contents``, stored on ``parent`` as an engine
    stores: each block hash names (parent hash, content), so the same content on the same
    parent is the same block. None when the draw repeats a hash or reaches the parent (an
    engine never stores that). Returns (token ids, block hashes)."""
    picked = [rng.randrange(len(contents)) for _ in range(rng.randint(1, most))]
    hashes, prev = [], parent or 0
    for c in picked:
        prev = (hash((prev, c)) & 0xFFFFFFF) + 1
        hashes.append(prev)
    if len(set(hashes)) < len(hashes) or parent in hashes:
        return None
    return [t for c in picked for t in contents[c]], hashes


class KilledAndRestarted:
    """``kvgraph run GRAPH`` as a process, SIGKILLed mid-stream and started again: the crash
    tests of every at-least-once edge (JetStream, Redis, Kafka) share it.

        with KilledAndRestarted(graph) as run:
            run.until(lambda: written() >= n // 4)   # well into the stream...
            run.kill()                               # ...kill -9, with messages in flight
            run.start()                              # returns once it runs (all nodes up)
            run.until(lambda: written() >= n)
            run.stop()                               # SIGTERM: a clean exit, code 0

    Each process's stderr goes to a file next to the graph (``log()``), shown when it fails.
    """

    def __init__(self, graph: Path):
        self.graph = graph
        self.proc: "subprocess.Popen[bytes] | None" = None
        self.starts = 0
        self.start()

    def start(self, timeout: float = 60.0) -> None:
        """Start kvgraph; return once it says it is running (every node started)."""
        self.starts += 1
        self.log_path = self.graph.with_suffix(f".run{self.starts}.log")
        with open(self.log_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "kvgraph", "run",
                                          str(self.graph), "--status", "off"], cwd=ROOT,
                                         stderr=err, env={**os.environ, "NO_COLOR": "1"})
        self.until(lambda: "INFO running " in self.log(), timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def until(self, condition, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc is not None and self.proc.poll() is None, self.log()[-4000:]
            assert time.monotonic() < deadline, \
                f"not reached within {timeout} s; kvgraph's log:\n{self.log()[-4000:]}"
            time.sleep(0.02)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> str:
        """SIGTERM; the process must exit 0. Returns its log."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        assert self.proc.returncode == 0, \
            f"exit {self.proc.returncode}; kvgraph's log:\n{self.log()[-4000:]}"
        return self.log()

    def __enter__(self) -> "KilledAndRestarted":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def metrics_page(port: int) -> str:
    """The /metrics page of a ``kvgraph run --metrics-port`` (empty while it is not up)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return r.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return ""


def metric(page: str, name: str, **labels: str) -> float | None:
    """The value of one sample of a metrics page, or None."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in page.splitlines():
        head, _, value = line.rpartition(" ")
        if head == name + (f"{{{want}}}" if want else ""):
            return float(value)
    return None


def wait_until(predicate: Callable[[], object], timeout: float = 20.0,
               what: str = "condition") -> None:
    """Poll ``predicate`` (from a thread, not an event loop) until true, within a deadline."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not met within {timeout} s")
        time.sleep(0.05)


async def stream_events(urls: list[str], stream: str, subjects: str = ">",
                        timeout: float = 60.0) -> list[tuple[str, dict]]:
    """Every jsonl event a JetStream stream holds, in stream order, with its message's subject.
    Fetches are tried again until ``timeout``: right after a server of the cluster died, its
    consumers may answer nothing for a few seconds."""
    import asyncio
    import json

    import nats

    nc = await nats.connect(urls)
    deadline = time.monotonic() + timeout
    try:
        js = nc.jetstream()
        while True:   # the JetStream API too may not answer for a while
            try:
                total = (await js.stream_info(stream)).state.messages
                sub = await js.pull_subscribe(subjects, stream=stream)
                break
            except (asyncio.TimeoutError, nats.errors.TimeoutError):
                if time.monotonic() > deadline:
                    raise
        out: list[tuple[str, dict]] = []
        seen = 0
        while seen < total:
            try:
                msgs = await sub.fetch(1000, timeout=2)
            except (asyncio.TimeoutError, nats.errors.TimeoutError):
                if time.monotonic() > deadline:
                    raise
                continue
            for msg in msgs:
                seen += 1
                out += [(msg.subject, json.loads(line)) for line in msg.data.splitlines()]
                await msg.ack()
        return out
    finally:
        await nc.close()
