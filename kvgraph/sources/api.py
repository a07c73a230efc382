"""``api`` source: engines publish from Python, shaped like Dynamo's ``KvEventPublisher``.

The running graph exposes one publisher per ``api`` node, with ``publish_stored``,
``publish_removed`` and ``publish_cleared``; they are safe to call from the event loop and from
an engine's own thread.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import asyncio

from ..errors import ApiError
from ..event import CLEARED, REMOVED, STORED, U64_MASK, Event
from ..node import Source, integer, string, worker_id, worker_id_value
from ..registry import register


@register
class ApiSource(Source):
    name = "api"
    summary = "Events published by in-process Python calls (publish_stored/removed/cleared)."
    options = {
        "worker_id": worker_id("Worker id stamped on every event.", 0),
        "dp_rank": integer("Data-parallel rank stamped on every event.", 0, minimum=0),
        "block_size": integer("Tokens per block; publish_stored checks token counts against it.",
                              16, minimum=1),
        "medium": string("Medium stamped on events that name none (GPU, CPU, DISK...).", "GPU"),
        "max_pending": integer("Events buffered before publish calls block (from a thread) or "
                               "raise (from the loop).", 65_536, minimum=1),
    }
    example = "worker_id = 3\nblock_size = 16"

    # -- runtime ------------------------------------------------------------------------------

    async def start(self) -> None:
        import asyncio
        self.publisher = Publisher(self, asyncio.get_running_loop())

    def on_stop(self) -> None:
        self.publisher._wake_soon()

    async def run(self) -> None:
        pub = self.publisher
        while True:
            batch = pub._take()
            if batch:
                self.metrics.events_in += len(batch)
                await self.ctx.emit(batch)
                continue
            if self.ctx.stopping.is_set():
                return
            pub._wake.clear()
            if pub._pending:  # an append raced with the clear
                continue
            await pub._wake.wait()


class Publisher:
    """The engine-facing API, shaped like Dynamo's ``KvEventPublisher``.

    Every method may be called from the event loop's thread or, thread-safely, from any other
    (an engine's scheduler thread). Events are queued and emitted as a batch by the node's
    task. Past ``max_pending`` queued events a call from another thread waits for room; a call
    from the loop's own thread raises ApiError (it cannot wait without blocking the loop).
    """

    def __init__(self, node: ApiSource, loop: asyncio.AbstractEventLoop):
        import asyncio
        c = node.config
        self._node, self._loop = node, loop
        self.worker_id, self.dp_rank = worker_id_value(c["worker_id"]), c["dp_rank"]
        self.block_size, self.medium = c["block_size"], c["medium"]
        self._max = c["max_pending"]
        self._pending: deque[Event] = deque()
        self._room = threading.Condition()
        self._wake = asyncio.Event()

    # -- the API ------------------------------------------------------------------------------

    def publish_stored(self, token_ids: Sequence[int], num_block_tokens: int | Sequence[int],
                       block_hashes: Sequence[int], parent_hash: int | None = None,
                       block_mm_infos: Any = None, lora_name: str | None = None,
                       is_eagle: bool | None = None, cache_salt: str | None = None,
                       medium: str | None = None, dp_rank: int | None = None) -> None:
        """Blocks became cached: ``block_hashes`` in order, ``parent_hash`` before the first,
        ``token_ids`` exactly the tokens of those blocks (``num_block_tokens`` per block)."""
        hashes = _check_hashes(block_hashes)
        n = len(hashes)
        counts = [num_block_tokens] * n if isinstance(num_block_tokens, int) \
            else list(num_block_tokens)
        if len(counts) != n:
            raise ApiError(f"num_block_tokens has {len(counts)} entries for {n} block hashes")
        bad = [c for c in counts if c != self.block_size]
        if bad:
            raise ApiError(f"blocks of {bad[0]} tokens, but this publisher's block_size is "
                           f"{self.block_size}; only full blocks are cached")
        tokens = list(token_ids)
        if len(tokens) != sum(counts):
            raise ApiError(f"{len(tokens)} token ids for {n} block(s) of {self.block_size} "
                           f"tokens (expected {sum(counts)})")
        if any(type(t) is not int or t < 0 or t > 0xFFFFFFFF for t in tokens):
            raise ApiError("token ids must be integers in 0..2^32-1")
        parent = None if parent_hash is None else _check_hashes([parent_hash])[0]
        self._put(Event(kind=STORED, worker_id=self.worker_id,
                        dp_rank=self.dp_rank if dp_rank is None else dp_rank,
                        ts=time.time(), block_hashes=hashes, parent_hash=parent,
                        token_ids=tokens, block_size=self.block_size, lora_name=lora_name,
                        medium=medium or self.medium, cache_salt=cache_salt or None))

    def publish_removed(self, block_hashes: Sequence[int], medium: str | None = None,
                        dp_rank: int | None = None) -> None:
        """Blocks were evicted."""
        self._put(Event(kind=REMOVED, worker_id=self.worker_id,
                        dp_rank=self.dp_rank if dp_rank is None else dp_rank, ts=time.time(),
                        block_hashes=_check_hashes(block_hashes), medium=medium or self.medium))

    def publish_cleared(self, dp_rank: int | None = None) -> None:
        """Every cached block of this worker (and DP rank) is gone."""
        self._put(Event(kind=CLEARED, worker_id=self.worker_id,
                        dp_rank=self.dp_rank if dp_rank is None else dp_rank, ts=time.time()))

    # -- plumbing -----------------------------------------------------------------------------

    def _on_loop_thread(self) -> bool:
        import asyncio
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def _put(self, event: Event) -> None:
        if self._node.ctx.stopping.is_set():
            raise ApiError("the graph is stopping; no more events are accepted")
        if self._on_loop_thread():
            if len(self._pending) >= self._max:
                raise ApiError(f"{self._max} events are already pending (max_pending); the "
                               "graph downstream is slower than the engine")
            self._pending.append(event)
            self._wake.set()
            return
        with self._room:
            while len(self._pending) >= self._max:
                self._room.wait(timeout=1.0)
            self._pending.append(event)
        self._wake_soon()

    def _wake_soon(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._wake.set)
        except RuntimeError:  # the loop is closed
            pass

    def _take(self) -> list[Event]:
        pending = self._pending
        if not pending:
            return []
        with self._room:
            batch = list(pending)
            pending.clear()
            self._room.notify_all()
        return batch


def _check_hashes(hashes: Sequence[Any]) -> list[int]:
    out = []
    for h in hashes:
        if type(h) is not int:
            raise ApiError(f"block hash {h!r} is not an int")
        if not -(1 << 63) <= h <= U64_MASK:
            raise ApiError(f"block hash {h} is out of the 64-bit range")
        out.append(h & U64_MASK)
    return out
