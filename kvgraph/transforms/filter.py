"""``filter`` transform: keep only the events that match every configured predicate.

Each predicate is a list of accepted values; an option left out accepts everything. Events
that fail go nowhere (counted as discarded on purpose), unless ``invert`` flips the test.
Dynamo drops the events of non-main attention groups of hybrid models; ``group_idx = [0]`` or
``kv_cache_spec_kind = ["full_attention"]`` does the same here.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from ..node import CheckContext, Kind, NodeType, Problem, array, boolean, integer, string
from ..registry import register

PREDICATES = ("kinds", "medium", "group_idx", "kv_cache_spec_kind", "worker_id", "dp_rank",
              "lora_name")


@register
class Filter(NodeType):
    name = "filter"
    kind = Kind.TRANSFORM
    summary = "Keep events by kind, medium, group, worker, DP rank or LoRA."
    options = {
        "kinds": array("Event kinds to keep.",
                       string("", enum=["stored", "removed", "cleared"]), min_items=1,
                       unique=True),
        "medium": array("Media to keep (GPU, CPU, DISK...); an event without medium is GPU.",
                        string(""), min_items=1, unique=True),
        "group_idx": array("KV-cache groups to keep; an event without group_idx is group 0.",
                           integer("", minimum=0), min_items=1, unique=True),
        "kv_cache_spec_kind": array("KV-cache spec kinds to keep (full_attention, "
                                    "sliding_window, mamba...); events without one pass.",
                                    string(""), min_items=1, unique=True),
        "worker_id": array("Worker ids to keep.", integer("", minimum=0), min_items=1,
                           unique=True),
        "dp_rank": array("Data-parallel ranks to keep.", integer("", minimum=0), min_items=1,
                         unique=True),
        "lora_name": array("LoRA adapter names to keep; use \"\" for the base model.",
                           string(""), min_items=1, unique=True),
        "invert": boolean("Drop the matching events and keep the rest.", False),
        "keep_cleared": boolean("Always keep `cleared` events, whatever the predicates: "
                                "dropping a clear leaves stale blocks in every index "
                                "downstream.", True),
    }
    example = 'kinds = ["stored", "removed"]\ngroup_idx = [0]'

    @classmethod
    def check(cls, options: Mapping[str, Any], ctx: CheckContext) -> Iterable[Problem]:
        if not any(p in options for p in PREDICATES):
            yield Problem("", "filter has no predicate: it passes everything",
                          hint="set one of " + ", ".join(PREDICATES), severity="warning")
