"""``${NAME}`` interpolation of options marked ``x-env`` (credentials, URLs).

Rules, chosen so that a secret can neither leak nor smuggle structure into a config:

* Only options whose schema carries ``x-env`` are interpolated; ``${`` anywhere else is an error,
  so that a typo never silently sends the literal text ``${NATS_TOKEN}`` as a password.
* ``$${`` stands for a literal ``${``.
* A value containing a newline, before or after interpolation, is rejected: header-injection and
  multi-line credential accidents are both caught.
* An unset variable is an error at run time; ``validate`` only warns, since it often runs where
  the secrets are not (CI, a laptop).
"""

from __future__ import annotations

import re
from typing import Mapping

from .errors import ConfigError

_REF = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def references(value: str) -> list[str]:
    """Names referenced by ``value``. Raises ConfigError on malformed references."""
    names = []
    for m in _REF.finditer(value):
        token = m.group(0)
        if token == "$${":
            continue
        if m.group(1) is None:
            raise ConfigError("unterminated '${': write ${NAME}, or $${ for a literal '${'")
        if not _NAME.match(m.group(1)):
            raise ConfigError(f"'${{{m.group(1)}}}' is not a valid variable name; "
                              "use letters, digits and '_'")
        names.append(m.group(1))
    return names


def has_reference(value: str) -> bool:
    return "${" in value.replace("$${", "")


def interpolate(value: str, environ: Mapping[str, str]) -> str:
    """Replace every ``${NAME}`` from ``environ``. Raises ConfigError naming what is missing."""
    references(value)  # syntax first

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$${":
            return "${"
        name = m.group(1)
        if name not in environ:
            raise ConfigError(f"environment variable {name} is not set")
        return environ[name]

    result = _REF.sub(sub, value)
    if "\n" in result or "\r" in result:
        raise ConfigError("the value contains a newline after interpolation; refusing it")
    return result
