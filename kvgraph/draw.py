"""Diagrams of a graph: Mermaid (for Markdown docs), DOT, and SVG/PNG through Graphviz.

Data first: :func:`layout` describes nodes and edges once (shape, label, style), and each
renderer only formats it. Sources, transforms and sinks have distinct shapes; an edge is
labelled with its port when that is not ``out``, and with capacity and when_full when they
differ from the defaults; edges from ``errors`` ports are dashed. Options are never drawn, so no
secret can leak into a diagram; a type may name the system outside it talks to
(:meth:`NodeType.outside`, built from options that are never secret), drawn under its type.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

from .errors import UsageError
from .graph import Graph
from .node import DEFAULT_PORT, ERRORS_PORT, Kind
from .schema import DEFAULT_CAPACITY, DEFAULT_CAPACITY_BYTES, DEFAULT_CAPACITY_EVENTS

FORMATS = ("mermaid", "dot", "svg", "png")

_MERMAID_SHAPE = {Kind.SOURCE: ('(["', '"])'), Kind.TRANSFORM: ('["', '"]'),
                  Kind.SINK: ('[("', '")]')}
_DOT_SHAPE = {Kind.SOURCE: "shape=box, style=\"rounded,filled\", fillcolor=\"#dbeafe\"",
              Kind.TRANSFORM: "shape=box, style=filled, fillcolor=\"#fef3c7\"",
              Kind.SINK: "shape=cylinder, style=filled, fillcolor=\"#dcfce7\""}
_MERMAID_CLASS = {Kind.SOURCE: "fill:#dbeafe,stroke:#1d4ed8",
                  Kind.TRANSFORM: "fill:#fef3c7,stroke:#b45309",
                  Kind.SINK: "fill:#dcfce7,stroke:#15803d"}


@dataclass(frozen=True)
class DrawnEdge:
    src: str
    dst: str
    label: str
    dashed: bool


def edge_label(port: str, capacity: int, when_full: str,
               capacity_events: int = DEFAULT_CAPACITY_EVENTS,
               capacity_bytes: int = DEFAULT_CAPACITY_BYTES) -> str:
    parts = []
    if port != DEFAULT_PORT:
        parts.append(port)
    if capacity != DEFAULT_CAPACITY:
        parts.append(f"cap {capacity}")
    if capacity_events != DEFAULT_CAPACITY_EVENTS:
        parts.append(f"cap {capacity_events} events")
    if capacity_bytes != DEFAULT_CAPACITY_BYTES:
        parts.append(f"cap {capacity_bytes} bytes")
    if when_full != "block":
        parts.append(when_full)
    return ", ".join(parts)


def layout(graph: Graph) -> list[DrawnEdge]:
    return [DrawnEdge(e.src, e.dst, edge_label(e.src_port, e.capacity, e.when_full,
                                               e.capacity_events, e.capacity_bytes),
                      e.src_port == ERRORS_PORT) for e in graph.edges]


def _mermaid_text(s: str) -> str:
    return s.replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")


def to_mermaid(graph: Graph) -> str:
    lines = ["flowchart LR"]
    if graph.description:
        lines.append(f"    %% {graph.name}: {graph.description}")
    for node in graph.nodes.values():
        open_, close = _MERMAID_SHAPE[node.kind]
        label = f"<b>{_mermaid_text(node.id)}</b><br/>{node.type.name}"
        if outside := node.type.outside(node.config):
            label += f"<br/><i>{_mermaid_text(outside)}</i>"
        lines.append(f"    {node.id}{open_}{label}{close}:::{node.kind.value}")
    for e in layout(graph):
        arrow = "-.->" if e.dashed else "-->"
        label = f"|{_mermaid_text(e.label)}|" if e.label else ""
        lines.append(f"    {e.src} {arrow}{label} {e.dst}")
    for kind, style in _MERMAID_CLASS.items():
        lines.append(f"    classDef {kind.value} {style}")
    return "\n".join(lines) + "\n"


def _dot_quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(graph: Graph) -> str:
    lines = [f"digraph {_dot_quote(graph.name)} {{",
             "    rankdir=LR;",
             '    node [fontname="Helvetica", fontsize=11];',
             '    edge [fontname="Helvetica", fontsize=9];']
    if graph.description:
        lines.append(f"    label={_dot_quote(graph.description)}; labelloc=t;")
    for node in graph.nodes.values():
        label = f"{node.id}\\n{node.type.name}"
        if outside := node.type.outside(node.config):
            label += "\\n" + outside.replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'    {_dot_quote(node.id)} [label="{label}", {_DOT_SHAPE[node.kind]}];')
    for e in layout(graph):
        attrs = []
        if e.label:
            attrs.append(f"label={_dot_quote(e.label)}")
        if e.dashed:
            attrs.append('style=dashed, color="#b91c1c"')
        suffix = f" [{', '.join(attrs)}]" if attrs else ""
        lines.append(f"    {_dot_quote(e.src)} -> {_dot_quote(e.dst)}{suffix};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(graph: Graph, fmt: str) -> bytes:
    """The diagram in ``fmt``; svg and png need Graphviz's ``dot`` on PATH."""
    if fmt == "mermaid":
        return to_mermaid(graph).encode()
    if fmt == "dot":
        return to_dot(graph).encode()
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    dot = shutil.which("dot")
    if dot is None:
        raise UsageError(f"--format {fmt} needs Graphviz's `dot`, which is not installed. "
                         "Install it (Debian/Ubuntu: apt-get install graphviz; macOS: brew "
                         "install graphviz), or use --format mermaid or --format dot.")
    proc = subprocess.run([dot, f"-T{fmt}"], input=to_dot(graph).encode(),
                          capture_output=True, timeout=60)
    if proc.returncode != 0:
        raise UsageError(f"Graphviz failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout
