"""The ``kvgraph`` command line: validate, run, draw, nodes, schema.

Exit codes: 0 success (graph valid), 1 invalid graph or failed action, 2 usage error (bad
arguments, or an address to listen on that is taken: nothing was started).
Heavy modules (jsonschema, networkx) are imported only by the commands that need them, so that
``kvgraph --help`` and ``kvgraph nodes`` start at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from . import __version__
from .errors import KvgraphError, UsageError

if TYPE_CHECKING:
    from .graph import Graph


def _colour(stream: object) -> bool:
    return (hasattr(stream, "isatty") and stream.isatty() and "NO_COLOR" not in os.environ
            and os.environ.get("TERM") != "dumb")


def _write(data: bytes | str, output: str | None) -> None:
    if isinstance(data, str):
        data = data.encode()
    if output and output != "-":
        Path(output).write_bytes(data)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()


def cmd_validate(args: argparse.Namespace) -> int:
    from .diagnostics import as_json, render_text
    from .validate import validate_file

    results = [validate_file(f) for f in args.files]
    if args.connect:
        import asyncio

        from .validate import probe

        for r in results:
            if r.graph is not None:
                found = asyncio.run(probe(r.graph))
                r.diagnostics.extend(found)
                if found:
                    r.graph = None
    failed = False
    if args.format == "json":
        payload = []
        for r in results:
            bad = bool(r.errors) or (args.strict and bool(r.warnings))
            failed |= bad
            payload.append({"file": r.file, "valid": not bad,
                            **as_json(r.diagnostics)})
        print(json.dumps(payload if len(payload) > 1 else payload[0], indent=2))
        return 1 if failed else 0
    colour = _colour(sys.stdout)
    for r in results:
        if r.diagnostics:
            print(render_text(r.diagnostics, colour))
        bad = bool(r.errors) or (args.strict and bool(r.warnings))
        failed |= bad
        counts = f"{len(r.errors)} error(s), {len(r.warnings)} warning(s)"
        if bad:
            note = " (warnings are errors with --strict)" if not r.errors else ""
            print(f"{r.file}: invalid: {counts}{note}")
        elif not args.quiet:
            g = r.graph
            size = f"{len(g.nodes)} nodes, {len(g.edges)} edges" if g else ""
            extra = f", {len(r.warnings)} warning(s)" if r.warnings else ""
            print(f"{r.file}: valid ({size}{extra})")
    return 1 if failed else 0


def cmd_draw(args: argparse.Namespace) -> int:
    from .diagnostics import render_text
    from .draw import render
    from .validate import validate_file

    r = validate_file(args.file)
    if r.graph is None:
        print(render_text(r.diagnostics, _colour(sys.stderr)), file=sys.stderr)
        print(f"{r.file}: invalid; fix it before drawing (`kvgraph validate {r.file}`)",
              file=sys.stderr)
        return 1
    _write(render(r.graph, args.format), args.output)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .diagnostics import render_text
    from .plan import plan
    from .validate import validate_file

    results = [validate_file(args.old), validate_file(args.new)]
    bad = [r for r in results if r.graph is None]
    for r in bad:
        print(render_text(r.diagnostics, _colour(sys.stderr)), file=sys.stderr)
        print(f"{r.file}: invalid; no plan (`kvgraph validate {r.file}`)", file=sys.stderr)
    if bad:
        return 1
    old, new = (r.graph for r in results)
    assert old is not None and new is not None
    p = plan(old, new)
    if args.format == "json":
        print(json.dumps(p.as_json(), indent=2))
    else:
        print(f"plan: {args.old} -> {args.new}")
        print("\n".join(f"  {line}" for line in p.lines()))
    return 0


def cmd_nodes(args: argparse.Namespace) -> int:
    from . import catalog, registry
    from .schema import suggest

    if args.format == "json":
        items = catalog.as_json()
        if args.name:
            items = [i for i in items if i["name"] == args.name]
        print(json.dumps(items, indent=2))
        return 0 if items else 1
    if not args.name:
        print(catalog.summary_table())
        return 0
    types = registry.named(args.name)
    if not types:
        raise UsageError(f"no node type {args.name!r}; {suggest(args.name, registry.names())}")
    print("\n\n".join(catalog.describe(t) for t in types))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    early = EarlySignals()  # a Ctrl-C while this process still imports and validates is
    early.install()         # handled once the graph runs, never a KeyboardInterrupt traceback

    from .diagnostics import render_text
    from .validate import validate_file

    if args.workers < 1:
        raise UsageError(f"--workers {args.workers}: give 1 or more")
    if args.watch and args.workers > 1:
        raise UsageError("--watch with --workers: reloading a graph shared out over processes "
                         "is not supported; run one process per graph, or restart to change it")
    r = validate_file(args.file)
    if r.diagnostics and not (args.shard and r.graph is not None):  # workers: said once
        print(render_text(r.diagnostics, _colour(sys.stderr)), file=sys.stderr)
    if r.graph is None or (args.strict and r.warnings):
        print(f"{r.file}: invalid; not starting (`kvgraph validate {r.file}` for details)",
              file=sys.stderr)
        return 1
    graph = r.graph
    prefix = ""
    if args.shard:
        from .graph import shard, worker_plan
        from .workers import parse_shard

        index, count = parse_shard(args.shard)
        graph = shard(graph, worker_plan(graph, count)[index])
        prefix = f"[worker {index}/{count}] "
    elif args.workers > 1:
        from .graph import worker_plan
        from .workers import supervise

        return supervise(args, worker_plan(graph, args.workers), early)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s {prefix}%(message)s")
    status = args.status
    if status == "auto":
        status = "tty" if _screen_is_ours(graph) else "log"
    loop = _event_loop(args.loop)
    if loop is not None:
        return loop.run(_run(graph, args, status, prefix, early))
    return asyncio.run(_run(graph, args, status, prefix, early))


#: ``kvgraph run``'s default bound on draining after a stop signal, and its exit code past it.
DRAIN_TIMEOUT_S = 25.0
EXIT_DRAIN_TIMEOUT = 3


def _event_loop(choice: str) -> Any:
    """uvloop (libuv's event loop) when asked, or by default where it is installed: the same
    graph, with less time per wake-up and per socket operation (the index node answered 10%
    more queries, and a new connection per query had a p99 of 2 ms instead of 24-35 ms).
    None: asyncio's own loop."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise UsageError("--loop uvloop: uvloop is not installed (pip install uvloop)") \
                from None
        return None
    return uvloop


class EarlySignals:
    """SIGINT and SIGTERM received before their real handler is installed (while the
    process imports, validates or starts its workers): recorded, then handed over with
    :meth:`take`. A worker of ``--workers`` gets its supervisor's signal at once, however
    early, so without this its first second of life ended in a KeyboardInterrupt traceback."""

    def __init__(self) -> None:
        self.pending: list[int] = []

    def install(self) -> None:
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._record)

    def _record(self, signum: int, _frame: object) -> None:
        self.pending.append(signum)

    def take(self) -> list[int]:
        taken, self.pending = self.pending, []
        return taken


def _screen_is_ours(graph: "Graph") -> bool:
    """``--status auto``: draw the live screen only on a terminal that nothing else writes
    to. Not for a background job (``kvgraph run ... &``: the screen would be drawn over the
    shell; the choice is made at start, so a job brought back with ``fg`` keeps log lines),
    and not when a node prints events to the same terminal (the ``stdout`` sink)."""
    if not sys.stderr.isatty():
        return False
    try:
        if os.getpgrp() != os.tcgetpgrp(sys.stderr.fileno()):
            return False
    except OSError:
        return False
    if sys.stdout.isatty() and any(n.type.writes_terminal for n in graph.nodes.values()):
        return False
    return True


async def _cancel_until_done(task: "asyncio.Future[Any]") -> None:
    """Cancel ``task`` and make it stick. A cancellation that lands as an inner ``wait_for``
    completes is lost (Python 3.11's wait_for; nats-py's connect has such waits), and the
    start-up would go on for a whole connect timeout; asking again until the task ends
    closes that window."""
    import asyncio

    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.2)


def _tune_gc() -> None:
    """Make the cyclic garbage collector cheap for a relay process (``kvgraph run`` only; an
    embedding application keeps its own settings).

    Every event brings a few lists (its hashes and tokens), which the collector tracks; with
    the default threshold it runs every 700 of them and, in a burst, walks every queued batch
    again and again: the relay ran 30-40% slower at 128 events per message. Events never form
    cycles, so collecting rarely loses nothing: ``freeze`` moves everything alive before the
    graph starts (modules, the graph) out of the collector's sight, and the young generation is
    collected every 50,000 allocations instead of 700."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


async def _run(graph: "Graph", args: argparse.Namespace, status_mode: str,
               prefix: str = "", early: EarlySignals | None = None) -> int:
    import asyncio
    import logging
    import signal

    from .errors import listen_error
    from .runtime import Runtime
    from .status import Status, serve_metrics, totals

    from .live import WarningBuffer

    log = logging.getLogger("kvgraph")
    rt = Runtime(graph)
    rt.reload_timeout_s = args.reload_timeout
    warnings = WarningBuffer()   # for the live view and /warnings
    logging.getLogger().addHandler(warnings)
    server = None
    if args.metrics_port is not None:  # every listener before any source: a taken port
        try:                           # stops the run before anything was read
            server = await serve_metrics(rt, args.metrics_host, args.metrics_port, warnings)
        except OSError as exc:
            where = f"--metrics-port {args.metrics_port} on {args.metrics_host}"
            raise listen_error(where, exc) or UsageError(f"{where}: {exc}") from None
        log.info("metrics on http://%s:%d/metrics", args.metrics_host, server.port)
    _tune_gc()  # before start: its full collection must not delay the first events
    loop = asyncio.get_running_loop()
    signals = 0
    abort_task: list[asyncio.Task[int]] = []
    abandon: list[asyncio.Task[None]] = []
    # Signals are handled from the very start: a Ctrl-C while nodes connect (a NATS server
    # slow to answer, say) stops the graph once it has started; a second one abandons the
    # start-up. Both end with totals and an exit code, never a traceback.
    starting = asyncio.ensure_future(rt.start())  # awaited just below

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        name = signal.Signals(signum).name
        if not starting.done():
            if signals == 1:
                log.warning("%s during start-up: stopping once every node has started; "
                            "send it again to abort", name)
            elif not abandon:
                log.warning("second signal: abandoning the start-up")
                abandon.append(asyncio.create_task(_cancel_until_done(starting)))
        elif signals == 1:
            log.warning("%s: stopping sources and draining%s; send it again to abort", name,
                        f" (at most {args.drain_timeout:g} s)" if args.drain_timeout else "")
            rt.request_stop()
            arm_drain_deadline()
        elif not abort_task:
            log.warning("second signal: aborting now")
            abort_task.append(asyncio.create_task(rt.abort()))

    drain: list[asyncio.TimerHandle] = []
    timed_out: list[bool] = []

    def arm_drain_deadline() -> None:
        if args.drain_timeout and not drain:
            drain.append(loop.call_later(args.drain_timeout, drain_timed_out))

    def drain_timed_out() -> None:
        if abort_task:
            return
        log.warning("draining took longer than --drain-timeout %g s: aborting; what was not "
                    "delivered is counted in the totals and the report", args.drain_timeout)
        timed_out.append(True)
        abort_task.append(asyncio.create_task(rt.abort()))

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    reloads = _Reloads(rt, graph.path or args.file, log)
    if status_mode == "tty":
        # The live view is drawn on a terminal: a SIGHUP there is the terminal hanging up
        # (closed, ssh gone), so the graph stops and drains as on SIGTERM; reload with
        # --watch or POST /graph instead.
        loop.add_signal_handler(signal.SIGHUP, on_signal, signal.SIGHUP)
    elif not args.shard:   # a worker of --workers runs a share of the graph: not reloadable
        loop.add_signal_handler(signal.SIGHUP, reloads.on_sighup)
    else:
        loop.add_signal_handler(signal.SIGHUP, lambda: log.warning(
            "SIGHUP: a worker of --workers cannot be reloaded; it runs on as it was"))
    for sig in early.take() if early else ():
        on_signal(sig)
    status = Status(rt, status_mode, args.status_interval, warnings=warnings)
    orphan_watch = None
    try:
        try:
            await starting
        except asyncio.CancelledError:
            print(f"{prefix}kvgraph {graph.name}: ABORTED during start-up; nothing was read",
                  file=sys.stderr)
            return 1
        if signals:
            rt.request_stop()
            arm_drain_deadline()
        status.start()
        if args.shard:  # a worker: stop (draining) if the supervising process is gone
            from .workers import watch_parent

            orphan_watch = asyncio.create_task(watch_parent(os.getppid(), rt.request_stop))
        log.info("running %s: %d nodes, %d edges", graph.name, len(graph.nodes),
                 len(graph.edges))
        if args.watch:
            reloads.watch()
        result = await rt.wait()
        if abort_task:
            await abort_task[0]
            result = rt.result()
    finally:
        for task in abandon:
            await task
        if orphan_watch is not None:
            orphan_watch.cancel()
        for handle in drain:
            handle.cancel()
        await status.stop()
        if server is not None:
            await server.close()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await reloads.close()
        logging.getLogger().removeHandler(warnings)
    print(prefix + totals(rt, result), file=sys.stderr)
    if args.report:
        import dataclasses

        Path(args.report).write_text(json.dumps(dataclasses.asdict(result), indent=2) + "\n")
    if timed_out:
        return EXIT_DRAIN_TIMEOUT
    return 0 if result.ok else 1


class _Reloads:
    """``kvgraph run``'s reloads of its graph file: on SIGHUP, and with ``--watch`` when the
    file changes. Each reads the file and hands it to ``rt.reconfigure``, which logs the
    outcome and its plan; the tasks are owned, and end with the run."""

    def __init__(self, rt: Any, path: str, log: Any):
        from .tasks import TaskOwner

        self.rt, self.path, self.log = rt, path, log
        self.owner = TaskOwner("kvgraph:reload", self._failed)
        self.applied_text = Path(path).read_text(encoding="utf-8") if path else ""

    def _failed(self, name: str, exc: BaseException) -> None:
        self.log.error("%s failed: %s: %s", name, type(exc).__name__, exc)

    def on_sighup(self) -> None:
        if self.rt.stopping:
            return
        if not self.rt.tasks:
            self.log.warning("SIGHUP during start-up: ignored; send it again once running")
            return
        self.log.info("SIGHUP: reading %s again", self.path)
        self.owner.spawn(self._from_file(), "sighup")

    async def _from_file(self) -> None:
        try:
            text = Path(self.path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            self.log.error("cannot read %s: %s; the running graph is unchanged", self.path, exc)
            return
        await self.apply(text)

    async def apply(self, text: str) -> None:
        from .errors import ReloadError

        try:
            await self.rt.reconfigure(text, source=self.path)
        except ReloadError:
            pass   # logged with its diagnostics; the graph runs on as it was

    def watch(self) -> None:
        from .watch import watch

        self.log.info("--watch: applying %s again whenever it changes", self.path)
        self.owner.spawn(watch(self.path, self.apply, self.applied_text), "watch")

    async def close(self) -> None:
        await self.owner.close()


def cmd_top(args: argparse.Namespace) -> int:
    import asyncio

    from .top import run

    try:
        return asyncio.run(run(args.url, args.interval, args.once))
    except KeyboardInterrupt:
        return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from .schema import graph_schema

    _write(json.dumps(graph_schema(), indent=2) + "\n", args.output)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvgraph",
        description="KV-cache event relays as declarative dataflow graphs.",
        epilog="Exit codes: 0 ok, 1 invalid graph or failure, 2 usage error or a port in use "
               "(nothing started).")
    p.add_argument("--version", action="version", version=f"kvgraph {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    v = sub.add_parser("validate", help="check graph files and report every problem")
    v.add_argument("files", nargs="+", metavar="FILE")
    v.add_argument("--format", choices=["text", "json"], default="text")
    v.add_argument("--strict", action="store_true", help="treat warnings as errors")
    v.add_argument("-q", "--quiet", action="store_true", help="print only problems")
    v.add_argument("--connect", action="store_true",
                   help="also check that servers answer, streams exist and ports are free")
    v.set_defaults(func=cmd_validate)

    d = sub.add_parser("draw", help="draw a graph (Mermaid by default)")
    d.add_argument("file", metavar="FILE")
    d.add_argument("--format", choices=["mermaid", "dot", "svg", "png"], default="mermaid")
    d.add_argument("-o", "--output", metavar="PATH", help="write here instead of stdout")
    d.set_defaults(func=cmd_draw)

    pl = sub.add_parser("plan", help="what changing a graph file changes: nodes added, "
                        "removed, changed (option by option), kept; edges added and removed")
    pl.add_argument("old", metavar="OLD")
    pl.add_argument("new", metavar="NEW")
    pl.add_argument("--format", choices=["text", "json"], default="text")
    pl.set_defaults(func=cmd_plan)

    n = sub.add_parser("nodes", help="list node types, or show one type's options")
    n.add_argument("name", nargs="?", metavar="TYPE")
    n.add_argument("--format", choices=["text", "json"], default="text")
    n.set_defaults(func=cmd_nodes)

    r = sub.add_parser("run", help="run a graph until its sources end or a signal stops it")
    r.add_argument("file", metavar="FILE")
    r.add_argument("--metrics-port", type=int, metavar="N",
                   help="serve Prometheus metrics on this port (0 picks a free one)")
    r.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST")
    r.add_argument("--status", choices=["auto", "tty", "log", "off"], default="auto",
                   help="live screen on a terminal, summary log lines otherwise (default)")
    r.add_argument("--status-interval", type=float, default=10.0, metavar="S",
                   help="seconds between summary log lines (default 10)")
    r.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    r.add_argument("--strict", action="store_true", help="refuse to run with warnings")
    r.add_argument("--report", metavar="PATH",
                   help="write the final totals as JSON here (for scripts and tests); with "
                        "--workers, one file per worker: NAME.workerI.json")
    r.add_argument("--drain-timeout", type=float, default=DRAIN_TIMEOUT_S, metavar="S",
                   help="after a stop signal, drain for at most S seconds, then abort, count "
                        "what was not delivered, write the report and exit "
                        f"{EXIT_DRAIN_TIMEOUT} (default {DRAIN_TIMEOUT_S:g}: inside "
                        "Kubernetes' default 30 s grace period); 0 waits for ever")
    r.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], default="auto",
                   help="the event loop: uvloop where installed (auto, the default), or "
                        "asyncio's own")
    r.add_argument("--workers", type=int, default=1, metavar="N",
                   help="run the graph in N processes: the source nodes are shared out "
                        "round-robin, every other node is copied (its type must allow it); "
                        "--metrics-port P serves worker I on P+I")
    r.add_argument("--watch", action="store_true",
                   help="apply FILE again whenever it changes (also when it is replaced "
                        "through a symlink swap); SIGHUP applies it at once, with or without "
                        "--watch (except under the live view, where a SIGHUP is the terminal "
                        "hanging up: the graph stops)")
    r.add_argument("--reload-timeout", type=float, default=10.0, metavar="S",
                   help="in a reload, how long a replaced or removed node may take to finish "
                        "its batch and confirm what it wrote before it is cancelled (default 10)")
    r.add_argument("--shard", metavar="I/N", help=argparse.SUPPRESS)  # one worker's part
    r.set_defaults(func=cmd_run)

    t = sub.add_parser("top", help="watch graphs running elsewhere, from their /metrics")
    t.add_argument("url", nargs="+", help="a `kvgraph run --metrics-port` endpoint, such as "
                   "http://host:9464; several are combined (the workers of --workers N)")
    t.add_argument("--interval", type=float, default=1.0, metavar="S",
                   help="seconds between refreshes (default 1)")
    t.add_argument("--once", action="store_true", help="print the view once and exit")
    t.set_defaults(func=cmd_top)

    s = sub.add_parser("schema", help="print the JSON Schema of graph files")
    s.add_argument("-o", "--output", metavar="PATH", help="write here instead of stdout")
    s.set_defaults(func=cmd_schema)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"kvgraph {args.command}: {exc}", file=sys.stderr)
        return 2
    except KvgraphError as exc:
        print(f"kvgraph {args.command}: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
