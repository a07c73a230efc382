"""kvgraph: KV-cache event relays as declarative dataflow graphs.

The public API is re-exported here; modules not listed in ``__all__`` are internal.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import ConfigError, GraphError, KvgraphError, NodeTypeError, UsageError
from .node import Kind, NodeType
from .registry import register
from .validate import Validation, load, validate_file, validate_text

__all__ = [
    "ConfigError",
    "GraphError",
    "Kind",
    "KvgraphError",
    "NodeType",
    "NodeTypeError",
    "UsageError",
    "Validation",
    "__version__",
    "load",
    "register",
    "validate_file",
    "validate_text",
]
