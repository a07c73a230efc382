"""How a node type declares itself.

A node type is a subclass of :class:`NodeType` registered with :func:`kvgraph.registry.register`.
Its class attributes are the single declaration of the type: the JSON Schema of its options
(``options`` and ``required``), its kind and its ports. Validation, ``kvgraph nodes``, the
committed schema files and the docs are all generated from this one place, so they cannot drift.

The option helpers below (``string``, ``integer``...) only build JSON Schema dicts; they exist so
that declarations read like a table of options, with the description next to the default.
Two extension keywords mark string options:

* ``x-env``: the value may contain ``${NAME}``, replaced from the environment at run time;
* ``x-secret``: the value is a credential; it is never printed by ``validate``, ``draw`` or logs.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Mapping

if TYPE_CHECKING:
    from .runtime import NodeContext

JsonSchema = dict[str, Any]


class Kind(str, Enum):
    SOURCE = "source"
    TRANSFORM = "transform"
    SINK = "sink"

    def __str__(self) -> str:
        return self.value


#: Keys every node table may carry, around the type's own options.
COMMON_OPTIONS: dict[str, JsonSchema] = {
    "type": {"type": "string", "description": "The node type, from `kvgraph nodes`."},
    "kind": {"enum": [k.value for k in Kind],
             "description": "Only needed when a type name is both a source and a sink (for "
                            "example `zmq`) and the edges do not make it clear."},
    "description": {"type": "string", "description": "Free text shown by `draw --details`."},
    "on_error": {"enum": ["skip", "fail"],
                 "description": "What a failure in this node does to the graph: `skip` logs, "
                                "counts and continues; `fail` stops the graph. Default: `skip` "
                                "for bad events, `fail` for connections broken after retries."},
}

DEFAULT_PORT = "out"
ERRORS_PORT = "errors"
INPUT_PORT = "in"


@dataclass(frozen=True)
class Problem:
    """A semantic problem found by a type's :meth:`NodeType.check`. ``field`` may be ''."""

    field: str
    message: str
    severity: str = "error"
    hint: str = ""


@dataclass(frozen=True)
class Metric:
    """A metric a node type adds to the contract (``ctx.metrics.extra[name]``): its Prometheus
    type and HELP text. Declared once, in the type's ``metrics``; the exporter reads them."""

    kind: str   # "counter" (only grows) or "gauge"
    help: str


def counter(help: str) -> Metric:
    return Metric("counter", help)


def gauge(help: str) -> Metric:
    return Metric("gauge", help)


@dataclass(frozen=True)
class Bind:
    """An address a node will bind, so that two nodes binding the same one can be reported."""

    field: str
    address: str


@dataclass
class CheckContext:
    """What a type's check may want beyond its own options."""

    node_id: str


class NodeType:
    """Base class of every node type: the declaration (class attributes) and the behaviour.

    ``name`` is what users write as ``type``. A name may be used by one source and one sink (the
    ``zmq`` source reads engines, the ``zmq`` sink re-publishes); ``kind`` tells them apart.
    Subclass :class:`Source`, :class:`Transform` or :class:`Sink`, not this class.

    An instance is one running node. The runtime builds it with a :class:`NodeContext` that holds
    the node id, its resolved ``config`` (defaults applied, ``${ENV}`` interpolated), its metrics
    and the ``emit``/``reject`` functions. Heavy imports (pyzmq, nats) belong in :meth:`start`,
    so that ``validate`` never pays for them.
    """

    name: ClassVar[str]
    kind: ClassVar[Kind]
    summary: ClassVar[str]
    options: ClassVar[Mapping[str, JsonSchema]] = {}
    required: ClassVar[tuple[str, ...]] = ()
    #: The metrics the type adds to the contract, by ``extra`` name (see :class:`Metric`).
    metrics: ClassVar[Mapping[str, Metric]] = {}
    #: Output ports besides the standard ones (``out`` unless a sink, and ``errors``).
    extra_ports: ClassVar[tuple[str, ...]] = ()
    #: An example node table body, shown by ``kvgraph nodes NAME``.
    example: ClassVar[str] = ""
    #: Hidden types (test helpers) run, but stay out of the catalog and the schemas.
    hidden: ClassVar[bool] = False
    #: With ``kvgraph run --workers N``, each source node runs whole in one worker process,
    #: and every other node runs as a copy in every worker. A transform or sink may be copied
    #: when its state is per engine (worker_id) and it holds nothing exclusive: not a file it
    #: writes, a port it binds, or an index it serves. Such types set this to True.
    replicable: ClassVar[bool] = False
    #: The node answers requests (an HTTP API) for as long as the graph runs. Such a sink with
    #: no input edges runs until the graph is asked to stop (Ctrl-C), and needs no input:
    #: a graph of an ``index`` node alone is a standalone indexer.
    serves: ClassVar[bool] = False
    #: The node prints to the process's standard output: ``kvgraph run --status auto`` then
    #: keeps the live screen off a terminal that the node's output shares.
    writes_terminal: ClassVar[bool] = False

    @classmethod
    def output_ports(cls) -> tuple[str, ...]:
        base = (ERRORS_PORT,) if cls.kind is Kind.SINK else (DEFAULT_PORT, ERRORS_PORT)
        return base + tuple(cls.extra_ports)

    @classmethod
    def input_ports(cls) -> tuple[str, ...]:
        return () if cls.kind is Kind.SOURCE else (INPUT_PORT,)

    @classmethod
    def schema(cls) -> JsonSchema:
        """The JSON Schema of one node table of this type, common keys included."""
        props: dict[str, JsonSchema] = dict(COMMON_OPTIONS)
        props["type"] = {"const": cls.name, "description": COMMON_OPTIONS["type"]["description"]}
        props["kind"] = {"const": cls.kind.value, "description": COMMON_OPTIONS["kind"]["description"]}
        props.update(cls.options)
        return {
            "title": f"{cls.kind} {cls.name}",
            "description": cls.summary,
            "type": "object",
            "properties": props,
            "required": ["type", *cls.required],
            "additionalProperties": False,
        }

    @classmethod
    def check(cls, options: Mapping[str, Any], ctx: CheckContext) -> Iterable[Problem]:
        """Semantic checks beyond the schema (endpoint syntax, option combinations).

        Called only when the node's options passed the schema, so types may rely on it.
        ``options`` has the type's defaults applied (as ``binds``, ``probe``, ``outside`` and
        ``at_least_once`` get them): read ``options["x"]``, never restate a default.
        """
        return ()

    @classmethod
    def outside(cls, config: Mapping[str, Any]) -> str:
        """The system outside kvgraph this node talks to, in a few words for diagrams (`draw`
        shows it under the type). Built only from options that are never secret; empty (the
        default) shows nothing."""
        return ""

    @classmethod
    def binds(cls, options: Mapping[str, Any]) -> Iterable[Bind]:
        """Addresses this node binds; the validator reports any address bound twice."""
        return ()

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {k: s["default"] for k, s in cls.options.items() if "default" in s}

    @classmethod
    def implemented(cls) -> bool:
        """False for a type that is declared (validates, draws) but cannot run yet."""
        return True

    @classmethod
    async def probe(cls, config: Mapping[str, Any]) -> list[Problem]:
        """``validate --connect``: check that what this node needs outside is there (servers
        answer, streams exist, ports are free), without running it. ``config`` is resolved."""
        return []

    @classmethod
    def at_least_once(cls, options: Mapping[str, Any]) -> bool:
        """True for a source that acks its input only after every sink confirmed it (then
        ``validate`` warns about sinks downstream that cannot confirm)."""
        return False

    # -- runtime ------------------------------------------------------------------------------

    def __init__(self, ctx: "NodeContext") -> None:
        self.ctx = ctx
        self.id = ctx.node_id
        self.config = ctx.config
        self.metrics = ctx.metrics
        self.log = ctx.log

    async def start(self) -> None:
        """Open connections and bind sockets. Sinks start first, then transforms, then sources."""

    async def stop(self) -> None:
        """Release resources. Called once, after the node finished (or on abort)."""

    async def adopt(self, old: "NodeType") -> None:
        """A reload replaces ``old`` (the same type, other options) by this instance: take
        over the state that must not start again (sequence tracking, event-id counters, a
        dedup memory), and resources the new options leave as they were (a socket). Called
        after ``old`` stopped reading, before ``old.stop()``, except when the two bind the same
        address: then ``old`` has stopped and only its state can be taken. Take nothing the
        new options make wrong. Default: nothing (a fresh start)."""


class Source(NodeType):
    """Produces batches: :meth:`run` emits with ``await self.ctx.emit(batch)`` until it is done
    (a finite source returns) or ``self.ctx.stopping`` is set."""

    kind = Kind.SOURCE

    @classmethod
    def implemented(cls) -> bool:
        return cls.run is not Source.run

    async def run(self) -> None:
        raise NotImplementedError

    def on_stop(self) -> None:
        """Called when the graph is asked to stop: wake :meth:`run` if it is waiting."""


class Transform(NodeType):
    """Maps each batch to zero or more batches per port: :meth:`process` emits them."""

    kind = Kind.TRANSFORM

    @classmethod
    def implemented(cls) -> bool:
        return cls.process is not Transform.process

    async def process(self, batch: list[Any]) -> None:
        raise NotImplementedError

    async def finish(self) -> None:
        """Every input is closed and drained: emit anything still held."""


class Sink(NodeType):
    """Consumes batches: :meth:`write` hands a batch on, :meth:`flush` confirms that everything
    written so far was delivered. A sink counts as delivered only what a flush confirmed."""

    kind = Kind.SINK
    #: False for a sink whose flush cannot prove delivery (a ZMQ PUB drops silently).
    confirms_delivery: ClassVar[bool] = True

    @classmethod
    def implemented(cls) -> bool:
        return cls.write is not Sink.write

    async def write(self, batch: list[Any]) -> None:
        raise NotImplementedError

    async def flush(self) -> None:
        """Return once everything written is delivered; raise NodeFailure if it cannot be."""

    def can_confirm(self) -> bool:
        """False while a flush could only wait (a broken connection): the runtime then keeps
        handing batches to :meth:`write`, which holds them up to its own bound, and confirms
        later. At the end of the input the runtime flushes regardless."""
        return True


# -- option helpers ---------------------------------------------------------------------------

def _opt(base: JsonSchema, doc: str, default: Any, extra: Mapping[str, Any]) -> JsonSchema:
    s = dict(base, description=doc)
    if default is not None:
        s["default"] = default
    s.update({k: v for k, v in extra.items() if v is not None})
    return s


def string(doc: str, default: str | None = None, *, enum: list[str] | None = None,
           pattern: str | None = None, env: bool = False, secret: bool = False,
           min_length: int | None = None, examples: list[str] | None = None) -> JsonSchema:
    base: JsonSchema = {"enum": enum} if enum else {"type": "string"}
    s = _opt(base, doc, default, {"pattern": pattern, "minLength": min_length,
                                  "examples": examples})
    if env:
        s["x-env"] = True
    if secret:
        s["x-secret"] = True
        s["writeOnly"] = True
    return s


def integer(doc: str, default: int | None = None, *, minimum: int | None = None,
            maximum: int | None = None) -> JsonSchema:
    return _opt({"type": "integer"}, doc, default, {"minimum": minimum, "maximum": maximum})


def number(doc: str, default: float | None = None, *, minimum: float | None = None,
           exclusive_minimum: float | None = None) -> JsonSchema:
    return _opt({"type": "number"}, doc, default,
                {"minimum": minimum, "exclusiveMinimum": exclusive_minimum})


def boolean(doc: str, default: bool | None = None) -> JsonSchema:
    return _opt({"type": "boolean"}, doc, default, {})


def array(doc: str, items: JsonSchema, default: list[Any] | None = None, *,
          min_items: int | None = None, unique: bool = False) -> JsonSchema:
    s = _opt({"type": "array", "items": items}, doc, default, {"minItems": min_items})
    if unique:
        s["uniqueItems"] = True
    return s


def worker_id(doc: str, default: int | None = None) -> JsonSchema:
    """A worker id: an integer, or a hex string such as ``"0x9e9a78b2cd7b3f09"``. Dynamo's
    instance ids are unsigned 64-bit (its discovery names them in hex), and TOML integers stop
    at 2^63-1. Read it with :func:`worker_id_value`."""
    s = _opt({"anyOf": [{"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
                        {"type": "string", "pattern": "^0x[0-9a-fA-F]{1,16}$"}]},
             doc + " An integer, or a hex string (\"0x...\") for ids past 2^63-1, such as "
             "Dynamo's instance ids.", default, {})
    return s


def worker_id_value(value: int | str) -> int:
    """The integer of a :func:`worker_id` option."""
    return int(value, 16) if isinstance(value, str) else value


def one_or_many(doc: str, items: JsonSchema, default: Any = None) -> JsonSchema:
    """A single value or a list of them (``url = "nats://a"`` or ``url = ["nats://a", ...]``)."""
    s = _opt({"anyOf": [items, {"type": "array", "items": items, "minItems": 1}]},
             doc, default, {})
    for flag in ("x-env", "x-secret"):
        if items.get(flag):
            s[flag] = True
    return s


def table(doc: str, properties: Mapping[str, JsonSchema], required: list[str] | None = None
          ) -> JsonSchema:
    s: JsonSchema = {"type": "object", "description": doc, "properties": dict(properties),
                     "additionalProperties": False}
    if required:
        s["required"] = required
    return s
