"""Dynamo 1.6.1's standalone indexer HTTP API, on aiohttp, so that its clients work unchanged.

Routes, request and answer shapes, status codes and units are the ones the wheel's server
gives (probed; ``tests/indexer_client.py`` is a client written from them and run against both
servers):

    POST /register         {instance_id, endpoint, model_name, block_size, routing_group?,
                            dp_rank?, replay_endpoint?} -> 201 {"status": "ok"}; 409 taken or
                            another block_size; 400 bad endpoint
    POST /unregister       {instance_id, model_name, routing_group?, dp_rank?} -> 200; 404
    POST /query            {token_ids, model_name, routing_group?, lora_name?, cache_salt?}
    POST /query_by_hash    {block_hashes (signed 64-bit), model_name, routing_group?}
                           -> 200 {"scores": {worker: {dp_rank: tokens}}, "frequencies": [],
                                   "instances": {worker: {longest_matched, gpu, dp, cpu, disk}}}
                              404 no such (model_name, routing_group)
    GET  /workers          ?model_name=&routing_group= -> the registered engines
    GET  /dump             {"model:group": {"block_size", "events": [RouterEvent...]}}, streamed
    GET  /health, /metrics (Prometheus, Dynamo's metric names), /peers
    POST /register_peer, /deregister_peer {url}, /reopen_logs

Malformed JSON is 400, a body of the wrong shape 422, a body that is not
``application/json`` 415, a body over ``max_body_bytes`` 413 (all text, as axum gives them).

kvgraph's own, richer answers stay under ``/kvgraph/``: ``POST /kvgraph/query`` and
``/kvgraph/query_by_hash`` (model_name optional: the node's own partition; a sorted list of
``{worker_id, dp_rank, matched_blocks}``), ``GET /kvgraph/workers`` (blocks per worker).
"""

from __future__ import annotations

import asyncio
import time
from array import array
from bisect import bisect_left
from typing import TYPE_CHECKING, Annotated, Any, Awaitable, Callable

import msgspec
from aiohttp import web

from ..webserver import application
from .registry import RegistryError

if TYPE_CHECKING:
    from ..sinks.index import IndexSink

U32 = Annotated[int, msgspec.Meta(ge=0, le=0xFFFFFFFF)]
U64 = Annotated[int, msgspec.Meta(ge=0)]   # and < 2^64: msgspec decodes no larger int
I64 = Annotated[int, msgspec.Meta(ge=-(1 << 63), le=(1 << 63) - 1)]


class RegisterRequest(msgspec.Struct):
    instance_id: U64
    endpoint: str
    model_name: str
    block_size: Annotated[int, msgspec.Meta(ge=1, le=0xFFFFFFFF)]
    routing_group: str = "default"
    tenant_id: str = "default"
    dp_rank: U32 | None = None
    replay_endpoint: str | None = None


class UnregisterRequest(msgspec.Struct):
    instance_id: U64
    model_name: str
    routing_group: str | None = None
    tenant_id: str | None = None
    dp_rank: U32 | None = None


class QueryRequest(msgspec.Struct):
    token_ids: list[int]   # u32, checked as they are hashed (3x cheaper than here)
    model_name: str
    routing_group: str = "default"
    tenant_id: str = "default"
    lora_name: str | None = None
    cache_salt: str | None = None


class QueryByHashRequest(msgspec.Struct):
    block_hashes: list[I64]
    model_name: str
    routing_group: str = "default"
    tenant_id: str = "default"
    cache_salt: str | None = None


class OwnQueryRequest(msgspec.Struct):
    token_ids: list[int]
    model_name: str | None = None
    routing_group: str | None = None
    lora_name: str | None = None
    cache_salt: str | None = None


class OwnQueryByHashRequest(msgspec.Struct):
    block_hashes: list[U64]
    model_name: str | None = None
    routing_group: str | None = None


class PeerRequest(msgspec.Struct):
    url: str


_DECODERS: dict[type, msgspec.json.Decoder[Any]] = {}
_encode = msgspec.json.Encoder().encode
_JSON = "application/json"
#: Dynamo's request latency buckets (seconds): 0.1 ms doubling.
BUCKETS = tuple(0.0001 * 2 ** i for i in range(15))
#: How long a request body may take to arrive, and an answer's chunk to be read by its client.
READ_TIMEOUT_S = 10.0
WRITE_TIMEOUT_S = 10.0
#: Request bodies held at once over all connections; a request past it gets 503 before its body
#: is read (100 clients sending 8 MB bodies slowly would otherwise hold 800 MB).
BODY_BUDGET = 64 * 1024 * 1024
DUMP_CHUNK_BYTES = 64 * 1024


class Budget:
    """Bytes held at once over all connections, shown in ``stats`` (the node's metrics)
    under ``key`` (``http_body_bytes``: request bodies being read)."""

    def __init__(self, total: int, stats: dict[str, Any], key: str):
        self.left, self.total, self.stats, self.key = total, total, stats, key
        stats.setdefault(key, 0)

    def take(self, n: int) -> None:
        self.left -= n
        self.stats[self.key] = self.total - self.left

    def give(self, n: int) -> None:
        self.take(-n)


BUDGET = web.AppKey("budget", Budget)
MAX_BODY = web.AppKey("max_body", int)
SLOW_DROPPED = web.AppKey("slow_dropped", Callable[[], None])


def _text(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message, content_type="text/plain",
                        charset="utf-8")


_JSON_HEADERS = {"Content-Type": _JSON}


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=_encode(obj), headers=_JSON_HEADERS)


async def _body(request: web.Request, kind: type) -> Any:
    """The request body decoded as ``kind``, or the rejection axum's Json extractor gives."""
    ctype = request.headers.get("Content-Type", "")
    base = ctype.split(";", 1)[0].strip().lower()
    if base != _JSON and not (base.startswith("application/") and base.endswith("+json")):
        raise _Reject(415, "Expected request with `Content-Type: application/json`")
    budget = request.app[BUDGET]
    size = request.content_length or 0
    if size > request.app[MAX_BODY]:
        raise _Reject(413, f"body of {size} bytes is over the limit of {request.app[MAX_BODY]}")
    if size > budget.left:
        raise _Reject(503, "too many request bodies in flight; try again")
    budget.take(size)
    try:
        if request.content.total_bytes >= size:   # all here already (most requests): no timer
            body = await request.read()
        else:
            body = await asyncio.wait_for(request.read(), READ_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise _Reject(408, f"the body did not arrive within {READ_TIMEOUT_S:g} s") from None
    finally:
        budget.give(size)
    dec = _DECODERS.get(kind)
    if dec is None:
        dec = _DECODERS[kind] = msgspec.json.Decoder(kind)
    try:
        return dec.decode(body)
    except msgspec.ValidationError as exc:
        raise _Reject(422, f"Failed to deserialize the JSON body into the target type: {exc}")
    except msgspec.DecodeError as exc:
        raise _Reject(400, f"Failed to parse the request body as JSON: {exc}")


class _Reject(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Stats:
    """Dynamo's indexer HTTP metrics: requests and errors per endpoint, latency histogram."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], int] = {}
        self.errors: dict[tuple[str, str], int] = {}
        self.latency: dict[str, list[float]] = {}   # endpoint -> bucket counts, then sum, count

    def record(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        key = (endpoint, method)
        self.requests[key] = self.requests.get(key, 0) + 1
        if status >= 400:
            ek = (endpoint, "4xx" if status < 500 else "5xx")
            self.errors[ek] = self.errors.get(ek, 0) + 1
        h = self.latency.get(endpoint)
        if h is None:
            h = self.latency[endpoint] = [0.0] * (len(BUCKETS) + 2)
        i = bisect_left(BUCKETS, seconds)
        if i < len(BUCKETS):
            h[i] += 1
        h[-2] += seconds
        h[-1] += 1


#: What an index answers only once it has caught up with its stream (``IndexSink.ready``):
#: a replica that is still reading the history would answer with part of it.
_WAIT_FOR_READY = frozenset({"/health", "/query", "/query_by_hash", "/dump", "/kvgraph/query",
                             "/kvgraph/query_by_hash"})


def build_app(node: "IndexSink", max_body_bytes: int) -> web.Application:
    reg = node.registry
    stats = node.http_stats

    @web.middleware
    async def measured(request: web.Request,
                       handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                       ) -> web.StreamResponse:
        t0 = time.perf_counter()
        status = 500
        try:
            if request.path in _WAIT_FOR_READY and not node.ready():
                status = 503
                return _json({"status": "catching up",
                              "error": "this index is still reading the history of its "
                                       "stream; it answers once it has caught up"}, 503)
            resp = await handler(request)
            status = resp.status
            return resp
        except _Reject as exc:
            status = exc.status
            return _text(exc.status, str(exc))
        except web.HTTPRequestEntityTooLarge as exc:   # chunked bodies past the limit
            status = exc.status
            return _text(413, "Failed to buffer the request body: length limit exceeded")
        except RegistryError as exc:
            status = exc.status
            return _json({"error": str(exc)}, exc.status)
        except web.HTTPException as exc:
            status = exc.status
            raise
        except Exception as exc:  # a bug: said, counted, answered; the server goes on
            node.log.problem("http", "%s %s failed: %s: %s", request.method, request.path,
                             type(exc).__name__, exc)
            return _json({"error": f"{type(exc).__name__}: {exc}"}, 500)
        finally:
            route = request.match_info.route.resource
            endpoint = route.canonical if route is not None else request.path
            stats.record(endpoint, request.method, status, time.perf_counter() - t0)

    async def register(request: web.Request) -> web.Response:
        r = await _body(request, RegisterRequest)
        reg.register(r.instance_id, r.endpoint, r.model_name, r.block_size, r.routing_group,
                     r.dp_rank or 0, r.replay_endpoint)
        return _json({"status": "ok"}, 201)

    async def unregister(request: web.Request) -> web.Response:
        r = await _body(request, UnregisterRequest)
        reg.unregister(r.instance_id, r.model_name, r.routing_group, r.dp_rank)
        return _json({"status": "ok"})

    async def query(request: web.Request) -> web.Response:
        r = await _body(request, QueryRequest)
        node.bounded(len(r.token_ids))
        p = reg.find(r.model_name, r.routing_group)
        return _json(p.answer(_hashed(p, r.token_ids, r.lora_name, r.cache_salt)))

    async def query_by_hash(request: web.Request) -> web.Response:
        r = await _body(request, QueryByHashRequest)
        if r.cache_salt is not None:
            return _json({"error": "cache_salt is not accepted by /query_by_hash; block_hashes "
                                   "must already include the intended cache salt"}, 400)
        p = reg.find(r.model_name, r.routing_group)
        node.bounded(len(r.block_hashes) * p.block_size)
        mask = (1 << 64) - 1
        return _json(p.answer([h & mask for h in r.block_hashes]))

    async def workers(request: web.Request) -> web.Response:
        q = request.query
        return _json(reg.listed(q.get("model_name"), q.get("routing_group")))

    async def dump(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": _JSON})
        await resp.prepare(request)
        buf = bytearray(b"{")
        encode = msgspec.json.Encoder().encode_into
        for i, part in enumerate(list(reg.partitions.values())):
            buf += b"," if i else b""
            buf += _encode(part.key) + b':{"block_size":' + str(part.block_size).encode() \
                + b',"events":['
            first = True
            for ev in part.dump():
                if not first:
                    buf += b","
                first = False
                encode(ev, buf, -1)
                if len(buf) >= DUMP_CHUNK_BYTES:
                    await _send(request, resp, buf)
                    buf = bytearray()
            buf += b"]}"
        buf += b"}"
        await _send(request, resp, buf)
        await resp.write_eof()
        return resp

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=node.prometheus().encode(),
                            headers={"Content-Type": "text/plain; version=0.0.4"})

    async def peers(request: web.Request) -> web.Response:
        return _json(reg.peers)

    async def register_peer(request: web.Request) -> web.Response:
        reg.add_peer((await _body(request, PeerRequest)).url)
        return _json({"status": "ok"}, 201)

    async def deregister_peer(request: web.Request) -> web.Response:
        if reg.remove_peer((await _body(request, PeerRequest)).url):
            return _json({"status": "ok"})
        return _json({"error": "peer not found"}, 404)

    async def reopen_logs(request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    # -- kvgraph's own ----------------------------------------------------------------------

    async def own_query(request: web.Request) -> web.Response:
        r = await _body(request, OwnQueryRequest)
        node.bounded(len(r.token_ids))
        p = node.partition_for(r.model_name, r.routing_group)
        return _json(node.own_answer(p, _hashed(p, r.token_ids, r.lora_name, r.cache_salt)))

    async def own_query_by_hash(request: web.Request) -> web.Response:
        r = await _body(request, OwnQueryByHashRequest)
        p = node.partition_for(r.model_name, r.routing_group)
        node.bounded(len(r.block_hashes) * p.block_size)
        return _json(node.own_answer(p, r.block_hashes))

    async def own_workers(request: web.Request) -> web.Response:
        return _json(node.workers())

    app = application(max_body_bytes, middlewares=[measured])
    app[BUDGET] = Budget(BODY_BUDGET, node.metrics.extra, "http_body_bytes")
    app[MAX_BODY] = max_body_bytes
    node.metrics.extra.setdefault("http_slow_clients_dropped", 0)
    app[SLOW_DROPPED] = lambda: node.metrics.add("http_slow_clients_dropped")
    app.router.add_post("/register", register)
    app.router.add_post("/unregister", unregister)
    app.router.add_post("/query", query)
    app.router.add_post("/query_by_hash", query_by_hash)
    app.router.add_get("/workers", workers)
    app.router.add_get("/dump", dump)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/peers", peers)
    app.router.add_post("/register_peer", register_peer)
    app.router.add_post("/deregister_peer", deregister_peer)
    app.router.add_post("/reopen_logs", reopen_logs)
    app.router.add_post("/kvgraph/query", own_query)
    app.router.add_post("/kvgraph/query_by_hash", own_query_by_hash)
    app.router.add_get("/kvgraph/workers", own_workers)
    return app


def _hashed(p: Any, token_ids: list[int], lora_name: str | None, cache_salt: str | None
            ) -> list[int]:
    """The request's tokens_hash per block; a token id outside u32 is the 422 Dynamo gives."""
    try:
        hashes = p.tokens_hashes(token_ids, lora_name, cache_salt)
        rest = len(token_ids) - len(hashes) * p.block_size
        if rest:   # the tokens past the last whole block are not hashed: checked here
            array("I", token_ids[-rest:])
        return hashes
    except (OverflowError, TypeError):
        bad = next((i for i, t in enumerate(token_ids) if not 0 <= t <= 0xFFFFFFFF), 0)
        raise _Reject(422, "Failed to deserialize the JSON body into the target type: "
                           f"Expected `int` >= 0 and <= 4294967295 - at `$.token_ids[{bad}]`"
                      ) from None


async def _send(request: web.Request, resp: web.StreamResponse, buf: bytearray) -> None:
    """One chunk of a streamed answer; a client that does not read it for WRITE_TIMEOUT_S is
    dropped. Yields to the loop between chunks, so that ingestion and queries go on."""
    try:
        await asyncio.wait_for(resp.write(bytes(buf)), WRITE_TIMEOUT_S)
    except asyncio.TimeoutError:
        request.app[SLOW_DROPPED]()
        if request.transport is not None:
            request.transport.abort()
        raise
    await asyncio.sleep(0)


def prometheus_http(stats: Stats) -> list[str]:
    """The HTTP part of Dynamo's indexer metrics, in Prometheus text format."""
    lines = ["# HELP dynamo_kvindexer_errors_total HTTP error responses (4xx/5xx)",
             "# TYPE dynamo_kvindexer_errors_total counter"]
    lines += [f'dynamo_kvindexer_errors_total{{endpoint="{e}",status_class="{c}"}} {n}'
              for (e, c), n in sorted(stats.errors.items())]
    lines += ["# HELP dynamo_kvindexer_request_duration_seconds HTTP request latency",
              "# TYPE dynamo_kvindexer_request_duration_seconds histogram"]
    for e, h in sorted(stats.latency.items()):
        acc = 0.0
        for b, n in zip(BUCKETS, h):
            acc += n
            lines.append(f'dynamo_kvindexer_request_duration_seconds_bucket{{endpoint="{e}",'
                         f'le="{b:g}"}} {acc:.0f}')
        lines.append(f'dynamo_kvindexer_request_duration_seconds_bucket{{endpoint="{e}",'
                     f'le="+Inf"}} {h[-1]:.0f}')
        lines.append(f'dynamo_kvindexer_request_duration_seconds_sum{{endpoint="{e}"}} {h[-2]}')
        lines.append(f'dynamo_kvindexer_request_duration_seconds_count{{endpoint="{e}"}} '
                     f'{h[-1]:.0f}')
    lines += ["# HELP dynamo_kvindexer_requests_total Total HTTP requests",
              "# TYPE dynamo_kvindexer_requests_total counter"]
    lines += [f'dynamo_kvindexer_requests_total{{endpoint="{e}",method="{m}"}} {n}'
              for (e, m), n in sorted(stats.requests.items())]
    return lines


__all__ = ["build_app", "Stats", "prometheus_http"]
