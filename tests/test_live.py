"""Issue 14: the operator's live view, on a real terminal (tmux), and `kvgraph top`."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from kvgraph.testing import NatsServer, free_port, free_ports, terminate

from .helpers import ROOT, GraphFile

TMUX = shutil.which("tmux")


class Terminal:
    """A tmux session of its own (private socket) running one command."""

    def __init__(self, command: str, width: int = 180, height: int = 50):
        self.socket = f"kvgraph-test-{os.getpid()}-{free_port()}"
        subprocess.run([TMUX, "-L", self.socket, "new-session", "-d", "-s", "t", "-x",
                        str(width), "-y", str(height), command], check=True, cwd=ROOT,
                       env={**os.environ, "TERM": "xterm-256color"})

    def screen(self) -> str:
        return subprocess.run([TMUX, "-L", self.socket, "capture-pane", "-p", "-t", "t"],
                              capture_output=True, text=True).stdout

    def wait(self, predicate, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            shot = self.screen()
            if predicate(shot):
                return shot
            if time.monotonic() > deadline:
                raise AssertionError(f"the screen never showed what was waited for:\n{shot}")
            time.sleep(0.1)

    def close(self) -> None:
        subprocess.run([TMUX, "-L", self.socket, "kill-server"], capture_output=True)


def up_seconds(shot: str) -> int:
    m = re.search(r"up (\d+) s", shot)
    return int(m.group(1)) if m else -1


@pytest.mark.skipif(TMUX is None, reason="tmux is not installed (Debian: apt-get install tmux)")
def test_the_live_view_keeps_the_disconnect_warning_through_an_outage(tmp_path) -> None:
    """Three captures during the outage show the warning and DOWN; after the server is back,
    the node is up and the warning is still there (it stays 10 minutes)."""
    server = NatsServer().start()
    graph = (GraphFile("watched").node("engines", "synthetic", rate=500)
             .node("router", "nats", url=server.url, subject="kv.live",
                   format="dynamo-msgpack", block_size=16)
             .edge("engines", "router").write(tmp_path))
    term = Terminal(shlex.join([sys.executable, "-m", "kvgraph", "run", str(graph),
                                "--status", "tty"]) + "; sleep 60")
    try:
        term.wait(lambda s: "router" in s and "up" in s and "no warnings" in s)
        server.stop()
        in_pane = "warning: [router] disconnected from NATS"   # the view's, not a log line
        shots = [term.wait(lambda s: in_pane in s and "DOWN" in s)]
        for _ in range(2):   # two more redraws, seconds apart, during the outage
            before = up_seconds(shots[-1])
            shots.append(term.wait(lambda s: up_seconds(s) > before))
        for shot in shots:
            assert in_pane in shot and "DOWN" in shot, shot
        assert up_seconds(shots[-1]) > up_seconds(shots[0])
        server.start(server.port)   # back: the node is up again, the warning stays on screen
        back = term.wait(lambda s: "DOWN" not in s and " up" in s.split("router", 1)[-1])
        assert in_pane in back, back
    finally:
        term.close()
        server.close()


def test_top_combines_the_workers_of_a_graph(tmp_path) -> None:
    graph = (GraphFile("pair").node("a", "synthetic", rate=400, workers=1)
             .node("b", "synthetic", rate=400, workers=1, seed=2)
             .node("out", "null").edge("a", "out").edge("b", "out").write(tmp_path))
    port = free_ports(2)   # worker I serves on port + I: both must be free
    proc = subprocess.Popen([sys.executable, "-m", "kvgraph", "run", str(graph), "--workers",
                             "2", "--metrics-port", str(port), "--status", "off"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        urls = [f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"]

        def top() -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "kvgraph", "top", "--once", *urls],
                                  capture_output=True, text=True, cwd=ROOT, timeout=30)

        deadline = time.monotonic() + 30
        while True:
            r = top()
            rows = {cells[0]: cells for cells in map(str.split, r.stdout.splitlines())
                    if len(cells) > 5 and cells[1] in ("source", "sink")}
            if r.returncode == 0 and len(rows) == 3 and rows["a"][5] != "0" and \
                    rows["b"][5] != "0" and "no answer" not in r.stdout:
                break
            assert time.monotonic() < deadline, r.stdout + r.stderr
            time.sleep(0.2)
        assert "2 endpoints" not in r.stdout and ", " in r.stdout.splitlines()[0]
    finally:
        terminate(proc)
    gone = subprocess.run([sys.executable, "-m", "kvgraph", "top", "--once", urls[0]],
                          capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert gone.returncode == 1 and "no answer" in gone.stdout


@pytest.mark.skipif(TMUX is None, reason="tmux is not installed (Debian: apt-get install tmux)")
def test_a_terminal_that_hangs_up_stops_the_live_view_run(tmp_path) -> None:
    """Under the live view a SIGHUP is the terminal going away (here: tmux killed), not a
    request to reload: the run stops and drains, as on SIGTERM, and leaves no process."""
    graph = (GraphFile("hangup").node("engines", "synthetic", rate=200)
             .node("out", "null").edge("engines", "out").write(tmp_path))
    term = Terminal(shlex.join([sys.executable, "-m", "kvgraph", "run", str(graph),
                                "--status", "tty"]))

    def running() -> bool:
        found = subprocess.run(["pgrep", "-f", f"kvgraph run {graph}"], capture_output=True)
        return found.returncode == 0

    try:
        term.wait(lambda s: "engines" in s and "up" in s)
        assert running()
    finally:
        term.close()
    deadline = time.monotonic() + 30
    while running():
        assert time.monotonic() < deadline, "kvgraph run outlived its terminal"
        time.sleep(0.1)
