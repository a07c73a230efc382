"""Diagnostics: one problem found in a graph file, and how it is printed.

A diagnostic prints as ``FILE:LINE: error|warning: PATH: message`` so that editors and CI logs can
jump to it; PATH is the dotted location in the document (``nodes.engine0.endpoint``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Literal

Severity = Literal["error", "warning"]

_COLOURS = {"error": "\x1b[1;31m", "warning": "\x1b[1;33m"}
_DIM, _BOLD, _RESET = "\x1b[2m", "\x1b[1m", "\x1b[0m"


@dataclass(frozen=True)
class Diagnostic:
    """One problem. ``line`` and ``column`` are 1-based; 0 means unknown."""

    file: str
    line: int
    severity: Severity
    path: str
    message: str
    column: int = 0
    hint: str = ""

    def format(self, colour: bool = False) -> str:
        where = f"{self.file}:{self.line}" + (f":{self.column}" if self.column else "")
        path = f"{self.path}: " if self.path else ""
        hint = f" ({self.hint})" if self.hint else ""
        if not colour:
            return f"{where}: {self.severity}: {path}{self.message}{hint}"
        sev = f"{_COLOURS[self.severity]}{self.severity}{_RESET}"
        return f"{_BOLD}{where}{_RESET}: {sev}: {_BOLD}{path}{_RESET}{self.message}{_DIM}{hint}{_RESET}"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def sort_key(d: Diagnostic) -> tuple[str, int, int, str]:
    return (d.file, d.line, 0 if d.severity == "error" else 1, d.path)


def render_text(diags: Iterable[Diagnostic], colour: bool = False) -> str:
    return "\n".join(d.format(colour) for d in sorted(diags, key=sort_key))


def as_json(diags: Iterable[Diagnostic]) -> dict[str, Any]:
    """The diagnostics, sorted, with their counts: what ``--format json`` and ``POST /graph``
    answer."""
    items = [d.to_dict() for d in sorted(diags, key=sort_key)]
    return {"diagnostics": items,
            "errors": sum(d["severity"] == "error" for d in items),
            "warnings": sum(d["severity"] == "warning" for d in items)}


def render_json(diags: Iterable[Diagnostic]) -> str:
    return json.dumps(as_json(diags), indent=2)
