"""A client of Dynamo 1.6.1's standalone indexer HTTP API, written from the shapes the wheel's
server gives (``python -m dynamo.indexer``). The tests run it unchanged against Dynamo's
server and against kvgraph's ``index`` node: that is what "drop-in" means here.

One keep-alive connection, as a router would hold; every call returns (status, body), the
body parsed as JSON when it is JSON.
"""

from __future__ import annotations

import http.client
import json
import time
from typing import Any


class IndexerClient:
    def __init__(self, url: str, timeout: float = 10.0):
        host, _, port = url.removeprefix("http://").rstrip("/").partition(":")
        self.url, self.host, self.port, self.timeout = url, host, int(port), timeout
        self.conn = http.client.HTTPConnection(host, self.port, timeout=timeout)

    def close(self) -> None:
        self.conn.close()

    def call(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
             content_type: str = "application/json") -> tuple[int, Any]:
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": content_type} if data is not None else {}
        for attempt in (0, 1):   # a keep-alive connection the server closed: once more
            try:
                self.conn.request(method, path, body=data, headers=headers)
                resp = self.conn.getresponse()
                payload = resp.read()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.conn.close()
                self.conn = http.client.HTTPConnection(self.host, self.port,
                                                       timeout=self.timeout)
                if attempt:
                    raise
        if (resp.getheader("Content-Type") or "").startswith("application/json") and payload:
            return resp.status, json.loads(payload)
        return resp.status, payload.decode(errors="replace")

    # -- the API ------------------------------------------------------------------------------

    def register(self, instance_id: int, endpoint: str, model_name: str, block_size: int,
                 **extra: Any) -> tuple[int, Any]:
        return self.call("POST", "/register", {"instance_id": instance_id, "endpoint": endpoint,
                                               "model_name": model_name,
                                               "block_size": block_size, **extra})

    def unregister(self, instance_id: int, model_name: str, **extra: Any) -> tuple[int, Any]:
        return self.call("POST", "/unregister", {"instance_id": instance_id,
                                                 "model_name": model_name, **extra})

    def query(self, token_ids: list[int], model_name: str, **extra: Any) -> tuple[int, Any]:
        return self.call("POST", "/query", {"token_ids": token_ids, "model_name": model_name,
                                            **extra})

    def query_by_hash(self, block_hashes: list[int], model_name: str, **extra: Any
                      ) -> tuple[int, Any]:
        """``block_hashes``: tokens_hash values as signed 64-bit, as Dynamo's clients send."""
        signed = [h - (1 << 64) if h >= 1 << 63 else h for h in block_hashes]
        return self.call("POST", "/query_by_hash", {"block_hashes": signed,
                                                    "model_name": model_name, **extra})

    def workers(self, **filters: str) -> tuple[int, Any]:
        q = "&".join(f"{k}={v}" for k, v in filters.items())
        return self.call("GET", "/workers" + (f"?{q}" if q else ""))

    def dump(self) -> tuple[int, Any]:
        return self.call("GET", "/dump")

    def health(self) -> int:
        return self.call("GET", "/health")[0]

    def metrics(self) -> str:
        return self.call("GET", "/metrics")[1]

    def peers(self) -> tuple[int, Any]:
        return self.call("GET", "/peers")

    def register_peer(self, url: str) -> tuple[int, Any]:
        return self.call("POST", "/register_peer", {"url": url})

    def deregister_peer(self, url: str) -> tuple[int, Any]:
        return self.call("POST", "/deregister_peer", {"url": url})

    def wait_healthy(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health() == 200:
                    return
            except OSError:
                self.conn.close()
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=5)
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.url}: no answer on /health within {timeout} s")
            time.sleep(0.05)

    def wait_answer(self, token_ids: list[int], model_name: str, worker: int,
                    timeout: float = 20.0) -> dict[str, Any]:
        """Query until ``worker`` matches the whole of ``token_ids`` on some tier: the events
        its engine sent before them are then applied (each engine's stream is in order)."""
        deadline = time.monotonic() + timeout
        while True:
            status, answer = self.query(token_ids, model_name)
            inst = answer.get("instances", {}).get(str(worker)) if status == 200 else None
            if inst and inst["longest_matched"] >= len(token_ids):
                return answer
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.url}: worker {worker} never matched the marker: "
                                     f"{status} {answer}")
            time.sleep(0.02)
