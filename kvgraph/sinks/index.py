"""``index`` sink: Dynamo's standalone KV indexer, in the graph or in its place.

The index keeps, per (model_name, routing_group), the router's prefix tree (device tier) and
the lower tiers (CPU, disk, external), with Dynamo 1.6.1's semantics (``kvgraph/indexer/``),
and serves Dynamo's indexer HTTP API (``kvgraph/indexer/http_api.py``): a client written for
``python -m dynamo.indexer`` works unchanged against it.

Events come two ways, and may come both ways at once:

* from the graph's edges (any source, transforms in between): into the partition named by
  ``model_name`` and ``routing_group``, with ``block_size``;
* from engines it reads itself: registered with ``POST /register`` while running, or listed in
  ``workers`` (as ``--workers`` of Dynamo's indexer). A graph holding only an index node
  serves until it is stopped: that is kvgraph in place of ``python -m dynamo.indexer``.

At start it recovers from the first of ``peers`` that answers ``/dump`` (as Dynamo's
``--peers``), before it listens.

The same queries without HTTP, on a running graph: ``rt.nodes["index"].query(token_ids)``,
``.query_by_hash(tokens_hashes)``, ``.workers()``, ``.dump()``.
"""

from __future__ import annotations

import asyncio
from typing import Any, Iterable, Mapping

from ..codecs import dynamo
from ..event import Event
from ..indexer.partition import Partition
from ..indexer.registry import Registry, RegistryError
from ..node import Bind, CheckContext, Problem, Sink, array, integer, string, table, worker_id
from ..node import worker_id_value
from ..prefix_index import IndexError_
from ..node import counter, gauge
from ..registry import register

_WORKER = table("An engine to read from the start, as Dynamo's `--workers`.", {
    "instance_id": worker_id("The engine's worker (instance) id."),
    "endpoint": string("The engine's ZMQ PUB endpoint.", examples=["tcp://127.0.0.1:5557"]),
    "dp_rank": integer("Its data-parallel rank.", 0, minimum=0),
    "replay_endpoint": string("The engine's replay (ROUTER) endpoint, to repair gaps."),
    "model_name": string("Its partition's model; default: the node's `model_name`."),
    "routing_group": string("Its partition's routing group; default: the node's."),
    "block_size": integer("Its block size; default: the node's `block_size`.", minimum=1),
}, required=["instance_id", "endpoint"])


@register
class IndexSink(Sink):
    name = "index"
    metrics = {
        "blocks": gauge("Blocks held over all workers and partitions."),
        "tree_nodes": gauge("Blocks in the device trees, whoever holds them."),
        "unknown_removes": counter("Removes of blocks the worker did not hold (skipped)."),
        "rejected_stores": counter("Stores refused (unknown parent, no complete block...)."),
        "not_indexed": counter("Events of tiers or KV groups Dynamo's indexer does not "
                               "index."),
        "blocks_without_tokens": counter("Blocks of stores whose tokens ran out (dropped, as "
                                         "Dynamo does)."),
        "http_body_bytes": gauge("Request bodies being read, in bytes."),
        "http_slow_clients_dropped": counter("Clients dropped for not reading an answer."),
    }
    summary = ("Dynamo's standalone KV indexer: prefix index and its HTTP API (a drop-in for "
               "`python -m dynamo.indexer`).")
    options = {
        "host": string("HTTP listen address.", "127.0.0.1"),
        "port": integer("HTTP port; 0 picks a free one (logged at start).", 8090, minimum=0,
                        maximum=65535),
        "block_size": integer("Tokens per block of the node's own partition (events from the "
                              "graph, `workers`).", 16, minimum=1),
        "model_name": string("Model of the partition events from the graph go to (Dynamo's "
                             "`--model-name`).", "default"),
        "routing_group": string("Routing group of that partition (`--routing-group`).",
                                "default"),
        "workers": array("Engines to read from the start (`--workers`); more come with "
                         "`POST /register`.", _WORKER, []),
        "peers": array("Other indexers' URLs (`--peers`): recover from the first that answers "
                       "`GET /dump` at start, before listening.", {"type": "string"}, []),
        "max_blocks": integer("Most blocks held over all workers of a partition before stores "
                              "are refused (bounds memory).", 50_000_000, minimum=1),
        "max_body_bytes": integer("Largest HTTP request body accepted (Dynamo: 8 MiB, one "
                                  "million tokens as JSON).", 8 * 1024 * 1024, minimum=1024),
        "max_query_tokens": integer("Most token ids (or hashes times block_size) in one "
                                    "query; more is refused with 413 (a 1M-token query held the "
                                    "relay for 165 ms).", 1_048_576, minimum=1),
    }
    example = "port = 8090\nblock_size = 16"
    serves = True

    @classmethod
    def binds(cls, options: Mapping[str, Any]) -> Iterable[Bind]:
        port = options["port"]
        if port:
            yield Bind("port", f"http://{options['host']}:{port}")

    @classmethod
    def check(cls, options: Mapping[str, Any], ctx: CheckContext) -> Iterable[Problem]:
        from ..indexer.registry import check_endpoint

        for i, w in enumerate(options["workers"]):
            for key in ("endpoint", "replay_endpoint"):
                try:
                    if key in w:
                        check_endpoint(w[key])
                except RegistryError as exc:
                    yield Problem(f"workers.{i}.{key}", str(exc))

    @classmethod
    async def probe(cls, config: Mapping[str, Any]) -> list[Problem]:
        from ..proto.zmq import probe_bind

        if not config["port"]:
            return []
        why = probe_bind(f"tcp://{config['host']}:{config['port']}")
        return [Problem("port", why.replace("tcp://", "http://"))] if why else []

    # -- runtime ------------------------------------------------------------------------------

    async def start(self) -> None:
        from ..indexer.http_api import Stats, build_app
        from ..webserver import serve

        c = self.config
        for name in ("unknown_removes", "rejected_stores", "not_indexed", "blocks_without_tokens"):
            self.metrics.extra.setdefault(name, 0)
        self.registry = Registry(c["max_blocks"], self.metrics.extra, self.log, self._listened,
                                 self.id, self.ctx.spawn)
        self.http_stats = Stats()
        self.own = None if self.ctx.inbox is not None and not self.ctx.inbox.channels \
            else self.registry.partition(c["model_name"], c["routing_group"], c["block_size"])
        for peer in c["peers"]:
            self.registry.add_peer(peer)
        if c["peers"]:
            await self._recover(c["peers"])
        self._ready = False   # see ready()
        self._server = await serve(build_app(self, c["max_body_bytes"]), c["host"], c["port"])
        self.port = self._server.port
        for w in c["workers"]:
            self.registry.register(worker_id_value(w["instance_id"]), w["endpoint"],
                                   w.get("model_name", c["model_name"]),
                                   w.get("block_size", c["block_size"]),
                                   w.get("routing_group", c["routing_group"]),
                                   w.get("dp_rank", 0), w.get("replay_endpoint"))
        self.log.info("index queries on http://%s:%d", c["host"], self.port)
        self._trimmer = self.ctx.spawn(self._trim_after_bursts(), "trim")

    async def _trim_after_bursts(self) -> None:
        """Give the memory an ingestion burst used back to the system once it is over.

        A burst (engines replaying, a peer's dump, a fleet starting) decodes megabytes of
        token ids that are freed right after hashing, but glibc keeps the freed heap: a 1M-block
        load left 616 MiB of RSS per million blocks, of which the index itself is about 106.
        ``malloc_trim`` after each burst returns it. Off where there is no glibc."""
        trim = _malloc_trim()
        if trim is None:
            return
        seen = 0
        while True:
            await asyncio.sleep(TRIM_CHECK_S)
            now = self.metrics.events_in
            if now != seen and now == getattr(self, "_last_seen", -1):   # quiet again
                trim(0)
                seen = now
            self._last_seen = now

    async def stop(self) -> None:
        registry = getattr(self, "registry", None)
        if registry is not None:
            await registry.close()
        server = getattr(self, "_server", None)
        if server is not None:
            await server.close()

    async def _recover(self, peers: list[str]) -> None:
        """As Dynamo's ``--peers``: the first peer whose ``/dump`` loads is the state."""
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for url in peers:
                try:
                    async with session.get(url.rstrip("/") + "/dump") as resp:
                        if resp.status != 200:
                            raise RuntimeError(f"status {resp.status}")
                        body = await resp.read()
                    dump = dynamo.decode_dump(body)
                except Exception as exc:  # the next peer, as Dynamo does
                    self.log.warning("recovery from %s failed: %s; trying the next peer", url, exc)
                    continue
                n = 0
                for key, (block_size, events) in dump.items():
                    model, _, group = key.partition(":")
                    part = self.registry.partition(model, group, block_size)
                    for e in events:
                        self._apply(part, e)
                        n += 1
                self.log.info("recovered %d events from %s", n, url)
                return
        self.log.warning("no peer answered /dump: starting empty")

    # -- events -------------------------------------------------------------------------------

    async def write(self, batch: list[Any]) -> None:
        part = self.own
        if part is None:
            part = self.own = self.registry.partition(self.config["model_name"],
                                                      self.config["routing_group"],
                                                      self.config["block_size"])
        bad = self._feed(part, batch)
        await self.ctx.reject(bad)

    def _listened(self, part: Partition, batch: list[Any]) -> None:
        """A batch from an engine the index reads itself: counted here (the runtime counts
        only what edges bring), applied, and its bad events said (rate-limited)."""
        bad = self._feed(part, batch)
        self.metrics.events_in += len(batch)
        self.metrics.events_out += len(batch) - len(bad)
        self.metrics.errors += len(bad)
        if bad:
            self.log.problem("listened", "%s: %d event(s) refused, the first: %s", part.key,
                             len(bad), bad[0].reason)

    def _feed(self, part: Partition, batch: list[Any]) -> list[Any]:
        bad = []
        for e in batch:
            if not isinstance(e, Event):
                bad.append(self.ctx.rejected("not an event"))
                continue
            why = self._apply(part, e)
            if why:
                bad.append(self.ctx.rejected(why, e))
        self.metrics.extra["blocks"] = sum(p.blocks for p in self.registry.partitions.values())
        self.metrics.extra["tree_nodes"] = sum(p.device.nodes
                                               for p in self.registry.partitions.values())
        return bad

    def _apply(self, part: Partition, e: Event) -> str:
        try:
            part.apply(e)
        except (IndexError_, dynamo.ConversionError) as exc:
            self.metrics.extra["rejected_stores"] += 1
            return str(exc)
        return ""

    # -- queries (Python API; the HTTP API calls these) -----------------------------------------

    @property
    def index(self) -> Any:
        """The device tree of the node's own partition (``model_name``, ``routing_group``)."""
        return self.partition_for(None, None).device

    def ready(self) -> bool:
        """Answer queries? Not while a source upstream is still reading the history of its
        stream (a new replica catching up): its answers would hold part of the state. Said
        once in the log when it becomes ready."""
        if self._ready:
            return True
        if self.ctx.caught_up():
            self._ready = True
            self.log.info("caught up with what feeds it: answering queries")
        return self._ready

    def bounded(self, tokens: int) -> None:
        limit = self.config["max_query_tokens"]
        if tokens > limit:
            raise RegistryError(413, f"{tokens} tokens are over the limit of {limit} per query "
                                     "(max_query_tokens)")

    def partition_for(self, model_name: str | None, routing_group: str | None) -> Partition:
        c = self.config
        model, group = model_name or c["model_name"], routing_group or c["routing_group"]
        p = self.registry.partitions.get((model, group))
        if p is None and (model, group) == (c["model_name"], c["routing_group"]):
            p = self.own = self.registry.partition(model, group, c["block_size"])
        return p if p is not None else self.registry.find(model, group)

    def query(self, token_ids: list[int], lora_name: str | None = None,
              cache_salt: str | None = None, model_name: str | None = None,
              routing_group: str | None = None) -> dict[str, Any]:
        """kvgraph's answer: workers by matched blocks, best first."""
        p = self.partition_for(model_name, routing_group)
        return self.own_answer(p, p.tokens_hashes(token_ids, lora_name, cache_salt))

    def query_by_hash(self, tokens_hashes: list[int], model_name: str | None = None,
                      routing_group: str | None = None) -> dict[str, Any]:
        return self.own_answer(self.partition_for(model_name, routing_group), tokens_hashes)

    def dynamo_query(self, token_ids: list[int], model_name: str | None = None,
                     routing_group: str | None = None, lora_name: str | None = None,
                     cache_salt: str | None = None) -> dict[str, Any]:
        """Dynamo's answer (``POST /query``)."""
        p = self.partition_for(model_name, routing_group)
        return p.answer(p.tokens_hashes(token_ids, lora_name, cache_salt))

    @staticmethod
    def own_answer(p: Partition, hashes: list[int]) -> dict[str, Any]:
        return {"scores": [s.__dict__ for s in p.device.query_hashes(hashes)],
                "query_blocks": len(hashes), "tree_size": p.device.nodes,
                "blocks": p.device.blocks}

    def workers(self, model_name: str | None = None, routing_group: str | None = None
                ) -> list[dict[str, int]]:
        """Blocks held per (worker_id, dp_rank) on the device tier."""
        return self.partition_for(model_name, routing_group).device.workers()

    def dump(self) -> dict[str, Any]:
        """What ``GET /dump`` sends, as Python objects."""
        return {p.key: {"block_size": p.block_size,
                        "events": msgspec_list(p.dump())}
                for p in self.registry.partitions.values()}

    def prometheus(self) -> str:
        from ..indexer.http_api import prometheus_http

        reg = self.registry
        counts = reg.listener_counts()
        lines = ["# HELP dynamo_kvindexer_listeners Number of ZMQ listeners by status",
                 "# TYPE dynamo_kvindexer_listeners gauge"]
        lines += [f'dynamo_kvindexer_listeners{{status="{s}"}} {counts.get(s, 0)}'
                  for s in ("active", "failed", "paused", "pending")]
        lines += ["# HELP dynamo_kvindexer_models Number of active model+routing-group indexers",
                  "# TYPE dynamo_kvindexer_models gauge",
                  f"dynamo_kvindexer_models {len(reg.partitions)}"]
        lines += prometheus_http(self.http_stats)
        lines += ["# HELP dynamo_kvindexer_workers Number of registered worker instances",
                  "# TYPE dynamo_kvindexer_workers gauge",
                  f"dynamo_kvindexer_workers {len({r[0] for r in reg.registrations})}"]
        for name in ("blocks", "not_indexed", "unknown_removes", "rejected_stores",
                     "blocks_without_tokens"):
            spec = type(self).metrics[name]   # (self.metrics is the node's counters)
            metric = f"kvgraph_index_{name}" + ("_total" if spec.kind == "counter" else "")
            lines += [f"# HELP {metric} {spec.help}", f"# TYPE {metric} {spec.kind}",
                      f"{metric} {self.metrics.extra.get(name, 0)}"]
        return "\n".join(lines) + "\n"


TRIM_CHECK_S = 2.0


def _malloc_trim() -> Any:
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def msgspec_list(events: Iterable[Any]) -> list[Any]:
    import msgspec

    return [msgspec.to_builtins(e) for e in events]
