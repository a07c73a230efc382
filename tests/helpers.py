"""Helpers shared by the tests: paths and running the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
GRAPHS = ROOT / "graphs"
TEST_GRAPHS = Path(__file__).resolve().parent / "graphs"


def kvgraph(*args: str, env: dict[str, str] | None = None, timeout: float = 60
            ) -> subprocess.CompletedProcess[str]:
    """Run the real CLI as a user would, in a fresh process."""
    return subprocess.run([sys.executable, "-m", "kvgraph", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "NO_COLOR": "1", **(env or {})})
