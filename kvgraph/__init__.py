"""kvgraph: KV-cache event relays as declarative dataflow graphs.

The public API is re-exported here; modules not listed in ``__all__`` are internal.
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
    "UsageError": "errors",
    "Event": "event", "Rejected": "event",
    "Kind": "node", "NodeType": "node", "Sink": "node", "Source": "node", "Transform": "node",
    "register": "registry",
    "Runtime": "runtime", "RunResult": "runtime",
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
                         NodeTypeError, UsageError)
    from .event import Event, Rejected
    from .node import Kind, NodeType, Sink, Source, Transform
    from .registry import register
    from .runtime import Runtime, RunResult
    from .validate import Validation, load, validate_file, validate_text

__all__ = [
    "ApiError",
    "Background",
    "ConfigError",
    "Event",
    "GraphError",
    "Kind",
    "KvgraphError",
    "NodeFailure",
    "NodeType",
    "NodeTypeError",
    "Rejected",
    "RunResult",
    "Runtime",
    "Sink",
    "Source",
    "Transform",
    "UsageError",
    "Validation",
    "__version__",
    "load",
    "open",
    "register",
    "start",
    "validate_file",
    "validate_text",
]
