"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    """Run the CLI in-process (fast); returns (exit code, stdout, stderr)."""
    from kvgraph.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
