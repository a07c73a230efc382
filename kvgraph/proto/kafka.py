"""Kafka connection options and clients, shared by the ``kafka`` source and sink (aiokafka).

Why aiokafka: measured here against the same broker (Tansu, 50k messages of 500 bytes, acks=all,
one producer in one asyncio loop), aiokafka produced 78k messages/s and confluent-kafka's
asyncio producer (2.16, ``confluent_kafka.aio``) 25k/s: the latter hands every call to a
thread. aiokafka is pure Python on asyncio, so its waits are the graph's own; the nodes send
messages of up to ``events_per_message`` events, so messages/s is rarely the limit anyway.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

from ..node import JsonSchema, Problem, integer, number, one_or_many, string
from .link import LINK_METRICS

_SERVER = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")

CONNECTION_OPTIONS: dict[str, JsonSchema] = {
    "bootstrap_servers": one_or_many("Brokers to start from, HOST:PORT, or a list of them. "
                                     "May use ${ENV}.", string("HOST:PORT", env=True),
                                     default="127.0.0.1:9092"),
    "client_id": string("Client id shown by the brokers.", "kvgraph"),
    "security_protocol": string("PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.", "PLAINTEXT",
                                enum=["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]),
    "sasl_mechanism": string("SASL mechanism.", enum=["PLAIN", "SCRAM-SHA-256",
                                                      "SCRAM-SHA-512"]),
    "sasl_username": string("SASL user. May use ${ENV}.", env=True),
    "sasl_password": string("SASL password. Use ${ENV}; never printed.", env=True,
                            secret=True),
    "tls_ca_file": string("CA bundle that signs the brokers' certificates.", env=True),
    "request_timeout_s": number("How long a request may wait for a broker.", 30.0,
                                exclusive_minimum=0),
    "reconnect_wait_s": number("First wait between attempts while the brokers are away "
                               "(doubles up to 5 s).", 0.2, exclusive_minimum=0),
    "connect_attempts": integer("Attempts to reach the brokers at start; past them the node "
                                "fails to start.", 10, minimum=1),
}

TOPIC_OPTIONS: dict[str, JsonSchema] = {
    "topic": string("The topic.", min_length=1, env=True),
    "create_topic": {"type": "boolean", "default": False,
                     "description": "Create the topic at start if it does not exist."},
    "partitions": integer("Partitions of a topic this node creates.", 1, minimum=1),
}

KAFKA_METRICS = dict(LINK_METRICS)

#: The record header that carries a message's idempotency id.
HEADER_ID = "kvgraph-id"


def servers(config: Mapping[str, Any]) -> list[str]:
    s = config["bootstrap_servers"]
    return [s] if isinstance(s, str) else list(s)


def check_connection(options: Mapping[str, Any]) -> Iterable[Problem]:
    for i, server in enumerate(servers(options)):
        if "${" in server:
            continue
        m = _SERVER.match(server)
        where = "bootstrap_servers" if isinstance(options["bootstrap_servers"], str) \
            else f"bootstrap_servers[{i}]"
        if not m:
            yield Problem("bootstrap_servers", f"{where} {server!r} is not HOST:PORT")
        elif not 0 < int(m.group(2)) < 65536:
            yield Problem("bootstrap_servers", f"{where}: port {m.group(2)} is out of range")
    if options["security_protocol"].startswith("SASL") and not options.get("sasl_mechanism"):
        yield Problem("sasl_mechanism", f"security_protocol {options['security_protocol']} "
                      "needs sasl_mechanism (and sasl_username, sasl_password)")


def aiokafka() -> Any:
    """The aiokafka module, or a NodeFailure that says how to install it."""
    try:
        import aiokafka as module
    except ImportError:
        from ..errors import NodeFailure

        raise NodeFailure("the kafka nodes need aiokafka: pip install 'kvgraph[kafka]'") \
            from None
    return module


def client_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """aiokafka keyword arguments common to producers, consumers and admin clients."""
    opts: dict[str, Any] = {"bootstrap_servers": servers(config),
                            "client_id": config["client_id"],
                            "security_protocol": config["security_protocol"],
                            "request_timeout_ms": int(config["request_timeout_s"] * 1000),
                            "retry_backoff_ms": int(config["reconnect_wait_s"] * 1000)}
    if "sasl_mechanism" in config:
        opts.update(sasl_mechanism=config["sasl_mechanism"],
                    sasl_plain_username=config.get("sasl_username"),
                    sasl_plain_password=config.get("sasl_password"))
    if config["security_protocol"].endswith("SSL"):
        from aiokafka.helpers import create_ssl_context

        opts["ssl_context"] = create_ssl_context(cafile=config.get("tls_ca_file"))
    return opts


async def start_client(node: Any, client: Any) -> None:
    """``await client.start()`` with ``connect_attempts`` tries; a NodeFailure naming the
    brokers otherwise."""
    from .link import first_contact

    await first_contact(node, client.start, f"Kafka at {', '.join(servers(node.config))}")


async def create_topic(node: Any, topic: str, partitions: int) -> bool:
    """Create ``topic`` unless it exists (True when it was created)."""
    aiokafka()
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(**client_options(node.config))
    await start_client(node, admin)
    try:
        if topic in await admin.list_topics():
            return False
        try:
            await admin.create_topics([NewTopic(topic, partitions, 1)])
        except TopicAlreadyExistsError:
            return False
        return True
    finally:
        await admin.close()


class KafkaEdge:
    """What the ``kafka`` source and sink declare alike: the servers' check, the topic in
    diagrams, and ``validate --connect`` (the brokers answer, the topic exists or will be
    created)."""

    @classmethod
    def check(cls, options: Mapping[str, Any], ctx: Any) -> Iterable[Problem]:
        return check_connection(options)

    @classmethod
    def outside(cls, config: Mapping[str, Any]) -> str:
        return f"topic {config['topic']}"

    @classmethod
    async def probe(cls, config: Mapping[str, Any]) -> list[Problem]:
        import asyncio

        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(**{**client_options(config), "request_timeout_ms": 3000})
        try:
            await asyncio.wait_for(admin.start(), 5.0)
            topics = await asyncio.wait_for(admin.list_topics(), 5.0)
        except Exception as exc:
            return [Problem("bootstrap_servers", f"cannot reach Kafka at "
                            f"{', '.join(servers(config))}: {type(exc).__name__}: {exc}")]
        finally:
            await admin.close()
        if config["topic"] not in topics and not config.get("create_topic"):
            return [Problem("topic", f"topic {config['topic']!r} does not exist",
                            hint="create it, or set create_topic = true")]
        return []
