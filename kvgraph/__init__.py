"""kvgraph: KV-cache event relays as declarative dataflow graphs.

The public API is re-exported here; modules not listed in ``__all__`` are internal. A node
type needs nothing else: the base classes (``Source``, ``Transform``, ``Sink``), ``register``,
the option helpers (``string``, ``integer``, ...), ``Problem`` and ``Bind`` for its checks,
``NodeContext`` (its ``ctx``: ``emit``, ``reject``, ``spawn``, ``call_later``), ``Event``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

# Names are imported on first use (PEP 562), so that `kvgraph validate` and `--help` do not pay
# for the runtime, msgspec or networkx before they need them.
_EXPORTS = {
    "Background": "embed", "open": "embed", "start": "embed",
    "ApiError": "errors", "ConfigError": "errors", "GraphError": "errors",
    "KvgraphError": "errors", "NodeFailure": "errors", "NodeTypeError": "errors",
    "UsageError": "errors", "ReloadError": "errors",
    "Event": "event", "Rejected": "event",
    "Kind": "node", "NodeType": "node", "Sink": "node", "Source": "node", "Transform": "node",
    "Problem": "node", "Bind": "node", "CheckContext": "node",
    "string": "node", "integer": "node", "number": "node", "boolean": "node", "array": "node",
    "table": "node", "one_or_many": "node", "worker_id": "node", "worker_id_value": "node",
    "register": "registry",
    "Runtime": "runtime", "RunResult": "runtime", "NodeContext": "runtime", "run": "runtime",
    "Timer": "tasks",
    "Validation": "validate", "load": "validate", "validate_file": "validate",
    "validate_text": "validate",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvgraph' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # pragma: no cover
    from .embed import Background, open, start
    from .errors import (ApiError, ConfigError, GraphError, KvgraphError, NodeFailure,
                         NodeTypeError, ReloadError, UsageError)
    from .event import Event, Rejected
    from .node import (Bind, CheckContext, Kind, NodeType, Problem, Sink, Source, Transform,
                       array, boolean, integer, number, one_or_many, string, table, worker_id,
                       worker_id_value)
    from .registry import register
    from .runtime import NodeContext, Runtime, RunResult, run
    from .tasks import Timer
    from .validate import Validation, load, validate_file, validate_text

__all__ = sorted([*_EXPORTS, "__version__"])
