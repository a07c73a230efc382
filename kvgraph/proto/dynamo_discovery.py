"""Dynamo's discovery, as Dynamo 1.6.1 keeps it: where its KV event publishers are found.

A publisher of KV events for one worker (worker_id, dp_rank) is two records, both named by the
endpoint it serves and its random ``publisher_id`` (hex):

- ``v1/event_channels/namespace/NS/component/COMP/endpoint/EP/topic/kv-events/ID``: how to
  reach it, ``{"kind": "Zmq", "config": {"endpoint": "tcp://HOST:PORT"}}`` or
  ``{"kind": "Nats", "config": {"subject_prefix": "namespace.NS.component.COMP.endpoint.EP"}}``;
- ``v1/event_sources/...`` (the same key): which worker and DP rank its events are for.

A router takes a worker's events only when the worker also serves the endpoint and has a model
card (``v1/instances/...``, ``v1/mdc/...``; Dynamo's workers write those), and only from one
publisher per (worker, rank): two publishers for one worker make it ambiguous, and it gets no
KV routing at all until one goes.

Two backends hold the records, as in Dynamo:

- ``file`` (Dynamo's ``DYN_FILE_KV``): one file per key under ``ROOT/BUCKET/``, the key
  URL-encoded into the name, written to a ``.tmp_`` file and renamed. Files untouched for 10 s
  are expired by any Dynamo process that uses the directory, so an owner touches its files every
  few seconds. A process killed with SIGKILL leaves its files behind until then.
- ``etcd``: the same keys, unencoded, under a lease of 10 s kept alive by the owner. etcd's
  JSON gateway (``/v3/...``) is spoken with the standard library: no client dependency.

Both are blocking; callers run them in a thread (see :class:`Registration`).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Protocol

from ..node import Problem, array, string

TOPIC = "kv-events"
CHANNELS, SOURCES = "v1/event_channels", "v1/event_sources"
TTL_S = 10.0                        # Dynamo's file-store TTL and etcd lease expiry
KEEP_ALIVE_S = TTL_S / 4
#: Where Dynamo's file backend keeps its records when ``DYN_FILE_KV`` is not set.
DEFAULT_FILE_ROOT = "/tmp/dynamo_store_kv"


NAME_PATTERN = r"^[A-Za-z0-9_-]+$"

DISCOVERY_OPTIONS = {
    "namespace": string("Dynamo namespace of the workers' endpoint.", "dynamo",
                        pattern=NAME_PATTERN),
    "component": string("Dynamo component of the workers' endpoint.", "backend",
                        pattern=NAME_PATTERN),
    "endpoint": string("Dynamo endpoint the workers serve.", "generate", pattern=NAME_PATTERN),
    "transport": string("Event plane: `zmq` (Dynamo 1.6.1's default) or `nats` (a deployment "
                        "with event_plane=\"nats\" / DYN_EVENT_PLANE=nats; then `url`).", "zmq",
                        enum=["zmq", "nats"]),
    "discovery": string("Dynamo's discovery backend: `file` (DYN_FILE_KV) or `etcd`.", "file",
                        enum=["file", "etcd"]),
    "discovery_path": string("The file backend's directory, as Dynamo's DYN_FILE_KV; empty: "
                             "DYN_FILE_KV from the environment, else Dynamo's default "
                             "/tmp/dynamo_store_kv. May use ${ENV}.", "", env=True),
    "etcd_endpoints": array("etcd client URLs (Dynamo's ETCD_ENDPOINTS).",
                            {"type": "string"}, ["http://127.0.0.1:2379"], min_items=1),
}


def endpoint_key(namespace: str, component: str, endpoint: str) -> str:
    """The key prefix of an endpoint's KV event publishers (a trailing slash included)."""
    return f"namespace/{namespace}/component/{component}/endpoint/{endpoint}/topic/{TOPIC}/"


def subject_prefix(namespace: str, component: str, endpoint: str) -> str:
    return f"namespace.{namespace}.component.{component}.endpoint.{endpoint}"


def publisher_records(namespace: str, component: str, endpoint: str, publisher_id: int,
                      worker_id: int, dp_rank: int, transport: dict[str, Any]
                      ) -> list[tuple[str, str, bytes]]:
    """The (bucket, key, value) records that make a publisher known to Dynamo's routers."""
    scope = {"kind": "endpoint", "endpoint": {"namespace": namespace, "component": component,
                                              "name": endpoint}}
    key = endpoint_key(namespace, component, endpoint) + f"{publisher_id:x}"
    channel = {"type": "EventChannel", "scope": scope, "topic": TOPIC,
               "instance_id": publisher_id, "transport": transport}
    source = {"type": "EventSource", "scope": scope, "topic": TOPIC, "publisher_id": publisher_id,
              "metadata": {"kv_state_endpoint": scope["endpoint"],
                           "worker": {"worker_id": worker_id, "dp_rank": dp_rank},
                           "publisher_id": publisher_id}}
    return [(CHANNELS, key, json.dumps(channel).encode()),
            (SOURCES, key, json.dumps(source).encode())]


def new_publisher_id() -> int:
    """Random, as Dynamo's: 53 bits (its ids stay exact as JSON numbers anywhere)."""
    return secrets.randbits(53) | 1


class Discovery(Protocol):
    def put(self, bucket: str, key: str, value: bytes) -> None: ...
    def delete(self, bucket: str, key: str) -> None: ...
    def keep_alive(self) -> None: ...
    def list(self, bucket: str, prefix: str) -> dict[str, bytes]: ...
    def close(self) -> None: ...


def _file_name(key: str) -> str:
    """Dynamo's URL-safe key: every byte but ASCII letters and digits as %XX."""
    return "".join(c if c.isascii() and c.isalnum() else
                   "".join(f"%{b:02X}" for b in c.encode()) for c in key)


def _key_of(name: str) -> str:
    import urllib.parse
    return urllib.parse.unquote(name)


class FileDiscovery:
    """Dynamo's ``file`` backend: a directory of JSON files (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        # what we wrote, to keep alive and remove: path -> (bucket, key, value)
        self._owned: dict[Path, tuple[str, str, bytes]] = {}

    def _path(self, bucket: str, key: str) -> Path:
        return self.root / bucket / _file_name(key)

    def put(self, bucket: str, key: str, value: bytes) -> None:
        directory = self.root / bucket
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".tmp_{secrets.token_hex(8)}"
        tmp.write_bytes(value)
        path = self._path(bucket, key)
        os.replace(tmp, path)
        self._owned[path] = (bucket, key, value)

    def delete(self, bucket: str, key: str) -> None:
        path = self._path(bucket, key)
        self._owned.pop(path, None)
        path.unlink(missing_ok=True)

    def keep_alive(self) -> None:
        """Touch what we own; write again what an expiry removed (we were away past the TTL)."""
        for path, (bucket, key, value) in list(self._owned.items()):
            try:
                os.utime(path)
            except FileNotFoundError:
                self.put(bucket, key, value)

    def list(self, bucket: str, prefix: str) -> dict[str, bytes]:
        """Live records of ``bucket`` whose key starts with ``prefix`` (expired ones skipped, as
        Dynamo would delete them)."""
        directory = self.root / bucket
        out: dict[str, bytes] = {}
        oldest = time.time() - TTL_S
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            return out
        for entry in entries:
            if entry.name.startswith(".tmp_") or not entry.is_file():
                continue
            key = _key_of(entry.name)
            if not key.startswith(prefix):
                continue
            try:
                if entry.stat().st_mtime < oldest:
                    continue
                out[key] = Path(entry.path).read_bytes()
            except FileNotFoundError:
                continue
        return out

    def close(self) -> None:
        for path in list(self._owned):
            path.unlink(missing_ok=True)
        self._owned.clear()


class DiscoveryError(Exception):
    """The discovery backend cannot be reached or refused a request."""


class EtcdDiscovery:
    """Dynamo's ``etcd`` backend, through etcd's JSON gateway: keys under one lease."""

    def __init__(self, endpoints: list[str], timeout_s: float = 2.0):
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.timeout_s = timeout_s
        self.lease = 0
        self._owned: dict[str, bytes] = {}

    def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode()
        errors = []
        for ep in self.endpoints:
            req = urllib.request.Request(ep + path, data=data,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                    answer: dict[str, Any] = json.loads(r.read() or b"{}")
                    return answer
            except urllib.error.HTTPError as exc:
                raise DiscoveryError(f"etcd at {ep} refused {path}: HTTP {exc.code} "
                                     f"{exc.read()[:200]!r}") from None
            except (OSError, ValueError) as exc:
                errors.append(f"{ep}: {exc}")
        raise DiscoveryError("no etcd endpoint answered (" + "; ".join(errors) + ")")

    @staticmethod
    def _b64(s: str | bytes) -> str:
        return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()

    def _grant(self) -> None:
        self.lease = int(self._call("/v3/lease/grant", {"TTL": int(TTL_S)})["ID"])

    def put(self, bucket: str, key: str, value: bytes) -> None:
        if not self.lease:
            self._grant()
        full = f"{bucket}/{key}"
        self._call("/v3/kv/put", {"key": self._b64(full), "value": self._b64(value),
                                  "lease": str(self.lease)})
        self._owned[full] = value

    def delete(self, bucket: str, key: str) -> None:
        full = f"{bucket}/{key}"
        self._owned.pop(full, None)
        self._call("/v3/kv/deleterange", {"key": self._b64(full)})

    def keep_alive(self) -> None:
        """Renew the lease; if it expired (we were away past the TTL), put everything again
        under a new one."""
        if not self.lease:
            return
        answer = self._call("/v3/lease/keepalive", {"ID": str(self.lease)})
        if int(answer.get("result", {}).get("TTL", 0) or 0) > 0:
            return
        self._grant()
        for full, value in list(self._owned.items()):
            self._call("/v3/kv/put", {"key": self._b64(full), "value": self._b64(value),
                                      "lease": str(self.lease)})

    def list(self, bucket: str, prefix: str) -> dict[str, bytes]:
        start = f"{bucket}/{prefix}".encode()
        end = start[:-1] + bytes([start[-1] + 1])
        answer = self._call("/v3/kv/range", {"key": self._b64(start),
                                             "range_end": self._b64(end)})
        return {base64.b64decode(kv["key"]).decode()[len(bucket) + 1:]:
                base64.b64decode(kv.get("value", "")) for kv in answer.get("kvs", [])}

    def close(self) -> None:
        for full in list(self._owned):
            self._call("/v3/kv/deleterange", {"key": self._b64(full)})
        self._owned.clear()
        if self.lease:
            self._call("/v3/lease/revoke", {"ID": str(self.lease)})
            self.lease = 0


def open_discovery(kind: str, path: str, etcd_endpoints: list[str]) -> Discovery:
    """The backend a node's options name (``discovery``, ``discovery_path``,
    ``etcd_endpoints``); an empty path is ``DYN_FILE_KV``, or Dynamo's default."""
    if kind == "etcd":
        return EtcdDiscovery(etcd_endpoints)
    return FileDiscovery(path or os.environ.get("DYN_FILE_KV") or DEFAULT_FILE_ROOT)


class Registration:
    """A node's records in discovery: put, kept alive while the node runs, removed when it
    stops. Blocking backend calls run in a thread; a failing keep-alive is logged (the records
    expire after TTL_S without it) and retried, and writes them again once it works."""

    def __init__(self, discovery: Discovery, log: Any):
        self.discovery, self.log = discovery, log

    async def put(self, records: list[tuple[str, str, bytes]]) -> None:
        import asyncio

        def put_all() -> None:
            for bucket, key, value in records:
                self.discovery.put(bucket, key, value)

        await asyncio.to_thread(put_all)

    async def keep_alive_forever(self) -> None:
        import asyncio

        while True:
            await asyncio.sleep(KEEP_ALIVE_S)
            try:
                await asyncio.to_thread(self.discovery.keep_alive)
            except (DiscoveryError, OSError) as exc:
                self.log.problem("discovery", "cannot keep the discovery records alive (%s); "
                                 "routers drop them after %.0f s without it", exc, TTL_S)

    async def close(self) -> None:
        import asyncio

        try:
            await asyncio.to_thread(self.discovery.close)
        except (DiscoveryError, OSError) as exc:
            self.log.warning("could not remove the discovery records (%s); they expire within "
                             "%.0f s", exc, TTL_S)


class DiscoveryProbe:
    """``validate --connect`` for the ``dynamo`` node types: the discovery backend answers (etcd)
    or can be written (a file directory), and the NATS server answers when it is the plane."""

    @classmethod
    async def probe(cls, config: dict[str, Any]) -> list[Problem]:
        import asyncio

        problems = []
        if config["discovery"] == "etcd":
            backend = EtcdDiscovery(config["etcd_endpoints"])
            prefix = endpoint_key(config["namespace"], config["component"], config["endpoint"])
            try:
                await asyncio.to_thread(backend.list, CHANNELS, prefix)
            except DiscoveryError as exc:
                problems.append(Problem("etcd_endpoints", str(exc),
                                        hint="is etcd running there? (Dynamo's ETCD_ENDPOINTS)"))
        else:
            root = Path(config["discovery_path"] or os.environ.get("DYN_FILE_KV")
                        or DEFAULT_FILE_ROOT)
            existing = next((p for p in (root, *root.parents) if p.exists()), None)
            if existing is None or not os.access(existing, os.W_OK):
                problems.append(Problem("discovery_path", f"{root} cannot be written",
                                        hint="the directory Dynamo's processes use "
                                             "(DYN_FILE_KV), writable by kvgraph"))
        if config["transport"] == "nats":
            from .nats import probe as nats_probe

            problems += await nats_probe(config, stream_needed=False)
        return problems
