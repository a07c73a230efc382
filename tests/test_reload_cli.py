"""``kvgraph run`` reloads its graph file: on SIGHUP, and with ``--watch`` when the file
changes, a file replaced through a symlink swap (a Kubernetes ConfigMap) included."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from kvgraph.testing import free_port
from tests.helpers import ROOT, GraphFile, metric, metrics_page, wait_until


def generator(*sinks: str) -> GraphFile:
    g = GraphFile("live").node("engine", "synthetic", rate=200, workers=1)
    for sink in sinks:
        g.node(sink, "null").edge("engine", sink)
    return g


def run(graph: Path, port: int, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "kvgraph", "run", str(graph), "--status",
                             "off", "--metrics-port", str(port), *extra], cwd=ROOT,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)


def reloads(port: int, result: str) -> float:
    return metric(metrics_page(port), "kvgraph_reloads_total", result=result) or 0


def swap(link: Path, directory: Path) -> None:
    """Point ``link`` at ``directory`` in one atomic rename, as kubelet updates ``..data``."""
    tmp = link.with_name(link.name + ".tmp")
    os.symlink(directory.name, tmp)
    os.replace(tmp, link)


def test_watch_applies_a_file_replaced_through_a_symlink_swap(tmp_path: Path) -> None:
    for version, sinks in (("v1", ("out",)), ("v2", ("out", "copy"))):
        (tmp_path / version).mkdir()
        generator(*sinks).write(tmp_path / version, "graph.toml")
    (tmp_path / "v3").mkdir()   # a typo: not applied
    (tmp_path / "v3" / "graph.toml").write_text(
        generator("out", "copy").node("copy", "nul").text())
    os.symlink("v1", tmp_path / "..data")
    os.symlink("..data/graph.toml", tmp_path / "graph.toml")
    port = free_port()
    proc = run(tmp_path / "graph.toml", port, "--watch")
    try:
        wait_until(lambda: metric(metrics_page(port), "kvgraph_reloads_total",
                                  result="applied") == 0, what="the graph running")
        swap(tmp_path / "..data", tmp_path / "v2")
        wait_until(lambda: reloads(port, "applied") == 1, what="v2 applied")
        assert 'node="copy"' in metrics_page(port)
        swap(tmp_path / "..data", tmp_path / "v3")
        wait_until(lambda: reloads(port, "invalid") == 1, what="v3 refused")
        assert 'node="copy"' in metrics_page(port)
        assert metric(metrics_page(port), "kvgraph_last_reload_success") == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "add     node copy (sink null)" in err
    assert "graph.toml:" in err and "'nul'" in err   # the refused file's error, with its line


def test_sighup_applies_the_edited_file(tmp_path: Path) -> None:
    graph = generator("out").write(tmp_path)
    port = free_port()
    proc = run(graph, port)
    try:
        wait_until(lambda: reloads(port, "applied") == 0 and metrics_page(port),
                   what="the graph running")
        generator("out", "copy").write(tmp_path)
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: reloads(port, "applied") == 1, what="the edit applied")
        proc.send_signal(signal.SIGHUP)   # the same text again: no change
        wait_until(lambda: reloads(port, "unchanged") == 1, what="no change")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "reload from" in err and "applied" in err
