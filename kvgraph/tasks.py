"""Tasks with an owner: every asyncio task kvgraph starts belongs to one.

A :class:`TaskOwner` keeps each task it started until the task ends; a task that ends with an
exception hands it to the owner's ``on_error`` at once (never lost to an unread result), and
:meth:`TaskOwner.close` cancels what is left and waits for it. Unlike ``asyncio.TaskGroup``, one
failing task does not cancel its siblings: what a failure means (skip or stop the graph) is the
``on_error`` callback's decision, the node's ``on_error`` setting for a node's helpers.

The runtime owns the node tasks; each node owns its helper tasks and timers through
``ctx.spawn(...)`` and ``ctx.call_later(...)``, closed when the node stops.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Coroutine

OnError = Callable[[str, BaseException], None]


class Timer:
    """A pending :meth:`TaskOwner.call_later`; :meth:`cancel` before it fires drops it."""

    __slots__ = ("_handle",)

    def __init__(self) -> None:
        self._handle: asyncio.TimerHandle | None = None

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()


class TaskOwner:
    def __init__(self, name: str, on_error: OnError):
        self.name, self.on_error = name, on_error
        self.tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str = "") -> asyncio.Task[Any]:
        """Start ``coro`` as a task of this owner."""
        if self._closed:
            coro.close()
            raise RuntimeError(f"{self.name}: closed, cannot start {name or coro!r}")
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.name}:{name}")
        self.tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def call_later(self, delay: float, fn: Callable[[], Awaitable[Any]], name: str = "timer"
                   ) -> Timer:
        """Run ``fn()`` (a coroutine function) as a task of this owner after ``delay`` s."""
        timer = Timer()

        def fire() -> None:
            if not self._closed:
                self.spawn(fn(), name)  # type: ignore[arg-type]

        timer._handle = asyncio.get_running_loop().call_later(delay, fire)
        return timer

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.on_error(task.get_name(), exc)

    async def join(self) -> None:
        """Wait until every task ended (their errors went to ``on_error``)."""
        while self.tasks:
            await asyncio.wait(list(self.tasks))
            await asyncio.sleep(0)   # their done callbacks (``_done``) have run

    async def close(self) -> None:
        """Cancel what is still running and wait for it; nothing starts after this."""
        self._closed = True
        for t in list(self.tasks):
            t.cancel()
        await self.join()
