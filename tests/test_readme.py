"""The README stays true: its generated parts match the tool, CI runs its set-up block, and every
other command in it runs as written, against real processes (see tests/readme.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvgraph import load
from kvgraph.catalog import markdown_catalog
from kvgraph.draw import to_mermaid

from . import readme
from .helpers import GRAPHS, ROOT

README = (ROOT / "README.md").read_text()
KNOWN_KEYS = {"", "step", "background", "ready", "exit", "output", "timeout", "skip"}


def test_embedded_diagram_is_the_tools_output() -> None:
    assert f"```mermaid\n{to_mermaid(load(GRAPHS / 'fanout.toml'))}```" in README


def test_catalog_table_is_current() -> None:
    assert markdown_catalog() in README


def test_every_command_block_is_run_by_a_test_or_says_why_not() -> None:
    unmarked, unknown = [], []
    for b in readme.blocks():
        if b.lang in readme.COMMAND_LANGS and not b.marker:
            unmarked.append(b.where())
        if set(b.marker) - KNOWN_KEYS:
            unknown.append(f"{b.where()}: {sorted(set(b.marker) - KNOWN_KEYS)}")
        if "skip" in b.marker:
            assert len(b.marker["skip"]) > 10, f"{b.where()}: say why it is not run"
    assert not unmarked, "README blocks with no <!-- test: ... --> marker: " + ", ".join(unmarked)
    assert not unknown, unknown


def test_ci_runs_the_readme_set_up_block() -> None:
    (block,) = [b for b in readme.blocks() if b.scenario == "ci"]
    assert "python3 -m venv .venv && . .venv/bin/activate" in block.text.splitlines()[0]
    assert "python3 -m pip install -e '.[test]' && python3 -m pytest" in block.text
    ci = (ROOT / ".ci" / "run").read_text()
    assert "<!-- test: ci -->" in ci  # .ci/run extracts that block and runs it


@pytest.mark.parametrize("name", sorted(readme.scenarios()))
def test_readme_walkthrough_works_as_written(name: str, tmp_path: Path) -> None:
    sandbox = readme.Sandbox(tmp_path)
    try:
        for block in readme.scenarios()[name]:
            if "output" in block.marker:
                sandbox.expect(block)
            else:
                sandbox.run(block)
    finally:
        problems = sandbox.close()
    assert not problems, "\n".join(problems)


def test_the_repository_refers_to_nothing_outside_itself() -> None:
    """A plain clone passes its own tests: no file reads (or tells the reader to look at) a
    folder beside the checkout, such as the ``shared/`` this project was developed next to."""
    import re
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    outside = re.compile(r"\.\./shared|ROOT\.parent\b|shared/(specs|fixtures)")
    found = [f"{name}:{n}" for name in files if not name.startswith("tests/fixtures/")
             for n, line in enumerate((ROOT / name).read_text(errors="replace").splitlines(), 1)
             if outside.search(line) and name != "tests/test_readme.py"]
    assert not found, found
