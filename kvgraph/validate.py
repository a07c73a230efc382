"""``validate``: every problem of a graph file, in one pass, each with its line.

The layers, as in mature pipeline tools; a later layer runs on whatever the earlier ones left
usable, so that one mistake does not hide the next:

1. TOML syntax (file, line, column). Nothing else can run without a parse.
2. Schema: the top level, then each node's options against its type's schema.
3. Graph: unknown nodes and ports, wrong directions, duplicate edges, cycles, dangling nodes.
4. Per-type semantics (endpoint syntax, URLs), addresses bound twice, ``${ENV}`` references.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

from . import envvars, registry
from .diagnostics import Diagnostic, Severity, sort_key
from .errors import ConfigError, GraphError
from .graph import Edge, Graph, Node, check_structure
from .locate import Locator
from .node import COMMON_OPTIONS, DEFAULT_PORT, INPUT_PORT, CheckContext, Kind, NodeType
from .schema import (DEFAULT_CAPACITY, DEFAULT_CAPACITY_BYTES, DEFAULT_CAPACITY_EVENTS, NODE_ID_PATTERN, PORT_REF_PATTERN, check_node, check_top,
                     suggest)

_PORT_REF = re.compile(PORT_REF_PATTERN)
_NODE_ID = re.compile(NODE_ID_PATTERN)
_TOML_POS = re.compile(r"\(at line (\d+), column (\d+)\)")
_MAX_FILE_BYTES = 16 * 1024 * 1024


@dataclass
class Validation:
    """The outcome of validating one file: the graph when it is valid, and every diagnostic."""

    file: str
    graph: Graph | None
    diagnostics: list[Diagnostic] = field(default_factory=list)

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "error"]

    @property
    def warnings(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors


def dotted(path: Sequence[Hashable]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


class _Collector:
    def __init__(self, file: str, locator: Locator | None):
        self.file, self.locator = file, locator
        self.items: list[Diagnostic] = []

    def add(self, path: Sequence[Hashable], message: str, hint: str = "",
            severity: Severity = "error", line: int | None = None, column: int = 0) -> None:
        if line is None:
            line = self.locator.line_of(path) if self.locator else 1
        self.items.append(Diagnostic(self.file, line, severity, dotted(path), message,
                                     column, hint))

    def error(self, path: Sequence[Hashable], message: str, hint: str = "") -> None:
        self.add(path, message, hint)

    def report(self, path: Sequence[Hashable], message: str, hint: str, severity: str) -> None:
        self.add(path, message, hint, "warning" if severity == "warning" else "error")


def validate_file(path: str | os.PathLike[str],
                  environ: Mapping[str, str] | None = None) -> Validation:
    """Validate one graph file; never raises for a bad file, only reports."""
    file = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        return Validation(file, None, [Diagnostic(file, 0, "error", "",
                                                  f"cannot read file: {exc.strerror}")])
    if len(raw) > _MAX_FILE_BYTES:
        return Validation(file, None, [Diagnostic(
            file, 0, "error", "", f"file is {len(raw)} bytes; graph files are limited to "
            f"{_MAX_FILE_BYTES // 1024 // 1024} MiB")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        return Validation(file, None, [Diagnostic(file, line, "error", "",
                                                  "file is not valid UTF-8")])
    return validate_text(text, file, environ)


def validate_text(text: str, file: str = "<string>",
                  environ: Mapping[str, str] | None = None) -> Validation:
    """Validate graph text. ``environ`` resolves ``${NAME}`` checks (default: os.environ)."""
    environ = os.environ if environ is None else environ
    too_big = _precheck(text, file)
    if too_big:
        return Validation(file, None, too_big)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = _TOML_POS.search(str(exc))
        msg = _TOML_POS.sub("", str(exc)).strip()
        line, col = (int(m.group(1)), int(m.group(2))) if m else (1, 0)
        return Validation(file, None, [Diagnostic(file, line, "error", "",
                                                  f"TOML syntax: {msg}", col)])
    except RecursionError:
        return Validation(file, None, [Diagnostic(file, 1, "error", "",
                                                  "TOML syntax: nesting is too deep")])
    out = _Collector(file, Locator(text))
    if _check_values(doc, out):
        return Validation(file, None, sorted(out.items, key=sort_key))
    graph = _validate_doc(doc, out, environ, file)
    diags = sorted(out.items, key=sort_key)
    errors = any(d.severity == "error" for d in diags)
    return Validation(file, None if errors else graph, diags)


#: Limits checked before and right after parsing, so that a hostile file gets a diagnostic at
#: its line in milliseconds (unchecked, a 50,000-part dotted key took tomllib 86 s and 14.7 GB;
#: 1,000 parts, or a 5,001-digit integer, ended in a traceback).
MAX_KEY_PARTS = 32
MAX_DEPTH = 32
_QUOTED = re.compile(r'"(?:[^"\\\n]|\\.)*"|\'[^\'\n]*\'')
_LONG_INT = re.compile(r"(?<![\w.])[+-]?\d[\d_]{40,}")


def _precheck(text: str, file: str) -> list[Diagnostic]:
    """Keys of too many parts and integers of too many digits, found line by line."""
    found = []
    in_multiline = False  # inside a """ or \'\'\' string, lines are text, not keys
    for n, line in enumerate(text.splitlines(), 1):
        if (line.count('"""') + line.count("'''")) % 2:
            in_multiline = not in_multiline
            continue
        if in_multiline:
            continue
        bare = _QUOTED.sub('""', line.split("#", 1)[0] if '"' not in line and "'" not in line
                           else line)
        head = bare.strip()
        key = head.strip("[]") if head.startswith("[") else head.split("=", 1)[0]
        parts = key.count(".") + 1
        if parts > MAX_KEY_PARTS:
            found.append(Diagnostic(file, n, "error", "", f"a key of {parts} dotted parts",
                                    0, f"graph files allow at most {MAX_KEY_PARTS}"))
        elif _LONG_INT.search(bare.split("=", 1)[-1]):
            found.append(Diagnostic(file, n, "error", "", "an integer of more than 40 digits",
                                    0, "TOML integers are 64-bit: -2^63 to 2^63-1"))
    return found


def _check_values(doc: dict[str, Any], out: _Collector) -> bool:
    """After parsing: nesting depth, 64-bit integers, and no nan or inf (they pass every
    numeric bound: ``connect_timeout_s = nan`` would validate, then never connect). Walks with
    a stack, not recursion. True when it found a problem."""
    import math

    before = len(out.items)
    stack: list[tuple[tuple[Any, ...], Any]] = [((), doc)]
    while stack:
        path, value = stack.pop()
        if len(path) > MAX_DEPTH:
            out.error(path[:MAX_DEPTH], f"nested more than {MAX_DEPTH} levels deep")
            continue
        if isinstance(value, dict):
            stack.extend((path + (k,), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((path + (i,), v) for i, v in enumerate(value))
        elif isinstance(value, float) and not math.isfinite(value):
            out.error(path, f"{value} is not a usable number", "give a finite value")
        elif isinstance(value, int) and not isinstance(value, bool) and \
                not -2**63 <= value < 2**63:
            out.error(path, "integer out of the 64-bit range",
                      "TOML integers are -2^63 to 2^63-1")
    return len(out.items) > before


def load(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Graph:
    """Validate and return the graph, or raise GraphError with every diagnostic."""
    v = validate_file(path, environ)
    if v.graph is None:
        raise GraphError(v.diagnostics)
    return v.graph


def _validate_doc(doc: dict[str, Any], out: _Collector, environ: Mapping[str, str],
                  file: str) -> Graph | None:
    check_top(doc, out.error)
    nodes_doc = doc.get("nodes") if isinstance(doc.get("nodes"), dict) else {}
    edges = _edges(doc.get("edges"))

    # Resolve each node's type (and kind, for names that are both a source and a sink). An
    # edge that misspells a node (reported below, with "did you mean") still tells the kind of
    # the node it was meant for, so that one typo does not hide that node's own mistakes.
    types: dict[str, type[NodeType]] = {}
    ambiguous: dict[str, list[type[NodeType]]] = {}
    names = [n for n in nodes_doc if isinstance(n, str)]
    intended = _intended_edges(edges, names)
    for node_id, table in nodes_doc.items():
        if not isinstance(table, dict) or not isinstance(table.get("type"), str) \
                or not _NODE_ID.match(node_id):  # a bad id is reported once, by the schema
            continue
        t = _resolve_type(node_id, table, intended, out, ambiguous)
        if t is not None:
            types[node_id] = t

    schema_ok: set[str] = set()
    for node_id, t in types.items():
        before = len(out.items)
        check_node(node_id, nodes_doc[node_id], t, out.error)
        if len(out.items) == before:
            schema_ok.add(node_id)
    for node_id, candidates in ambiguous.items():
        _check_under_every_kind(node_id, nodes_doc[node_id], candidates, out)

    # Edges whose ends are names of nodes that exist but are broken are not reported again.
    known = {n: t.kind for n, t in types.items()}
    ports = {n: t.output_ports() for n, t in types.items()}
    unresolved = set(nodes_doc) - set(types)
    check_structure(known, ports,
                    [e for e in edges if e.src not in unresolved and e.dst not in unresolved],
                    out.report, names=names,
                    serving={n for n, t in types.items() if t.serves})

    binds: dict[str, tuple[str, str]] = {}
    for node_id in sorted(schema_ok):
        t, table = types[node_id], nodes_doc[node_id]
        opts = {k: v for k, v in table.items() if k not in COMMON_OPTIONS}
        _check_env(node_id, t, opts, out, environ)
        ctx = CheckContext(node_id)
        opts = {**t.defaults(), **opts}   # defaults applied once: types never restate them
        for p in t.check(opts, ctx):
            out.add(("nodes", node_id, p.field) if p.field else ("nodes", node_id),
                    p.message, p.hint, "warning" if p.severity == "warning" else "error")
        try:
            bound = list(t.binds(opts))
        except ValueError:  # an address the type's check already reported as malformed
            bound = []
        for b in bound:
            if b.address in binds:
                other, other_field = binds[b.address]
                out.error(("nodes", node_id, b.field),
                          f"{b.address} is also bound by nodes.{other}.{other_field}",
                          "two nodes cannot bind the same address")
            else:
                binds[b.address] = (node_id, b.field)

    _check_acknowledgement(types, nodes_doc, schema_ok, edges, out)
    if any(d.severity == "error" for d in out.items):
        return None
    graph_table = doc["graph"]
    nodes = {
        nid: Node(nid, types[nid], {k: v for k, v in nodes_doc[nid].items()
                                    if k not in COMMON_OPTIONS},
                  nodes_doc[nid].get("description", ""), nodes_doc[nid].get("on_error"),
                  out.locator.line_of(("nodes", nid)) if out.locator else 0)
        for nid in nodes_doc
    }
    return Graph(graph_table["name"], nodes, edges, graph_table.get("description", ""), file)


def _edges(raw: Any) -> list[Edge]:
    """Edges whose endpoints are well-formed strings; the schema layer reports the rest."""
    edges = []
    if not isinstance(raw, list):
        return edges
    for i, e in enumerate(raw):
        if not isinstance(e, dict):
            continue
        src, dst = e.get("from"), e.get("to")
        if not (isinstance(src, str) and isinstance(dst, str)
                and _PORT_REF.match(src) and _PORT_REF.match(dst)):
            continue
        s_node, _, s_port = src.partition(".")
        d_node, _, d_port = dst.partition(".")
        cap = e.get("capacity", DEFAULT_CAPACITY)
        cap_ev = e.get("capacity_events", DEFAULT_CAPACITY_EVENTS)
        cap_b = e.get("capacity_bytes", DEFAULT_CAPACITY_BYTES)
        wf = e.get("when_full", "block")
        edges.append(Edge(s_node, s_port or DEFAULT_PORT, d_node,
                          cap if isinstance(cap, int) else DEFAULT_CAPACITY,
                          wf if isinstance(wf, str) else "block", i, d_port or INPUT_PORT,
                          cap_ev if isinstance(cap_ev, int) else DEFAULT_CAPACITY_EVENTS,
                          cap_b if isinstance(cap_b, int) else DEFAULT_CAPACITY_BYTES))
    return edges


def _intended_edges(edges: list[Edge], names: list[str]) -> list[Edge]:
    """The edges, with an end that names no node replaced by the node it most likely means
    (the same guess as the "did you mean" hint). Used only to infer kinds, never to run."""
    import dataclasses

    from .schema import closest

    known = set(names)

    def meant(node_id: str) -> str:
        return node_id if node_id in known else closest(node_id, names) or node_id

    return [dataclasses.replace(e, src=meant(e.src), dst=meant(e.dst)) for e in edges]


def _check_under_every_kind(node_id: str, table: dict[str, Any],
                            candidates: list[type[NodeType]], out: _Collector) -> None:
    """A node whose kind is unknown (``kind`` missing, edges silent): report the schema
    problems it has whichever kind is meant, such as a required option missing from both."""
    found: list[list[tuple[tuple[Hashable, ...], str, str]]] = []
    for t in candidates:
        problems: list[tuple[tuple[Hashable, ...], str, str]] = []
        check_node(node_id, {**table, "kind": t.kind.value}, t,
                   lambda path, msg, hint="": problems.append((tuple(path), msg, hint)))
        found.append(problems)
    for path, msg, hint in found[0]:
        if all((path, msg, hint) in other for other in found[1:]):
            out.error(path, msg, hint)


def _resolve_type(node_id: str, table: dict[str, Any], edges: list[Edge],
                  out: _Collector, ambiguous: dict[str, list[type[NodeType]]]
                  ) -> type[NodeType] | None:
    name, kind = table["type"], table.get("kind")
    candidates = registry.named(name)
    if not candidates:
        out.error(("nodes", node_id, "type"), f"unknown node type {name!r}",
                  " ".join(filter(None, [suggest(name, registry.names(), listing=False),
                                        "`kvgraph nodes` lists the types"])))
        return None
    if kind in [k.value for k in Kind]:
        match = [t for t in candidates if t.kind.value == kind]
        if not match:
            have = " or ".join(t.kind.value for t in candidates)
            out.error(("nodes", node_id, "kind"), f"type {name!r} is a {have}, not a {kind}")
            return None
        return match[0]
    if kind is not None:
        return None  # the schema layer reports the bad kind
    if len(candidates) == 1:
        return candidates[0]
    # A name that is both a source and a sink: the edges tell which one is meant.
    has_in = any(e.dst == node_id for e in edges)
    has_out = any(e.src == node_id and e.src_port != "errors" for e in edges)
    by_kind = {t.kind: t for t in candidates}
    if has_in and not has_out and Kind.SINK in by_kind:
        return by_kind[Kind.SINK]
    if has_out and not has_in and Kind.SOURCE in by_kind:
        return by_kind[Kind.SOURCE]
    kinds = " or ".join(f'kind = "{t.kind.value}"' for t in candidates)
    ambiguous[node_id] = candidates
    out.error(("nodes", node_id, "type"),
              f"type {name!r} names both a source and a sink, and the edges do not tell which",
              f"add {kinds}")
    return None


def _check_env(node_id: str, t: type[NodeType], opts: dict[str, Any], out: _Collector,
               environ: Mapping[str, str]) -> None:
    for key, raw in opts.items():
        values = [raw] if isinstance(raw, str) else [v for v in raw if isinstance(v, str)] \
            if isinstance(raw, list) else []
        spec = t.options.get(key, {})
        path = ("nodes", node_id, key)
        for value in values:
            if not spec.get("x-env"):
                if envvars.has_reference(value):
                    allowed = [k for k, s in t.options.items() if s.get("x-env")]
                    out.error(path, "environment references (${...}) are not allowed here",
                              "allowed in: " + ", ".join(allowed) if allowed
                              else f"{t.name} takes no environment references")
                continue
            if "\n" in value or "\r" in value:
                out.error(path, "value contains a newline", "credentials and URLs are one line")
                continue
            try:
                names = envvars.references(value)
            except ConfigError as exc:
                out.error(path, str(exc))
                continue
            for name in names:
                if name not in environ:
                    out.add(path, f"environment variable {name} is not set",
                            "`kvgraph run` will refuse to start without it", "warning")
                elif "\n" in environ[name] or "\r" in environ[name]:
                    out.error(path, f"environment variable {name} contains a newline")


def _check_acknowledgement(types: dict[str, type[NodeType]], nodes_doc: dict[str, Any],
                           schema_ok: set[str], edges: list[Edge], out: _Collector) -> None:
    """A source that acks only after delivery is only as good as the sinks below it."""
    for node_id in sorted(schema_ok):
        t = types[node_id]
        opts = {**t.defaults(),
                **{k: v for k, v in nodes_doc[node_id].items() if k not in COMMON_OPTIONS}}
        if not t.at_least_once(opts):
            continue
        seen, todo = {node_id}, [node_id]
        while todo:
            current = todo.pop()
            for e in edges:
                if e.src == current and e.dst in types and e.dst not in seen:
                    seen.add(e.dst)
                    todo.append(e.dst)
        for sink in sorted(seen):
            st = types[sink]
            if st.kind is Kind.SINK and not getattr(st, "confirms_delivery", True):
                out.add(("nodes", node_id), f"at-least-once does not hold: sink {sink!r} "
                        f"({st.name}) cannot confirm delivery, so its input is acked unconfirmed",
                        "route it from a node that does not need acknowledgement", "warning")


async def probe(graph: Graph, environ: Mapping[str, str] | None = None) -> list[Diagnostic]:
    """``validate --connect``: ask every node whether what it needs outside is there."""
    import asyncio

    from .runtime import resolve_config

    environ = os.environ if environ is None else environ
    diags: list[Diagnostic] = []

    async def one(node: Node) -> None:
        try:
            config = resolve_config(node, environ)
        except ConfigError as exc:
            diags.append(Diagnostic(graph.path, node.line, "error", f"nodes.{node.id}", str(exc)))
            return
        for p in await node.type.probe(config):
            diags.append(Diagnostic(graph.path, node.line, "error",
                                    f"nodes.{node.id}" + (f".{p.field}" if p.field else ""),
                                    p.message, 0, p.hint))

    await asyncio.gather(*(one(n) for n in graph.nodes.values()))
    return sorted(diags, key=sort_key)
