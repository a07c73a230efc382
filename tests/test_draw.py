"""draw: Mermaid checked structurally, DOT rendered by Graphviz when it is installed."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from kvgraph import load
from kvgraph.draw import render, to_dot, to_mermaid

from .helpers import GRAPHS

FANOUT = GRAPHS / "fanout.toml"


def parse_mermaid(text: str) -> tuple[dict[str, tuple[str, str]], list[tuple[str, str, str, str]]]:
    """Nodes as {id: (shape-opening, class)} and edges as (src, arrow, label, dst)."""
    nodes, edges = {}, []
    for line in text.splitlines()[1:]:
        line = line.strip()
        if m := re.fullmatch(r'(\w+)(\(\[|\[\(|\[)"(.*)"(\]\)|\)\]|\]):::(\w+)', line):
            nodes[m.group(1)] = (m.group(2), m.group(5))
        elif m := re.fullmatch(r"(\w+) (-->|-\.->)(?:\|([^|]*)\|)? (\w+)", line):
            edges.append((m.group(1), m.group(2), m.group(3) or "", m.group(4)))
    return nodes, edges


def test_mermaid_structure() -> None:
    g = load(FANOUT)
    text = to_mermaid(g)
    assert text.startswith("flowchart LR\n")
    nodes, edges = parse_mermaid(text)
    assert set(nodes) == set(g.nodes)
    # one shape per kind
    assert nodes["engine0"] == ("([", "source")
    assert nodes["main_group"] == ("[", "transform")
    assert nodes["router"] == ("[(", "sink") and nodes["audit"] == ("[(", "sink")
    assert sorted(edges) == sorted([
        ("engine0", "-->", "", "main_group"),
        ("main_group", "-->", "", "router"),
        ("engine0", "-->", "cap 256, drop_oldest", "audit"),
        ("router", "-.->", "errors", "dead_letters"),
    ])
    assert "<b>engine0</b><br/>zmq" in text


def test_no_option_reaches_a_diagram() -> None:
    g = load(GRAPHS / "vllm-to-dynamo-nats.toml")
    for text in (to_mermaid(g), to_dot(g)):
        assert "127.0.0.1" not in text and "kv_events" not in text


def test_a_dynamo_node_shows_the_dynamo_endpoint_and_transport_it_feeds() -> None:
    g = load(GRAPHS / "vllm-to-dynamo.toml")
    assert "<i>Dynamo dynamo/backend/generate, zmq + file discovery</i>" in to_mermaid(g)
    assert 'label="router\\ndynamo\\nDynamo dynamo/backend/generate, zmq + file discovery"' \
        in to_dot(g)


def test_dot_is_valid_graphviz_input() -> None:
    dot = to_dot(load(FANOUT))
    assert dot.startswith('digraph "fanout" {')
    assert '"router" -> "dead_letters" [label="errors", style=dashed' in dot
    if shutil.which("dot") is None:
        pytest.skip("Graphviz is not installed; DOT text checked, not rendered")
    out = subprocess.run(["dot", "-Tsvg"], input=dot.encode(), capture_output=True, check=True)
    assert b"<svg" in out.stdout and b"dead_letters" in out.stdout


def test_svg_and_png_through_the_cli(cli, tmp_path) -> None:
    if shutil.which("dot") is None:
        code, _, err = cli("draw", "--format", "svg", str(FANOUT))
        assert code == 2 and "apt-get install graphviz" in err
        return
    code, _, _ = cli("draw", "--format", "png", "-o", str(tmp_path / "g.png"), str(FANOUT))
    assert code == 0 and (tmp_path / "g.png").read_bytes().startswith(b"\x89PNG")
    assert render(load(FANOUT), "svg").lstrip().startswith(b"<?xml")


def test_draw_refuses_an_invalid_graph(cli) -> None:
    from .helpers import TEST_GRAPHS

    code, out, err = cli("draw", str(TEST_GRAPHS / "bad" / "cycle.toml"))
    assert code == 1 and out == "" and "cycle: a -> b -> c -> a" in err


def test_draw_to_file(cli, tmp_path) -> None:
    code, out, _ = cli("draw", "-o", str(tmp_path / "g.mmd"), str(FANOUT))
    assert code == 0 and out == ""
    assert (tmp_path / "g.mmd").read_text().startswith("flowchart LR")
