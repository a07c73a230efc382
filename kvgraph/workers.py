"""``kvgraph run --workers N``: one graph in N processes that share nothing.

The plan (which worker runs which source node) is :func:`kvgraph.graph.worker_plan`; this
module starts the worker processes (``kvgraph run FILE --shard I/N``), passes signals on, and
keeps them together: one failing stops the others, and a worker whose supervisor died drains
by itself.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .errors import UsageError

if TYPE_CHECKING:
    from .cli import EarlySignals


async def watch_parent(parent: int, stop: Callable[[], None]) -> None:
    """A worker's parent, ``kvgraph run --workers``, passes signals on; if it dies without
    doing so (SIGKILL), the worker is re-parented and drains by itself."""
    import asyncio

    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    stop()


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text!r}: expected I/N, e.g. 0/2") from None
    if not 0 <= index < count:
        raise UsageError(f"--shard {text!r}: I must be in 0..N-1")
    return index, count


def python_m_kvgraph() -> list[str]:
    """The command that starts this same kvgraph in a new process.

    ``python -m kvgraph`` puts the current directory first on ``sys.path``: started from a
    directory that holds a folder named ``kvgraph`` (a clone's parent, say), the worker would
    import that folder instead of the installed package. ``-P`` (Python 3.11) leaves the
    current directory out; it is kept only when this kvgraph itself was imported from it (an
    uninstalled checkout run as ``python -m kvgraph``)."""
    here = Path(__file__).resolve().parent.parent
    safe = [] if here == Path.cwd().resolve() else ["-P"]
    return [sys.executable, *safe, "-m", "kvgraph"]


def supervise(args: argparse.Namespace, plan: list[list[str]],
              early: "EarlySignals | None" = None) -> int:
    """``run --workers N``: run each part of the graph in its own ``kvgraph run`` process.

    The processes share nothing, so N of them use up to N cores: each worker runs its share
    of the source nodes and its own copy of every other node (its own NATS connection, say).
    A signal is passed on to every worker (the first drains, a second aborts). If a worker
    fails, the others are stopped (drained) and the exit code is the failure's, so that a
    supervisor restarts the whole relay rather than leave some engines unserved."""
    import signal
    import subprocess

    count = len(plan)
    status = "log" if args.status in ("auto", "tty") else args.status
    procs = []
    for i, sources in enumerate(plan):
        cmd = [*python_m_kvgraph(), "run", args.file, "--shard", f"{i}/{count}",
               "--status", status, "--status-interval", str(args.status_interval),
               "--log-level", args.log_level]
        if args.strict:
            cmd.append("--strict")
        cmd += ["--loop", args.loop, "--drain-timeout", str(args.drain_timeout)]
        if args.metrics_port is not None:
            port = args.metrics_port + i if args.metrics_port else 0
            cmd += ["--metrics-port", str(port), "--metrics-host", args.metrics_host]
        if args.report:
            path = Path(args.report)
            cmd += ["--report", str(path.with_name(f"{path.stem}.worker{i}{path.suffix}"))]
        print(f"kvgraph run: worker {i}/{count}: {', '.join(sources)}", file=sys.stderr)
        # Its own process group: a Ctrl-C on the terminal reaches only this process, which
        # passes it on once (twice would abort the workers instead of draining them).
        procs.append(subprocess.Popen(cmd, process_group=0))

    def forward(signum: int, _frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)

    def no_reload(_signum: int, _frame: object) -> None:
        print("kvgraph run: SIGHUP: a graph run with --workers cannot be reloaded; it runs on "
              "as it was (restart it to apply a changed file)", file=sys.stderr)

    signal.signal(signal.SIGHUP, no_reload)   # its default action would end the supervisor
    for sig in early.take() if early is not None else ():  # arrived while validating
        forward(sig, None)
    code = 0
    running = {p.pid: p for p in procs}
    while running:
        pid, raw = os.wait()
        p = running.pop(pid, None)
        if p is None:
            continue
        p.returncode = os.waitstatus_to_exitcode(raw)
        if p.returncode and not code:
            code = p.returncode if p.returncode > 0 else 1
            print(f"kvgraph run: worker {procs.index(p)}/{count} exited with "
                  f"{p.returncode}; stopping the others", file=sys.stderr)
            forward(signal.SIGTERM, None)
    return code
