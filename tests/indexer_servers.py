"""The two indexer servers the API tests compare, each started as a user starts it, on a free
port: Dynamo 1.6.1's (``python -m dynamo.indexer``, from the ``ai-dynamo-runtime`` wheel) and
kvgraph's (``kvgraph run`` on a graph that holds only an ``index`` node)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kvgraph.testing import free_port, terminate

from .helpers import ROOT, GraphFile
from .indexer_client import IndexerClient

HAVE_DYNAMO = importlib.util.find_spec("dynamo") is not None and \
    importlib.util.find_spec("dynamo.indexer") is not None
NO_DYNAMO = "Dynamo's indexer needs the ai-dynamo-runtime==1.6.1 wheel (pip install -e '.[test]')"


class Server:
    def __init__(self, kind: str, proc: subprocess.Popen[bytes], port: int, log: Path):
        self.kind, self.proc, self.port, self.log = kind, proc, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.client = IndexerClient(self.url)

    def close(self) -> None:
        self.client.close()
        terminate(self.proc)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start(kind: str, tmp: Path, **options: Any) -> Server:
    """``kind`` "dynamo" or "kvgraph"; ``options``: the index node's (kvgraph) or the CLI
    flags (dynamo: ``peers``)."""
    port = free_port()
    log = tmp / f"{kind}-{port}.log"
    env = {**os.environ, "NO_COLOR": "1"}
    if kind == "dynamo":
        if not HAVE_DYNAMO:
            pytest.skip(NO_DYNAMO)
        cmd = [sys.executable, "-m", "dynamo.indexer", "--port", str(port)]
        if options.get("peers"):
            cmd += ["--peers", ",".join(options["peers"])]
    else:
        graph = GraphFile("indexer").node("index", "index", host="127.0.0.1", port=port,
                                          **options).write(tmp, f"indexer-{port}.toml")
        cmd = [sys.executable, "-m", "kvgraph", "run", str(graph), "--status", "off"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    server = Server(kind, proc, port, log)
    try:
        server.client.wait_healthy()
    except AssertionError:
        server.close()
        raise AssertionError(f"{kind} indexer did not start:\n{server.output()}") from None
    return server
