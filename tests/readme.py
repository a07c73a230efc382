"""Run the README's commands as a reader would, so that no walkthrough can rot.

Every ``sh`` and ``python`` block of README.md carries a marker on the line before it:

    <!-- test: SCENARIO [step=NAME] [background] [ready="TEXT"] [exit=N] -->
    <!-- test: SCENARIO output[=STEP] -->      the next block is what STEP printed
    <!-- test: ci -->                          .ci/run runs this block verbatim
    <!-- test: skip="WHY" -->                  not run, and the README says why

A scenario's blocks run in README order, each in its own process (a terminal of its own, as the
README tells the reader): a ``background`` step is started and kept running (once its output
shows ``ready``), a foreground step must end with ``exit`` (0 by default), and at the end the
background steps get Ctrl-C (SIGINT) in reverse order and must exit 0 (or by that SIGINT).
An ``output`` block must appear in the step's output: ``...`` alone on a line stands for any
lines, and inside a line for any text; a background step's output is polled until it matches.

Blocks run in a sandbox: a temp directory with copies of ``graphs/`` and ``tests/graphs/``, and
the README's well-known ports (NATS 4222, the engines', the index's) replaced everywhere by free
ones, so that a test never touches a server the machine already runs. ``curl`` lines are sent by
this module's own HTTP client (the test needs no curl binary); everything else runs in bash,
with this Python's ``bin`` first on PATH (``python3``, ``kvgraph``, ``nats-server``).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from kvgraph.testing import free_port

from .helpers import ROOT

README = ROOT / "README.md"
#: Ports the README and the example graphs use; each test gets free ones instead.
WELL_KNOWN_PORTS = (4222, 5557, 5558, 5600, 8090, 8091, 9464, 5507, 5508, 5517, 5518, 5527,
                    5528, 5537, 5538, 6379, 9092)
_MARKER = re.compile(r"^<!-- test: (.*?) -->$")
_FENCE = re.compile(r"^```(\w*)\s*$")
COMMAND_LANGS = ("sh", "python")


@dataclass
class Block:
    lang: str
    text: str
    line: int                          # of the block's first line in README.md
    marker: dict[str, str] = field(default_factory=dict)

    @property
    def scenario(self) -> str:
        return self.marker.get("", "")

    def where(self) -> str:
        return f"README.md:{self.line}"


def _parse_marker(text: str) -> dict[str, str]:
    words = shlex.split(text)
    out: dict[str, str] = {}
    for i, w in enumerate(words):
        key, eq, value = w.partition("=")
        if i == 0 and not eq and key not in ("skip",):
            out[""] = key
        else:
            out[key] = value if eq else "yes"
    return out


def blocks(path: Path = README) -> list[Block]:
    """Every fenced block, with the marker that precedes it (if any)."""
    lines = path.read_text().splitlines()
    out: list[Block] = []
    marker: dict[str, str] | None = None
    i = 0
    while i < len(lines):
        m = _MARKER.match(lines[i].strip())
        if m:
            marker = _parse_marker(m.group(1))
            i += 1
            continue
        f = _FENCE.match(lines[i])
        if f:
            start = i + 1
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                i += 1
            out.append(Block(f.group(1), "\n".join(lines[start:i]) + "\n", start + 1,
                             marker or {}))
            marker = None
        elif lines[i].strip():
            marker = None  # a marker applies only to the block right after it
        i += 1
    return out


def scenarios(path: Path = README) -> dict[str, list[Block]]:
    found: dict[str, list[Block]] = {}
    for b in blocks(path):
        if b.scenario and b.scenario != "ci":
            found.setdefault(b.scenario, []).append(b)
    return found


# -- matching printed output ---------------------------------------------------------------------

def pattern(expected: str) -> re.Pattern[str]:
    """``expected`` as a regex: ``...`` alone on a line = any lines, in a line = any text."""
    parts = []
    for line in expected.strip("\n").splitlines():
        if line.strip() == "...":
            parts.append(r"(?:[^\n]*\n)*?")
        else:
            body = ".*?".join(re.escape(p) for p in line.rstrip().split("..."))
            parts.append(f"^{body}[ \\t]*\n")
    return re.compile("".join(parts), re.M)


def contains(text: str, output: str) -> bool:
    """``text`` appears in ``output``, where ``...`` in ``text`` stands for any text."""
    return bool(re.search(".*?".join(re.escape(p) for p in text.split("...")), output))


def matches(expected: str, output: str) -> bool:
    text = output.replace("\r\n", "\n")
    return bool(pattern(expected).search(text if text.endswith("\n") else text + "\n"))


# -- the sandbox and its processes ---------------------------------------------------------------

class Sandbox:
    """A reader's working copy with free ports, and the processes a scenario started."""

    def __init__(self, tmp: Path):
        self.dir = tmp
        self.ports = {p: free_port() for p in WELL_KNOWN_PORTS}
        for sub in ("graphs", "tests/graphs"):
            shutil.copytree(ROOT / sub, tmp / sub)
        for f in tmp.rglob("*.toml"):
            f.write_text(self.localize(f.read_text()))
        bindir = str(Path(sys.executable).parent)
        self.env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
                    "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"}
        self.background: list[tuple[Block, subprocess.Popen[bytes], Path]] = []
        self.outputs: dict[str, Path] = {}
        self.queries: dict[Path, list[str]] = {}   # curl steps: their commands, to ask again
        self._n = 0

    def localize(self, text: str) -> str:
        for old, new in self.ports.items():
            text = re.sub(rf"(?<![0-9]){old}(?![0-9])", str(new), text)
        return text

    def _output_of(self, block: Block) -> Path:
        """A new step: the file its output goes to, under its name and as the latest."""
        self._n += 1
        log = self.dir / f"step{self._n}.out"
        self.outputs[block.marker.get("step") or f"step{self._n}"] = self.outputs["_last"] = log
        return log

    def _spawn(self, block: Block) -> tuple[subprocess.Popen[bytes], Path]:
        log = self._output_of(block)
        text = self.localize(block.text)
        if block.lang == "python":
            script = self.dir / f"step{self._n}.py"
            script.write_text(text)
            cmd = [sys.executable, str(script)]
        else:
            cmd = ["bash", "-c", "set -e\n" + text]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, cwd=self.dir, env=self.env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        return proc, log

    def run(self, block: Block) -> None:
        if block.lang == "sh" and _only_curl(block.text):
            log = self._output_of(block)
            self.queries[log] = _commands(self.localize(block.text))
            self._query(log)
            return
        proc, log = self._spawn(block)
        if "background" in block.marker:
            self.background.append((block, proc, log))
            ready = block.marker.get("ready")
            if ready:
                self.wait_output(log, lambda out: contains(self.localize(ready), out),
                                 f"{block.where()}: {ready!r} never appeared", proc)
            return
        try:
            code = proc.wait(timeout=float(block.marker.get("timeout", 120)))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"{block.where()}: still running after its timeout; output:\n"
                                 + log.read_text(errors="replace")) from None
        want = int(block.marker.get("exit", 0))
        assert code == want, (f"{block.where()}: exit {code}, expected {want}; output:\n"
                              + log.read_text(errors="replace"))

    def _query(self, log: Path) -> None:
        log.write_text("".join(http(cmd) + "\n" for cmd in self.queries[log]))

    def expect(self, block: Block) -> None:
        step = block.marker.get("output")
        log = self.outputs["_last" if step in (None, "yes") else step]
        expected = self.localize(block.text)
        message = f"{block.where()}: the output shown in the README did not appear"
        if log in self.queries:  # a reader asks again until the answer settles
            deadline = time.monotonic() + 60
            while not matches(expected, log.read_text()) and time.monotonic() < deadline:
                time.sleep(0.2)
                self._query(log)
            self.wait_output(log, lambda out: matches(expected, out), message, None, expected)
            return
        proc = next((p for b, p, lg in self.background if lg == log), None)
        self.wait_output(log, lambda out: matches(expected, out), message, proc, expected)

    @staticmethod
    def wait_output(log: Path, ok, message: str,
                    proc: subprocess.Popen[bytes] | None = None, expected: str = "",
                    timeout: float = 60) -> None:
        """Until ``ok(output)``. A finished step's output is final: it is checked once; a
        running one's is polled, up to ``timeout`` s or until the step exits."""
        deadline = time.monotonic() + timeout
        while True:
            finished = proc is None or proc.poll() is not None
            out = log.read_text(errors="replace")
            if ok(out):
                return
            if finished or time.monotonic() > deadline:
                state = "" if proc is None else (f" (the step exited with {proc.returncode})"
                                                  if proc.poll() is not None else
                                                  f" (within {timeout:.0f} s)")
                raise AssertionError(f"{message}{state}\nexpected:\n{expected}\noutput:\n{out}")
            time.sleep(0.05)

    def close(self) -> list[str]:
        """Ctrl-C each background step, newest first; returns the problems found."""
        problems = []
        for block, proc, log in reversed(self.background):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
            try:
                code = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                problems.append(f"{block.where()}: did not stop within 30 s of Ctrl-C")
                continue
            if code not in (0, -signal.SIGINT, 128 + signal.SIGINT):
                problems.append(f"{block.where()}: exit {code} after Ctrl-C; output:\n"
                                + log.read_text(errors="replace")[-3000:])
        self.background.clear()
        return problems


def _commands(text: str) -> list[str]:
    """A block's commands, as a shell reads them: comment lines dropped, a line ending in a
    backslash or inside an open quote continued on the next."""
    out, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        try:
            shlex.split(current, comments=True)
        except ValueError:  # an open quote: the command goes on
            current += "\n"
            continue
        out.append(current)
        current = ""
    return out


def _only_curl(text: str) -> bool:
    cmds = _commands(text)
    return bool(cmds) and all(shlex.split(c, comments=True)[0] == "curl" for c in cmds)


def http(command: str) -> str:
    """Perform a ``curl [-s] [-X M] [-H H] [-d DATA] URL`` line; returns the body, as curl would
    print it."""
    args = shlex.split(command, comments=True)[1:]
    data, method, headers, url = None, None, {}, None
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-s", "--silent", "-S", "-sS"):
            pass
        elif a in ("-d", "--data"):
            i += 1
            data = args[i].encode()
            headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
        elif a in ("-X", "--request"):
            i += 1
            method = args[i]
        elif a in ("-H", "--header"):
            i += 1
            name, _, value = args[i].partition(":")
            headers[name.strip()] = value.strip()
        elif a.startswith("-"):
            raise AssertionError(f"curl option {a} is not understood by the README runner")
        else:
            url = a if "://" in a else "http://" + a
        i += 1
    assert url, f"no URL in {command!r}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.read().decode()
    except urllib.error.HTTPError as exc:  # curl without -f prints error bodies too
        return exc.read().decode()
