"""NATS connection options and URL syntax, shared by the ``nats`` source and sink."""

from __future__ import annotations

import re
import time
from typing import Any, Callable, Iterable, Mapping

from ..node import (JsonSchema, Problem, boolean, counter, gauge, integer, number,
                    one_or_many, string)

_URL = re.compile(r"^(nats|tls|ws|wss)://(?:[^@/\s]+@)?(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+)"
                  r"(?::(\d{1,5}))?/?$")

CONNECTION_OPTIONS: dict[str, JsonSchema] = {
    "url": one_or_many("NATS server URL, or a list of them for a cluster. May use ${ENV}.",
                       string("A nats://, tls://, ws:// or wss:// URL.", env=True),
                       default="nats://127.0.0.1:4222"),
    "name": string("Connection name shown by the server's monitoring.", "kvgraph"),
    "user": string("User name. May use ${ENV}.", env=True),
    "password": string("Password. Use ${ENV}; never printed.", env=True, secret=True),
    "token": string("Authentication token. Use ${ENV}; never printed.", env=True, secret=True),
    "creds_file": string("Path to a .creds file (JWT and NKey seed). May use ${ENV}.", env=True),
    "nkeys_seed_file": string("Path to an NKey seed file. May use ${ENV}.", env=True),
    "tls_ca_file": string("CA bundle that signs the server certificate.", env=True),
    "tls_cert_file": string("Client certificate for mutual TLS.", env=True),
    "tls_key_file": string("Client private key for mutual TLS.", env=True),
    "connect_timeout_s": number("Timeout of one connection attempt.", 2.0, exclusive_minimum=0),
    "reconnect_wait_s": number("Initial wait between reconnect attempts (backs off).", 0.5,
                               exclusive_minimum=0),
    "connect_attempts": {"type": "integer", "minimum": 1, "default": 10,
                         "description": "Retries per server to connect at start; past them "
                                        "the node fails to start."},
    "max_reconnect_attempts": {"type": "integer", "minimum": -1, "default": -1,
                               "description": "Reconnect attempts before the node fails; -1 "
                                              "retries for ever."},
}

JETSTREAM_OPTIONS: dict[str, JsonSchema] = {
    "jetstream": boolean("Use JetStream (durable, acknowledged) instead of core NATS.", False),
    "stream": string("JetStream stream name."),
    "create_stream": boolean("Create the stream at start if it does not exist.", False),
    "replicas": integer("Copies of the stream a cluster keeps (JetStream `num_replicas`): 3 "
                        "survives the loss of one server of three. Used when the node creates "
                        "the stream; an existing stream with another count is reported.", 1,
                        minimum=1, maximum=5),
    "partitions": integer("Partition the stream by worker (JetStream): stored subjects become "
                          "`STREAM.part.P.<the subject's wildcards>`, P = NATS's "
                          "`partition(N, worker token)`, so that each worker's events stay in "
                          "one partition, in order. The subject must hold the worker id as a "
                          "token (`{worker_id}` in a sink's subject, `*` in a source's). "
                          "0: not partitioned.", 0, minimum=0, maximum=1024),
}


def check_url(value: str) -> str | None:
    """None when ``value`` is a usable NATS URL, else what is wrong with it."""
    if "${" in value:
        return None  # checked after interpolation, at run time
    m = _URL.match(value)
    if not m:
        return "expected nats://HOST[:PORT] (or tls://, ws://, wss://)"
    if m.group(3) and not 0 < int(m.group(3)) < 65536:
        return f"port {m.group(3)} is out of range 1-65535"
    return None


#: The metrics of every node holding a NATS connection.
NATS_METRICS = {
    "disconnects": counter("Times the NATS connection dropped."),
    "reconnects": counter("Times it came back."),
    "connection_errors": counter("Errors the NATS client reported."),
    "connected": gauge("1 while connected to NATS, 0 while the connection is down."),
    "disconnected_since": gauge("Unix time the connection went down; 0 while connected."),
}


def check_connection(options: Mapping[str, Any]) -> Iterable[Problem]:
    urls = options["url"]
    for i, url in enumerate([urls] if isinstance(urls, str) else urls):
        why = check_url(url)
        if why:
            yield Problem("url", f"{url!r} is not a NATS URL" if isinstance(urls, str)
                          else f"url[{i}] {url!r} is not a NATS URL", hint=why)
    auth = [k for k in ("token", "creds_file", "nkeys_seed_file") if k in options]
    if "user" in options or "password" in options:
        auth.append("user/password")
    if len(auth) > 1:
        yield Problem(auth[0] if auth[0] != "user/password" else "user",
                      f"choose one way to authenticate, not {' and '.join(auth)}")
    if ("password" in options) != ("user" in options):
        yield Problem("password" if "user" in options else "user",
                      "user and password go together")
    if ("tls_cert_file" in options) != ("tls_key_file" in options):
        yield Problem("tls_cert_file", "tls_cert_file and tls_key_file go together")
    if options.get("jetstream") is False and (options.get("stream") or options.get("durable")):
        yield Problem("stream", "JetStream options are set but jetstream = false",
                      hint="set jetstream = true", severity="warning")


async def connect(config: Mapping[str, Any], log: Any, metrics: Any,
                  closing: Callable[[], bool] = lambda: False,
                  on_up: Callable[[], None] = lambda: None,
                  on_down: Callable[[], None] = lambda: None) -> Any:
    """Connect with the node's options; reconnects with backoff are nats-py's, counted here.
    ``closing()`` tells the callbacks that a disconnect is the node's own close."""
    import ssl

    import nats

    urls = config["url"]
    opts: dict[str, Any] = {
        "servers": [urls] if isinstance(urls, str) else list(urls),
        "name": config["name"],
        "connect_timeout": config["connect_timeout_s"],
        "reconnect_time_wait": config["reconnect_wait_s"],
        # nats-py applies this to the first connection too, where -1 would retry for ever:
        # bound the start, then restore the configured value once connected.
        # (nats-py treats 0 as "for ever" too, so the bound is at least 1 retry)
        "max_reconnect_attempts": config["connect_attempts"],
        "allow_reconnect": True,
        # A server that stops answering without closing the connection is declared gone
        # after 3 unanswered pings 20 s apart (nats-py's default: 2 of 120 s, 4 minutes).
        "ping_interval": 20,
        "max_outstanding_pings": 3,
    }
    if "user" in config:
        opts["user"], opts["password"] = config["user"], config.get("password")
    if "token" in config:
        opts["token"] = config["token"]
    if "creds_file" in config:
        opts["user_credentials"] = config["creds_file"]
    if "nkeys_seed_file" in config:
        opts["nkeys_seed"] = config["nkeys_seed_file"]
    if any(k in config for k in ("tls_ca_file", "tls_cert_file")):
        tls = ssl.create_default_context(cafile=config.get("tls_ca_file"))
        if "tls_cert_file" in config:
            tls.load_cert_chain(config["tls_cert_file"], config.get("tls_key_file"))
        opts["tls"] = tls
    if "max_pending_bytes" in config:
        opts["pending_size"] = config["max_pending_bytes"]

    for name in ("disconnects", "reconnects", "connection_errors", "disconnected_since"):
        metrics.extra.setdefault(name, 0)
    metrics.extra["connected"] = 0

    async def disconnected() -> None:
        on_down()
        if closing():
            return
        metrics.extra["connected"] = 0
        metrics.extra["disconnected_since"] = time.time()
        metrics.extra["disconnects"] += 1
        log.warning("disconnected from NATS; reconnecting")

    async def reconnected() -> None:
        on_up()
        metrics.extra["connected"] = 1
        metrics.extra["disconnected_since"] = 0
        metrics.extra["reconnects"] += 1
        log.info("reconnected to NATS")

    async def error(exc: Exception) -> None:
        metrics.extra["connection_errors"] += 1
        log.problem("nats-error", "NATS: %s: %s", type(exc).__name__, exc)

    opts.update(disconnected_cb=disconnected, reconnected_cb=reconnected, error_cb=error)
    urls = config["url"] if isinstance(config["url"], list) else [config["url"]]
    log.info("connecting to NATS at %s", ", ".join(redact_url(u) for u in urls))
    nc = await nats.connect(**opts)
    nc.options["max_reconnect_attempts"] = config["max_reconnect_attempts"]
    metrics.extra["connected"] = 1
    log.info("connected to NATS at %s", redact_url(str(nc.connected_url.geturl())
                                                   if nc.connected_url else urls[0]))
    return nc


def redact_url(url: str) -> str:
    """A URL fit for a log line: credentials removed."""
    return re.sub(r"//[^@/]*@", "//***@", url)


async def connect_node(node: Any, **callbacks: Any) -> Any:
    """Connect a nats node (source or sink); a failure is a NodeFailure naming the servers."""
    from ..errors import NodeFailure

    c = node.config
    node._closing = False
    try:
        return await connect(c, node.log, node.metrics, lambda: node._closing, **callbacks)
    except Exception as exc:
        urls = c["url"] if isinstance(c["url"], list) else [c["url"]]
        raise NodeFailure(f"cannot connect to {', '.join(map(redact_url, urls))}: "
                          f"{type(exc).__name__}: {exc}") from exc


async def probe(config: Mapping[str, Any], stream_needed: bool) -> list[Problem]:
    """Connect once; check the JetStream stream when one is configured."""
    import nats

    urls = config["url"] if isinstance(config["url"], list) else [config["url"]]
    try:
        nc = await connect({**config, "connect_attempts": 1, "connect_timeout_s":
                            min(config["connect_timeout_s"], 2.0)}, _Quiet(), _Counts())
    except Exception as exc:
        return [Problem("url", f"cannot connect to {', '.join(map(redact_url, urls))}: "
                        f"{type(exc).__name__}: {exc}")]
    problems = []
    try:
        if stream_needed and config.get("jetstream"):
            from nats.js.errors import NotFoundError

            try:
                await nc.jetstream().stream_info(config["stream"])
            except NotFoundError:
                if not config.get("create_stream"):
                    problems.append(Problem("stream", f"JetStream stream {config['stream']!r} "
                                            "does not exist", hint="create it, or set "
                                            "create_stream = true"))
            except nats.errors.Error as exc:
                problems.append(Problem("jetstream", f"JetStream is not available: {exc}"))
    finally:
        await nc.close()
    return problems


class _Quiet:
    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


class _Counts:
    def __init__(self) -> None:
        self.extra: dict[str, int] = {}


class NatsProbe:
    """``validate --connect`` for both nats node types: the server answers, the stream exists."""

    @classmethod
    async def probe(cls, config: Mapping[str, Any]) -> list[Problem]:
        return await probe(config, stream_needed=True)


def worker_token(template: str) -> int:
    """Which wildcard (1-based) of a sink's stream subject holds the worker id (0: none)."""
    import re

    names = re.findall(r"\{(worker_id|dp_rank)\}", template)
    return names.index("worker_id") + 1 if "worker_id" in names else 0


def check_partitions(options: Mapping[str, Any], subject: str) -> Iterable[Problem]:
    """A partitioned stream needs JetStream and a worker token in the subject."""
    if not options["partitions"]:
        return
    if not options.get("jetstream"):
        yield Problem("partitions", "partitions need jetstream = true and a stream")
    if "*" not in subject.split("."):
        yield Problem("partitions", f"subject {options['subject']!r} has no worker token to "
                      "partition on", hint="put the worker id in the subject: "
                      "kv.events.{worker_id} (a sink), kv.events.* (a source)")


def stream_subject(template: str) -> str:
    """The subject a stream listens on for a sink's subject template (placeholders as ``*``)."""
    return template.replace("{worker_id}", "*").replace("{dp_rank}", "*")


def partition_transform(subject: str, stream: str, partitions: int,
                        worker_token: int | None = None) -> tuple[str, str]:
    """(source, destination) of the stream's subject transform that partitions it by worker:
    ``kv.events.*`` -> ``STREAM.part.{{partition(N,1)}}.{{wildcard(1)}}``. The worker token is
    the first wildcard unless ``worker_token`` (1-based, among the wildcards) says otherwise."""
    wildcards = subject.split(".").count("*")
    if wildcards == 0:
        raise ValueError(f"subject {subject!r} has no wildcard token for the worker id")
    token = worker_token or 1
    rest = ".".join(f"{{{{wildcard({i})}}}}" for i in range(1, wildcards + 1))
    return subject, f"{stream}.part.{{{{partition({partitions},{token})}}}}.{rest}"


def partition_subject(stream: str, partition: int) -> str:
    """What a consumer of one partition filters on."""
    return f"{stream}.part.{partition}.>"


async def ensure_stream(js: Any, config: Mapping[str, Any], subject: str,
                        log: Any = None, worker_token: int = 1) -> bool:
    """Check that the configured JetStream stream exists, with the configured partitions (and
    replicas: a different count is said, not fatal); create it when ``create_stream`` is set
    (True when it did). A missing stream otherwise stops the node at start. ``subject`` is what
    the stream listens on (wildcards for the worker, when partitioned)."""
    from nats.js.api import StreamConfig, SubjectTransform
    from nats.js.errors import NotFoundError

    from ..errors import NodeFailure

    name, partitions = config["stream"], config["partitions"]
    try:
        info = await while_electing(lambda: js.stream_info(name), config, log)
    except NotFoundError:
        if not config.get("create_stream"):
            raise NodeFailure(f"JetStream stream {name!r} does not exist; create it "
                              "or set create_stream = true") from None
        info = None
    if info is not None:
        _check_stream(info.config, config, subject, log)
        return False
    sc = StreamConfig(name=name, subjects=[subject], num_replicas=config["replicas"])
    if config.get("dedup_window_s"):
        sc.duplicate_window = config["dedup_window_s"]
    if partitions:
        src, dest = partition_transform(subject, name, partitions, worker_token)
        sc.subject_transform = SubjectTransform(src=src, dest=dest)
    try:
        await while_electing(lambda: js.add_stream(sc), config, log)
    except Exception as exc:
        if "already in use" not in str(exc):   # another node created it meanwhile: check it
            raise
        _check_stream((await js.stream_info(name)).config, config, subject, log)
        return False
    return True


async def while_electing(call: Callable[[], Any], config: Mapping[str, Any], log: Any) -> Any:
    """``call()``, tried again while JetStream cannot answer (a cluster electing a leader after
    a server died answers nothing for a few seconds), as :func:`~kvgraph.proto.link.with_backoff`
    tries (the wait up to 2 s). Answers (not found, already in use) are not retried."""
    import asyncio

    from nats.errors import NoRespondersError, TimeoutError as NatsTimeout
    from nats.js.errors import ServiceUnavailableError

    from .link import with_backoff

    electing = (NatsTimeout, NoRespondersError, ServiceUnavailableError, asyncio.TimeoutError)

    def said(exc: BaseException) -> None:
        if log is not None:
            log.problem("jetstream", "JetStream does not answer (%s); trying again",
                        type(exc).__name__)

    return await with_backoff(config, call, lambda exc: isinstance(exc, electing), 2.0, said)


def _check_stream(sc: Any, config: Mapping[str, Any], subject: str, log: Any) -> None:
    from ..errors import NodeFailure

    name, partitions = config["stream"], config["partitions"]
    transform = getattr(sc, "subject_transform", None)
    have = 0
    if transform is not None and ".part.{{partition(" in (transform.dest or ""):
        have = int(transform.dest.split("{{partition(")[1].split(",")[0])
    if have != partitions:
        raise NodeFailure(f"JetStream stream {name!r} has {have or 'no'} partitions, the graph "
                          f"asks for {partitions or 'none'}; a stream's partitioning is fixed "
                          "when it is created: use another stream, or match it")
    if (sc.num_replicas or 1) != config["replicas"] and log is not None:
        log.warning("JetStream stream %s keeps %d replica(s), the graph asks for %d (set when "
                    "the stream was created; `nats stream edit %s --replicas %d` changes it)",
                    name, sc.num_replicas or 1, config["replicas"], name, config["replicas"])
