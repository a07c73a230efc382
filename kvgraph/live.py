"""The operator's live view: drawn with rich, from Prometheus families, so that the same view
shows a graph running here (``kvgraph run``, its own collector) and graphs running elsewhere
(``kvgraph top URL...``, their ``/metrics``; several URLs, such as the workers of
``--workers N``, are combined node by node).

rich, not curses: it redraws a region in place (``Live``) and keeps log lines printed above it,
renders tables that fit the terminal, works on any terminal Python runs on, and needs no raw
terminal handling. What the view shows:

* per node: rates and totals in and out, errors, and events **filtered** (discarded on
  purpose), **dropped** (discarded by accident) and **held** (written, not yet confirmed), kept
  apart; its connection state when it holds one (``up``, or ``DOWN`` since when);
* per edge: fill against capacity, peak, drops;
* the latest warnings and errors, with how many times each came, kept on screen for
  ``WARNING_TTL_S`` (10 minutes) after the last time (a log line scrolls away; these do not).
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

#: How long a warning stays in the view after it last came.
WARNING_TTL_S = 600.0
MAX_WARNINGS = 8


@dataclass
class NodeRow:
    node: str
    type: str = ""
    kind: str = ""
    events_in: float = 0.0
    events_out: float = 0.0
    errors: float = 0.0
    filtered: float = 0.0
    dropped: float = 0.0
    lost: float = 0.0
    held: float = 0.0
    connected: float | None = None     # 1 up, 0 down, None: holds no connection
    down_since: float | None = None    # unix time


@dataclass
class EdgeRow:
    edge: str
    fill: float = 0.0
    capacity: float = 0.0
    peak: float = 0.0
    dropped: float = 0.0


@dataclass
class Warning_:
    text: str
    level: str
    first: float
    last: float
    count: int = 1


@dataclass
class Snapshot:
    title: str
    up_s: float
    nodes: dict[str, NodeRow] = field(default_factory=dict)
    edges: dict[str, EdgeRow] = field(default_factory=dict)
    warnings: list[Warning_] = field(default_factory=list)
    at: float = field(default_factory=time.monotonic)
    reloads: dict[str, float] = field(default_factory=dict)   # by result
    last_reload_at: float | None = None                        # unix time
    last_reload_ok: bool = True
    #: the last reload's outcome and plan, one line each (a local view has them)
    reload_lines: list[str] = field(default_factory=list)


def snapshot(families: Iterable[Any], title: str, warnings: list[Warning_] | None = None
             ) -> Snapshot:
    """A view of metric families (prometheus_client's, local or parsed from a page); samples
    of the same node or edge from several pages add up."""
    snap = Snapshot(title, 0.0, warnings=list(warnings or []))
    for fam in families:
        name = fam.name
        for s in fam.samples:
            labels, value = s.labels, s.value
            if name == "kvgraph_uptime_seconds":
                snap.up_s = max(snap.up_s, value)
                continue
            if name == "kvgraph_reloads" and not s.name.endswith("_created"):
                result = labels.get("result", "")
                snap.reloads[result] = snap.reloads.get(result, 0) + value
                continue
            if name == "kvgraph_last_reload_timestamp_seconds":
                snap.last_reload_at = max(snap.last_reload_at or 0.0, value)
                continue
            if name == "kvgraph_last_reload_success":
                snap.last_reload_ok = snap.last_reload_ok and bool(value)
                continue
            if name.startswith("kvgraph_edge_") and "edge" in labels:
                row = snap.edges.setdefault(labels["edge"], EdgeRow(labels["edge"]))
                field_ = {"kvgraph_edge_fill_batches": "fill",
                          "kvgraph_edge_capacity_batches": "capacity",
                          "kvgraph_edge_peak_batches": "peak",
                          "kvgraph_edge_dropped_events": "dropped"}.get(name)
                if field_ is not None and not s.name.endswith("_created"):
                    setattr(row, field_, getattr(row, field_) + value)
                continue
            if not name.startswith("kvgraph_node_") or "node" not in labels:
                continue
            if s.name.endswith("_created"):
                continue
            row = snap.nodes.setdefault(labels["node"], NodeRow(labels["node"]))
            row.type = labels.get("type", row.type)
            row.kind = labels.get("kind", row.kind)
            key = name.removeprefix("kvgraph_node_")
            if key in ("events_in", "events_out", "errors", "lost"):
                setattr(row, key, getattr(row, key) + value)
            elif key == "discarded":
                if labels.get("reason") == "intentional":
                    row.filtered += value
                else:
                    row.dropped += value
            elif key == "held_events":
                row.held += value
            elif key == "connected":
                row.connected = value if row.connected is None else min(row.connected, value)
            elif key == "disconnected_since" and value:
                row.down_since = value if row.down_since is None else min(row.down_since,
                                                                            value)
    return snap


def render(snap: Snapshot, prev: Snapshot | None,
           footer: str = "Ctrl-C stops (drains), twice aborts") -> Any:
    """The view, as a rich renderable."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from .status import human

    dt = snap.at - prev.at if prev is not None else 0.0
    head = Text(f"kvgraph {snap.title}   up {snap.up_s:.0f} s", style="bold")
    nodes = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("node", "type", "in/s", "out/s", "in", "out", "errors", "filtered", "dropped",
                "held", "lost", "connection"):
        nodes.add_column(col, justify="left" if col in ("node", "type", "connection")
                         else "right")
    now = time.time()
    for nid, r in snap.nodes.items():
        p = prev.nodes.get(nid) if prev is not None else None
        rate_in = (r.events_in - p.events_in) / dt if p is not None and dt > 0 else 0.0
        rate_out = (r.events_out - p.events_out) / dt if p is not None and dt > 0 else 0.0
        if r.connected is None:
            conn = ""
        elif r.connected:
            conn = "[green]up[/]"
        else:
            since = f" for {now - r.down_since:.0f} s" if r.down_since else ""
            conn = f"[bold red]DOWN{since}[/]"
        nodes.add_row(nid, f"{r.kind} {r.type}".strip(), human(rate_in), human(rate_out),
                      human(r.events_in), human(r.events_out),
                      f"[red]{human(r.errors)}[/]" if r.errors else "0", human(r.filtered),
                      f"[red]{human(r.dropped)}[/]" if r.dropped else "0", human(r.held),
                      f"[bold red]{human(r.lost)}[/]" if r.lost else "0", conn)
    parts: list[Any] = [head, Text(""), nodes]
    if snap.edges:
        edges = Table(box=None, pad_edge=False, header_style="bold")
        for col in ("edge", "fill", "peak", "dropped"):
            edges.add_column(col, justify="left" if col == "edge" else "right")
        for e in snap.edges.values():
            full = e.capacity and e.fill >= e.capacity
            fill = f"{human(e.fill)}/{human(e.capacity)}"
            edges.add_row(e.edge, f"[bold red]{fill}[/]" if full else fill, human(e.peak),
                          f"[red]{human(e.dropped)}[/]" if e.dropped else "0")
        parts += [Text(""), edges]
    if snap.last_reload_at is not None:
        counts = ", ".join(f"{human(n)} {r}" for r, n in snap.reloads.items() if n)
        age = time.time() - snap.last_reload_at
        parts += [Text(""), Text(f"reloads: {counts}; last {age:.0f} s ago"
                                 + ("" if snap.last_reload_ok else ", refused"),
                                 style="bold" if snap.last_reload_ok else "bold red")]
        parts += [Text("  " + line) for line in snap.reload_lines[:MAX_RELOAD_LINES]]
        if len(snap.reload_lines) > MAX_RELOAD_LINES:
            parts.append(Text(f"  ... and {len(snap.reload_lines) - MAX_RELOAD_LINES} more"))
    parts.append(Text(""))
    if snap.warnings:
        parts.append(Text("warnings and errors (kept for 10 min)", style="bold"))
        for w in snap.warnings:
            age = time.time() - w.last
            times = f" (x{w.count})" if w.count > 1 else ""
            style = "red" if w.level in ("ERROR", "CRITICAL") else "yellow"
            parts.append(Text(f"{time.strftime('%H:%M:%S', time.localtime(w.last))} "
                              f"{w.level.lower()}{times}: {w.text}  [{age:.0f} s ago]",
                              style=style))
    else:
        parts.append(Text("no warnings", style="dim"))
    parts.append(Text(footer, style="dim"))
    return Group(*parts)


#: Lines of the last reload's plan that the view shows.
MAX_RELOAD_LINES = 8


def reload_lines(outcome: Any) -> list[str]:
    """The last reload as the live view shows it (:meth:`kvgraph.reload.Outcome.lines`)."""
    return [] if outcome is None else outcome.lines()


class WarningBuffer(logging.Handler):
    """The latest warnings and errors of the process's kvgraph loggers, each kept until
    ``WARNING_TTL_S`` after it last came; the same message again counts up instead of
    taking another line."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.items: collections.OrderedDict[str, Warning_] = collections.OrderedDict()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # a bad format string must not break logging
            text = str(record.msg)
        key = _shape(text)
        now = time.time()
        w = self.items.pop(key, None)
        if w is None:
            w = Warning_(text, record.levelname, now, now)
        else:
            w.text, w.last, w.count = text, now, w.count + 1
        self.items[key] = w
        while len(self.items) > 64:
            self.items.popitem(last=False)

    def current(self) -> list[Warning_]:
        cutoff = time.time() - WARNING_TTL_S
        alive = [w for w in self.items.values() if w.last >= cutoff]
        return alive[-MAX_WARNINGS:][::-1]


def _shape(text: str) -> str:
    """A message with its numbers taken out: the same warning again, with other counts."""
    import re

    return re.sub(r"\d+(\.\d+)?", "#", text)


def warnings_json(buf: WarningBuffer) -> list[dict[str, Any]]:
    return [w.__dict__ for w in buf.current()]


def warnings_from_json(items: list[dict[str, Any]]) -> list[Warning_]:
    return [Warning_(**w) for w in items]
