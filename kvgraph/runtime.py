"""Run a validated graph: one asyncio task per node, joined by bounded channels.

Lifecycle:

1. Resolve every node's config (defaults, ``${ENV}``); refuse to start on a missing variable.
2. Start sinks first, then transforms, then sources, so that nothing is produced before its
   consumers are ready.
3. Run. A source's task ends when it is done (finite sources) or asked to stop; then its output
   channels close, and each downstream node ends once all of its inputs are closed and drained.
   A graph whose sources are all finite therefore ends by itself.
4. :meth:`Runtime.request_stop` (first SIGINT/SIGTERM) stops the sources and lets everything in
   flight drain and the sinks flush. :meth:`Runtime.abort` (second signal) cancels at once and
   counts what was lost.

Failures: an exception while a node handles a batch rejects that batch (counted, logged with the
node id, sent to the node's ``errors`` port) and the graph goes on, unless the node sets
``on_error = "fail"``. A :class:`~kvgraph.errors.NodeFailure` (a connection broken after
retries) stops the graph unless the node sets ``on_error = "skip"``. A failed node's inputs are
drained and counted as lost, so that nothing upstream blocks for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from . import envvars
from .acks import Ack, Tracked, acks_of, release_all
from .channel import Channel, Inbox, resolve
from .errors import ConfigError, NodeFailure, UsageError, listen_error
from .event import Event, Rejected, batch_bytes
from .graph import Edge, EdgeKey, Graph, Node
from .metrics import NodeMetrics
from .node import DEFAULT_PORT, ERRORS_PORT, Kind, NodeType, Sink, Source, Transform
from .tasks import TaskOwner, Timer

log = logging.getLogger("kvgraph")

#: When sinks confirm delivery (a flush, a round trip): see _Unconfirmed.
CONFIRM_INTERVAL_S = 0.05      # an idle sink confirms at most this often
CONFIRM_EVERY_EVENTS = 8192    # a busy sink confirms after this many events...
CONFIRM_EVERY_S = 0.25         # ...or this long since the last confirmation
OUTAGE_RECHECK_S = 0.25        # an idle sink that cannot confirm looks again this often
IDLE_RECHECK_S = 0.001         # the least wait before an idle sink looks again


class RateLimitedLog:
    """A node's logger that says the first problem at once, then at most one line per
    ``interval`` seconds with the count of what it held back, so a flood of bad input cannot
    flood the log."""

    def __init__(self, node_id: str, interval: float = 5.0):
        self.logger = logging.getLogger(f"kvgraph.node.{node_id}")
        self.node_id, self.interval = node_id, interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def problem(self, key: str, message: str, *args: Any) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return
        held = self._held.pop(key, 0)
        suffix = f" (and {held} more like it in the last {now - last:.0f} s)" if held and \
            last is not None else ""
        self._last[key] = now
        self.logger.warning(f"[{self.node_id}] {message}{suffix}", *args)

    def info(self, message: str, *args: Any) -> None:
        self.logger.info(f"[{self.node_id}] {message}", *args)

    def warning(self, message: str, *args: Any) -> None:
        self.logger.warning(f"[{self.node_id}] {message}", *args)

    def error(self, message: str, *args: Any) -> None:
        self.logger.error(f"[{self.node_id}] {message}", *args)


def _unowned_error(name: str, exc: BaseException) -> None:
    """A context outside a runtime (a test building one by hand): say it, never lose it."""
    log.error("%s failed: %s: %s", name, type(exc).__name__, exc)


class NodeContext:
    """What a running node gets from the runtime."""

    def __init__(self, node: Node, config: dict[str, Any], base_dir: Path,
                 outlets: dict[str, list[Channel]], stopping: asyncio.Event):
        self.node = node
        self.node_id = node.id
        self.config = config
        self.base_dir = base_dir
        self.outlets = outlets
        self.stopping = stopping
        self.metrics = NodeMetrics(node.id, node.type.name, node.kind.value)
        self.log = RateLimitedLog(node.id)
        self.inbox: Inbox | None = None
        #: The node's helper tasks and timers (set by the runtime: errors follow on_error).
        self.tasks = TaskOwner(f"kvgraph:{node.id}", _unowned_error)
        self.runtime_node: Any = None
        self.current_acks: tuple[Ack, ...] = ()   # of the batch a transform is processing
        self.held_acks: list[Ack] = []            # inputs a holding transform has not passed on
        #: True once every source upstream has caught up with the history it replays (a
        #: JetStream consumer that found its stream read and settled); set by the runtime.
        self.caught_up: Any = lambda: True
        #: Set when this instance is being replaced by a reload: its loop ends at a batch
        #: boundary and its output edges stay open for the successor.
        self.detached = False
        self.emitting = 0        # emits in progress: a reload rewires outlets between them
        self._quiet: list[asyncio.Future[None]] = []

    async def quiet(self) -> None:
        """Return once no emit of this node is in progress (a reload may then change which
        edges its ports feed without a batch being half sent)."""
        while self.emitting:
            fut = asyncio.get_running_loop().create_future()
            self._quiet.append(fut)
            await fut

    def spawn(self, coro: Any, name: str = "") -> "asyncio.Task[Any]":
        """Start a helper task the runtime owns: an exception in it is reported and follows
        the node's ``on_error`` (``skip``: logged and counted in ``errors``; ``fail``: the
        graph stops); it is cancelled when the node stops."""
        return self.tasks.spawn(coro, name)

    def call_later(self, delay: float, fn: Any, name: str = "timer") -> Timer:
        """Run the coroutine function ``fn`` as an owned helper task after ``delay`` s;
        ``.cancel()`` the returned timer to drop it."""
        return self.tasks.call_later(delay, fn, name)

    def path(self, value: str) -> Path:
        """A path option, relative to the graph file's directory."""
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else self.base_dir / p

    async def emit(self, batch: list[Any], port: str = DEFAULT_PORT,
                   acks: tuple[Ack, ...] | None = None) -> None:
        """Send a batch on a port (to every edge from it). Never mutate a batch after this.

        ``acks`` (sources with end-to-end acknowledgement) travel with the batch; a
        transform's emits inherit the acks of the batch it is processing."""
        if not batch:
            return
        passed_on: tuple[Ack, ...] = ()  # a holding transform's inputs, now in this output
        if acks is None:
            acks = self.current_acks
            if self.held_acks and not self.holding():
                passed_on = tuple(self.held_acks)
                self.held_acks.clear()
                acks = acks + passed_on
        self.emitting += 1
        try:
            await self._emit(batch, port, acks)
        finally:
            release_all(passed_on)
            self.emitting -= 1
            if not self.emitting and self._quiet:
                for fut in self._quiet:
                    resolve(fut)
                self._quiet.clear()

    async def _emit(self, batch: list[Any], port: str, acks: tuple[Ack, ...]) -> None:
        if acks:
            batch = Tracked(batch, acks)
        if port == DEFAULT_PORT:
            self.metrics.events_out += len(batch)
        chans = self.outlets.get(port)
        if not chans:
            if port == DEFAULT_PORT:
                self.metrics.discarded_unintentional += len(batch)
                for a in acks:
                    a.fail()
            return
        size = batch_bytes(batch)
        for ch in chans:
            dropped = await ch.send(batch, size)
            if dropped:
                self.metrics.discarded_unintentional += dropped
            if acks and not (dropped and ch.when_full == "drop_newest"):
                for a in acks:
                    a.hold()
            elif acks:
                for a in acks:
                    a.fail()

    def output_full(self, port: str = DEFAULT_PORT) -> bool:
        """Would an emit on ``port`` wait now (an edge from it is full and blocks)? A source
        whose peer cannot be paused reads ahead meanwhile, within a bound of its own."""
        return any(ch.full and ch.when_full == "block" for ch in self.outlets.get(port, ()))

    def holding(self) -> bool:
        node = self.runtime_node
        return bool(getattr(node, "holding", lambda: False)())

    async def reject(self, items: list[Rejected]) -> None:
        """Count, log (rate-limited) and forward to the ``errors`` port what could not be
        handled. The graph goes on."""
        if not items:
            return
        self.metrics.errors += len(items)
        first = items[0]
        self.log.problem(first.reason.split(":")[0], "rejected %d item(s): %s", len(items),
                         first.reason)
        if self.outlets.get(ERRORS_PORT):
            await self.emit(items, ERRORS_PORT)

    def rejected(self, reason: str, event: Event | None = None, raw: bytes | None = None
                 ) -> Rejected:
        return Rejected(node=self.node_id, reason=reason, event=event, raw=raw, ts=time.time())

    def close_outputs(self) -> None:
        """The node is done: its output edges end (not when it was detached by a reload, whose
        successor goes on sending on them)."""
        if self.detached:
            return
        for chans in self.outlets.values():
            for ch in chans:
                ch.close()


#: After an abort, how long each node's ``stop`` may take (closing connections to a server that
#: is down must not hold the exit).
ABORT_STOP_TIMEOUT_S = 0.5


@dataclass
class RunResult:
    """How a run ended. ``ok`` is True only when everything in flight was delivered and no
    node reported a loss."""

    ok: bool
    aborted: bool = False
    failures: dict[str, str] = field(default_factory=dict)
    lost_events: int = 0
    #: per node, what it reported lost for good (its ``lost`` counter: an engine's batches no
    #: replay brought back, events a sink could not write); any makes the run not ok
    lost: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    metrics: dict[str, dict[str, int | float]] = field(default_factory=dict)
    #: when the run was aborted (a second signal, ``--drain-timeout``): what was still on each
    #: edge, and what each sink had written but not confirmed; all of it is in lost_events
    undelivered_edges: dict[str, int] = field(default_factory=dict)
    undelivered_nodes: dict[str, int] = field(default_factory=dict)


def resolve_config(node: Node, environ: Mapping[str, str]) -> dict[str, Any]:
    """Defaults, then ``${ENV}`` interpolation of the options that allow it."""
    config = node.config
    for key, value in list(config.items()):
        spec = node.type.options.get(key, {})
        if not spec.get("x-env"):
            continue
        try:
            if isinstance(value, str):
                config[key] = envvars.interpolate(value, environ)
            elif isinstance(value, list):
                config[key] = [envvars.interpolate(v, environ) for v in value]
        except ConfigError as exc:
            raise ConfigError(f"{node.id}.{key}: {exc}") from None
    return config


class Runtime:
    """A graph being run. Use :meth:`start`, then :meth:`wait`; or ``async with``."""

    def __init__(self, graph: Graph, environ: Mapping[str, str] | None = None,
                 base_dir: str | os.PathLike[str] | None = None):
        self.graph = graph
        self.environ = os.environ if environ is None else environ
        self.base_dir = Path(base_dir) if base_dir is not None else (
            Path(graph.path).resolve().parent if graph.path else Path.cwd())
        self.nodes: dict[str, NodeType] = {}
        self.contexts: dict[str, NodeContext] = {}
        self.channels: list[Channel] = []
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.owner = TaskOwner("kvgraph", self._node_task_failed)   # the node tasks
        self.failures: dict[str, str] = {}
        self.lost_events = 0
        self.undelivered_edges: dict[str, int] = {}
        self.undelivered_nodes: dict[str, int] = {}
        self.aborted = False
        self.started_at = 0.0
        self._stopping: asyncio.Event | None = None
        self._started: list[str] = []
        self.edge_channels: dict[EdgeKey, Channel] = {}
        #: Reloads (:mod:`kvgraph.reload`): one at a time; their outcomes, for /metrics.
        self.reload_lock = asyncio.Lock()
        self.reloads: dict[str, int] = {}
        self.last_reload: Any = None
        #: How long a node being replaced or removed by a reload may take to hand over
        #: (drain its current batch, confirm what it wrote) before it is cancelled.
        self.reload_timeout_s = 10.0
        self.removed_lost: dict[str, int] = {}   # the losses of nodes a reload removed

    # -- building ---------------------------------------------------------------------------

    def _build(self) -> None:
        missing = [n for n in self.graph.nodes.values() if not n.type.implemented()]
        if missing:
            names = ", ".join(f"{n.id} ({n.kind} {n.type.name})" for n in missing)
            raise UsageError(f"these nodes' types are declared but cannot run yet: {names}")
        self._stopping = asyncio.Event()
        self.edge_channels = {e.key: self.make_channel(e) for e in self.graph.edges}
        self.channels = list(self.edge_channels.values())
        for nid, node in self.graph.nodes.items():
            outlets, inputs = self.wiring(nid, self.graph, self.edge_channels)
            inst = self.make_node(node, outlets)
            if node.kind is not Kind.SOURCE:
                inst.ctx.inbox = Inbox(inputs)
            self.contexts[nid] = inst.ctx
            self.nodes[nid] = inst

    def make_channel(self, e: Edge) -> Channel:
        """The channel of edge ``e``."""
        ch = Channel(e.label, e.capacity, e.when_full, e.src, e.dst, e.capacity_events,
                     e.capacity_bytes)
        ch.on_drop_queued = lambda b: release_all(acks_of(b), failed=True)
        return ch

    @staticmethod
    def wiring(nid: str, graph: Graph, channels: Mapping[EdgeKey, Channel]
               ) -> tuple[dict[str, list[Channel]], list[Channel]]:
        """Node ``nid``'s outlets (port -> channels) and input channels in ``graph``."""
        outlets: dict[str, list[Channel]] = {}
        inputs: list[Channel] = []
        for e in graph.edges:
            if e.src == nid:
                outlets.setdefault(e.src_port, []).append(channels[e.key])
            if e.dst == nid:
                inputs.append(channels[e.key])
        return outlets, inputs

    def make_node(self, node: Node, outlets: dict[str, list[Channel]],
                  metrics: NodeMetrics | None = None) -> NodeType:
        """A node instance, not started. ``metrics``: an instance it replaces keeps counting
        in the same counters (Prometheus counters never go back)."""
        ctx = NodeContext(node, resolve_config(node, self.environ), self.base_dir, outlets,
                          asyncio.Event())
        if metrics is not None:
            ctx.metrics = metrics
        nid = node.id
        ctx.tasks.on_error = lambda name, exc: self._helper_failed(nid, name, exc)
        ctx.caught_up = lambda: self.upstream_caught_up(nid)
        inst = ctx.runtime_node = node.type(ctx)
        return inst

    def upstream_caught_up(self, nid: str) -> bool:
        """Has every source upstream of ``nid`` caught up with the history it replays? A
        source that replays one says so with its ``caught_up`` metric (0, then 1 for good);
        the others have nothing to catch up with once they run (sinks start before sources:
        until then, nothing upstream has even begun)."""
        seen, todo = {nid}, [nid]
        while todo:
            here = todo.pop()
            for e in self.graph.edges:
                if e.dst == here and e.src not in seen:
                    seen.add(e.src)
                    todo.append(e.src)
        return all(n in self.tasks and self.contexts[n].metrics.extra.get("caught_up", 1)
                   for n in seen if self.graph.nodes[n].kind is Kind.SOURCE)

    def start_order(self, graph: Graph, ids: Any) -> list[str]:
        """Sinks first, then transforms, then sources; downstream before upstream."""
        rank = {Kind.SINK: 0, Kind.TRANSFORM: 1, Kind.SOURCE: 2}
        topo = {nid: i for i, nid in enumerate(reversed(graph.topological_order()))}
        return sorted(ids, key=lambda n: (rank[graph.nodes[n].kind], topo[n]))

    def spawn(self, nid: str) -> None:
        """Launch the task of the started node ``nid``."""
        node = self.nodes[nid]
        if isinstance(node, Source):
            coro = self._run_source(node)
        elif isinstance(node, Transform):
            coro = self._run_transform(node)
        else:
            coro = self._run_sink(node)  # type: ignore[arg-type]
        self.tasks[nid] = self.owner.spawn(coro, nid)

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Build, start every node (sinks first) and launch the node tasks."""
        self._build()
        self.started_at = time.monotonic()
        order = self.start_order(self.graph, self.nodes)
        for nid in order:
            self._started.append(nid)   # stopped too if it fails: what it opened is closed
            try:
                await self.nodes[nid].start()
            except asyncio.CancelledError:  # start-up abandoned: close what was opened
                await self._stop_nodes()
                raise
            except Exception as exc:
                await self._stop_nodes()
                listen = listen_error(f"node {nid!r}", exc)
                if listen is not None:
                    raise listen from exc
                raise NodeFailure(f"node {nid!r} failed to start: {exc}") from exc
        for nid in order:
            self.spawn(nid)

    def request_stop(self) -> None:
        """Stop the sources; everything already produced drains and is delivered."""
        if self._stopping is None or self._stopping.is_set():
            return
        self._stopping.set()
        for nid in self.nodes:
            self.stop_node(nid)

    def stop_node(self, nid: str) -> None:
        """Ask one node to end: a source stops reading; a transform or sink ends once its
        inputs are closed and drained (a serving sink waiting for its first input edge, at
        once)."""
        node, ctx = self.nodes[nid], self.contexts[nid]
        ctx.stopping.set()
        if isinstance(node, Source):
            node.on_stop()
        elif ctx.inbox is not None:
            ctx.inbox.wake()

    @property
    def stopping(self) -> bool:
        return self._stopping is not None and self._stopping.is_set()

    async def abort(self) -> int:
        """Cancel every task now; returns the number of events known to be lost."""
        self.aborted = True
        self.request_stop()
        for t in self.tasks.values():
            t.cancel()
        await self.owner.join()
        for ctx in self.contexts.values():
            await ctx.tasks.close()
        for ch in self.channels:
            n = ch.clear()
            if n:
                self.undelivered_edges[ch.name] = n
                self.lost_events += n
        return self.lost_events

    async def wait(self) -> RunResult:
        """Wait until every node has finished; stop the nodes; report."""
        try:
            while True:
                await self.owner.join()   # a node task's exception went to _node_task_failed
                if not self.reload_lock.locked():
                    break
                async with self.reload_lock:   # a reload between old and new tasks: its
                    pass                       # new ones are waited for too
        finally:
            await self._stop_nodes()
        return self.result()

    def result(self) -> RunResult:
        lost = {**self.removed_lost,
                **{nid: c.metrics.lost for nid, c in self.contexts.items() if c.metrics.lost}}
        return RunResult(ok=not self.failures and not self.aborted and not self.lost_events
                         and not lost,
                         aborted=self.aborted, failures=dict(self.failures),
                         lost_events=self.lost_events, lost=lost,
                         elapsed_s=time.monotonic() - self.started_at,
                         metrics={nid: c.metrics.snapshot() for nid, c in self.contexts.items()},
                         undelivered_edges=dict(self.undelivered_edges),
                         undelivered_nodes=dict(self.undelivered_nodes))

    async def _stop_nodes(self) -> None:
        for nid in reversed(self._started):
            try:
                if self.aborted:   # an abort is bounded: a node may not wait on an outage
                    await asyncio.wait_for(self.nodes[nid].stop(), ABORT_STOP_TIMEOUT_S)
                else:
                    await self.nodes[nid].stop()
            except asyncio.TimeoutError:
                log.warning("[%s] did not stop within %.1f s of the abort: left as it is", nid,
                            ABORT_STOP_TIMEOUT_S)
            except Exception as exc:  # stopping must reach every node
                log.warning("[%s] error while stopping: %s", nid, exc)
            await self.contexts[nid].tasks.close()   # helpers the node left running
        self._started.clear()

    async def __aenter__(self) -> "Runtime":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.request_stop()
        await self.wait()

    async def reconfigure(self, text: str, source: str = "reconfigure()") -> Any:
        """Apply a new version of the graph (TOML ``text``) while it runs, and return the
        :class:`kvgraph.reload.Outcome` (its ``plan`` says what changed). Unchanged nodes go
        on untouched; nothing in flight is lost. Raises :class:`~kvgraph.errors.ReloadError`
        when nothing was applied (the text is invalid, a new node failed to start): the graph
        runs on as it was. See :mod:`kvgraph.reload`."""
        from .reload import reconfigure

        return await reconfigure(self, text, source)

    def publisher(self, node_id: str) -> Any:
        """The publisher object of a running ``api`` source (or any node offering one)."""
        node = self.nodes.get(node_id)
        pub = getattr(node, "publisher", None)
        if pub is None:
            raise UsageError(f"node {node_id!r} has no publisher; api nodes: "
                             f"{[n for n, x in self.nodes.items() if hasattr(x, 'publisher')]}")
        return pub

    # -- node tasks -------------------------------------------------------------------------

    def _on_error(self, nid: str, exc: BaseException) -> str:
        """skip or fail, from the node's on_error and the kind of exception."""
        setting = self.graph.nodes[nid].on_error
        if setting:
            return setting
        return "fail" if isinstance(exc, NodeFailure) else "skip"

    def _node_task_failed(self, name: str, exc: BaseException) -> None:
        """A node task ended by an exception its loop did not handle (a kvgraph bug)."""
        nid = name.split(":", 1)[1] if ":" in name else name
        self._fail(nid, exc)

    def _helper_failed(self, nid: str, name: str, exc: BaseException) -> None:
        """A node's helper task raised: the node's on_error decides, as for a batch."""
        if self._on_error(nid, exc) == "fail":
            self._fail(nid, exc)
            return
        ctx = self.contexts[nid]
        ctx.metrics.errors += 1
        ctx.log.problem("helper", "helper task %s failed: %s: %s (on_error = skip: going on)",
                        name.rsplit(":", 1)[-1], type(exc).__name__, exc)

    def _fail(self, nid: str, exc: BaseException) -> None:
        self.failures[nid] = f"{type(exc).__name__}: {exc}"
        log.error("[%s] failed: %s: %s; stopping the graph", nid, type(exc).__name__, exc)
        self.request_stop()

    async def _handle_batch_error(self, nid: str, batch: list[Any], exc: Exception) -> bool:
        """True when the graph goes on (the batch was rejected), False when the node failed."""
        if self._on_error(nid, exc) == "fail":
            self._fail(nid, exc)
            return False
        ctx = self.contexts[nid]
        reason = f"{type(exc).__name__}: {exc}"
        await ctx.reject([ctx.rejected(reason, e if isinstance(e, Event) else None)
                          for e in batch])
        return True

    async def _drain_dead(self, nid: str) -> None:
        """A failed node's inputs: drain and count as lost, so that upstream never blocks."""
        inbox = self.contexts[nid].inbox
        if inbox is None:
            return
        while (batch := await inbox.get()) is not None:
            self.lost_events += len(batch)
            self.contexts[nid].metrics.discarded_unintentional += len(batch)
            release_all(acks_of(batch), failed=True)

    async def _run_source(self, node: Source) -> None:
        ctx = node.ctx
        try:
            await node.run()
            if not ctx.stopping.is_set():  # a finite source (a recording...) reached its end
                log.info("[%s] finished: %d events", node.id, ctx.metrics.events_out)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a source that raises is broken, not given a bad event
            if self.graph.nodes[node.id].on_error == "skip":
                log.error("[%s] source ended by an error (on_error = skip): %s: %s", node.id,
                          type(exc).__name__, exc)
            else:
                self._fail(node.id, exc)
        finally:
            ctx.close_outputs()

    async def _run_transform(self, node: Transform) -> None:
        ctx = node.ctx
        inbox = ctx.inbox
        assert inbox is not None
        m = ctx.metrics
        try:
            while (batch := await inbox.get()) is not None:
                m.events_in += len(batch)
                acks = ctx.current_acks = acks_of(batch)
                try:
                    await node.process(batch)
                except asyncio.CancelledError:
                    self.lost_events += len(batch)  # aborted while handling it
                    raise
                except Exception as exc:
                    if not await self._handle_batch_error(node.id, batch, exc):
                        release_all(acks, failed=True)
                        await self._drain_dead(node.id)
                        return
                finally:
                    ctx.current_acks = ()
                if acks and ctx.holding():  # some of its events wait inside the node
                    ctx.held_acks.extend(acks)
                else:
                    release_all(acks)
            await node.finish()
            release_all(ctx.held_acks)
            ctx.held_acks.clear()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # finish() failed
            self._fail(node.id, exc)
        finally:
            ctx.close_outputs()

    async def _run_sink(self, node: Sink) -> None:
        """Hand batches to the sink and confirm them (see :class:`_Unconfirmed`): written
        events count as delivered only once a flush confirmed them."""
        ctx = node.ctx
        inbox = ctx.inbox
        assert inbox is not None
        m = ctx.metrics
        held = _Unconfirmed(node)
        while node.serves and not inbox.channels and not ctx.stopping.is_set():
            await inbox.wait()   # a server with no input: until stopped, or given an input
        try:
            while True:
                batch = inbox.get_nowait()
                if batch is None:   # idle: confirm what was written, then wait for more
                    if held.events and held.due_idle() <= 0 and node.can_confirm():
                        await held.confirm()
                    if held.events:   # confirm soon (or, in an outage, look again soon)
                        if inbox.exhausted:
                            break
                        await inbox.wait(held.next_look())
                        continue
                    batch = await inbox.get()
                    if batch is None:
                        break
                n = len(batch)
                m.events_in += n
                before = m.errors + m.discarded_intentional
                try:
                    await node.write(batch)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if not await self._handle_batch_error(node.id, batch, exc):
                        if held.events and node.can_confirm():  # written before the failure:
                            with contextlib.suppress(Exception):  # delivered if confirmed
                                await held.confirm()
                        self.lost_events += held.events + n   # the batch it failed on, too
                        held.fail(acks_of(batch))
                        await self._drain_dead(node.id)
                        return
                    release_all(acks_of(batch))  # rejected to errors: handled, not lost
                    continue
                # what the sink itself rejected or filtered is not waiting for confirmation
                held.written(n - (m.errors + m.discarded_intentional - before), acks_of(batch))
                if held.due_busy() and node.can_confirm():
                    await held.confirm()
            if held.events or held.acks:
                await held.confirm()
        except asyncio.CancelledError:
            self.lost_events += held.events
            if held.events:
                self.undelivered_nodes[node.id] = held.events
            raise
        except Exception as exc:  # flush failed: what was pending is not known delivered
            self.lost_events += held.events
            self._fail(node.id, exc)
            await self._drain_dead(node.id)
        finally:
            ctx.close_outputs()


class _Unconfirmed:
    """What a sink was given and has not confirmed: an event count and the acks to release.

    Invariant: ``events`` and ``acks`` are exactly what ``written`` added since the last
    ``confirm`` (after which both are empty: the events count in ``events_out``, the acks are
    released) or ``fail`` (the acks are released as failed). A confirmation is a round trip,
    so it is asked for while busy every ``CONFIRM_EVERY_EVENTS`` events or
    ``CONFIRM_EVERY_S``, and when idle at most every ``CONFIRM_INTERVAL_S``; while the sink
    cannot confirm (an outage) the idle sink looks again every ``OUTAGE_RECHECK_S``.
    """

    __slots__ = ("node", "events", "acks", "last", "loop")

    def __init__(self, node: Sink):
        self.node = node
        self.events = 0
        self.acks: list[Ack] = []
        self.loop = asyncio.get_running_loop()
        self.last = self.loop.time()   # of the last confirmation

    def written(self, events: int, acks: tuple[Ack, ...]) -> None:
        self.events += events
        self.acks.extend(acks)

    async def confirm(self) -> None:
        """Flush; what was written now counts as delivered, and its acks are released."""
        await self.node.flush()
        self.node.ctx.metrics.events_out += self.events
        self.events = 0
        release_all(self.acks)
        self.acks.clear()
        self.last = self.loop.time()

    def fail(self, more: tuple[Ack, ...]) -> None:
        """The sink failed: nothing held will be confirmed."""
        release_all(self.acks + list(more), failed=True)
        self.acks.clear()

    def due_busy(self) -> bool:
        return self.events >= CONFIRM_EVERY_EVENTS or \
            self.loop.time() - self.last > CONFIRM_EVERY_S

    def due_idle(self) -> float:
        """Seconds until an idle sink should confirm (<= 0: now)."""
        return self.last + CONFIRM_INTERVAL_S - self.loop.time()

    def next_look(self) -> float:
        return max(self.due_idle(), OUTAGE_RECHECK_S if not self.node.can_confirm()
                   else IDLE_RECHECK_S)


async def run(graph: Graph, environ: Mapping[str, str] | None = None) -> RunResult:
    """Run a graph to completion (finite sources) or until cancelled."""
    rt = Runtime(graph, environ)
    await rt.start()
    return await rt.wait()
