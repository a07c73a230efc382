"""validate: every diagnostic, with its line, from fixture graphs annotated with expectations.

A bad fixture marks each expected diagnostic on the line it must be reported at:
``# expect-error: PATH: TEXT`` (or ``expect-warning``; several may share a line) means a diagnostic of that severity, at
that line, for that document path, whose message or hint contains TEXT. Nothing else may be
reported: a diagnostic the file does not expect fails the test too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kvgraph import validate_file, validate_text
from kvgraph.validate import dotted

from .helpers import GRAPHS, TEST_GRAPHS, kvgraph

_EXPECT = re.compile(r"#\s*expect-(error|warning):\s*([^:]*):\s*(.+?)(?=\s*#\s*expect-|\s*$)")
ENV = {"KVGRAPH_TEST_PASSWORD": "hunter2", "KVGRAPH_TEST_NEWLINE": "a\nb", "HOME": "/root"}


def expectations(path: Path) -> list[tuple[int, str, str, str]]:
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        for m in _EXPECT.finditer(line):
            out.append((n, m.group(1), m.group(2).strip(), m.group(3)))
    return out


BAD = sorted((TEST_GRAPHS / "bad").glob("*.toml"))
GOOD = sorted((TEST_GRAPHS / "good").glob("*.toml")) + sorted(GRAPHS.glob("*.toml"))


def assert_diagnostics_as_announced(path: Path, result) -> None:
    """Every diagnostic of ``path`` is one its ``# expect-...`` comments announce, and each
    announced one comes."""
    expected = expectations(path)
    got = [(d.line, d.severity, d.path, f"{d.message} {d.hint}") for d in result.diagnostics]
    unmatched = list(got)
    for line, sev, dpath, text in expected:
        hits = [g for g in unmatched if g[0] == line and g[1] == sev and g[2] == dpath
                and text in g[3]]
        assert hits, f"{path.name}:{line}: expected {sev} {dpath}: {text!r}; got:\n" + \
            "\n".join(map(str, got))
        unmatched.remove(hits[0])
    assert not unmatched, f"unexpected diagnostics in {path.name}: {unmatched}"


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_bad_graph_reports_every_expected_diagnostic(path: Path) -> None:
    result = validate_file(path, environ=ENV)
    assert (result.graph is None) == any(sev == "error" for _, sev, _, _ in
                                         expectations(path))
    assert_diagnostics_as_announced(path, result)


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.stem)
def test_good_graph_is_valid_and_warns_only_as_it_announces(path: Path) -> None:
    """Examples are valid; a warning is there only where the file announces it (an example
    may show a limit its users will meet, such as a sink that cannot confirm)."""
    result = validate_file(path, environ=ENV)
    assert result.ok, [d.format() for d in result.diagnostics]
    assert_diagnostics_as_announced(path, result)
    assert result.graph is not None and result.graph.nodes


def test_toml_syntax_error_has_line_and_column() -> None:
    result = validate_file(TEST_GRAPHS / "bad" / "syntax.toml")
    (d,) = result.diagnostics
    assert (d.line, d.column) == (5, 8)
    assert d.format().startswith(f"{TEST_GRAPHS / 'bad' / 'syntax.toml'}:5:8: error: TOML syntax")


def test_inferred_kinds() -> None:
    g = validate_file(TEST_GRAPHS / "good" / "inferred_kinds.toml").graph
    assert g is not None
    assert {n.id: n.kind.value for n in g.nodes.values()} == \
        {"in": "source", "out": "sink", "errs": "sink"}


def test_secret_values_never_appear_in_diagnostics() -> None:
    text = """
[graph]
name = "s"
[nodes.a]
type = "api"
[nodes.b]
type = "nats"
subject = "x"
user = "u"
password = ["hunter2-secret"]
token = "hunter2-secret"
[[edges]]
from = "a"
to = "b"
"""
    result = validate_text(text)
    assert result.errors
    rendered = json.dumps([d.to_dict() for d in result.diagnostics])
    assert "hunter2" not in rendered


def test_missing_file_and_binary_file(tmp_path: Path) -> None:
    assert "cannot read file" in validate_file(tmp_path / "nope.toml").diagnostics[0].message
    bad = tmp_path / "bin.toml"
    bad.write_bytes(b"[graph]\nname = \"\xff\"\n")
    (d,) = validate_file(bad).diagnostics
    assert d.line == 2 and "UTF-8" in d.message


@pytest.mark.parametrize("text", [
    "a = " + "[" * 5000 + "]" * 5000,            # deep nesting
    "[graph]\nname = \"" + "x" * 2_000_000 + "\"",  # a huge string
    "[graph]\nname = \"a\x00b\"",                  # NUL byte
    "[nodes.\u00e9ngine]\ntype = \"null\"",        # a unicode id
    "[graph]\nname = \"${HOME}\"",                 # env reference where none is allowed
    "",
])
def test_hostile_text_gets_diagnostics_not_tracebacks(text: str) -> None:
    result = validate_text(text)
    assert result.errors
    for d in result.errors:
        assert len(d.format()) < 5000


def test_large_graph_validates() -> None:
    lines = ['[graph]\nname = "big"\n[nodes.src]\ntype = "synthetic"\n']
    for i in range(998):
        lines.append(f'[nodes.f{i}]\ntype = "filter"\nkinds = ["stored"]\n')
    lines.append('[nodes.sink]\ntype = "null"\n')
    prev = "src"
    for i in range(998):
        lines.append(f'[[edges]]\nfrom = "{prev}"\nto = "f{i}"\n')
        prev = f"f{i}"
    lines.append(f'[[edges]]\nfrom = "{prev}"\nto = "sink"\n')
    result = validate_text("".join(lines))
    assert result.ok and len(result.graph.nodes) == 1000


def test_dotted_paths() -> None:
    assert dotted(("nodes", "a", "url", 1)) == "nodes.a.url[1]"
    assert dotted(("edges", 3, "from")) == "edges[3].from"


# -- the command line ---------------------------------------------------------------------------

def test_exit_codes_as_a_process() -> None:
    assert kvgraph("validate", "graphs/demo.toml").returncode == 0
    bad = kvgraph("validate", "tests/graphs/bad/cycle.toml")
    assert bad.returncode == 1
    assert "tests/graphs/bad/cycle.toml:27: error: edges[3]: cycle: a -> b -> c -> a" in bad.stdout
    assert kvgraph("validate").returncode == 2
    assert kvgraph("validate", "--format", "yaml", "graphs/demo.toml").returncode == 2
    assert kvgraph("frobnicate").returncode == 2


def test_validate_many_files_reports_each(cli) -> None:
    code, out, _ = cli("validate", str(GRAPHS / "demo.toml"),
                       str(TEST_GRAPHS / "bad" / "edges.toml"))
    assert code == 1
    assert "demo.toml: valid" in out and "edges.toml: invalid: 7 error(s)" in out


def test_strict_turns_warnings_into_errors(cli) -> None:
    path = str(TEST_GRAPHS / "bad" / "warnings.toml")
    assert cli("validate", path)[0] == 0
    code, out, _ = cli("validate", "--strict", path)
    assert code == 1 and "warnings are errors with --strict" in out


def test_json_format(cli) -> None:
    code, out, _ = cli("validate", "--format", "json", str(TEST_GRAPHS / "bad" / "cycle.toml"))
    data = json.loads(out)
    assert code == 1 and data["valid"] is False and data["errors"] == 2
    d = data["diagnostics"][0]
    assert set(d) == {"file", "line", "column", "severity", "path", "message", "hint"}


def test_colour_only_on_a_terminal(cli) -> None:
    _, out, _ = cli("validate", str(TEST_GRAPHS / "bad" / "cycle.toml"))
    assert "\x1b[" not in out


def test_worker_plan_shares_out_sources_and_copies_the_rest() -> None:
    from kvgraph.graph import shard, worker_plan
    from kvgraph.validate import validate_file

    from .helpers import GRAPHS

    g = validate_file(str(GRAPHS / "fleet-to-dynamo.toml")).graph
    assert g is not None
    plan = worker_plan(g, 2)
    assert plan == [["engine0", "engine2"], ["engine1", "engine3"]]
    part = shard(g, plan[1])
    assert set(part.nodes) == {"engine1", "engine3", "gpu_main", "dedup", "router"}
    assert {(e.src, e.dst) for e in part.edges} == {
        ("engine1", "gpu_main"), ("engine3", "gpu_main"), ("gpu_main", "dedup"),
        ("dedup", "router")}
