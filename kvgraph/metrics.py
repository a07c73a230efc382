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

Types add their own metrics in ``extra`` (for example ``seq_gaps`` on the zmq source),
declared in the type's ``metrics`` (Prometheus type and HELP); they are exported as
``kvgraph_node_<name>`` (counters with ``_total``). Edges export their channel statistics.
Exported through prometheus_client, read at scrape time (:class:`GraphCollector`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping

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


#: The contract's counters, as Prometheus families: name, HELP.
_CONTRACT_HELP = {
    "events_in": "Events received (sources: produced).",
    "events_out": "Events emitted on out (sinks: confirmed delivered).",
    "errors": "Events or messages the node could not handle (sent to its errors port).",
    "lost": "Known lost for good, each with a loss record (engine batches, failed writes).",
}
#: Channel statistics: family suffix, ChannelStats attribute, type, HELP.
_EDGE = [
    ("fill_batches", "current", "gauge", "Batches queued on the edge."),
    ("fill_events", "current_events", "gauge", "Events queued on the edge."),
    ("fill_bytes", "current_bytes", "gauge", "Estimated bytes queued on the edge."),
    ("peak_batches", "peak", "gauge", "Most batches ever queued on the edge."),
    ("capacity_batches", "capacity", "gauge", "The edge's capacity in batches."),
    ("waiting_senders", "waiting_senders", "gauge", "Producers waiting for room."),
    ("sent_events", "sent_events", "counter", "Events sent through the edge."),
    ("dropped_events", "dropped_events", "counter", "Events the edge dropped (when_full)."),
    ("dropped_batches", "dropped_batches", "counter", "Batches the edge dropped (when_full)."),
]


def families(nodes: Iterable[tuple[NodeMetrics, Mapping[str, Any]]],
             channels: Iterable["Channel"], up_seconds: float) -> Iterator[Any]:
    """The graph's metrics as prometheus_client families, read now (a scrape reads the
    counters the nodes keep anyway: nothing is counted twice on the hot path). ``nodes``: each
    node's metrics with its type's declared ``metrics`` (HELP and TYPE of its extras; one it
    did not declare is a gauge that says so)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    nodes, channels = list(nodes), list(channels)
    yield GaugeMetricFamily("kvgraph_uptime_seconds", "Seconds since the graph started.",
                            value=up_seconds)
    labels = ["node", "type", "kind"]
    for name, help_ in _CONTRACT_HELP.items():
        fam = CounterMetricFamily(f"kvgraph_node_{name}", help_, labels=labels)
        for m, _ in nodes:
            fam.add_metric([m.node, m.type, m.kind], getattr(m, name))
        yield fam
    fam = CounterMetricFamily("kvgraph_node_discarded", "Events discarded, on purpose "
                              "(intentional: filtered, deduplicated) or not (unintentional).",
                              labels=[*labels, "reason"])
    for m, _ in nodes:
        for reason in ("intentional", "unintentional"):
            fam.add_metric([m.node, m.type, m.kind, reason],
                           getattr(m, "discarded_" + reason))
    yield fam
    extras: dict[str, Any] = {}
    declared: dict[str, Any] = {}   # a name is one family: any type's declaration of it
    for _, decl in nodes:
        for name, spec in decl.items():
            declared.setdefault(name, spec)
    for m, _ in nodes:
        for name, value in m.extra.items():
            if not isinstance(value, (int, float)):
                continue
            fam = extras.get(name)
            if fam is None:
                spec = declared.get(name)
                base = f"kvgraph_node_{name.removesuffix('_total')}"
                if spec is not None and spec.kind == "counter":
                    fam = CounterMetricFamily(base, spec.help, labels=["node", "type"])
                else:
                    fam = GaugeMetricFamily(base, spec.help if spec is not None else
                                            f"{name}: set by the node type, which does not "
                                            "declare it.", labels=["node", "type"])
                extras[name] = fam
            fam.add_metric([m.node, m.type], value)
    yield from extras.values()
    stats = [(ch, ch.statistics()) for ch in channels]
    for suffix, attr, kind, help_ in _EDGE:
        cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        fam = cls(f"kvgraph_edge_{suffix}", help_, labels=["edge", "src", "dst"])
        for ch, st in stats:
            fam.add_metric([st.name, ch.src, ch.dst], getattr(st, attr))
        yield fam


class GraphCollector:
    """A prometheus_client collector of a running graph (``runtime``), read at scrape time."""

    def __init__(self, runtime: Any):
        self.rt = runtime

    def collect(self) -> Iterator[Any]:
        import time

        rt = self.rt
        nodes = [(c.metrics, c.node.type.metrics) for c in rt.contexts.values()]
        up = time.monotonic() - rt.started_at if rt.started_at else 0.0
        yield from families(nodes, rt.channels, up)
        yield from reload_families(rt.reloads, rt.last_reload)


def reload_families(reloads: Mapping[str, int], last: Any) -> Iterator[Any]:
    """Reloads of the running graph (:mod:`kvgraph.reload`): how many, by outcome, and the
    last one's time and duration (absent until the first reload)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    from .reload import RESULTS

    fam = CounterMetricFamily("kvgraph_reloads", "Reloads of the graph file, by outcome: "
                              "applied, unchanged, invalid, failed (nothing changed).",
                              labels=["result"])
    for result in RESULTS:
        fam.add_metric([result], reloads.get(result, 0))
    yield fam
    if last is not None:
        yield GaugeMetricFamily("kvgraph_last_reload_timestamp_seconds",
                                "When the last reload was asked for (Unix time).", value=last.at)
        yield GaugeMetricFamily("kvgraph_last_reload_duration_seconds",
                                "How long the last reload took.", value=last.duration_s)
        fam = GaugeMetricFamily("kvgraph_last_reload_success", "1 when the last reload was "
                                "applied (or changed nothing), 0 when it was refused.")
        fam.add_metric([], 1 if last.result in ("applied", "unchanged") else 0)
        yield fam


def registry_for(runtime: Any) -> Any:
    """A prometheus_client registry with the graph's metrics and the standard process_* and
    python_* collectors (RSS, CPU, open fds, GC)."""
    from prometheus_client import (CollectorRegistry, GCCollector, PlatformCollector,
                                   ProcessCollector)

    reg = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=reg)
    PlatformCollector(registry=reg)
    GCCollector(registry=reg)
    reg.register(GraphCollector(runtime))
    return reg


def exposition(registry: Any, accept: str = "") -> tuple[bytes, str]:
    """The registry's page in the format the scraper asked for (OpenMetrics when its Accept
    says so, else the text format 0.0.4), and its content type."""
    from prometheus_client.exposition import choose_encoder

    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type
