"""The README stays true: its generated parts match the tool, its commands match CI."""

from __future__ import annotations

from kvgraph import load
from kvgraph.catalog import markdown_catalog
from kvgraph.draw import to_mermaid

from .helpers import GRAPHS, ROOT

README = (ROOT / "README.md").read_text()


def test_embedded_diagram_is_the_tools_output() -> None:
    assert f"```mermaid\n{to_mermaid(load(GRAPHS / 'fanout.toml'))}```" in README


def test_catalog_table_is_current() -> None:
    assert markdown_catalog() in README


def test_ci_runs_the_readme_test_command() -> None:
    command = "python3 -m pip install -e '.[test]' && python3 -m pytest"
    assert command in README
    assert command in (ROOT / ".ci" / "run").read_text()
