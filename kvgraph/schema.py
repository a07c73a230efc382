"""JSON Schemas of graph files, generated from the node catalog, and the schema layer of validate.

Two schemas come out of here:

* :func:`graph_schema` is the complete schema of a graph file: the top level, edges, and every
  node type's options. It is what ``kvgraph schema`` prints and what ``schemas/graph.schema.json``
  holds, so that TOML editors (Taplo, Even Better TOML) validate and complete graph files.
* :func:`check_document` validates in two steps: the top level first, then each node against its
  own type's schema. Errors from one big ``anyOf`` would read "is not valid under any of the given
  schemas"; per-node validation can say "unknown option 'endpont', did you mean 'endpoint'?".
"""

from __future__ import annotations

import difflib
from functools import lru_cache
from typing import Any, Callable, Hashable, Iterable, Iterator, Sequence

from . import registry
from .node import COMMON_OPTIONS, Kind, NodeType

NODE_ID_PATTERN = r"^[a-z][a-z0-9_]*$"
GRAPH_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]*$"
PORT_REF_PATTERN = r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)?$"
DEFAULT_CAPACITY = 1024
DEFAULT_CAPACITY_EVENTS = 4096
DEFAULT_CAPACITY_BYTES = 256 * 1024 * 1024
WHEN_FULL = ["block", "drop_newest", "drop_oldest"]
SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

_HINTS = {
    NODE_ID_PATTERN: "a node id starts with a lowercase letter and uses only a-z, 0-9 and '_'",
    GRAPH_NAME_PATTERN: "a graph name uses only lowercase letters, digits, '-' and '_'",
    PORT_REF_PATTERN: 'write "node" or "node.port", e.g. "engine0" or "engine0.errors"',
}

EDGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "A bounded channel from an output port to a node's input.",
    "properties": {
        "from": {"type": "string", "pattern": PORT_REF_PATTERN,
                 "description": '"node" or "node.port"; the default port is "out".'},
        "to": {"type": "string", "pattern": PORT_REF_PATTERN,
               "description": "The receiving node (its only input port is `in`)."},
        "capacity": {"type": "integer", "minimum": 1, "default": DEFAULT_CAPACITY,
                     "description": "Channel size, in batches."},
        "capacity_events": {"type": "integer", "minimum": 1, "default": DEFAULT_CAPACITY_EVENTS,
                            "description": "The same bound in events, since batches vary in "
                                           "size and memory follows events; full at either "
                                           "bound."},
        "capacity_bytes": {"type": "integer", "minimum": 1024, "default": DEFAULT_CAPACITY_BYTES,
                           "description": "The same bound in bytes of decoded events, estimated "
                                          "from their token ids and hashes (an event of 4,096 "
                                          "blocks holds about 2.5 MB); full at any bound."},
        "when_full": {"enum": WHEN_FULL, "default": "block",
                      "description": "What a full channel does: `block` the sender (backpressure), "
                                     "or drop the newest or oldest batch (counted as lost)."},
    },
    "required": ["from", "to"],
    "additionalProperties": False,
}

GRAPH_TABLE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": GRAPH_NAME_PATTERN,
                 "description": "The graph's name: lowercase letters, digits, '-' and '_'."},
        "description": {"type": "string", "description": "What this graph is for."},
    },
    "required": ["name"],
    "additionalProperties": False,
}


def _top(node_schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "graph": GRAPH_TABLE_SCHEMA,
            "nodes": {"type": "object", "minProperties": 1,
                      "propertyNames": {"pattern": NODE_ID_PATTERN},
                      "additionalProperties": node_schema,
                      "description": "The nodes, keyed by id."},
            "edges": {"type": "array", "items": EDGE_SCHEMA,
                      "description": "The channels between nodes."},
        },
        "required": ["graph", "nodes"],
        "additionalProperties": False,
    }


def _base_schema() -> dict[str, Any]:
    """Top level only: a node must be a table with a string ``type``; its options come later."""
    node = {"type": "object", "required": ["type"],
            "properties": {"type": COMMON_OPTIONS["type"], "kind": COMMON_OPTIONS["kind"]}}
    return _top(node)


def graph_schema() -> dict[str, Any]:
    """The complete schema of a graph file, for editors and for ``kvgraph schema``."""
    types = registry.all_types()
    defs: dict[str, Any] = {f"{t.kind}.{t.name}": t.schema() for t in types}
    branches = []
    for name in registry.names():
        refs = [{"$ref": f"#/$defs/{t.kind}.{t.name}"} for t in registry.named(name)]
        then = refs[0] if len(refs) == 1 else {"anyOf": refs}
        branches.append({"if": {"properties": {"type": {"const": name}}, "required": ["type"]},
                         "then": then})
    node = {
        "type": "object",
        "required": ["type"],
        "properties": {"type": {"enum": registry.names(),
                                "description": COMMON_OPTIONS["type"]["description"]}},
        "allOf": branches,
    }
    schema = {"$schema": SCHEMA_DIALECT,
              "$id": "https://github.com/kvgraph/kvgraph/schemas/graph.schema.json",
              "title": "kvgraph graph",
              "description": "A kvgraph dataflow graph: nodes (sources, transforms, sinks) and "
                             "the edges between them. Generated by `kvgraph schema`.",
              **_top(node)}
    schema["$defs"] = {"edge": EDGE_SCHEMA, **defs}
    return schema


# -- validation ---------------------------------------------------------------------------------

Report = Callable[[Sequence[Hashable], str, str], None]
"""report(path, message, hint) records one error at a document path."""


@lru_cache(maxsize=None)
def _validator(key: str) -> Any:
    from jsonschema import Draft202012Validator

    if key == "":
        schema = _base_schema()
    else:
        kind, name = key.split(".", 1)
        t = registry.get(name, Kind(kind))
        assert t is not None
        schema = t.schema()
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def check_top(doc: dict[str, Any], report: Report) -> None:
    """Validate the top level of a document (graph table, node ids, edges)."""
    _explain_all(_validator("").iter_errors(doc), (), report, secrets=frozenset())


def check_node(node_id: str, node: dict[str, Any], t: type[NodeType], report: Report) -> None:
    """Validate one node table against its type's schema."""
    secrets = frozenset(k for k, s in t.options.items() if s.get("x-secret"))
    _explain_all(_validator(f"{t.kind}.{t.name}").iter_errors(node), ("nodes", node_id),
                 report, secrets)


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The choice ``word`` most likely misspells, if one is close enough."""
    close = difflib.get_close_matches(word, sorted(set(choices)), n=1, cutoff=0.6)
    return close[0] if close else None


def suggest(word: str, choices: Iterable[str], listing: bool = True) -> str:
    """A 'did you mean' hint, or (with ``listing``) the choices when nothing is close."""
    choices = sorted(set(choices))
    close = closest(word, choices)
    if close:
        return f"did you mean {close!r}?"
    if listing and len(choices) <= 12:
        return "valid: " + ", ".join(choices)
    return ""


_TOML_TYPES = {"string": "a string", "integer": "an integer", "number": "a number",
               "boolean": "a boolean", "array": "an array", "object": "a table", "null": "null"}


def _toml_type(value: Any) -> str:
    for py, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"),
                     (list, "array"), (dict, "object")):
        if isinstance(value, py):
            return _TOML_TYPES[name]
    return type(value).__name__


def _explain_all(errors: Iterator[Any], prefix: tuple[Hashable, ...], report: Report,
                 secrets: frozenset[str]) -> None:
    for err in sorted(errors, key=lambda e: list(map(str, e.absolute_path))):
        _explain(err, prefix, report, secrets)


def _explain(err: Any, prefix: tuple[Hashable, ...], report: Report,
             secrets: frozenset[str]) -> None:
    """Turn one jsonschema error into a message a user can act on."""
    path = prefix + tuple(err.absolute_path)
    v, inst, schema = err.validator, err.instance, err.schema
    secret = bool(set(map(str, err.absolute_path)) & secrets)
    shown = "(secret value hidden)" if secret else repr(inst)
    if v == "additionalProperties":
        allowed = set(schema.get("properties", {}))
        for key in sorted(set(inst) - allowed):
            report(path + (key,), f"unknown key {key!r}", suggest(key, allowed))
    elif v == "required":
        missing = err.message.split("'")[1] if "'" in err.message else err.message
        report(path, f"missing required key {missing!r}", "")
    elif v == "type":
        want = err.validator_value
        want = " or ".join(_TOML_TYPES.get(w, w) for w in (want if isinstance(want, list) else [want]))
        report(path, f"must be {want}, not {_toml_type(inst)}" +
               ("" if secret else f" ({inst!r})"), "")
    elif v == "enum":
        choices = [str(c) for c in err.validator_value]
        close = suggest(str(inst), choices, listing=False)
        report(path, f"{shown} is not one of {', '.join(map(repr, choices))}",
               close if not secret else "")
    elif v == "const":
        report(path, f"must be {err.validator_value!r}, not {shown}", "")
    elif v == "pattern" and "propertyNames" in err.schema_path:
        report(path + (inst,), f"invalid id {inst!r}", _HINTS.get(err.validator_value, ""))
    elif v == "pattern":
        report(path, f"{shown} is not valid", _HINTS.get(err.validator_value,
                                                         f"must match {err.validator_value}"))
    elif v == "propertyNames":
        for sub in err.context:
            report(path + (sub.instance,), f"invalid id {sub.instance!r}",
                   _HINTS.get(sub.validator_value, ""))
    elif v in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        op = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">",
              "exclusiveMaximum": "<"}[v]
        report(path, f"must be {op} {err.validator_value}, not {shown}", "")
    elif v == "minItems":
        report(path, f"needs at least {err.validator_value} item(s)", "")
    elif v == "minProperties":
        report(path, f"needs at least {err.validator_value} entry", "")
    elif v == "minLength":
        report(path, "must not be empty" if err.validator_value == 1
               else f"must be at least {err.validator_value} characters", "")
    elif v == "uniqueItems":
        report(path, "has duplicate items", "")
    elif v in ("anyOf", "oneOf") and err.context:
        from jsonschema.exceptions import best_match

        _explain(best_match(err.context), prefix, report, secrets)
    else:
        report(path, err.message if not secret else f"invalid value ({v})", "")
