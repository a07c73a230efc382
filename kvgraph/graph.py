"""The validated graph: nodes, edges, and the structural checks that need the whole picture.

A :class:`Graph` only exists once validation passed, so the runtime and ``draw`` can trust it.
Cycles are reported as their full chain (``a -> b -> a``), found with networkx per strongly
connected component so that every independent cycle is named once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence

from .node import DEFAULT_PORT, ERRORS_PORT, INPUT_PORT, Kind, NodeType
from .schema import DEFAULT_CAPACITY, DEFAULT_CAPACITY_BYTES, DEFAULT_CAPACITY_EVENTS


@dataclass(frozen=True)
class Node:
    id: str
    type: type[NodeType]
    options: dict[str, Any]          # the type's own options, as written (no common keys)
    description: str = ""
    on_error: str | None = None
    line: int = 0

    @property
    def kind(self) -> Kind:
        return self.type.kind

    @property
    def config(self) -> dict[str, Any]:
        """Options with the type's defaults filled in."""
        return {**self.type.defaults(), **self.options}


@dataclass(frozen=True)
class Edge:
    src: str
    src_port: str
    dst: str
    capacity: int = DEFAULT_CAPACITY
    when_full: str = "block"
    index: int = 0
    dst_port: str = INPUT_PORT
    capacity_events: int = DEFAULT_CAPACITY_EVENTS
    capacity_bytes: int = DEFAULT_CAPACITY_BYTES

    @property
    def key(self) -> "EdgeKey":
        """What identifies the edge across versions of a graph (a reload keeps its channel)."""
        return (self.src, self.src_port, self.dst, self.dst_port)

    @property
    def label(self) -> str:
        port = "" if self.src_port == DEFAULT_PORT else f".{self.src_port}"
        return f"{self.src}{port} -> {self.dst}"


EdgeKey = tuple[str, str, str, str]


@dataclass
class Graph:
    name: str
    nodes: dict[str, Node]
    edges: list[Edge]
    description: str = ""
    path: str = ""

    def topological_order(self) -> list[str]:
        """Node ids, every node after all of its producers. The standard library's graphlib,
        not networkx: a running relay then never imports networkx (20 MB of its RSS)."""
        import graphlib

        sorter = graphlib.TopologicalSorter({n: set() for n in self.nodes})
        for e in self.edges:
            sorter.add(e.dst, e.src)
        return list(sorter.static_order())


def to_networkx(nodes: Sequence[str] | dict[str, Any], edges: Sequence[Edge]) -> Any:
    import networkx as nx

    g = nx.MultiDiGraph()
    g.add_nodes_from(nodes)
    for e in edges:
        g.add_edge(e.src, e.dst, key=e.index)
    return g


Report = Callable[[Sequence[Hashable], str, str, str], None]
"""report(path, message, hint, severity)"""


def check_structure(nodes: dict[str, Kind], ports: dict[str, tuple[str, ...]],
                    edges: list[Edge], report: Report,
                    names: Sequence[str] | None = None,
                    serving: set[str] | frozenset[str] = frozenset()) -> None:
    """Structural checks that need all nodes and edges; every finding goes to ``report``.

    ``nodes`` maps each node id whose type is known to its kind, ``ports`` to its output ports;
    ``names`` are all the node ids of the file (for "did you mean"; default: ``nodes``).
    Edges that name unknown nodes are reported and left out of the later checks, and the
    nodes at their other end get no "feeds nothing" / "no input" warning: the typo is the
    problem, said once. Nodes in ``serving`` (servers, see ``NodeType.serves``) need no input.
    """
    from .schema import closest, suggest

    good: list[Edge] = []
    seen: dict[tuple[str, str, str], int] = {}
    broken_ends: set[str] = set()   # nodes with an edge whose other end names no node
    for e in edges:
        where = ("edges", e.index)
        ok = True
        for end, node_id in (("from", e.src), ("to", e.dst)):
            if node_id not in nodes:
                choices = names if names is not None else list(nodes)
                report(where + (end,), f"unknown node {node_id!r}", suggest(node_id, choices),
                       "error")
                broken_ends.add(closest(node_id, choices) or node_id)
                ok = False
        if not ok:
            broken_ends.update((e.src, e.dst))
            continue
        if e.src_port not in ports[e.src]:
            if nodes[e.src] is Kind.SINK and e.src_port == DEFAULT_PORT:
                report(where + ("from",), f"{e.src!r} is a sink: it has no output {DEFAULT_PORT!r}",
                       f"a sink can only feed edges from its {ERRORS_PORT!r} port", "error")
            else:
                report(where + ("from",), f"node {e.src!r} has no output port {e.src_port!r}",
                       suggest(e.src_port, ports[e.src]), "error")
            ok = False
        if nodes[e.dst] is Kind.SOURCE:
            report(where + ("to",), f"{e.dst!r} is a source: it takes no input",
                   "edges go from sources to transforms and sinks", "error")
            ok = False
        elif e.dst_port != INPUT_PORT:
            report(where + ("to",), f"node {e.dst!r} has no input port {e.dst_port!r}",
                   f"its only input is {INPUT_PORT!r}; write just {e.dst!r}", "error")
            ok = False
        key = (e.src, e.src_port, e.dst)
        if key in seen:
            report(where, f"duplicate edge {e.label} (same as edges[{seen[key]}])",
                   "remove one; to send twice, add a node", "error")
            ok = False
        seen.setdefault(key, e.index)
        if ok:
            good.append(e)

    _check_cycles(nodes, good, report)

    for node_id, kind in nodes.items():
        if node_id in broken_ends:
            continue
        if kind is not Kind.SOURCE and node_id not in serving and \
                not any(e.dst == node_id for e in good):
            report(("nodes", node_id), f"{kind} {node_id!r} has no input: nothing will reach it",
                   "add an edge to it, or remove it", "warning")
        if kind is not Kind.SINK and not any(e.src == node_id and e.src_port == DEFAULT_PORT
                                             for e in good):
            report(("nodes", node_id), f"{kind} {node_id!r}: output {DEFAULT_PORT!r} feeds "
                   "nothing; its events will be discarded", "add an edge from it", "warning")


def _check_cycles(nodes: dict[str, Kind], edges: list[Edge], report: Report) -> None:
    """Prove the graph acyclic; name every cycle when it is not.

    The proof on the common path is the standard library's ``graphlib`` (a topological sort,
    well under a millisecond), so that ``kvgraph validate`` does not pay networkx's import
    (~130 ms) for a valid graph. networkx finds and names the cycles when there are any: one
    per strongly connected component, printed as its full chain.
    """
    import graphlib

    sorter = graphlib.TopologicalSorter({n: set() for n in nodes})
    for e in edges:
        sorter.add(e.dst, e.src)
    try:
        sorter.prepare()
        return
    except graphlib.CycleError:
        pass
    import networkx as nx

    g = to_networkx(nodes, edges)
    for scc in sorted(nx.strongly_connected_components(g), key=min):
        sub = g.subgraph(scc)
        if len(scc) == 1 and not sub.number_of_edges():
            continue
        start = min(scc)
        cycle = [u for u, *_ in nx.find_cycle(sub, source=start)]
        i = cycle.index(min(cycle))
        cycle = cycle[i:] + cycle[:i]
        chain = " -> ".join(cycle + [cycle[0]])
        closing = next(e for e in edges if e.src == cycle[-1] and e.dst == cycle[0])
        report(("edges", closing.index), f"cycle: {chain}",
               "a graph must be acyclic; remove one edge of the chain", "error")


# -- worker processes (kvgraph run --workers N) ---------------------------------------------

def worker_plan(graph: Graph, count: int) -> list[list[str]]:
    """Which source nodes each of ``count`` worker processes runs: round-robin in the file's
    order. Every other node runs as a copy in every worker, so each must be ``replicable``.

    The unit is a source node because the order that matters is per engine (worker_id), and a
    source node reads its engines on one socket: all of an engine's events then stay in one
    process, in order. Raises UsageError, naming every node that prevents the split."""
    from .errors import UsageError

    sources = [nid for nid, n in graph.nodes.items() if n.kind is Kind.SOURCE]
    problems = [f"{n.kind} {nid!r} ({n.type.name}) cannot run in several processes"
                for nid, n in graph.nodes.items()
                if n.kind is not Kind.SOURCE and not n.type.replicable]
    if count > len(sources):
        problems.append(f"--workers {count} needs at least {count} source nodes (one engine "
                        f"or more each); the graph has {len(sources)}")
    if problems:
        raise UsageError("cannot split this graph into worker processes:\n  "
                         + "\n  ".join(problems) + "\n(`kvgraph nodes TYPE` says which types "
                         "can; run such a graph without --workers)")
    return [sources[i::count] for i in range(count)]


def shard(graph: Graph, sources: Sequence[str]) -> Graph:
    """The part of ``graph`` one worker runs: the given sources, and every other node."""
    keep = {nid: n for nid, n in graph.nodes.items()
            if n.kind is not Kind.SOURCE or nid in sources}
    return Graph(graph.name, keep, [e for e in graph.edges if e.src in keep],
                 graph.description, graph.path)
