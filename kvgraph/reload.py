"""Recompose a running graph: apply a new version of its file without stopping it.

Triggers (all end here, one reload at a time): ``Runtime.reconfigure(text)`` (and
``Background.reconfigure`` for a graph on its own thread), ``kvgraph run`` on SIGHUP or with
``--watch``, and ``POST /graph`` on the graph's HTTP server.

1. **Check, touching nothing.** The whole text is validated as ``kvgraph validate`` would;
   the nodes it adds are probed as ``validate --connect`` would. Any error: the reload is
   ``invalid``, every diagnostic (with its line) is returned and logged, nothing changed.
2. **Plan** (:mod:`kvgraph.plan`): nodes matched by id and compared by type and options;
   edges by their ends. Unchanged nodes are never touched: their task, sockets, connections,
   consumers and state go on. An edge kept keeps its channel and what is queued on it.
3. **Make before break.** Every added node and every changed node's new instance is started
   (connections opened, ports bound) while the old graph runs. If one fails, those started are
   stopped and the reload is ``failed``: nothing else changed. A changed node whose old and new
   instances bind the same address cannot have both; it is the one exception, swapped first
   (old stopped, new started) and, if the new one fails, started again as it was, the reload
   ``failed`` with the old graph running.
4. **Switch**, with no event lost or reordered:

   * new edges from and to unchanged nodes are joined; edges kept but resized take their new
     bounds in place;
   * added transforms and sinks start reading;
   * changed nodes, downstream first: the old instance is *detached*: a source stops reading
     at a batch boundary, a transform or sink reads no further batch, finishes the one it has
     (a transform emits what it holds, a sink confirms what it wrote), and its output edges
     stay open. The new instance then :meth:`~kvgraph.node.NodeType.adopt`\\ s its state
     (a ``zmq`` source its sockets and sequence tracking, a Dynamo-format sink its event-id
     counters, ``dedup`` its memory), and reads the same channels from where the old one
     stopped;
   * removed edges: their producer stops sending on them between two batches, and their
     consumer drains what they hold;
   * removed nodes: a source stops, a transform or sink drains its input and confirms;
   * added sources start last, after their consumers.

   A node that does not hand over within ``Runtime.reload_timeout_s`` (a sink whose server is
   down) is cancelled and what it held is counted lost; to avoid that, a reload that would
   replace or remove a sink that cannot confirm delivery now (its server is away) is refused
   before anything starts.
5. **Visible.** The outcome (``applied``, ``unchanged``, ``invalid``, ``failed``) is logged with
   the plan, counted in ``kvgraph_reloads_total{result}``, timed in
   ``kvgraph_last_reload_timestamp_seconds``, and shown by the live view.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .channel import Channel, Inbox
from .errors import ConfigError, ReloadError
from .graph import EdgeKey, Graph, Node
from .node import NodeType, Sink, Source
from .plan import Plan, plan

if TYPE_CHECKING:
    from .diagnostics import Diagnostic
    from .runtime import Runtime

log = logging.getLogger("kvgraph")

RESULTS = ("applied", "unchanged", "invalid", "failed")


@dataclass
class Outcome:
    """What a reload did."""

    result: str                      # one of RESULTS
    source: str                      # where the text came from: a file, "POST /graph"...
    at: float                        # time.time() when it was asked for
    duration_s: float = 0.0
    plan: Plan | None = None
    error: str = ""
    diagnostics: list["Diagnostic"] = field(default_factory=list)
    #: nodes that did not hand over within the reload timeout, and were cancelled
    cancelled: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        from .diagnostics import as_json

        out: dict[str, Any] = {"result": self.result, "source": self.source, "at": self.at,
                               "duration_s": round(self.duration_s, 4),
                               "applied": self.result == "applied"}
        if self.plan is not None:
            out["plan"] = self.plan.as_json()
            out["summary"] = self.plan.lines()
        if self.error:
            out["error"] = self.error
        if self.diagnostics:
            out.update(as_json(self.diagnostics))
        if self.cancelled:
            out["cancelled"] = self.cancelled
        return out

    def headline(self) -> str:
        what = {"applied": "applied", "unchanged": "no change",
                "invalid": "invalid, nothing changed",
                "failed": "failed, the running graph is unchanged"}[self.result]
        return f"reload from {self.source}: {what} ({self.duration_s * 1000:.0f} ms)"

    def lines(self) -> list[str]:
        """The outcome as the log and the live view say it: the headline (and the error),
        then the plan, unless nothing changed."""
        out = [self.headline() + (f": {self.error}" if self.error else "")]
        if self.plan is not None and self.result != "unchanged":
            out += self.plan.lines()
        return out


async def reconfigure(rt: "Runtime", text: str, source: str = "reconfigure()") -> Outcome:
    """Apply graph ``text`` to the running ``rt``; raises :class:`ReloadError` (with the
    outcome) when nothing was applied. Reloads queue: one runs at a time."""
    async with rt.reload_lock:
        began = time.monotonic()
        outcome = Outcome("failed", source, time.time())
        try:
            await _reconfigure(rt, text, outcome)
        except ReloadError as exc:
            _record(rt, exc.outcome, began)  # type: ignore[arg-type]
            raise
        except Exception as exc:   # a bug: said, counted, never lost
            outcome.result, outcome.error = "failed", f"{type(exc).__name__}: {exc}"
            _record(rt, outcome, began)
            raise ReloadError(f"reload from {source} failed: {outcome.error}", outcome) \
                from exc
        _record(rt, outcome, began)
        return outcome


def _record(rt: "Runtime", outcome: Outcome, began: float) -> None:
    outcome.duration_s = time.monotonic() - began
    rt.reloads[outcome.result] = rt.reloads.get(outcome.result, 0) + 1
    rt.last_reload = outcome
    level = logging.INFO if outcome.result in ("applied", "unchanged") else logging.ERROR
    headline, *plan_lines = outcome.lines()
    log.log(level, "%s", headline)
    for line in plan_lines:
        log.log(level, "  %s", line)
    if outcome.diagnostics:
        for d in outcome.diagnostics:
            log.log(level, "  %s", d.format())


async def _reconfigure(rt: "Runtime", text: str, outcome: Outcome) -> None:
    from .validate import probe, validate_text

    def refuse(result: str, error: str) -> ReloadError:
        outcome.result, outcome.error = result, error
        return ReloadError(f"reload from {outcome.source}: {error}", outcome)

    if rt.stopping:
        raise refuse("failed", "the graph is stopping")
    if not any(not t.done() for t in rt.tasks.values()):
        raise refuse("failed", "the graph is not running (not started yet, or it ended)")
    v = validate_text(text, file=outcome.source, environ=rt.environ)
    await asyncio.sleep(0)   # validating took the loop for a millisecond: let batches move
    outcome.diagnostics = list(v.diagnostics)
    if v.graph is None:
        raise refuse("invalid", "the new graph is invalid; nothing changed")
    new = v.graph
    new.path = rt.graph.path
    outcome.plan = p = plan(rt.graph, new)
    if p.empty:
        outcome.result = "unchanged"
        return
    added = {nid: n for nid, n in new.nodes.items() if nid not in rt.graph.nodes}
    if added:
        found = await probe(Graph(new.name, added, []), rt.environ)
        outcome.diagnostics += found
        if any(d.severity == "error" for d in found):
            raise refuse("invalid", "a node it adds cannot reach what it needs; nothing "
                                    "changed")
    missing = [n.id for n in new.nodes.values() if not n.type.implemented()]
    if missing:
        raise refuse("invalid", f"these nodes' types cannot run yet: {', '.join(missing)}")
    switch = _Switch(rt, new, p)
    try:
        switch.check_handover()
        await switch.make()
    except (ReloadError, ConfigError) as exc:
        raise refuse("failed", str(exc)) from None
    outcome.cancelled = await switch.switch(refuse)
    outcome.result = "applied"


def _binds(node: Node) -> set[str]:
    return {b.address for b in node.type.binds(node.config)}


class _Switch:
    """One reload's changes to the runtime, in the order of the module's docstring."""

    def __init__(self, rt: "Runtime", new: Graph, p: Plan):
        self.rt, self.old, self.new = rt, rt.graph, new
        old = self.old
        self.kept = set(p.unchanged)
        self.changed = [c.id for c in p.changed]
        self.added = [nid for nid in new.nodes if nid not in old.nodes]
        self.removed = [nid for nid in old.nodes if nid not in new.nodes]
        self.channels: dict[EdgeKey, Channel] = {}
        self.created: list[tuple[Any, Channel]] = []    # (edge, channel) of new edges
        self.resized: list[tuple[Any, Channel]] = []
        for e in new.edges:
            ch = rt.edge_channels.get(e.key)
            if ch is None:
                ch = rt.make_channel(e)
                self.created.append((e, ch))
            elif (ch.capacity, ch.capacity_events, ch.capacity_bytes, ch.when_full) != (
                    e.capacity, e.capacity_events, e.capacity_bytes, e.when_full):
                self.resized.append((e, ch))
            self.channels[e.key] = ch
        self.retired = [ch for k, ch in rt.edge_channels.items() if k not in self.channels]
        #: changed nodes whose old and new instances bind an address in common
        self.late = [nid for nid in self.changed
                     if _binds(old.nodes[nid]) & _binds(new.nodes[nid])]
        self.fresh: dict[str, NodeType] = {}     # nid -> the new instance (added, changed)
        self.started: list[str] = []

    # -- before anything changes --------------------------------------------------------------

    def check_handover(self) -> None:
        """Refuse now, rather than lose what a sink holds, when a sink to replace or remove
        cannot confirm delivery (its server is away)."""
        for nid in [*self.changed, *self.removed]:
            node = self.rt.nodes[nid]
            if isinstance(node, Sink) and not node.can_confirm():
                raise ReloadError(f"node {nid!r} cannot confirm delivery now (its server is "
                                  "away) and would have to drop what it holds; try again once "
                                  "it is back", None)

    def _instance(self, nid: str, graph: Graph) -> NodeType:
        node = graph.nodes[nid]
        outlets, _ = self.rt.wiring(nid, graph, self.channels if graph is self.new
                                    else self.rt.edge_channels)
        old_ctx = self.rt.contexts.get(nid)
        same = old_ctx is not None and old_ctx.node.type is node.type
        return self.rt.make_node(node, outlets, old_ctx.metrics if same else None)

    async def make(self) -> None:
        """Start every new instance that can run beside the old graph; on a failure stop
        them all and raise."""
        for nid in [*self.added, *self.changed]:
            self.fresh[nid] = self._instance(nid, self.new)
        early = [nid for nid in self.fresh if nid not in self.late]
        for nid in self.rt.start_order(self.new, early):
            try:
                await self.fresh[nid].start()
            except Exception as exc:
                await self._stop(self.fresh[nid])   # what it opened before it failed
                await self._stop_fresh()
                raise ReloadError(f"node {nid!r} failed to start: {type(exc).__name__}: "
                                  f"{exc}; the running graph is unchanged", None) from exc
            self.started.append(nid)

    async def _stop_fresh(self) -> None:
        for nid in reversed(self.started):
            await self._stop(self.fresh[nid])
        self.started.clear()

    # -- the switch ---------------------------------------------------------------------------

    async def switch(self, refuse: Any) -> list[str]:
        rt = self.rt
        self.cancelled: list[str] = []
        await self._swap_late(refuse)
        for e, ch in self.resized:
            ch.capacity, ch.capacity_events = e.capacity, e.capacity_events
            ch.capacity_bytes, ch.when_full = e.capacity_bytes, e.when_full
        for e, ch in self.created:   # new edges between nodes that keep running
            if e.src in self.kept:
                outlets = rt.contexts[e.src].outlets
                outlets[e.src_port] = [*outlets.get(e.src_port, ()), ch]
            if e.dst in self.kept:
                inbox = rt.contexts[e.dst].inbox
                assert inbox is not None
                inbox.add(ch)
        for nid in self.rt.start_order(self.new, [n for n in self.added if not isinstance(
                self.fresh[n], Source)]):
            self._install(nid)
        for nid in self.rt.start_order(self.new, [n for n in self.changed
                                                  if n not in self.late]):
            old = rt.nodes[nid]
            await self._detach(nid)
            await self._hand_over(self.fresh[nid], old)
            await self._stop(old)
            self._install(nid)
        await self._retire_edges()
        await self._remove_nodes()
        for nid in self.rt.start_order(self.new, [n for n in self.added if isinstance(
                self.fresh[n], Source)]):
            self._install(nid)
        rt.graph = self.new
        rt.edge_channels = self.channels
        live = set(map(id, self.channels.values()))
        rt.channels = list(self.channels.values()) + [   # removed edges still draining
            ch for ch in rt.channels + self.retired
            if id(ch) not in live and (ch._q or not ch.closed)]
        return self.cancelled

    async def _swap_late(self, refuse: Any) -> None:
        """Changed nodes that bind what their old instance binds: old out, new in; if the
        new one fails, the old configuration comes back, and so do earlier ones."""
        done: list[tuple[str, NodeType]] = []
        for nid in self.rt.start_order(self.new, self.late):
            old = self.rt.nodes[nid]
            await self._detach(nid)
            await self._stop(old)
            new = self.fresh[nid]
            try:
                await new.start()
            except Exception as exc:
                await self._stop(new)   # what it opened before it failed, then the old again
                await self._restore(nid, old)
                for prev_id, prev_old in reversed(done):
                    replaced = self.rt.nodes[prev_id]
                    await self._detach(prev_id)
                    await self._stop(replaced)
                    await self._restore(prev_id, prev_old, replaced)
                await self._stop_fresh()
                raise refuse("failed", f"node {nid!r} failed to start: {type(exc).__name__}: "
                             f"{exc}; it runs again as it was, and so does the rest")
            await self._hand_over(new, old)
            self._install(nid, inputs=self.rt.wiring(nid, self.old, self.rt.edge_channels)[1])
            done.append((nid, old))

    async def _restore(self, nid: str, old: NodeType, state_from: NodeType | None = None
                       ) -> None:
        """Run node ``nid`` again with its old configuration (a failed swap)."""
        inst = self._instance(nid, self.old)
        try:
            await inst.start()
        except Exception as exc:
            self.rt._fail(nid, exc)   # neither version runs: the graph cannot go on as it was
            return
        await self._hand_over(inst, state_from or old)
        self.fresh[nid] = inst
        self._install(nid, inputs=self.rt.wiring(nid, self.old, self.rt.edge_channels)[1])

    async def _hand_over(self, new: NodeType, old: NodeType) -> None:
        if type(new) is type(old):
            await new.adopt(old)

    def _install(self, nid: str, inputs: list[Channel] | None = None) -> None:
        """Make the fresh instance of ``nid`` the running one and launch its task."""
        rt, inst = self.rt, self.fresh[nid]
        ctx = inst.ctx
        if not isinstance(inst, Source):
            if inputs is None:
                inputs = rt.wiring(nid, self.new, self.channels)[1]
            # removed input edges still holding events are drained by whoever reads nid now
            ctx.inbox = Inbox([*inputs, *(ch for ch in self.retired if ch.dst == nid
                                          and ch not in inputs)])
        rt.nodes[nid], rt.contexts[nid] = inst, ctx
        if rt.stopping:   # the graph was asked to stop during the reload: so is this node
            ctx.stopping.set()
        if nid not in rt._started:
            rt._started.append(nid)
        rt.spawn(nid)

    async def _detach(self, nid: str) -> None:
        """End the running instance's task at a batch boundary, its output edges open."""
        rt = self.rt
        ctx = rt.contexts[nid]
        ctx.detached = True
        if ctx.inbox is not None:
            ctx.inbox.detach()   # it reads no further batch, and leaves the rest queued
        rt.stop_node(nid)
        await self._wait_task(nid, rt.tasks.get(nid))

    async def _wait_task(self, nid: str, task: "asyncio.Task[None] | None") -> None:
        if task is None or task.done():
            return
        done, _ = await asyncio.wait({task}, timeout=self.rt.reload_timeout_s)
        if not done:
            log.error("[%s] did not hand over within %.0f s: cancelled; what it held is "
                      "counted lost", nid, self.rt.reload_timeout_s)
            self.cancelled.append(nid)
            task.cancel()
            await asyncio.wait({task})

    async def _stop(self, inst: NodeType) -> None:
        try:
            await asyncio.wait_for(inst.stop(), self.rt.reload_timeout_s)
        except Exception as exc:  # stopping must reach the end of the reload
            log.warning("[%s] error while stopping the replaced instance: %s", inst.id, exc)
        await inst.ctx.tasks.close()

    async def _retire_edges(self) -> None:
        """Removed edges: the producer stops sending between two batches; the channel closes
        and its consumer drains it."""
        rt = self.rt
        for ch in self.retired:
            if ch.src in self.removed:
                continue   # closed when that node ends
            ctx = rt.contexts[ch.src]
            for port, chans in list(ctx.outlets.items()):
                if ch in chans:
                    ctx.outlets[port] = [c for c in chans if c is not ch]
            await ctx.quiet()   # an emit that began before holds the old list
            ch.close()

    async def _remove_nodes(self) -> None:
        rt = self.rt
        for nid in self.removed:
            rt.stop_node(nid)
        for nid in self.removed:   # each ends once its inputs are closed and drained
            await self._wait_task(nid, rt.tasks.get(nid))
        for nid in self.removed:
            inst, ctx = rt.nodes.pop(nid), rt.contexts.pop(nid)
            await self._stop(inst)
            rt.tasks.pop(nid, None)
            if nid in rt._started:
                rt._started.remove(nid)
            if ctx.metrics.lost:
                rt.removed_lost[nid] = rt.removed_lost.get(nid, 0) + ctx.metrics.lost
