"""What changing a graph changes: nodes matched by id and compared by type and options, edges
by their ends. The first step of recomposing a running graph (issue 16): a reload will keep
the unchanged nodes running, swap the changed ones, start the added and drain the removed; this
module says which is which, for ``kvgraph plan OLD NEW`` today.

A node is *changed* when its type, kind, options (with defaults applied, so writing a default
out is no change) or ``on_error`` differ; its ``description`` is documentation and never a
change. An edge is identified by its ends (``src.port -> dst``); one whose capacity or
``when_full`` differ is *changed*. Secret options (``x-secret``) are compared but never shown.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .graph import Edge, EdgeKey, Graph, Node

SECRET = "***"


@dataclass
class NodeChange:
    """One changed node: what differs, option by option (old, new)."""

    id: str
    what: str                                   # "sink nats", as `kvgraph nodes` names it
    options: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    def describe(self) -> str:
        parts = [f"{k} {_show(old)} -> {_show(new)}" for k, (old, new) in self.options.items()]
        return f"{self.id} ({self.what}): " + "; ".join(parts)


@dataclass
class Plan:
    added: list[str] = field(default_factory=list)         # node ids, with their type
    removed: list[str] = field(default_factory=list)
    changed: list[NodeChange] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    edges_added: list[str] = field(default_factory=list)   # edge labels
    edges_removed: list[str] = field(default_factory=list)
    edges_changed: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.edges_added
                    or self.edges_removed or self.edges_changed)

    def lines(self) -> list[str]:
        """The plan as a person reads it, one action a line."""
        if self.empty:
            return ["no change"]
        out = [f"add     node {n}" for n in self.added]
        out += [f"remove  node {n}" for n in self.removed]
        out += [f"change  node {c.describe()}" for c in self.changed]
        out += [f"add     edge {e}" for e in self.edges_added]
        out += [f"remove  edge {e}" for e in self.edges_removed]
        out += [f"change  edge {e}" for e in self.edges_changed]
        if self.unchanged:
            out.append(f"keep    {len(self.unchanged)} node(s) as they run: "
                       + ", ".join(self.unchanged))
        return out

    def as_json(self) -> dict[str, Any]:
        return {"added": self.added, "removed": self.removed,
                "changed": {c.id: {k: [o, n] for k, (o, n) in c.options.items()}
                            for c in self.changed},
                "unchanged": self.unchanged, "edges_added": self.edges_added,
                "edges_removed": self.edges_removed, "edges_changed": self.edges_changed}


def plan(old: Graph, new: Graph) -> Plan:
    """What turning ``old`` into ``new`` changes."""
    p = Plan()
    for nid, n in new.nodes.items():
        if nid not in old.nodes:
            p.added.append(f"{nid} ({_what(n)})")
            continue
        change = _node_change(old.nodes[nid], n)
        if change is None:
            p.unchanged.append(nid)
        else:
            p.changed.append(change)
    p.removed = [f"{nid} ({_what(n)})" for nid, n in old.nodes.items() if nid not in new.nodes]
    old_edges, new_edges = _edges(old), _edges(new)
    for key, e in new_edges.items():
        if key not in old_edges:
            p.edges_added.append(e.label)
        elif _edge_options(old_edges[key]) != _edge_options(e):
            p.edges_changed.append(f"{e.label}: " + ", ".join(
                f"{k} {o} -> {n}" for k, o, n in _edge_diff(old_edges[key], e)))
    p.edges_removed = [e.label for key, e in old_edges.items() if key not in new_edges]
    return p


def _what(n: Node) -> str:
    return f"{n.kind} {n.type.name}"


def _node_change(old: Node, new: Node) -> NodeChange | None:
    change = NodeChange(new.id, _what(new))
    if old.type is not new.type:
        change.options["type"] = (_what(old), _what(new))
        return change
    a, b = old.config, new.config
    secret = {k for k, s in new.type.options.items() if s.get("x-secret")}
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            change.options[key] = (SECRET, SECRET) if key in secret else (a.get(key),
                                                                         b.get(key))
    if old.on_error != new.on_error:
        change.options["on_error"] = (old.on_error, new.on_error)
    return change if change.options else None


def _edges(g: Graph) -> dict[EdgeKey, Edge]:
    return {e.key: e for e in g.edges}


_EDGE_OPTIONS = ("capacity", "capacity_events", "capacity_bytes", "when_full")


def _edge_options(e: Edge) -> tuple[Any, ...]:
    return tuple(getattr(e, k) for k in _EDGE_OPTIONS)


def _edge_diff(old: Edge, new: Edge) -> list[tuple[str, Any, Any]]:
    return [(k, getattr(old, k), getattr(new, k)) for k in _EDGE_OPTIONS
            if getattr(old, k) != getattr(new, k)]


def _show(value: Any) -> str:
    import json

    return value if value == SECRET else "(unset)" if value is None else json.dumps(value)
