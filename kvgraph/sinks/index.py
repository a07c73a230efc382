"""``index`` sink: the router's prefix index, in the box.

Keeps per (worker_id, dp_rank) block maps in a radix tree keyed by Dynamo's tokens_hash, with
the router's semantics, and answers "which worker holds the longest prefix" over HTTP:
``POST /query``, ``POST /query_by_hash``, ``GET /workers``, ``GET /dump``.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from ..node import Bind, Sink, integer, string
from ..registry import register


@register
class IndexSink(Sink):
    name = "index"
    summary = "Prefix index answering longest-prefix queries over HTTP."
    options = {
        "host": string("HTTP listen address.", "127.0.0.1"),
        "port": integer("HTTP port; 0 picks a free one (logged at start).", 8090, minimum=0,
                        maximum=65535),
        "block_size": integer("Tokens per block for query token ids.", 16, minimum=1),
        "max_blocks": integer("Most blocks held over all workers before stores are refused "
                              "(bounds memory).", 50_000_000, minimum=1),
        "max_body_bytes": integer("Largest HTTP request body accepted.", 8 * 1024 * 1024,
                                  minimum=1024),
    }
    example = "port = 8090\nblock_size = 16"

    @classmethod
    def binds(cls, options: Mapping[str, Any]) -> Iterable[Bind]:
        port = options.get("port", 8090)
        if port:
            yield Bind("port", f"http://{options.get('host', '127.0.0.1')}:{port}")
