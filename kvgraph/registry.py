"""The catalog of node types.

Types register themselves with :func:`register`. The core never names a type: the built-in
types are found by importing every module of ``kvgraph.sources``, ``kvgraph.transforms`` and
``kvgraph.sinks``, and third-party packages add theirs through the entry point group
``kvgraph.nodes`` (each entry point names a module to import, or a NodeType class to register).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TypeVar

from .errors import NodeTypeError
from .node import Kind, NodeType

ENTRY_POINT_GROUP = "kvgraph.nodes"
_BUILTIN_PACKAGES = ("kvgraph.sources", "kvgraph.transforms", "kvgraph.sinks")

_types: dict[tuple[str, Kind], type[NodeType]] = {}
_loaded = False

T = TypeVar("T", bound=type[NodeType])


def register(cls: T) -> T:
    """Class decorator: add a node type to the catalog. Checks the declaration up front."""
    for attr in ("name", "kind", "summary"):
        if not getattr(cls, attr, None):
            raise NodeTypeError(f"node type {cls.__qualname__} does not set `{attr}`")
    if not isinstance(cls.kind, Kind):
        raise NodeTypeError(f"node type {cls.name!r}: kind must be a kvgraph.node.Kind")
    key = (cls.name, cls.kind)
    existing = _types.get(key)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise NodeTypeError(
            f"{cls.kind} type {cls.name!r} is registered twice: by {existing.__module__} and by "
            f"{cls.__module__}; rename one of them")
    unknown = set(cls.required) - set(cls.options)
    if unknown:
        raise NodeTypeError(f"node type {cls.name!r}: required options not declared: {unknown}")
    _types[key] = cls
    return cls


def load() -> None:
    """Import the built-in node modules and the plugins, once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for pkg_name in _BUILTIN_PACKAGES:
        pkg = importlib.import_module(pkg_name)
        for mod in pkgutil.iter_modules(pkg.__path__):
            if not mod.name.startswith("_"):
                importlib.import_module(f"{pkg_name}.{mod.name}")
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plugin must not hide the built-in catalog
            raise NodeTypeError(f"plugin entry point {ep.name!r} ({ep.value}) failed to load: "
                                f"{exc}") from exc
        if isinstance(obj, type) and issubclass(obj, NodeType):
            register(obj)


def all_types(include_hidden: bool = False) -> list[type[NodeType]]:
    """Every registered type, sorted by kind (sources, transforms, sinks) then name.

    Hidden types (test helpers) run but stay out of the catalog, schemas and suggestions."""
    load()
    order = {Kind.SOURCE: 0, Kind.TRANSFORM: 1, Kind.SINK: 2}
    return sorted((t for t in _types.values() if include_hidden or not t.hidden),
                  key=lambda t: (order[t.kind], t.name))


def named(name: str) -> list[type[NodeType]]:
    """The types registered under ``name``: none, one, or a source and a sink."""
    return [t for t in all_types(include_hidden=True) if t.name == name]


def get(name: str, kind: Kind) -> type[NodeType] | None:
    load()
    return _types.get((name, kind))


def names() -> list[str]:
    return sorted({t.name for t in all_types()})
