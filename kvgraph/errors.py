"""The one exception tree of kvgraph.

    KvgraphError                  anything kvgraph raises on purpose
    ├── GraphError                a graph file is invalid; carries every Diagnostic found
    ├── NodeTypeError             a node type is declared wrongly, or registered twice
    ├── ConfigError               a value is unusable at run time (e.g. a missing env var)
    ├── NodeFailure               a running node cannot go on (a connection broken after retries)
    ├── ApiError                  a publish_* call got bad arguments (TypeError/ValueError too)
    ├── ReloadError               a new version of a running graph was not applied (it is
    │                             invalid, or a new node failed to start): what runs is as it was
    └── UsageError                the command line or API was called wrongly
        └── ListenError           an address to listen on is taken or unusable; nothing started

Every error says what was wrong, where, and what to do; a GraphError carries the full list of
diagnostics so that a caller can print them all, not just the first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from .diagnostics import Diagnostic


class KvgraphError(Exception):
    """Base of every error kvgraph raises on purpose."""


class GraphError(KvgraphError):
    """A graph file failed validation. ``diagnostics`` lists every problem, in file order."""

    def __init__(self, diagnostics: Sequence["Diagnostic"]):
        self.diagnostics = list(diagnostics)
        errors = [d for d in self.diagnostics if d.severity == "error"]
        lines = "\n".join(d.format() for d in errors[:20])
        more = f"\n... and {len(errors) - 20} more" if len(errors) > 20 else ""
        super().__init__(f"invalid graph ({len(errors)} error(s)):\n{lines}{more}")


class NodeTypeError(KvgraphError):
    """A node type declaration is broken: a programming error in a node module or plugin."""


class ConfigError(KvgraphError):
    """A configuration value cannot be used at run time, e.g. an unset environment variable."""


class NodeFailure(KvgraphError):
    """A running node cannot continue, e.g. its connection is broken after every retry.

    By default this stops the graph (``on_error = "fail"``); other exceptions raised while
    handling a batch only reject that batch (``on_error = "skip"``).
    """


class ApiError(KvgraphError, ValueError):
    """A ``publish_*`` call of the ``api`` source got arguments that describe no valid event."""


class ReloadError(KvgraphError):
    """A reload (``reconfigure``, SIGHUP, ``--watch``, ``POST /graph``) changed nothing: the new
    graph is invalid (``outcome.diagnostics`` has every problem, with its line), a node it adds
    or changes failed to start, or a node it replaces cannot hand over now. The running graph
    goes on as it was. ``outcome`` is the :class:`kvgraph.reload.Outcome`."""

    def __init__(self, message: str, outcome: object):
        super().__init__(message)
        self.outcome = outcome


class UsageError(KvgraphError):
    """A command or API call was used wrongly (bad arguments, missing file)."""


class ListenError(UsageError):
    """An address kvgraph must listen on (``--metrics-port``, an index's port, a ``bind``
    endpoint) is taken or cannot be used. Raised before any source starts, so nothing was
    read or sent; ``kvgraph run`` exits with 2, as for any other usage error."""


def listen_error(what: str, exc: BaseException) -> ListenError | None:
    """A ListenError for ``exc`` if it is a failure to listen (socket or ZMQ), else None."""
    import errno

    codes = {errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES}
    code = getattr(exc, "errno", None)
    if code not in codes:
        return None
    why = getattr(exc, "strerror", None) or str(exc)
    return ListenError(f"{what}: cannot listen: {why}; choose another address or port "
                       "(0 picks a free port where the option allows it), or stop what uses it")
