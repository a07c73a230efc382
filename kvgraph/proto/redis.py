"""Redis connection options, the client, and what counts as "Redis is away", shared by the
``redis`` source and sink (Redis Streams, through redis-py's ``redis.asyncio``).

Stream commands are read as Redis sends them: the client's reply parsers for XREADGROUP,
XAUTOCLAIM, XPENDING and XCLAIM are taken off, and :mod:`kvgraph.sources.redis` reads the
replies itself, because their shape depends on the server (XAUTOCLAIM answers 2 elements on
Redis 6.2, 3 on 7.x; a deleted entry is ``nil`` on 6.2 and missing on 7.x) and redis-py's
parsers assume one of them.
"""

from __future__ import annotations

import re
from typing import Any, Awaitable, Callable, Iterable, Mapping, TypeVar

from ..node import JsonSchema, Problem, integer, number, string
from .link import LINK_METRICS

T = TypeVar("T")

_URL = re.compile(r"^(redis|rediss)://(?:[^@/\s]*@)?(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+)"
                  r"(?::(\d{1,5}))?(?:/(\d+))?/?(?:\?.*)?$|^unix://\S+$")

CONNECTION_OPTIONS: dict[str, JsonSchema] = {
    "url": string("Redis URL: redis://HOST[:PORT][/DB], rediss:// for TLS, or unix://PATH. "
                  "May use ${ENV}.", "redis://127.0.0.1:6379/0", env=True, min_length=1),
    "username": string("ACL user name. May use ${ENV}.", env=True),
    "password": string("Password. Use ${ENV}; never printed.", env=True, secret=True),
    "connect_timeout_s": number("Timeout of one connection attempt, and of one command.", 5.0,
                                exclusive_minimum=0),
    "reconnect_wait_s": number("First wait between attempts while Redis is away (doubles up "
                               "to 5 s).", 0.2, exclusive_minimum=0),
    "connect_attempts": integer("Attempts to reach Redis at start; past them the node fails "
                                "to start.", 10, minimum=1),
}

REDIS_METRICS = dict(LINK_METRICS)

#: Replies read raw (see the module's docstring).
_RAW_REPLIES = ("XREADGROUP", "XAUTOCLAIM", "XPENDING", "XCLAIM", "XINFO")

#: Error replies that mean "not now" rather than "never": Redis loading its data, out of
#: memory, a replica being promoted...
_TRANSIENT = ("LOADING", "OOM", "BUSY", "MASTERDOWN", "READONLY", "TRYAGAIN", "CLUSTERDOWN")


def check_connection(options: Mapping[str, Any]) -> Iterable[Problem]:
    url = options["url"]
    if "${" not in url:
        m = _URL.match(url)
        if not m:
            yield Problem("url", f"{redact_url(url)!r} is not a Redis URL",
                          hint="redis://HOST[:PORT][/DB], rediss://... or unix://PATH")
        elif m.group(3) and not 0 < int(m.group(3)) < 65536:
            yield Problem("url", f"port {m.group(3)} is out of range 1-65535")


def redact_url(url: str) -> str:
    return re.sub(r"//[^@/]*@", "//***@", url)


def transient(exc: BaseException) -> bool:
    """True when ``exc`` means Redis is away or busy (retry), False for a real error."""
    from redis import exceptions as rx

    if isinstance(exc, (rx.ConnectionError, rx.TimeoutError, OSError)):
        return True
    return isinstance(exc, rx.ResponseError) and str(exc).split(" ", 1)[0] in _TRANSIENT


def client(config: Mapping[str, Any]) -> Any:
    """A redis.asyncio client for the node's options (it connects on first use)."""
    try:
        import redis.asyncio as redis
    except ImportError:
        from ..errors import NodeFailure

        raise NodeFailure("the redis nodes need redis-py: pip install 'kvgraph[redis]'") \
            from None
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    # No retries inside the client: a command retried there could be applied twice without
    # anyone counting it. The nodes retry themselves (``retrying``) and count resends.
    kwargs: dict[str, Any] = {"socket_connect_timeout": config["connect_timeout_s"],
                              "socket_timeout": config["connect_timeout_s"] + 1.0,
                              "retry": Retry(NoBackoff(), 0),
                              "health_check_interval": 15}
    if "username" in config:
        kwargs["username"] = config["username"]
    if "password" in config:
        kwargs["password"] = config["password"]
    c = redis.Redis.from_url(config["url"], **kwargs)
    for name in _RAW_REPLIES:
        c.response_callbacks.pop(name, None)
    return c


async def connect(node: Any) -> Any:
    """The node's client, once Redis answered a PING (``connect_attempts`` tries); a
    NodeFailure naming the server otherwise."""
    from .link import first_contact

    c = node.config
    r = client(c)
    try:
        await first_contact(node, r.ping, f"Redis at {redact_url(c['url'])}", transient)
    except BaseException:
        await r.aclose()
        raise
    return r


async def retrying(link: Any, call: Callable[[], Awaitable[T]],
                   give_up: Callable[[], bool] = lambda: False) -> T | None:
    """``await call()`` until Redis answers (waits through an outage, with backoff, counted
    on ``link``); None if ``give_up()`` became true first. An error that is not an outage
    (a wrong key type, a refused command) is a NodeFailure."""
    import asyncio

    from ..errors import NodeFailure

    while True:
        try:
            result = await call()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not transient(exc):
                raise NodeFailure(f"Redis refused: {type(exc).__name__}: {exc}") from exc
            link.down(exc)
            if give_up():
                return None
            await asyncio.sleep(link.backoff())
            continue
        link.ok()
        return result


class RedisEdge:
    """What the ``redis`` source and sink declare alike: the URL check, the stream in
    diagrams, and ``validate --connect`` (Redis answers, is recent enough, and the key is a
    stream)."""

    @classmethod
    def check(cls, options: Mapping[str, Any], ctx: Any) -> Iterable[Problem]:
        return check_connection(options)

    @classmethod
    def outside(cls, config: Mapping[str, Any]) -> str:
        return f"stream {config['stream']}"

    #: The oldest server the type can use: streams came in 5.0, XAUTOCLAIM in 6.2.
    min_version: tuple[int, int] = (5, 0)

    @classmethod
    async def probe(cls, config: Mapping[str, Any]) -> list[Problem]:
        import asyncio

        r = client({**config, "connect_timeout_s": min(config["connect_timeout_s"], 2.0)})
        try:
            info = await asyncio.wait_for(r.info("server"), 3.0)
            version = tuple(int(x) for x in str(info["redis_version"]).split(".")[:2])
            problems = []
            if version < cls.min_version:
                problems.append(Problem("url", f"Redis {info['redis_version']} is too old: "
                                        f"this node needs {'.'.join(map(str, cls.min_version))}"
                                        " or later"))
            kind = await r.type(config["stream"])
            if kind not in (b"none", b"stream", "none", "stream"):
                problems.append(Problem("stream", f"key {config['stream']!r} holds a "
                                        f"{kind.decode() if isinstance(kind, bytes) else kind},"
                                        " not a stream", hint="choose another key"))
            return problems
        except Exception as exc:
            return [Problem("url", f"cannot reach Redis at {redact_url(config['url'])}: "
                            f"{type(exc).__name__}: {exc}")]
        finally:
            await r.aclose()
