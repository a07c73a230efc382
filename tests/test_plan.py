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


def post_graph(port: int, text: str, dry_run: bool = True) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    url = f"http://127.0.0.1:{port}/graph" + ("?dry_run=1" if dry_run else "")
    req = urllib.request.Request(url, data=text.encode(), method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_post_graph_dry_run_checks_a_new_version_against_what_runs() -> None:
    """POST /graph?dry_run=1 on the metrics server: the plan of a valid change; the errors,
    with lines, of an invalid one; a probe failure of an added node (its port is taken); none of
    them changes the running graph. Without dry_run the change is applied."""
    import asyncio
    import socket

    from kvgraph.status import serve_metrics
    from kvgraph.testing import run_text

    running = (GraphFile("live").node("engine", "api").node("keep", "filter", kinds=["stored"])
               .node("out", "null").edge("engine", "keep").edge("keep", "out"))
    grown = (GraphFile("live").node("engine", "api").node("keep", "filter", kinds=["stored"])
             .node("out", "null").node("audit", "file", path="audit.jsonl")
             .edge("engine", "keep").edge("keep", "out").edge("keep", "audit"))
    audited = (GraphFile("live").node("engine", "api").node("keep", "filter", kinds=["stored"])
               .node("out", "null").node("audit", "null")
               .edge("engine", "keep").edge("keep", "out").edge("keep", "audit"))
    typo = GraphFile("live").node("engine", "api").node("keep", "filter", kinds=["evicted"])
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port_taken = taken.getsockname()[1]
    blocked = (GraphFile("live").node("engine", "api").node("out", "null")
               .node("again", "zmq", kind="sink", endpoint=f"tcp://127.0.0.1:{port_taken}")
               .edge("engine", "out").edge("engine", "again"))

    async def go():
        async with run_text(running.text()) as rt:
            server = await serve_metrics(rt, "127.0.0.1", 0)
            try:
                answers = [await asyncio.to_thread(post_graph, server.port, g.text(), dry)
                           for g, dry in ((grown, True), (typo, True), (blocked, True))]
                nodes = sorted(rt.graph.nodes)
                answers.append(await asyncio.to_thread(post_graph, server.port,
                                                       audited.text(), False))
            finally:
                await server.close()
            return answers, nodes, sorted(rt.nodes)

    try:
        (ok, bad, probe, applied), before, after = asyncio.run(go())
    finally:
        taken.close()
    assert ok[0] == 200 and ok[1]["plan"]["added"] == ["audit (sink file)"]
    assert ok[1]["plan"]["edges_added"] == ["keep -> audit"] and ok[1]["applied"] is False
    assert bad[0] == 400 and not bad[1]["valid"]
    assert any(d["line"] and "'evicted' is not one of" in d["message"]
               for d in bad[1]["diagnostics"])
    assert probe[0] == 400 and any("again" in d["path"] for d in probe[1]["diagnostics"])
    assert before == ["engine", "keep", "out"]   # none of the checks changed anything
    assert applied[0] == 200 and applied[1]["result"] == "applied"
    assert applied[1]["summary"][0] == "add     node audit (sink null)"
    assert after == ["audit", "engine", "keep", "out"]
