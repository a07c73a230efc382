"""``python`` transform: run a user's function on each batch.

``function = "package.module:name"``; the function takes a list of events and returns a list
(or None to drop the batch); it may be async. Events are immutable: return new ones
(``msgspec.structs.replace(e, ...)``) to change them. An exception becomes an event on the ``errors`` port carrying the
traceback summary; it never stops the graph.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import traceback
from pathlib import Path
from typing import Any

from ..errors import NodeFailure
from ..event import Event
from ..node import Transform, string
from ..registry import register

_TARGET = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


@register
class Python(Transform):
    name = "python"
    summary = "Apply a user function `module:function` to every batch."
    # With --workers, the function runs in every worker; what it keeps is per process.
    replicable = True
    options = {
        "function": string("`module:function` to call with each batch (a list of events).",
                           pattern=_TARGET.pattern, examples=["mypkg.kv:drop_cpu"]),
        "path": string("Directory added to sys.path first; relative to the graph file."),
    }
    required = ("function",)
    example = 'function = "mypkg.kv:drop_cpu"'

    # -- runtime ------------------------------------------------------------------------------

    async def start(self) -> None:
        module_name, _, attr = self.config["function"].partition(":")
        if "path" in self.config:
            path = str(self.ctx.path(self.config["path"]))
            if path not in sys.path:
                sys.path.insert(0, path)
        try:
            obj: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            raise NodeFailure(f"cannot load {self.config['function']}: {exc}") from exc
        if not callable(obj):
            raise NodeFailure(f"{self.config['function']} is not callable")
        self._fn = obj

    async def process(self, batch: list[Any]) -> None:
        try:
            result = self._fn(batch)
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:
            if self.ctx.node.on_error == "fail":
                raise
            reason = f"{self.config['function']} raised {_summary(exc)}"
            await self.ctx.reject([self.ctx.rejected(reason, e if isinstance(e, Event) else None)
                                   for e in batch])
            return
        if result is None:
            self.metrics.discarded_intentional += len(batch)
            return
        out = list(result)
        if len(out) < len(batch):
            self.metrics.discarded_intentional += len(batch) - len(out)
        await self.ctx.emit(out)


def _summary(exc: BaseException) -> str:
    """``ValueError: bad (at mymod.py:12 in f)``: the exception and where it was raised."""
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno} in {tb[-1].name})" if tb else ""
    return "".join(traceback.format_exception_only(type(exc), exc)).strip() + where
