"""The metrics contract every node emits, and its Prometheus rendering.

Every node, whatever its type, has the same six counters (the contract; a test asserts it for
every type):

=========================  =======================================================================
``events_in``              events received from input edges (sources: events produced)
``events_out``             events emitted on ``out`` (sinks: events confirmed delivered)
``errors``                 events or messages the node could not handle (sent to ``errors``)
``discarded_intentional``  events dropped on purpose (filtered, deduplicated)
``discarded_unintentional`` events lost by accident (a full edge with a drop policy, no edge)
``lost``                   what the node knows is gone for good and could not deliver or repair,
                           each time with a loss record on ``errors`` (an engine's batches that
                           no replay brought back, writes that failed); any makes a run not ok
=========================  =======================================================================

Types add their own counters in ``extra`` (for example ``seq_gaps`` on the zmq source); they
are exported as ``kvgraph_node_<name>``. Edges export their channel statistics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from .channel import Channel

CONTRACT = ("events_in", "events_out", "errors", "discarded_intentional",
            "discarded_unintentional", "lost")


class NodeMetrics:
    __slots__ = ("node", "type", "kind", "events_in", "events_out", "errors",
                 "discarded_intentional", "discarded_unintentional", "lost", "extra")

    def __init__(self, node: str, type_: str, kind: str):
        self.node, self.type, self.kind = node, type_, kind
        self.events_in = self.events_out = self.errors = 0
        self.discarded_intentional = self.discarded_unintentional = self.lost = 0
        self.extra: dict[str, int | float] = {}

    def add(self, name: str, n: int | float = 1) -> None:
        """Count a type-specific metric (``seq_gaps``, ``reconnects``...)."""
        self.extra[name] = self.extra.get(name, 0) + n

    def snapshot(self) -> dict[str, int | float]:
        return {**{k: getattr(self, k) for k in CONTRACT}, **self.extra}


def _labels(**kv: str) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in kv.items())
    return "{" + inner + "}"


def prometheus(nodes: Iterable[NodeMetrics], channels: Iterable["Channel"],
               up_seconds: float) -> str:
    """Prometheus text exposition format 0.0.4."""
    nodes, channels = list(nodes), list(channels)
    out: list[str] = ["# HELP kvgraph_uptime_seconds Seconds since the graph started.",
                      "# TYPE kvgraph_uptime_seconds gauge",
                      f"kvgraph_uptime_seconds {up_seconds:.3f}"]
    helps = {
        "events_in": "Events received (sources: produced).",
        "events_out": "Events emitted on out (sinks: delivered).",
        "errors": "Events or messages the node could not handle.",
        "lost": "Known lost for good, each with a loss record (engine batches, failed writes).",
    }
    for name in ("events_in", "events_out", "errors", "lost"):
        metric = f"kvgraph_node_{name}_total"
        out += [f"# HELP {metric} {helps[name]}", f"# TYPE {metric} counter"]
        out += [f"{metric}{_labels(node=m.node, type=m.type, kind=m.kind)} {getattr(m, name)}"
                for m in nodes]
    metric = "kvgraph_node_discarded_total"
    out += [f"# HELP {metric} Events discarded, on purpose (intentional) or not.",
            f"# TYPE {metric} counter"]
    for m in nodes:
        for reason in ("intentional", "unintentional"):
            out.append(f"{metric}{_labels(node=m.node, type=m.type, kind=m.kind, reason=reason)}"
                       f" {getattr(m, 'discarded_' + reason)}")
    extras = sorted({k for m in nodes for k in m.extra})
    for name in extras:
        metric = f"kvgraph_node_{name}"
        out.append(f"# TYPE {metric} untyped")
        out += [f"{metric}{_labels(node=m.node, type=m.type)} {m.extra[name]}"
                for m in nodes if name in m.extra]
    gauges = [("fill_batches", "current", "gauge"), ("fill_events", "current_events", "gauge"),
              ("fill_bytes", "current_bytes", "gauge"),
              ("peak_batches", "peak", "gauge"), ("capacity_batches", "capacity", "gauge"),
              ("waiting_senders", "waiting_senders", "gauge"),
              ("sent_events_total", "sent_events", "counter"),
              ("dropped_events_total", "dropped_events", "counter"),
              ("dropped_batches_total", "dropped_batches", "counter")]
    stats = [(ch, ch.statistics()) for ch in channels]
    for suffix, attr, kind in gauges:
        metric = f"kvgraph_edge_{suffix}"
        out.append(f"# TYPE {metric} {kind}")
        out += [f"{metric}{_labels(edge=st.name, src=ch.src, dst=ch.dst)} {getattr(st, attr)}"
                for ch, st in stats]
    return "\n".join(out) + "\n"
