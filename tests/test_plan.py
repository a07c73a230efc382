"""`kvgraph plan OLD NEW`: what changing a graph file changes, the first step of recomposing a
running graph (issue 16)."""

from __future__ import annotations

import json
from pathlib import Path

from kvgraph.plan import plan
from kvgraph.testing import load_text

from .helpers import GraphFile


def relay(**changes: object) -> GraphFile:
    """engine -> keep (filter) -> router (nats) and audit (file): the graph both plans start
    from; ``changes`` replaces whole node tables."""
    g = (GraphFile("relay")
         .node("engine", "zmq", endpoint="tcp://127.0.0.1:5557")
         .node("keep", "filter", kinds=["stored"])
         .node("router", "nats", subject="kv.events", token="${NATS_TOKEN}")
         .node("audit", "file", path="audit.jsonl")
         .edge("engine", "keep").edge("keep", "router").edge("keep", "audit"))
    for nid, table in changes.items():
        if table is None:
            del g.nodes[nid]
            g.edges = [e for e in g.edges if nid not in (e["from"], e["to"])]
        else:
            g.nodes[nid] = table   # type: ignore[assignment]
    return g


ENV = {"NATS_TOKEN": "x"}


def test_unchanged_changed_added_removed_nodes_and_edges() -> None:
    old = relay()
    new = relay(audit=None, keep={"type": "filter", "kinds": ["stored", "removed"]},
                dead={"type": "file", "path": "dead.jsonl"})
    new.edge("keep.errors", "dead")
    new.edges[0]["capacity"] = 64
    p = plan(load_text(old.text(), ENV), load_text(new.text(), ENV))
    assert p.unchanged == ["engine", "router"]
    assert [c.id for c in p.changed] == ["keep"]
    assert p.changed[0].options == {"kinds": (["stored"], ["stored", "removed"])}
    assert p.added == ["dead (sink file)"] and p.removed == ["audit (sink file)"]
    assert p.edges_added == ["keep.errors -> dead"]
    assert p.edges_removed == ["keep -> audit"]
    assert p.edges_changed == ["engine -> keep: capacity 1024 -> 64"]


def test_a_default_written_out_or_a_new_description_is_no_change() -> None:
    new = relay(keep={"type": "filter", "kinds": ["stored"], "description": "GPU only"},
                router={"type": "nats", "subject": "kv.events", "token": "${NATS_TOKEN}",
                        "format": "dynamo-msgpack"})   # the default, written out
    p = plan(load_text(relay().text(), ENV), load_text(new.text(), ENV))
    assert p.empty and p.lines() == ["no change"]


def test_a_secret_is_compared_but_never_shown(tmp_path: Path, cli) -> None:
    old = relay().write(tmp_path, "old.toml")
    new = relay(router={"type": "nats", "subject": "kv.events",
                        "token": "hunter2"}).write(tmp_path, "new.toml")
    code, out, _ = cli("plan", str(old), str(new))
    assert code == 0 and "hunter2" not in out
    assert "change  node router (sink nats): token *** -> ***" in out
    code, out, _ = cli("plan", str(old), str(new), "--format", "json")
    assert code == 0 and json.loads(out)["changed"] == {"router": {"token": ["***", "***"]}}


def test_an_invalid_new_file_gives_its_errors_and_no_plan(tmp_path: Path, cli) -> None:
    old = relay().write(tmp_path, "old.toml")
    new = relay(keep={"type": "filter", "kinds": ["evicted"]}).write(tmp_path, "new.toml")
    code, out, err = cli("plan", str(old), str(new))
    assert code == 1 and out == ""
    assert "nodes.keep.kinds[0]: 'evicted' is not one of" in err
    assert "new.toml: invalid; no plan" in err
