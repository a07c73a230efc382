"""``filter`` transform: keep only the events that match every configured predicate.

Each predicate is a list of accepted values; an option left out accepts everything. Events
that fail go nowhere (counted as discarded on purpose), unless ``invert`` flips the test.
Dynamo drops the events of non-main attention groups of hybrid models; ``group_idx = [0]`` or
``kv_cache_spec_kind = ["full_attention"]`` does the same here.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

from ..event import CLEARED, Event
from ..node import CheckContext, Transform, Problem, array, boolean, integer, string
from ..registry import register

PREDICATES = ("kinds", "medium", "group_idx", "kv_cache_spec_kind", "worker_id", "dp_rank",
              "lora_name")


@register
class Filter(Transform):
    name = "filter"
    summary = "Keep events by kind, medium, group, worker, DP rank or LoRA."
    replicable = True
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

    # -- runtime ------------------------------------------------------------------------------

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.test = compile_predicate(self.config)
        self.invert = self.config["invert"]
        self.keep_cleared = self.config["keep_cleared"]

    async def process(self, batch: list[Event]) -> None:
        test, invert, keep_cleared = self.test, self.invert, self.keep_cleared
        kept = [e for e in batch
                if (keep_cleared and e.kind == CLEARED) or test(e) != invert]
        self.metrics.discarded_intentional += len(batch) - len(kept)
        await self.ctx.emit(kept if len(kept) != len(batch) else batch)


def compile_predicate(c: Mapping[str, Any]) -> Callable[[Event], bool]:
    """One closure testing every configured predicate; absent ones cost nothing."""
    checks: list[Callable[[Event], bool]] = []
    if "kinds" in c:
        kinds = frozenset(c["kinds"])
        checks.append(lambda e: e.kind in kinds)
    if "medium" in c:
        media = frozenset(m.upper() for m in c["medium"])
        checks.append(lambda e: (e.medium or "GPU").upper() in media)
    if "group_idx" in c:
        groups = frozenset(c["group_idx"])
        checks.append(lambda e: (e.group_idx or 0) in groups)
    if "kv_cache_spec_kind" in c:
        specs = frozenset(c["kv_cache_spec_kind"])
        checks.append(lambda e: e.kv_cache_spec_kind is None or e.kv_cache_spec_kind in specs)
    if "worker_id" in c:
        workers = frozenset(c["worker_id"])
        checks.append(lambda e: e.worker_id in workers)
    if "dp_rank" in c:
        ranks = frozenset(c["dp_rank"])
        checks.append(lambda e: e.dp_rank in ranks)
    if "lora_name" in c:
        loras = frozenset(c["lora_name"])
        checks.append(lambda e: (e.lora_name or "") in loras)
    if not checks:
        return lambda e: True
    if len(checks) == 1:
        return checks[0]
    return lambda e: all(check(e) for check in checks)
