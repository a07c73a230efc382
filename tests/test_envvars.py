"""${NAME} interpolation: only where allowed, never with newlines, $${ escapes."""

from __future__ import annotations

import pytest

from kvgraph.envvars import interpolate, references
from kvgraph.errors import ConfigError


def test_interpolate() -> None:
    env = {"USER_A": "alice", "TOKEN": "s3cret"}
    assert interpolate("nats://${USER_A}:${TOKEN}@h:4222", env) == "nats://alice:s3cret@h:4222"
    assert interpolate("literal $${NOT_A_VAR}", env) == "literal ${NOT_A_VAR}"
    assert references("${A}-${B}-$${C}") == ["A", "B"]


@pytest.mark.parametrize("value,env,match", [
    ("${MISSING}", {}, "MISSING is not set"),
    ("${A", {}, "unterminated"),
    ("${1A}", {}, "not a valid variable name"),
    ("${A}", {"A": "x\ny"}, "newline"),
])
def test_interpolate_refuses(value: str, env: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        interpolate(value, env)
