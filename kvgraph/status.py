"""What a running graph shows: a live screen on a terminal, summary lines in logs, totals at the
end, and a Prometheus endpoint.

Rates are computed between two snapshots, so the display costs nothing on the hot path.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO


if TYPE_CHECKING:
    from .runtime import Runtime, RunResult

log = logging.getLogger("kvgraph")


def human(n: float) -> str:
    """A count for a screen: 1234567 -> 1.2M."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:.0f}" if isinstance(n, float) else str(n)


def table(rt: "Runtime", prev: dict[str, tuple[int, int]] | None, dt: float) -> str:
    """The status screen: per node rates and totals, then channel fill."""
    rows = [("node", "type", "in/s", "out/s", "in", "out", "errors", "discarded")]
    for nid, ctx in rt.contexts.items():
        m = ctx.metrics
        p_in, p_out = (prev or {}).get(nid, (m.events_in, m.events_out))
        rate_in = (m.events_in - p_in) / dt if dt > 0 else 0.0
        rate_out = (m.events_out - p_out) / dt if dt > 0 else 0.0
        disc = m.discarded_intentional + m.discarded_unintentional
        rows.append((nid, f"{m.kind} {m.type}", human(rate_in), human(rate_out),
                     human(m.events_in), human(m.events_out), human(m.errors), human(disc)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(r, widths))) for r in rows]
    if rt.channels:
        lines.append("")
        lines.append("edge fill (batches): " + "   ".join(
            f"{s.name} {s.current}/{s.capacity} (peak {s.peak}"
            + (f", dropped {human(s.dropped_events)}" if s.dropped_events else "") + ")"
            for s in (ch.statistics() for ch in rt.channels)))
    return "\n".join(lines)


def summary_line(rt: "Runtime", prev: dict[str, tuple[int, int]] | None, dt: float) -> str:
    parts = []
    for nid, ctx in rt.contexts.items():
        m = ctx.metrics
        p_in, p_out = (prev or {}).get(nid, (0, 0))
        if m.kind == "source":
            parts.append(f"{nid} +{m.events_out - p_out} ({(m.events_out - p_out) / dt:.0f}/s)")
        elif m.kind == "sink":
            parts.append(f"{nid} delivered {m.events_out}")
        if m.errors:
            parts.append(f"{nid} errors {m.errors}")
    dropped = sum(ch.dropped_events for ch in rt.channels)
    if dropped:
        parts.append(f"dropped {dropped}")
    return "; ".join(parts)


class Status:
    """Runs while the graph runs: the live view (``tty``), log lines (``log``), or nothing.

    ``warnings``: the buffer of recent warnings the live view keeps on screen."""

    def __init__(self, rt: "Runtime", mode: str, interval: float, stream: TextIO = sys.stderr,
                 warnings: Any = None):
        self.rt, self.mode, self.interval, self.stream = rt, mode, interval, stream
        self.warnings = warnings
        self._task: asyncio.Task[None] | None = None

    def _snapshot(self) -> dict[str, tuple[int, int]]:
        return {nid: (c.metrics.events_in, c.metrics.events_out)
                for nid, c in self.rt.contexts.items()}

    async def _log_loop(self) -> None:
        prev, t_prev = self._snapshot(), time.monotonic()
        while True:
            await asyncio.sleep(self.interval)
            now = time.monotonic()
            log.info("status: %s", summary_line(self.rt, prev, now - t_prev))
            prev, t_prev = self._snapshot(), now

    async def _live_loop(self) -> None:
        """rich's Live redraws the view in place; log lines go above it (the handlers that
        wrote to the terminal write through rich while it runs), and warnings stay in its
        pane."""
        from rich.console import Console
        from rich.live import Live

        from .live import reload_lines, render, snapshot
        from .metrics import GraphCollector

        collector = GraphCollector(self.rt)
        prev = None
        console = Console(file=self.stream)
        with Live(console=console, auto_refresh=False, redirect_stderr=True,
                  redirect_stdout=False) as live:
            moved = _write_handlers_through(sys.stderr, self.stream)
            try:
                while True:
                    snap = snapshot(collector.collect(), self.rt.graph.name,
                                    self.warnings.current() if self.warnings else [])
                    snap.reload_lines = reload_lines(self.rt.last_reload)
                    live.update(render(snap, prev), refresh=True)
                    prev = snap
                    await asyncio.sleep(1.0)
            finally:
                for handler, stream in moved:
                    handler.setStream(stream)

    def start(self) -> None:
        if self.mode == "tty":
            self._task = asyncio.create_task(self._live_loop(), name="kvgraph:status")
        elif self.mode == "log":
            self._task = asyncio.create_task(self._log_loop(), name="kvgraph:status")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            done, _ = await asyncio.wait((self._task,))
            task = self._task
            if not task.cancelled() and task.exception() is not None:
                log.warning("the status view failed: %s", task.exception())


def _write_handlers_through(proxy: Any, original: Any) -> list[tuple[Any, Any]]:
    """Point the logging handlers that write to ``original`` (the terminal) at ``proxy``
    (rich's, which prints above the live view); returns what to restore."""
    moved = []
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is original:
            moved.append((handler, handler.setStream(proxy)))
    return moved


def totals(rt: "Runtime", result: "RunResult") -> str:
    head = (f"kvgraph {rt.graph.name}: "
            + ("done" if result.ok else "ABORTED" if result.aborted else
               "FAILED" if result.failures else "done, WITH LOSSES")
            + f" after {result.elapsed_s:.1f} s")
    lines = [head, table(rt, None, 0)]
    if result.lost_events:
        lines.append(f"lost in flight: {result.lost_events} event(s)")
    for edge, n in result.undelivered_edges.items():
        lines.append(f"undelivered: edge {edge}: {n} event(s) still queued at the abort")
    for nid, n in result.undelivered_nodes.items():
        lines.append(f"undelivered: {nid}: {n} event(s) written, not confirmed at the abort")
    for nid, n in result.lost.items():
        lines.append(f"lost: {nid}: {n} (see its loss records on errors, and the log)")
    for nid, why in result.failures.items():
        lines.append(f"failed: {nid}: {why}")
    return "\n".join(lines)


async def serve_metrics(rt: "Runtime", host: str, port: int, warnings: Any = None) -> Any:
    """``GET /metrics`` (and ``/``): the graph's metrics, process_* and python_*, in the
    Prometheus text format or OpenMetrics (by the Accept header); ``GET /warnings``: the
    recent warnings and errors (JSON, for ``kvgraph top``); ``POST /graph?dry_run=1``: a new
    version of the graph checked and planned (:mod:`kvgraph.admin`). ``.port``,
    ``await .close()``."""
    from aiohttp import web

    from .live import warnings_json
    from .metrics import exposition, registry_for
    from .webserver import application, serve

    registry = registry_for(rt)

    async def handle(request: web.Request) -> web.Response:
        body, content_type = exposition(registry, request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def recent(request: web.Request) -> web.Response:
        return web.json_response({"graph": rt.graph.name,
                                  "warnings": warnings_json(warnings) if warnings else []})

    async def graph_change(request: web.Request) -> web.Response:
        from .admin import handle_post_graph

        return await handle_post_graph(rt, request)

    app = application()
    app.router.add_get("/metrics", handle)
    app.router.add_get("/", handle)
    app.router.add_get("/warnings", recent)
    app.router.add_post("/graph", graph_change)
    return await serve(app, host, port)
