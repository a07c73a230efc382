"""``python`` transform: run a user's function on each batch.

``function = "package.module:name"``; the function takes a list of events and returns a list
(or None to drop the batch). An exception becomes an event on the ``errors`` port carrying the
traceback summary; it never stops the graph.
"""

from __future__ import annotations

import re
from ..node import Kind, NodeType, string
from ..registry import register

_TARGET = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


@register
class Python(NodeType):
    name = "python"
    kind = Kind.TRANSFORM
    summary = "Apply a user function `module:function` to every batch."
    options = {
        "function": string("`module:function` to call with each batch (a list of events).",
                           pattern=_TARGET.pattern, examples=["mypkg.kv:drop_cpu"]),
        "path": string("Directory added to sys.path first; relative to the graph file."),
    }
    required = ("function",)
    example = 'function = "mypkg.kv:drop_cpu"'
