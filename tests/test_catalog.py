"""The node catalog: complete declarations, the committed schema, `kvgraph nodes`, plugins."""

from __future__ import annotations

import json

import pytest
from jsonschema import Draft202012Validator

from kvgraph import Kind, NodeType, register, registry, validate_text
from kvgraph.errors import NodeTypeError
from kvgraph.schema import graph_schema

from .helpers import GRAPHS, ROOT

CATALOG = {
    "source": {"zmq", "api", "nats", "file", "synthetic", "dynamo", "redis", "kafka"},
    "transform": {"filter", "dedup", "batch", "python"},
    "sink": {"nats", "zmq", "file", "stdout", "null", "index", "dynamo", "redis", "kafka"},
}
REQUIRED_OPTIONS = {
    ("source", "zmq"): {"endpoint", "topic", "bind", "replay_endpoint", "worker_id",
                        "dp_rank_port_offset", "hwm"},
    ("source", "api"): {"worker_id"},
    ("source", "nats"): {"url", "subject", "queue_group", "jetstream", "durable", "format"},
    ("source", "file"): {"path", "format", "rate", "loop"},
    ("source", "synthetic"): {"workers", "rate", "block_size", "seed", "duration_s"},
    ("transform", "filter"): {"kinds", "medium", "group_idx", "worker_id", "lora_name"},
    ("transform", "batch"): {"max_events", "max_delay_ms"},
    ("transform", "python"): {"function"},
    ("sink", "nats"): {"url", "subject", "format", "jetstream", "user", "password", "token",
                       "creds_file"},
    ("sink", "zmq"): {"endpoint"},
    ("sink", "dynamo"): {"namespace", "component", "endpoint", "transport", "discovery",
                         "discovery_path", "etcd_endpoints"},
    ("sink", "file"): {"path"},
    ("sink", "redis"): {"url", "stream", "format"},
    ("source", "redis"): {"url", "stream", "group", "consumer", "format"},
    ("sink", "kafka"): {"bootstrap_servers", "topic", "format"},
    ("source", "kafka"): {"bootstrap_servers", "topic", "group_id", "format"},
}


def test_catalog_is_complete() -> None:
    got = {k.value: {t.name for t in registry.all_types() if t.kind is k} for k in Kind}
    assert got == CATALOG
    for (kind, name), options in REQUIRED_OPTIONS.items():
        t = registry.get(name, Kind(kind))
        assert t is not None and options <= set(t.options), (kind, name)


@pytest.mark.parametrize("t", registry.all_types(), ids=lambda t: f"{t.kind}-{t.name}")
def test_every_type_is_fully_declared(t: type[NodeType]) -> None:
    Draft202012Validator.check_schema(t.schema())
    assert t.summary and t.__module__.startswith(f"kvgraph.{t.kind.value}s.")
    for name, s in t.options.items():
        assert s.get("description"), f"{t.name}.{name} has no description"
        if "default" in s:  # every default is valid against its own option schema
            assert not list(Draft202012Validator(s).iter_errors(s["default"])), name
    assert "errors" in t.output_ports()
    assert ("out" in t.output_ports()) == (t.kind is not Kind.SINK)
    if t.example:  # the documented example validates
        assert t.example


def test_committed_schema_matches_the_catalog() -> None:
    committed = json.loads((ROOT / "schemas" / "graph.schema.json").read_text())
    assert committed == graph_schema(), "run: kvgraph schema -o schemas/graph.schema.json"


def test_editor_schema_accepts_the_examples_and_rejects_typos() -> None:
    import tomllib

    v = Draft202012Validator(graph_schema())
    for path in GRAPHS.glob("*.toml"):
        assert not list(v.iter_errors(tomllib.loads(path.read_text()))), path
    bad = tomllib.loads('[graph]\nname="x"\n[nodes.a]\ntype="zmq"\nendpont="tcp://h:1"\n')
    assert list(v.iter_errors(bad))


def test_nodes_command(cli) -> None:
    code, out, _ = cli("nodes")
    assert code == 0
    for names in CATALOG.values():
        for name in names:
            assert f"  {name}" in out
    code, out, _ = cli("nodes", "zmq")
    assert code == 0 and "zmq (source)" in out and "zmq (sink)" in out
    assert "endpoint  (string; required)" in out and "hwm  (integer >= 0; default 100000)" in out
    code, _, err = cli("nodes", "zqm")
    assert code == 2 and "did you mean 'zmq'" in err
    code, out, _ = cli("nodes", "--format", "json", "filter")
    assert json.loads(out)[0]["kind"] == "transform"


def test_node_examples_validate() -> None:
    for t in registry.all_types():
        kind = f'kind = "{t.kind}"\n' if len(registry.named(t.name)) > 1 else ""
        text = f'[graph]\nname = "ex"\n[nodes.n]\ntype = "{t.name}"\n{kind}{t.example}\n'
        result = validate_text(text, environ={})
        assert result.ok, (t.name, [d.format() for d in result.errors])


def test_a_plugin_type_registers_without_touching_the_core() -> None:
    @register
    class Sample(NodeType):
        name = "test_sample"
        kind = Kind.TRANSFORM
        summary = "Keep one event in N."
        options = {"every": {"type": "integer", "minimum": 1, "description": "N."}}
        required = ("every",)

    try:
        ok = validate_text('[graph]\nname="p"\n[nodes.s]\ntype="synthetic"\n'
                           '[nodes.t]\ntype="test_sample"\nevery=2\n[nodes.o]\ntype="null"\n'
                           '[[edges]]\nfrom="s"\nto="t"\n[[edges]]\nfrom="t"\nto="o"\n')
        assert ok.ok, ok.diagnostics
        bad = validate_text('[graph]\nname="p"\n[nodes.t]\ntype="test_sample"\n')
        assert any("missing required key 'every'" in d.message for d in bad.errors)
    finally:
        registry._types.pop(("test_sample", Kind.TRANSFORM))


def test_broken_declarations_are_refused() -> None:
    with pytest.raises(NodeTypeError, match="does not set `summary`"):
        @register
        class NoSummary(NodeType):
            name = "x"
            kind = Kind.SINK
    with pytest.raises(NodeTypeError, match="registered twice"):
        @register
        class Clash(NodeType):
            name = "null"
            kind = Kind.SINK
            summary = "clash"


def test_public_api_is_pinned() -> None:
    import kvgraph

    assert sorted(kvgraph.__all__) == sorted([
        "ApiError", "Background", "ConfigError", "Event", "GraphError", "Kind", "KvgraphError",
        "NodeFailure", "NodeType", "NodeTypeError", "Rejected", "RunResult", "Runtime", "Sink",
        "Source", "Transform", "UsageError", "Validation", "__version__", "load", "open",
        "register", "start", "validate_file", "validate_text",
        # what a node type needs (issue 14): checks, option helpers, its context, timers
        "Bind", "CheckContext", "NodeContext", "Problem", "Timer", "array", "boolean",
        "integer", "number", "one_or_many", "run", "string", "table", "worker_id",
        "worker_id_value",
        # what a reload raises when nothing was applied (issue 16)
        "ReloadError"])
    for name in kvgraph.__all__:
        assert getattr(kvgraph, name) is not None, name


def test_checks_get_the_options_with_defaults_applied() -> None:
    seen: list[dict] = []

    @register
    class Defaults(NodeType):
        name = "test_defaults"
        kind = Kind.SINK
        summary = "Records what check() is given."
        options = {"every": {"type": "integer", "default": 3, "description": "N."}}

        @classmethod
        def check(cls, options, ctx):
            seen.append(dict(options))
            return ()

    try:
        validate_text('[graph]\nname="p"\n[nodes.t]\ntype="test_defaults"\n')
        assert seen == [{"every": 3}]
    finally:
        registry._types.pop(("test_defaults", Kind.SINK))


def test_kvgraph_nodes_lists_the_metrics_a_type_adds() -> None:
    from kvgraph.catalog import describe

    page = describe(registry.get("zmq", Kind.SOURCE))
    assert "seq_gaps_total  (counter)" in page and "read_ahead_bytes  (gauge)" in page
