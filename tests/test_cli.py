"""``kvgraph run`` as a newcomer meets it: taken ports, silent engines, background jobs,
unusual working directories, and embedding programs that forget to stop the graph."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kvgraph.codecs.vllm import encode_payload
from kvgraph.testing import free_port

from .helpers import ROOT, GraphFile, ZmqPublisher


def run(graph: Path, *args: str, cwd: Path = ROOT, python: tuple[str, ...] = ()
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *python, "-m", "kvgraph", "run", str(graph),
                           "--status", "off", *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd, env={**os.environ, "NO_COLOR": "1"})


def recorded(tmp_path: Path, events: int = 200) -> GraphFile:
    """A finite source recorded to ``out.jsonl``: what was started shows in the file."""
    return (GraphFile("recorded")
            .node("engines", "synthetic", rate=0, max_events=events)
            .node("recording", "file", path=str(tmp_path / "out.jsonl"))
            .edge("engines", "recording"))


class Listening:
    """A port some other program already listens on."""

    def __enter__(self) -> int:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def assert_one_line_nothing_started(result: subprocess.CompletedProcess[str], port: int,
                                    tmp_path: Path) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert str(port) in lines[0] and "cannot listen" in lines[0], lines[0]
    out = tmp_path / "out.jsonl"
    assert not out.exists() or not out.read_text(), "events were produced before the failure"


def test_a_taken_metrics_port_stops_the_run_before_anything_starts(tmp_path: Path) -> None:
    with Listening() as port:
        result = run(recorded(tmp_path).write(tmp_path), "--metrics-port", str(port))
    assert_one_line_nothing_started(result, port, tmp_path)
    assert result.stderr.startswith(f"kvgraph run: --metrics-port {port}")


def test_a_taken_index_port_stops_the_run_before_any_source_starts(tmp_path: Path) -> None:
    with Listening() as port:
        graph = recorded(tmp_path).node("index", "index", port=port).edge("engines", "index")
        result = run(graph.write(tmp_path))
    assert_one_line_nothing_started(result, port, tmp_path)
    assert "node 'index'" in result.stderr


def test_a_silent_engine_is_reported_and_its_first_message_too(tmp_path: Path) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there yet
    graph = (GraphFile("silent").node("engine", "zmq", endpoint=endpoint, warn_silent_s=0.2)
             .node("out", "null").edge("engine", "out").write(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "kvgraph", "run", str(graph), "--status",
                             "off"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        lines = LineReader(proc)
        assert "connecting to " + endpoint in lines.until("connecting to")
        assert "nothing received from " + endpoint in lines.until("nothing received")
        engine = ZmqPublisher(endpoint)
        engine.wait_subscribed()
        engine.send([b"kv@pod@m", (0).to_bytes(8, "big"), encode_payload([], 0.0, 0, "map")])
        assert "first message from " + endpoint in lines.until("first message")
        engine.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0


class LineReader:
    """A process's stderr, line by line (read on a thread), with a deadline instead of hoping."""

    def __init__(self, proc: subprocess.Popen[str]):
        import queue
        import threading

        self.lines: queue.Queue[str] = queue.Queue()
        assert proc.stderr is not None
        stream = proc.stderr

        def pump() -> None:
            try:
                for line in iter(stream.readline, ""):
                    self.lines.put(line)
            except (ValueError, OSError):  # the test closed the pipe (communicate)
                pass
            self.lines.put("")

        threading.Thread(target=pump, daemon=True).start()

    def until(self, text: str, timeout: float = 20) -> str:
        import queue

        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            assert line, f"the process exited before saying {text!r}"
            if text in line:
                return line
        raise AssertionError(f"{text!r} not said within {timeout} s")


def test_workers_start_from_a_directory_that_holds_a_kvgraph_folder(tmp_path: Path) -> None:
    """A clone's parent holds a folder named ``kvgraph``: ``python -m kvgraph`` there would
    import that folder. The console script does not put the directory on sys.path (hence
    ``-P`` here), and the workers it starts must not either. (The folder here is a package
    that cannot be imported, so that it shadows kvgraph however kvgraph was installed; a
    clone's folder, with no ``__init__.py``, shadows an editable install.)"""
    (tmp_path / "kvgraph").mkdir()
    (tmp_path / "kvgraph" / "__init__.py").write_text("raise ImportError('not kvgraph')\n")
    graph = GraphFile("two")
    for i in (0, 1):
        graph.node(f"s{i}", "synthetic", rate=0, max_events=500, seed=i).edge(f"s{i}", "out")
    path = graph.node("out", "null").write(tmp_path)
    result = run(path, "--workers", "2", cwd=tmp_path, python=("-P",))
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("done after") == 2


def test_start_without_stop_still_delivers_at_exit_and_says_so(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    graph = (GraphFile("embedded").node("engine", "api", block_size=4)
             .node("recording", "file", path=str(out)).edge("engine", "recording")
             .write(tmp_path))
    script = textwrap.dedent(f"""
        import kvgraph
        bg = kvgraph.start({str(graph)!r})
        pub = bg.publisher("engine")
        for i in range(1, 1001):
            pub.publish_stored([i, i, i, i], 4, [i])
        # no bg.stop(): the program just ends
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "stop() was not called" in result.stderr
    lines = out.read_text().splitlines()
    assert len(lines) == 1000 and json.loads(lines[-1])["block_hashes"] == [1000]


# -- the live screen: only on a terminal that is ours ------------------------------------------

def on_a_terminal(graph: Path, background: bool, stdout_too: bool = True) -> str:
    """Run ``kvgraph run GRAPH`` with a pseudo-terminal as its controlling terminal, as a shell
    would, in the foreground process group or (``background``) in a group of its own, as
    ``kvgraph run ... &`` is. Returns what appeared on the terminal."""
    leader, follower = pty.openpty()
    starter = textwrap.dedent(f"""
        import os, sys
        os.setsid()
        fd = os.open(os.ttyname({follower}), os.O_RDWR)   # becomes the controlling terminal
        if {background!r}:
            pid = os.fork()
            if pid:
                os._exit(os.waitpid(pid, 0)[1] >> 8)
            os.setpgid(0, 0)                              # a job of its own: not in front
        os.dup2(fd, 2)
        if {stdout_too!r}:
            os.dup2(fd, 1)
        os.execv(sys.executable, [sys.executable, "-m", "kvgraph", "run", {str(graph)!r},
                                  "--status-interval", "0.2"])
    """)
    proc = subprocess.Popen([sys.executable, "-c", starter], pass_fds=(follower,), cwd=ROOT,
                            stdout=subprocess.DEVNULL, env={**os.environ, "TERM": "xterm"})
    os.close(follower)
    seen = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 30)
        if not ready:
            break
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: everyone exited
            break
        if not chunk:
            break
        seen += chunk
    proc.wait(timeout=30)
    os.close(leader)
    return seen.decode(errors="replace")


SCREEN = "Ctrl-C stops (drains), twice aborts"   # the live view's footer


@pytest.fixture
def quiet_graph(tmp_path: Path) -> Path:
    return (GraphFile("quiet").node("engines", "synthetic", rate=1000, duration_s=1.5)
            .node("out", "null").edge("engines", "out").write(tmp_path))


def test_the_live_screen_is_drawn_on_a_terminal_in_front(quiet_graph: Path) -> None:
    assert SCREEN in on_a_terminal(quiet_graph, background=False)


def test_a_background_job_logs_instead_of_drawing_over_the_shell(quiet_graph: Path) -> None:
    seen = on_a_terminal(quiet_graph, background=True)
    assert SCREEN not in seen and "status:" in seen and "done after" in seen


def test_a_stdout_sink_on_the_same_terminal_keeps_the_screen_off(tmp_path: Path) -> None:
    graph = (GraphFile("printing").node("engines", "synthetic", rate=1000, duration_s=1.5)
             .node("console", "stdout").edge("engines", "console").write(tmp_path))
    seen = on_a_terminal(graph, background=False)
    assert SCREEN not in seen and "stored" in seen


def test_ctrl_c_while_nodes_connect_is_handled_and_twice_abandons_the_start(
        tmp_path: Path) -> None:
    """A NATS server that accepts connections but never answers keeps the sink connecting;
    signals in that time are handled (no KeyboardInterrupt traceback): the first says the graph
    stops once started, the second abandons the start-up."""
    with Listening() as port:
        graph = (GraphFile("connecting").node("engines", "synthetic", rate=10)
                 .node("bus", "nats", url=f"nats://127.0.0.1:{port}", subject="s",
                       connect_timeout_s=30)
                 .edge("engines", "bus").write(tmp_path))
        proc = subprocess.Popen([sys.executable, "-m", "kvgraph", "run", str(graph),
                                 "--status", "off"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
        lines = LineReader(proc)
        try:
            lines.until("connecting to NATS")  # the nats sink's start-up, waiting for the server
            proc.send_signal(signal.SIGINT)
            lines.until("during start-up")
            proc.send_signal(signal.SIGINT)
            lines.until("ABORTED during start-up")
            assert proc.wait(timeout=30) == 1
        finally:
            if proc.poll() is None:
                proc.kill()


def _file_size_limit(limit: int):
    """For a child process: files larger than ``limit`` bytes cannot be written (EFBIG), as
    on a full disk, without filling one."""
    import resource

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # an error from write(), not a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_full_disk_ends_the_run_with_every_event_delivered_or_counted_lost(
        tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    graph = (GraphFile("full").node("engines", "synthetic", rate=0, max_events=20_000)
             .node("recording", "file", path=str(out)).edge("engines", "recording")
             .write(tmp_path))
    report = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "-m", "kvgraph", "run", str(graph), "--status",
                             "off", "--report", str(report)], capture_output=True, text=True,
                            timeout=60, cwd=ROOT, preexec_fn=_file_size_limit(200_000))
    assert result.returncode == 1, result.stderr
    assert "cannot write to" in result.stderr and "Traceback" not in result.stderr
    lines = out.read_text().splitlines()
    assert all(json.loads(line) for line in lines)      # no partial line at the end
    data = json.loads(report.read_text())
    produced = data["metrics"]["engines"]["events_out"]
    assert data["metrics"]["recording"]["events_out"] == len(lines)
    assert produced == len(lines) + data["lost_events"] and data["lost_events"] > 0


def test_a_file_that_refuses_every_write_fails_the_run_and_counts_the_loss(
        tmp_path: Path) -> None:
    graph = (GraphFile("refused").node("engines", "synthetic", rate=0, max_events=20_000)
             .node("recording", "file", path="/dev/full").edge("engines", "recording")
             .write(tmp_path))
    report = tmp_path / "report.json"
    result = run(graph, "--report", str(report))
    assert result.returncode == 1 and "cannot write to /dev/full" in result.stderr
    data = json.loads(report.read_text())
    assert not data["ok"] and data["metrics"]["recording"]["events_out"] == 0
    assert data["lost_events"] == data["metrics"]["engines"]["events_out"] > 0
