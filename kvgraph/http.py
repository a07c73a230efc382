"""A deliberately small HTTP/1.1 server for kvgraph's own endpoints (metrics, the index API).

One request per connection, bodies bounded, JSON errors: enough for Prometheus scrapes and
routers' queries, with no dependency. Every malformed request gets a 4xx with a clear message.

What a client can make it hold is bounded: request bodies in memory at once (all connections
together, ``BODY_BUDGET``; a request past it gets 503 at once, before its body is read), the
time a request may take to arrive (``READ_TIMEOUT_S``), and the time an answer may wait for a
client that does not read it (``WRITE_TIMEOUT_S``; then the connection is dropped with what it
held), and answers waiting for their clients, all together (``ANSWER_BUDGET``; past it, 503
instead of the answer, though one answer is always let through whatever its size). Measured
before: 100 clients that never read ``/dump`` held 14.4 GB; partial 8 MB bodies held 1.41 GB
for 30 s.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Awaitable, Callable

if TYPE_CHECKING:
    import asyncio

Response = tuple[int, str, bytes]                     # status, content type, body
Handler = Callable[[str, str, bytes], Awaitable[Response] | Response]

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 411: "Length Required", 413: "Payload Too Large",
            422: "Unprocessable Entity", 500: "Internal Server Error",
            503: "Service Unavailable"}


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def json_response(obj: Any, status: int = 200) -> Response:
    return status, "application/json", json.dumps(obj).encode() + b"\n"


def _error(status: int, message: str) -> Response:
    return json_response({"error": message}, status)


READ_TIMEOUT_S = 10.0
WRITE_TIMEOUT_S = 10.0
BODY_BUDGET = 64 * 1024 * 1024
ANSWER_BUDGET = 256 * 1024 * 1024


class Budget:
    """Bytes held at once over all connections, shown in ``stats`` (the node's metrics, say)
    under ``key``: ``http_body_bytes`` for request bodies, ``http_answer_bytes`` for answers
    not yet read by their clients."""

    def __init__(self, total: int, stats: dict[str, Any], key: str):
        self.left, self.total, self.stats, self.key = total, total, stats, key
        stats.setdefault(key, 0)

    def take(self, n: int) -> None:
        self.left -= n
        self.stats[self.key] = self.total - self.left

    def give(self, n: int) -> None:
        self.take(-n)


async def _read_request(reader: asyncio.StreamReader, max_body: int,
                        budget: Budget) -> tuple[str, str, bytes]:
    import asyncio

    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line")
    method, path = parts[0], parts[1].split("?", 1)[0]
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            try:
                length = int(value.strip())
            except ValueError:
                raise HttpError(400, "bad Content-Length") from None
            if length < 0:
                raise HttpError(400, "bad Content-Length")
        elif name.strip().lower() == "transfer-encoding":
            raise HttpError(411, "chunked bodies are not accepted; send Content-Length")
    if length > max_body:
        raise HttpError(413, f"body of {length} bytes is over the limit of {max_body}")
    if not length:
        return method, path, b""
    if length > budget.left:
        raise HttpError(503, "too many request bodies in flight; try again")
    budget.take(length)
    try:
        body = await asyncio.wait_for(reader.readexactly(length), READ_TIMEOUT_S)
    finally:
        budget.give(length)
    return method, path, body


async def serve(handler: Handler, host: str, port: int, max_body: int = 1 << 20,
                stats: dict[str, Any] | None = None) -> Any:
    """Start serving; returns the asyncio Server (``server.sockets[0]`` has the real port)."""
    import asyncio

    stats = {} if stats is None else stats
    for key in ("http_slow_clients_dropped", "http_answers_refused"):
        stats.setdefault(key, 0)
    budget = Budget(BODY_BUDGET, stats, "http_body_bytes")
    answers = Budget(ANSWER_BUDGET, stats, "http_answer_bytes")

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                method, path, body = await _read_request(reader, max_body, budget)
                result = handler(method, path, body)
                status, ctype, payload = await result if asyncio.iscoroutine(result) \
                    else result  # type: ignore[misc]
            except HttpError as exc:
                status, ctype, payload = _error(exc.status, str(exc))
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                status, ctype, payload = _error(408, "incomplete request")
            except Exception as exc:  # a handler bug must not kill the server
                status, ctype, payload = _error(500, f"{type(exc).__name__}: {exc}")
            if len(payload) > answers.left and answers.left < answers.total:
                status, ctype, payload = _error(503, "too many answers waiting for their "
                                                "clients to read them; try again")
                stats["http_answers_refused"] += 1
            held = len(payload)
            answers.take(held)
            writer.write(f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: {ctype}"
                         f"\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
                         .encode() + payload)
            del payload
            try:
                await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)
            finally:
                answers.give(held)
        except asyncio.TimeoutError:  # a client that does not read: drop what it holds
            writer.transport.abort()
            stats["http_slow_clients_dropped"] += 1
        except ConnectionError:
            pass
        finally:
            writer.close()

    return await asyncio.start_server(on_connection, host, port, limit=1 << 16)
