"""Running a graph inside another program: an engine, a test, a notebook.

* ``async with kvgraph.open("graph.toml") as g:`` runs the graph in the caller's event loop;
  ``g.publisher("engine")`` is the ``api`` node's publisher.
* ``await g.reconfigure(text)`` (``bg.reconfigure(text)`` from any thread) applies a new
  version of the graph while it runs and returns what it changed (:mod:`kvgraph.reload`).
* ``kvgraph.start("graph.toml")`` runs it on a background thread with its own loop, for engines
  that have no asyncio loop; the publisher is thread-safe, ``stop()`` drains and joins. A
  program that exits without calling ``stop()`` still delivers what it published: an
  ``atexit`` hook stops and drains the graph, with a warning that says so.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import threading
from typing import Any, AsyncIterator, Mapping

from .errors import KvgraphError
from .runtime import Runtime, RunResult
from .validate import load


@contextlib.asynccontextmanager
async def running(rt: Runtime) -> AsyncIterator[Runtime]:
    """Start ``rt``; on exit stop its sources and wait until everything drained."""
    await rt.start()
    try:
        yield rt
    finally:
        rt.request_stop()
        await rt.wait()


def open(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None
         ) -> contextlib.AbstractAsyncContextManager[Runtime]:
    """Validate, start, and on exit drain and stop the graph in ``path``."""
    return running(Runtime(load(path, environ), environ))


class Background:
    """A graph running on its own thread. Create it with :func:`start`."""

    def __init__(self, path: str | os.PathLike[str], environ: Mapping[str, str] | None):
        self._graph = load(path, environ)
        self._environ = environ
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.result: RunResult | None = None
        self.runtime: Runtime | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._main, name="kvgraph", daemon=True)

    def _main(self) -> None:
        async def body() -> None:
            self._loop = asyncio.get_running_loop()
            self.runtime = Runtime(self._graph, self._environ)
            try:
                await self.runtime.start()
            except BaseException as exc:
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            self.result = await self.runtime.wait()

        asyncio.run(body())

    def publisher(self, node_id: str) -> Any:
        assert self.runtime is not None
        return self.runtime.publisher(node_id)

    def reconfigure(self, text: str, timeout: float | None = 60) -> Any:
        """Apply a new version of the graph from any thread; returns the outcome (its
        ``plan`` says what changed) or raises :class:`~kvgraph.errors.ReloadError`, the graph
        unchanged. See :meth:`kvgraph.runtime.Runtime.reconfigure`."""
        assert self._loop is not None and self.runtime is not None
        return asyncio.run_coroutine_threadsafe(self.runtime.reconfigure(text),
                                                self._loop).result(timeout)

    def stop(self, timeout: float | None = 60) -> RunResult | None:
        """Stop the sources, drain, and wait for the thread; returns how the run ended."""
        atexit.unregister(self._at_exit)
        if self._loop is not None and self.runtime is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self.runtime.request_stop)
        self._thread.join(timeout)
        return self.result

    def _at_exit(self) -> None:
        """The interpreter is exiting and ``stop()`` was never called: the graph's thread is a
        daemon and would die with whatever it still holds. Drain it instead, and say so."""
        if not self._thread.is_alive():
            return
        logging.getLogger("kvgraph").warning(
            "kvgraph.start(%r): stop() was not called; stopping and draining the graph at "
            "interpreter exit (call stop() to choose when)", self._graph.path)
        result = self.stop()
        if result is not None and not result.ok:
            logging.getLogger("kvgraph").error(
                "kvgraph.start(%r): the run did not end cleanly: lost %d event(s), failures %s",
                self._graph.path, result.lost_events, result.failures or "none")


def start(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None,
          timeout: float = 30) -> Background:
    """Start the graph on a background thread; returns once every node has started."""
    bg = Background(path, environ)
    bg._thread.start()
    atexit.register(bg._at_exit)
    if not bg._ready.wait(timeout):
        raise KvgraphError(f"graph {path} did not start within {timeout} s")
    if bg._error is not None:
        raise bg._error
    return bg
