"""Find the line of every key in a TOML document.

``tomllib`` parses TOML but forgets positions, and every diagnostic must name its line. This module
scans the same text once and records, for each key path (``("nodes", "engine0", "endpoint")``,
``("edges", 2, "from")``), the line where it is written. It does not validate TOML: tomllib has
already accepted the text when this runs, so the scanner can stay small and forgiving.

Lookups fall back to the nearest recorded ancestor, so a key that is absent (a missing required
option) reports the line of its table header, as users expect.
"""

from __future__ import annotations

import bisect
import re
from typing import Hashable, Sequence

Path = tuple[Hashable, ...]

_BARE = re.compile(r"[A-Za-z0-9_-]+")
_WS = " \t"


class Locator:
    """Maps key paths of one TOML text to 1-based line numbers."""

    def __init__(self, text: str):
        self._text = text
        self._newlines = [i for i, c in enumerate(text) if c == "\n"]
        self.lines: dict[Path, int] = {}
        self._aot_count: dict[Path, int] = {}
        try:
            self._scan()
        except (IndexError, ValueError):  # never let a locator bug hide a real diagnostic
            pass

    # -- public -------------------------------------------------------------------------------

    def line_of(self, path: Sequence[Hashable]) -> int:
        """Line of ``path``, else of its nearest written ancestor, else 1."""
        p = tuple(path)
        while p:
            if p in self.lines:
                return self.lines[p]
            p = p[:-1]
        return 1

    # -- scanner ------------------------------------------------------------------------------

    def _line(self, pos: int) -> int:
        return bisect.bisect_left(self._newlines, pos) + 1

    def _record(self, path: Path, pos: int) -> None:
        line = self._line(pos)
        for i in range(1, len(path) + 1):
            self.lines.setdefault(path[:i], line)

    def _scan(self) -> None:
        t, n, i = self._text, len(self._text), 0
        table: Path = ()
        while i < n:
            i = self._skip_ws_comments(i, newlines=True)
            if i >= n:
                break
            if t.startswith("[[", i):
                keys, i = self._keys(i + 2)
                i = t.index("]]", i) + 2
                idx = self._aot_count.get(keys, 0)
                self._aot_count[keys] = idx + 1
                table = keys + (idx,)
                self._record(table, i - 1)
            elif t[i] == "[":
                keys, i = self._keys(i + 1)
                i = t.index("]", i) + 1
                table = keys
                self._record(table, i - 1)
            else:
                start = i
                keys, i = self._keys(i)
                self._record(table + keys, start)
                i = self._skip_ws(i)
                if i < n and t[i] == "=":
                    i = self._value(self._skip_ws(i + 1), table + keys)
            i = self._to_eol(i)

    def _skip_ws(self, i: int) -> int:
        t, n = self._text, len(self._text)
        while i < n and t[i] in _WS:
            i += 1
        return i

    def _skip_ws_comments(self, i: int, newlines: bool) -> int:
        t, n = self._text, len(self._text)
        while i < n:
            c = t[i]
            if c in _WS or (newlines and c in "\r\n"):
                i += 1
            elif c == "#":
                while i < n and t[i] != "\n":
                    i += 1
            else:
                break
        return i

    def _to_eol(self, i: int) -> int:
        t, n = self._text, len(self._text)
        while i < n and t[i] != "\n":
            i += 1
        return i + 1

    def _keys(self, i: int) -> tuple[Path, int]:
        """Parse a dotted key starting at ``i``; returns the parts and the position after it."""
        t = self._text
        parts: list[str] = []
        while True:
            i = self._skip_ws(i)
            if t[i] in "\"'":
                s, i = self._string(i)
                parts.append(s)
            else:
                m = _BARE.match(t, i)
                if not m:
                    break
                parts.append(m.group())
                i = m.end()
            i = self._skip_ws(i)
            if i < len(t) and t[i] == ".":
                i += 1
                continue
            break
        return tuple(parts), i

    def _string(self, i: int) -> tuple[str, int]:
        """Read a string token at ``i``; returns its (roughly unescaped) text and the end."""
        t = self._text
        for q in ('"""', "'''"):
            if t.startswith(q, i):
                end = t.index(q, i + 3)
                if q == '"""':
                    while self._escaped(end):
                        end = t.index(q, end + 1)
                while t.startswith(q[0], end + 3):  # up to two quotes may close the content
                    end += 1
                return t[i + 3:end], end + 3
        q = t[i]
        j = i + 1
        while t[j] != q:
            j += 2 if (q == '"' and t[j] == "\\") else 1
        raw = t[i + 1:j]
        if q == '"' and "\\" in raw:
            raw = raw.encode("utf-8", "surrogatepass").decode("unicode_escape", "replace")
        return raw, j + 1

    def _escaped(self, pos: int) -> bool:
        k, t = pos - 1, self._text
        while k >= 0 and t[k] == "\\":
            k -= 1
        return (pos - 1 - k) % 2 == 1

    def _value(self, i: int, path: Path) -> int:
        """Skip one value; record array elements and inline-table keys on the way."""
        t = self._text
        c = t[i]
        if c in "\"'":
            return self._string(i)[1]
        if c == "[":
            i, idx = i + 1, 0
            while True:
                i = self._skip_ws_comments(i, newlines=True)
                if t[i] == "]":
                    return i + 1
                self._record(path + (idx,), i)
                i = self._value(i, path + (idx,))
                i = self._skip_ws_comments(i, newlines=True)
                if t[i] == ",":
                    i += 1
                idx += 1
        if c == "{":
            i += 1
            while True:
                i = self._skip_ws(i)
                if t[i] == "}":
                    return i + 1
                start = i
                keys, i = self._keys(i)
                self._record(path + keys, start)
                i = self._skip_ws(i)
                i = self._value(self._skip_ws(i + 1), path + keys)  # skip '='
                i = self._skip_ws(i)
                if t[i] == ",":
                    i += 1
        # scalar: up to a delimiter
        while i < len(t) and t[i] not in ",]}\n#":
            i += 1
        return i
