"""``synthetic`` source: simulated engines with shared prefixes, for demos and benchmarks.

Each simulated engine serves requests whose prompts share system prompts and earlier chat
turns, stores full blocks, evicts under a cache capacity and now and then clears its cache.
Deterministic for a given ``seed``. With ``zmq_endpoint`` it also publishes in vLLM's wire
format through a real PUB socket, standing in for engines in front of any consumer.
"""

from __future__ import annotations

import random
import time
from array import array
from collections import OrderedDict
from typing import Any, Iterable, Mapping

import msgspec
import xxhash

from ..codecs.vllm import encode_payload
from ..event import CLEARED, REMOVED, STORED, Event
from ..node import (Bind, CheckContext, Source, Problem, integer, number, string)
from ..proto.zmq import parse_endpoint
from ..registry import register


@register
class SyntheticSource(Source):
    name = "synthetic"
    summary = "Load generator: simulated engines sharing prefixes, evicting and clearing."
    options = {
        "workers": integer("Number of simulated engines (worker ids first_worker_id and up).",
                           4, minimum=1, maximum=100_000),
        "first_worker_id": integer("Worker id of the first simulated engine; the others "
                                   "follow. Several synthetic nodes (or processes) with "
                                   "different ones simulate distinct engines.", 0, minimum=0,
                                   maximum=2**62),
        "rate": number("Events per second over all engines; 0 is as fast as possible.", 1000,
                       minimum=0),
        "block_size": integer("Tokens per block.", 16, minimum=1),
        "seed": integer("Random seed: the same seed gives the same stream.", 0, minimum=0),
        "duration_s": number("Stop after this many seconds; 0 runs until stopped or max_events.",
                             0, minimum=0),
        "max_events": integer("Stop after this many events; 0 is unlimited.", 0, minimum=0),
        "events_per_batch": integer("Events per batch (one engine step).", 16, minimum=1),
        "prompt_blocks_mean": number("Mean prompt length, in blocks.", 8, exclusive_minimum=0),
        "prefix_share": number("Fraction of requests that start with a shared system prompt or "
                               "continue an earlier conversation.", 0.6, minimum=0),
        "system_prompts": integer("Distinct shared system prompts, of 1 to 4 blocks. Prompt k "
                                  "(from 0) is the tokens k*1000+1, k*1000+2, ...: a demo can "
                                  "query one by hand.", 8, minimum=1),
        "cache_blocks": integer("Blocks each engine holds before it evicts.", 4096, minimum=1),
        "clear_probability": number("Chance per batch that an engine clears its cache.", 0.0005,
                                    minimum=0),
        "zmq_endpoint": string("Also publish in vLLM's wire format on a ZMQ PUB socket bound "
                               "here; engine r uses the topic kv@synthetic-<r>@synthetic and "
                               "its own seq (read it with worker_id_from = \"topic\")."),
        "zmq_wait_subscriber_s": number("Wait up to this long for a subscriber before "
                                        "publishing (ZMQ drops what is sent before).", 0,
                                        minimum=0),
        "zmq_linger_s": number("On stop, how long queued messages may still take to reach a "
                               "subscriber that reads more slowly (ZMQ LINGER).", 5.0,
                               minimum=0),
        "zmq_encoding": string("Event encoding on ZMQ: `map` (vLLM >= 0.24) or `array`.",
                               "map", enum=["map", "array"]),
    }
    example = "workers = 4\nrate = 2000\nseed = 1\nmax_events = 10000"

    @classmethod
    def check(cls, options: Mapping[str, Any], ctx: CheckContext) -> Iterable[Problem]:
        if options["prefix_share"] > 1:
            yield Problem("prefix_share", "prefix_share is a fraction between 0 and 1")
        if "zmq_endpoint" in options:
            try:
                ep = parse_endpoint(options["zmq_endpoint"])
            except ValueError as exc:
                yield Problem("zmq_endpoint", f"{options['zmq_endpoint']!r} is not a ZMQ "
                              "endpoint", hint=str(exc))
                return
            if ep.transport == "tcp" and ep.port is None:
                yield Problem("zmq_endpoint", "give a port number")

    @classmethod
    def binds(cls, options: Mapping[str, Any]) -> Iterable[Bind]:
        if "zmq_endpoint" in options:
            yield Bind("zmq_endpoint", options["zmq_endpoint"])

    # -- runtime ------------------------------------------------------------------------------

    async def start(self) -> None:
        c = self.config
        self.sim = Simulation(c["workers"], c["block_size"], c["seed"], c["prompt_blocks_mean"],
                              c["prefix_share"], c["system_prompts"], c["cache_blocks"],
                              c["clear_probability"])
        self._sock: Any = None
        if "zmq_endpoint" in c:
            import zmq

            from ..proto.zmq import OwnContext

            self._zctx = OwnContext()
            # kept before binding: a failed bind still leaves a socket that stop() must close
            # (the context's termination waits for every socket)
            sock = self._sock = self._zctx.socket(zmq.XPUB)
            sock.setsockopt(zmq.SNDHWM, 100_000)
            sock.bind(c["zmq_endpoint"])
            self.log.info("publishing vLLM frames on %s", c["zmq_endpoint"])
            wait = c["zmq_wait_subscriber_s"]
            if wait:
                from zmq.asyncio import Socket

                if not await Socket.from_socket(sock).poll(int(wait * 1000), zmq.POLLIN):
                    self.log.warning("no subscriber after %.1f s; publishing anyway", wait)

    async def run(self) -> None:
        import asyncio
        c = self.config
        per_batch, max_events = c["events_per_batch"], c["max_events"]
        interval = per_batch / c["rate"] if c["rate"] else 0.0
        loop = asyncio.get_running_loop()
        started = next_at = loop.time()
        deadline = started + c["duration_s"] if c["duration_s"] else None
        produced = 0
        seqs = [0] * c["workers"]
        encoding = c["zmq_encoding"]
        first = c["first_worker_id"]
        while not self.ctx.stopping.is_set():
            if max_events and produced >= max_events:
                return
            if deadline is not None and loop.time() >= deadline:
                return
            want = per_batch if not max_events else min(per_batch, max_events - produced)
            worker, events = self.sim.step(want)
            now = time.time()
            seq = seqs[worker]
            seqs[worker] += 1
            wid = worker + first
            events = [msgspec.structs.replace(e, seq=seq, ts=now, worker_id=wid)
                      for e in events]
            if self._sock is not None:
                self._sock.send_multipart([f"kv@synthetic-{wid}@synthetic".encode(),
                                     seq.to_bytes(8, "big"),
                                     encode_payload(events, now, 0, encoding)])
            produced += len(events)
            self.metrics.events_in += len(events)
            await self.ctx.emit(events)
            if interval:
                next_at += interval * len(events) / per_batch
                delay = next_at - loop.time()
                await asyncio.sleep(delay if delay > 0 else 0)
            else:
                await asyncio.sleep(0)

    async def stop(self) -> None:
        if getattr(self, "_sock", None) is not None:
            await self._zctx.close([self._sock], self.config["zmq_linger_s"], self.log)


class Simulation:
    """Engines serving requests whose prompts share prefixes; deterministic for a seed.

    Block hashes are content-addressed and chained (a block's hash covers its parent's hash and
    its tokens), as in vLLM's prefix caching, so the same prefix has the same hashes on every
    engine that computed it.
    """

    VOCAB = 151_936

    def __init__(self, workers: int, block_size: int, seed: int, prompt_blocks_mean: float,
                 prefix_share: float, system_prompts: int, cache_blocks: int,
                 clear_probability: float):
        self.rng = random.Random(seed)
        self.workers, self.block_size = workers, block_size
        self.mean, self.share = prompt_blocks_mean, prefix_share
        self.capacity, self.p_clear = cache_blocks, clear_probability
        self.caches: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(workers)]
        # Readable on purpose (prompt k: k*1000+1, k*1000+2, ...), so that a person trying
        # the demo can type a query that hits; the rest of every prompt is random.
        self.system = [list(range(k * 1000 + 1,
                                  k * 1000 + 1 + self.rng.randint(1, 4) * block_size))
                       for k in range(system_prompts)]
        self.conversations: list[list[int]] = []
        self.next_worker = 0
        self.pending: list[list[Event]] = [[] for _ in range(workers)]

    def _tokens(self, n: int) -> list[int]:
        r = self.rng.randrange
        return [r(self.VOCAB) for _ in range(n)]

    def _prompt(self) -> list[int]:
        n = max(1, int(self.rng.expovariate(1 / self.mean) * self.block_size))
        roll = self.rng.random()
        if roll < self.share / 2 and self.conversations:
            history = self.rng.choice(self.conversations)
            prompt = history + self._tokens(n)
        elif roll < self.share:
            prompt = self.rng.choice(self.system) + self._tokens(n)
        else:
            prompt = self._tokens(n)
        if len(self.conversations) < 256:
            self.conversations.append(prompt)
        else:
            self.conversations[self.rng.randrange(256)] = prompt
        return prompt

    def _request(self, worker: int) -> list[Event]:
        """One request on one engine: stores for the blocks it lacks, removes for evictions."""
        bs = self.block_size
        tokens = self._prompt()
        cache = self.caches[worker]
        events: list[Event] = []
        parent: int | None = None
        new_hashes: list[int] = []
        new_tokens: list[int] = []
        first_parent: int | None = None
        h_prev = 0
        for i in range(len(tokens) // bs):
            block = tokens[i * bs:(i + 1) * bs]
            h = xxhash.xxh3_64_intdigest(array("I", block).tobytes(), h_prev)
            h_prev = h
            if h in cache and not new_hashes:
                cache.move_to_end(h)
                parent = h
                continue
            if not new_hashes:
                first_parent = parent
            new_hashes.append(h)
            new_tokens.extend(block)
            cache[h] = None
            cache.move_to_end(h)
        if new_hashes:
            events.append(Event(kind=STORED, worker_id=worker, dp_rank=0,
                                block_hashes=new_hashes, parent_hash=first_parent,
                                token_ids=new_tokens, block_size=bs, medium="GPU"))
        while len(cache) > self.capacity:
            evicted, _ = cache.popitem(last=False)
            events.append(Event(kind=REMOVED, worker_id=worker, dp_rank=0,
                                block_hashes=[evicted], medium="GPU"))
        return events

    def step(self, n: int) -> tuple[int, list[Event]]:
        """The next engine step: up to ``n`` events from one engine (round robin)."""
        worker = self.next_worker
        self.next_worker = (worker + 1) % self.workers
        pending = self.pending[worker]
        if self.rng.random() < self.p_clear:
            self.caches[worker].clear()
            pending.clear()
            return worker, [Event(kind=CLEARED, worker_id=worker, dp_rank=0)]
        while len(pending) < n:
            pending.extend(self._request(worker))
        out, self.pending[worker] = pending[:n], pending[n:]
        return worker, out
