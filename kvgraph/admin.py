"""``POST /graph`` on a running graph's HTTP server (the one of ``--metrics-port``): send a new
version of the graph file; it is checked against what runs, then applied (:mod:`kvgraph.reload`).

* ``?dry_run=1`` only checks: the text is validated as ``kvgraph validate`` would (400 with
  every diagnostic, lines included, when it is invalid), the nodes it adds are probed as
  ``validate --connect`` would (servers answer, ports are free: 400 when not; changed nodes are
  not probed, since their running instance still holds what they need), and the answer is the
  plan (200), ``"applied": false``.
* Without it the change is applied: 200 with the outcome (``result`` ``applied`` or
  ``unchanged``, the plan, how long it took); 400 when the text is invalid; 409 when it could
  not be applied (a new node failed to start, a sink to replace cannot confirm now). On 400 and
  409 nothing changed.

The server listens where ``--metrics-host`` says (127.0.0.1 by default): whoever can reach it
can change the graph, as whoever can send the process a SIGHUP after editing its file.
"""

from __future__ import annotations

from typing import Any

#: The largest graph text accepted (graph files are limited to 1 MiB as well).
MAX_GRAPH_BYTES = 1024 * 1024


async def check_change(rt: Any, text: str, source: str = "POST /graph"
                       ) -> tuple[int, dict[str, Any]]:
    """(HTTP status, answer) for a new graph text against the running graph ``rt``."""
    from .diagnostics import as_json
    from .graph import Graph
    from .plan import plan
    from .validate import probe, validate_text

    result = validate_text(text, file=source, environ=rt.environ)
    if result.graph is None:
        return 400, {"valid": False, **as_json(result.diagnostics)}
    p = plan(rt.graph, result.graph)
    added = {nid: n for nid, n in result.graph.nodes.items() if nid not in rt.graph.nodes}
    found = await probe(Graph(result.graph.name, added, []), rt.environ) if added else []
    diagnostics = as_json(list(result.diagnostics) + found)
    if found:
        return 400, {"valid": False, **diagnostics, "plan": p.as_json()}
    return 200, {"valid": True, **diagnostics, "plan": p.as_json(),
                 "summary": p.lines(), "applied": False}


async def handle_post_graph(rt: Any, request: Any) -> Any:
    """The aiohttp handler (see the module's docstring)."""
    from aiohttp import web

    if request.content_length is not None and request.content_length > MAX_GRAPH_BYTES:
        return web.json_response({"error": f"graph text over {MAX_GRAPH_BYTES} bytes"},
                                 status=413)
    try:
        text = (await request.read()).decode()
    except UnicodeDecodeError:
        return web.json_response({"error": "the graph text must be UTF-8"}, status=400)
    if request.query.get("dry_run", "") not in ("", "0", "false"):
        status, body = await check_change(rt, text)
        return web.json_response(body, status=status)
    from .errors import ReloadError

    try:
        outcome = await rt.reconfigure(text, source="POST /graph")
    except ReloadError as exc:
        out = exc.outcome
        return web.json_response({"valid": out.result != "invalid", **out.as_json()},
                                 status=400 if out.result == "invalid" else 409)
    return web.json_response({"valid": True, **outcome.as_json()})
